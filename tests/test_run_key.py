"""The run key (no TensorFlow): fresh from OS entropy by default, derived only on request, kept in a 0600
file that round-trips, and every missing or damaged file a clear RunDirError that shows no key material."""

from __future__ import annotations

import numpy as np
import pytest

from dpsgd_cli.errors import RunDirError
from dpsgd_cli.privacy.run_key import (
    KEY_FILE,
    RunKey,
    key_file_is_private,
    load_run_key,
    new_run_key,
    save_run_key,
)


def test_secret_keys_are_fresh_and_reproducible_keys_repeat():
    secret = [new_run_key(reproducible=False, seed=0) for _ in range(3)]
    assert len({k.material for k in secret}) == 3 and {k.mode for k in secret} == {"secret"}
    assert all(len(k.material) == 16 for k in secret)
    a, b = (new_run_key(reproducible=True, seed=7) for _ in range(2))
    assert a == b and a.mode == "reproducible"
    assert new_run_key(reproducible=True, seed=8) != a
    assert new_run_key(reproducible=True, seed=7, label="batch_size=64") != a


def test_repr_and_str_hide_the_material():
    key = new_run_key(reproducible=False, seed=0)
    for text in (repr(key), str(key), f"{key}"):
        assert key.material.hex() not in text and "hidden" in text


def test_noise_seeds_differ_per_step_and_per_key():
    key, other = new_run_key(reproducible=True, seed=1), new_run_key(reproducible=True, seed=2)
    seeds = {tuple(key.noise_seed(t)) for t in range(1000)}
    assert len(seeds) == 1000
    assert not seeds & {tuple(other.noise_seed(t)) for t in range(1000)}
    assert key.noise_seed(5).dtype == np.int64 and key.noise_seed(5).shape == (2,)
    # both 64-bit halves of the key enter every seed
    halves = [int.from_bytes(key.material[i:i + 8], "big", signed=True) for i in (0, 8)]
    assert key.noise_seed(0).tolist() == halves


def test_key_file_round_trips_with_mode_0600(tmp_path):
    key = new_run_key(reproducible=False, seed=0)
    path = save_run_key(key, tmp_path)
    assert path == tmp_path / KEY_FILE and path.stat().st_mode & 0o777 == 0o600
    assert key_file_is_private(tmp_path)
    assert load_run_key(tmp_path) == key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary left
    assert "never share" in path.read_text().lower()


def test_missing_or_damaged_key_files_are_one_line_errors_without_material(tmp_path):
    with pytest.raises(RunDirError, match="run.key: missing.*--overwrite") as missing:
        load_run_key(tmp_path)
    assert "\n" not in str(missing.value)
    key = new_run_key(reproducible=False, seed=0)
    path = save_run_key(key, tmp_path)
    good = path.read_text()
    hex_key = key.material.hex()
    flipped = hex_key[:-1] + ("0" if hex_key[-1] != "0" else "1")
    damaged = [text.encode() for text in (
        good.replace(hex_key, flipped), good.replace(hex_key, hex_key[:-2]), good[: len(good) // 2], "",
        "garbage", good.replace("mode: secret", "mode: public"), good.replace("check", "chek"))]
    damaged.append(good.encode().replace(b"k", b"\xff"))  # not UTF-8
    for blob in damaged:
        path.write_bytes(blob)
        with pytest.raises(RunDirError, match="run.key: damaged") as error:
            load_run_key(tmp_path)
        assert hex_key not in str(error.value) and flipped not in str(error.value)
        assert "\n" not in str(error.value)


def test_a_key_is_16_bytes_of_a_known_mode():
    with pytest.raises(ValueError):
        RunKey(b"short", "secret")
    with pytest.raises(ValueError):
        RunKey(bytes(16), "public")
