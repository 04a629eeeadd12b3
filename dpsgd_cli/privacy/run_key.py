"""The run key: the one secret behind everything the privacy analysis treats as random.

DP-SGD's guarantee assumes the adversary cannot predict the Gaussian noise nor which examples each step
sampled. Everything of that kind — the noise of every step, the Poisson (or shuffle) batch selection, the
canaries' inclusion coins — is derived from one 128-bit key:

* **secret mode** (the default): the key is drawn from the operating system's entropy (`secrets`), kept
  only in `run.key` in the run directory (mode 0600), never in run.yaml, metrics, logs or errors;
* **reproducible mode** (`privacy.reproducible: true`, an explicit opt-in for research and tests): the key
  is SHA-256("dpsgd reproducible run key", seed, label), where the label is empty for `dpsgd train` and
  the point's name for a sweep point, so the same config gives the same run and two points of a sweep
  never share noise. Whoever knows the seed (and the label) can regenerate the noise and the batches: the
  stated ε then holds only while they stay secret.

`seed` keeps seeding what is not secret: initial weights, the data subset, the canary images.

Streams: the noise of step t uses the TensorFlow stateless seed (k0 XOR t, k1), where k0, k1 are the key's
two 64-bit halves (see `noise_seed`); batches and canary coins use numpy generators seeded by the whole key
and a stream label (`generator`). Neither TensorFlow's Philox nor numpy's PCG64 is a cryptographically
secure generator: see docs/privacy.md, "Threat model".
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpsgd_cli.atomic import atomic_write_text
from dpsgd_cli.errors import RunDirError

KEY_FILE = "run.key"
KEY_BYTES = 16  # 128 bits
MODES = ("secret", "reproducible")
STREAM_SAMPLING = 1
STREAM_CANARIES = 2
STREAM_FEATURE_STATS = 3  # the noise of the feature-normalisation release (feature_norm)
_HEADER = ("# dpsgd run key: SECRET. Never share or publish this file: whoever has it can subtract the\n"
           "# noise and see which examples each step used (then ε = ∞). `dpsgd export` leaves it out.\n")
_DERIVATION = b"dpsgd reproducible run key v1\0"


@dataclass(frozen=True, repr=False, eq=False)
class RunKey:
    """128 bits of key material and how they were made (`mode`: 'secret' or 'reproducible'). `origin`:
    the key file it was read from (`load_run_key`), None for a key made in this process: a key a run
    already used keys that run's noise and batches, so a second training must not take it."""

    material: bytes
    mode: str
    origin: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES or self.mode not in MODES:
            raise ValueError("a run key is 16 bytes, mode 'secret' or 'reproducible'")

    def __repr__(self) -> str:  # never print the material
        return f"RunKey(mode={self.mode!r}, material=<hidden>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunKey) and secrets.compare_digest(self.material, other.material) \
            and self.mode == other.mode

    __hash__ = None  # type: ignore[assignment]

    @property
    def reproducible(self) -> bool:
        return self.mode == "reproducible"

    def noise_seed(self, step: int) -> np.ndarray:
        """TensorFlow stateless seed [2] int64 of step `step`'s noise: (k0 XOR step, k1)."""
        k0, k1 = (int.from_bytes(self.material[i:i + 8], "big", signed=True) for i in (0, 8))
        return np.array([k0 ^ int(step), k1], dtype=np.int64)

    def generator(self, stream: int, *labels: int) -> np.random.Generator:
        """A numpy generator for one stream (STREAM_SAMPLING, STREAM_CANARIES, STREAM_FEATURE_STATS) and
        labels (e.g. epoch)."""
        return np.random.default_rng([int.from_bytes(self.material, "big"), stream, *labels])


def new_run_key(*, reproducible: bool, seed: int, label: str = "") -> RunKey:
    """A fresh secret key from OS entropy, or the reproducible key of (seed, label); `label`: "" for a
    single run, the point's name in a sweep (so points never share noise)."""
    if reproducible:
        digest = hashlib.sha256(_DERIVATION + f"{int(seed)}\0{label}".encode()).digest()
        return RunKey(digest[:KEY_BYTES], "reproducible")
    return RunKey(secrets.token_bytes(KEY_BYTES), "secret")


def key_path(run_dir: Path) -> Path:
    return Path(run_dir) / KEY_FILE


def save_run_key(key: RunKey, run_dir: Path) -> Path:
    """Write `run_dir/run.key` atomically with mode 0600 (owner read/write only)."""
    path = key_path(run_dir)
    atomic_write_text(path, f"{_HEADER}mode: {key.mode}\nkey: {key.material.hex()}\n"
                            f"check: {_check(key.material)}\n", mode=0o600)
    return path


def load_run_key(run_dir: Path) -> RunKey:
    """The key of the run in `run_dir`; RunDirError (one line, no key material) if missing or damaged."""
    path = key_path(run_dir)
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run's secret key is needed to continue the same noise "
                          "and batches, and a new key would not continue this run: restore the file from "
                          "where it was kept, or start the run again with --overwrite")
    try:
        fields = dict(line.split(": ", 1) for line in path.read_text("utf-8").splitlines()
                      if line and not line.startswith("#"))
        material = bytes.fromhex(fields["key"].strip())
        mode = fields["mode"].strip()
        if not secrets.compare_digest(fields["check"].strip(), _check(material)):
            raise ValueError
        return RunKey(material, mode, origin=str(path))
    except (OSError, UnicodeDecodeError, KeyError, ValueError):
        raise RunDirError(f"{path}: damaged (not a dpsgd run key, or its check does not match); restore the "
                          "file from where it was kept, or start the run again with --overwrite") from None


def key_file_is_private(run_dir: Path) -> bool:
    """True when the key file is readable by its owner only (POSIX permissions)."""
    return os.stat(key_path(run_dir)).st_mode & 0o077 == 0


def _check(material: bytes) -> str:
    return hashlib.sha256(b"dpsgd run key check\0" + material).hexdigest()[:16]
