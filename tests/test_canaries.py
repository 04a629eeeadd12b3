"""Tests for dpsgd_cli.audit.canaries: the seeded inclusion draw, what gets appended, and the saved file."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dpsgd_cli.audit import canaries
from dpsgd_cli.errors import ConfigError, RunDirError
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.training.data import Dataset


def _key(seed: int = 0, label: str = ""):
    return new_run_key(reproducible=True, seed=seed, label=label)


def _dataset(n: int = 1000, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(name="fashion_mnist",
                   x_train=rng.random((n, 28, 28, 1), dtype=np.float32),
                   y_train=rng.integers(0, 10, n).astype(np.int32),
                   x_test=rng.random((50, 28, 28, 1), dtype=np.float32),
                   y_test=rng.integers(0, 10, 50).astype(np.int32))


def test_images_come_from_the_seed_and_coins_from_the_key():
    data = _dataset()
    a = canaries.make_canaries(data.x_train, data.y_train, 200, 3, _key(1))
    b = canaries.make_canaries(data.x_train, data.y_train, 200, 3, _key(1))
    for field in ("x", "y", "included", "source_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other_key = canaries.make_canaries(data.x_train, data.y_train, 200, 3, _key(2))
    np.testing.assert_array_equal(a.x, other_key.x)  # the seed is not secret
    np.testing.assert_array_equal(a.y, other_key.y)
    assert not np.array_equal(a.included, other_key.included)  # the coins are
    other_seed = canaries.make_canaries(data.x_train, data.y_train, 200, 4, _key(1))
    assert not np.array_equal(a.x, other_seed.x)


def test_coins_of_secret_keys_cannot_be_recomputed_from_the_seed():
    """Two default-mode runs with the same seed toss different coins (equal with probability 2⁻²⁰⁰)."""
    data = _dataset()
    draws = [canaries.make_canaries(data.x_train, data.y_train, 200, 0,
                                    new_run_key(reproducible=False, seed=0)).included
             for _ in range(2)]
    assert not np.array_equal(*draws)


def test_inclusion_rate_is_one_half():
    data = _dataset(n=5000)
    included = np.concatenate([canaries.make_canaries(data.x_train, data.y_train, 5000, 0, _key(s)).included
                               for s in range(4)])
    # 20000 fair coins: a two-sided binomial test would reject a correct draw with probability 1e-4.
    assert stats.binomtest(int(included.sum()), included.size, 0.5).pvalue > 1e-4
    assert abs(included.mean() - 0.5) < 0.02


def test_canaries_are_synthetic_never_copies_of_a_training_record():
    """An included canary that copied a training image would give that person a second record (twice the
    influence the accountant assumes): canary images are synthetic, drawn from the seed, and equal no
    training or test image; their labels are uniform over the classes."""
    data = _dataset(n=2000)
    data.x_train[:300] = np.round(data.x_train[:300] * 255) / 255  # pixel values as the IDX loader gives
    c = canaries.make_canaries(data.x_train, data.y_train, 300, 0, _key())
    assert c.m == 300 and c.x.shape == (300, 28, 28, 1) and c.x.dtype == np.float32
    assert c.x.min() >= 0.0 and c.x.max() <= 1.0
    records = np.concatenate([data.x_train, data.x_test]).reshape(-1, 28 * 28)
    for image in c.x.reshape(300, -1):
        assert np.abs(records - image).max(axis=1).min() > 0.1, "a canary equals a record"
    assert len({image.tobytes() for image in c.x}) == 300  # distinct from each other too
    assert c.y.dtype == np.int32 and set(np.unique(c.y)) == set(range(10))
    assert stats.chisquare(np.bincount(c.y, minlength=10)).pvalue > 1e-4
    assert np.all(c.source_index == -1)  # no source record


def test_add_canaries_appends_exactly_the_included_ones_and_keeps_the_real_data():
    data = _dataset()
    grown, c = canaries.add_canaries(data, 100, 1, _key(1))
    k = int(c.included.sum())
    assert 0 < k < 100
    assert len(grown.y_train) == len(data.y_train) + k
    np.testing.assert_array_equal(grown.x_train[:1000], data.x_train)
    np.testing.assert_array_equal(grown.y_train[:1000], data.y_train)
    np.testing.assert_array_equal(grown.x_train[1000:], c.x[c.included])
    np.testing.assert_array_equal(grown.y_train[1000:], c.y[c.included])
    assert grown.y_train.dtype == np.int32 and grown.x_train.dtype == np.float32
    assert grown.x_test is data.x_test


def test_too_many_canaries_is_a_config_error():
    data = _dataset(n=50)
    with pytest.raises(ConfigError, match="privacy.canaries"):
        canaries.add_canaries(data, 51, 0, _key())


def test_saved_file_round_trips(tmp_path):
    data = _dataset()
    _, c = canaries.add_canaries(data, 64, 2, _key(2))
    path = canaries.save_canaries(c, tmp_path)
    assert path == tmp_path / canaries.CANARY_FILE
    assert [p.name for p in tmp_path.iterdir()] == [canaries.CANARY_FILE]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o600  # the secret coins: owner only, like run.key
    back = canaries.load_canaries(tmp_path)
    for field in ("x", "y", "included", "source_index"):
        np.testing.assert_array_equal(getattr(back, field), getattr(c, field))
    assert back.included.dtype == bool


def test_load_without_canaries_or_with_a_corrupt_file(tmp_path):
    assert canaries.load_canaries(tmp_path) is None
    (tmp_path / canaries.CANARY_FILE).write_bytes(b"not an npz file")
    with pytest.raises(RunDirError, match="cannot read the canaries"):
        canaries.load_canaries(tmp_path)
