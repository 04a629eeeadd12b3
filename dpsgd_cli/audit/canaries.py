"""Canaries for the one-run privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run"): `privacy.canaries: m` in the config.

What a canary is here: a *synthetic* example that is no one's record — an image of independent uniform
pixel values (in steps of 1/255, as the IDX images have) with a label drawn uniformly from the classes.
Why synthetic: a canary that copied a training image would, when included, give the person behind that
image a second record in the training set, twice the influence the accountant assumes for one example;
a synthetic image is nobody's data, so each person still has exactly one record. Why this kind: a model
that has not seen a canary has no reason to give its (arbitrary) label a high probability, so its loss is
high; a model that trained on it can only lower that loss by memorising this one example, which is
exactly the per-example influence that DP bounds.

How they enter training: canary i is included with probability 1/2, independently of all else. The
images and labels are drawn from ``seed`` (``numpy.random.default_rng([seed, CANARY_STREAM])``: not
secret), the inclusion coins from the run's secret key (``RunKey.generator(STREAM_CANARIES)``), so that
nobody who reads run.yaml can recompute them; canaries.npz, which holds the coins, is written 0600 like
run.key. The included canaries are appended to ``x_train``/``y_train``; the sampling rate q = B/(n + m)
counts *all* m canaries, so the mechanism (q, σ, steps) does not depend on the coins the audit treats as
secret.

Guarantees in words:
* For the accounting, an included canary is an ordinary training example: the run is DP with respect to
  adding or removing any one example of its final training set, canaries included, and the accountant's
  (ε, δ) covers every one of them exactly as it covers a real example. The real data are unchanged and
  each is there once. q = B/(n + m) is fixed before the coins are tossed, so including or excluding one
  canary changes only whether that example can be sampled: exactly the add/remove-one adjacency the
  accountant models.
* The audit (``dpsgd audit``) guesses each canary's inclusion bit from its loss under the final model and
  turns the number of correct guesses into ε_lb with Theorem 3 of the paper. If the training algorithm is
  (ε, δ)-DP, then with probability at least ``confidence`` (over the inclusion coins and the training
  randomness) ε_lb ≤ ε. So ε_lb is a valid lower bound on the ε of the mechanism at that confidence; a
  bound above the accountant's ε would reveal a bug in the implementation or the accounting.

Runs written before canaries were synthetic hold copies of training images (``source_index`` ≥ 0, the
index of the copied image); the audit still reads them (it leaves the copied images out of its members).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dpsgd_cli.atomic import atomic_write_bytes
from dpsgd_cli.errors import ConfigError, RunDirError
from dpsgd_cli.labels import NUM_CLASSES
from dpsgd_cli.privacy.run_key import STREAM_CANARIES, RunKey
from dpsgd_cli.runs.run_dir import CANARIES_FILE
from dpsgd_cli.training.data import Dataset

CANARY_STREAM = 0x5CA7A27  # second entry of the rng key; never a (small) epoch number
CANARY_FILE = CANARIES_FILE


@dataclass(frozen=True)
class CanarySet:
    """m canaries: images [m, *image shape] float32 in [0, 1], labels [m] int32, inclusion bits [m] bool,
    and `source_index` [m] int64: -1 for a synthetic canary (a run written by an older version: the index
    in the run's real ``x_train`` the image was copied from)."""

    x: np.ndarray
    y: np.ndarray
    included: np.ndarray
    source_index: np.ndarray

    @property
    def m(self) -> int:
        return len(self.y)


def make_canaries(x_train: np.ndarray, y_train: np.ndarray, m: int, seed: int, key: RunKey,
                  num_classes: int = NUM_CLASSES) -> CanarySet:
    """Draw m synthetic canaries shaped like `x_train`'s images (see the module docstring): images and
    labels (0..num_classes−1) from `seed`, inclusion coins from the run's `key`. No training record is
    copied."""
    n = len(y_train)
    if not 1 <= m <= n:
        raise ConfigError(f"privacy.canaries: {m} canaries would outnumber the run's {n} training examples; "
                          f"use 0 ≤ privacy.canaries ≤ {n}")
    rng = np.random.default_rng([seed, CANARY_STREAM])
    pixels = rng.integers(0, 256, size=(m, *x_train.shape[1:]))
    labels = rng.integers(0, num_classes, size=m).astype(np.int32)
    included = key.generator(STREAM_CANARIES).random(m) < 0.5
    return CanarySet(x=(pixels / 255.0).astype(np.float32), y=labels, included=included,
                     source_index=np.full(m, -1, np.int64))


def add_canaries(dataset: Dataset, m: int, seed: int, key: RunKey) -> tuple[Dataset, CanarySet]:
    """Return the dataset with the included canaries appended to x_train/y_train, and all m canaries."""
    canary_set = make_canaries(dataset.x_train, dataset.y_train, m, seed, key, dataset.num_classes)
    keep = canary_set.included
    grown = replace(dataset,
                    x_train=np.concatenate([dataset.x_train, canary_set.x[keep]]),
                    y_train=np.concatenate([dataset.y_train, canary_set.y[keep]]).astype(np.int32))
    return grown, canary_set


def save_canaries(canary_set: CanarySet, run_dir: Path) -> Path:
    """Write all m canaries (images, labels, inclusion bits, source indices) to run_dir/canaries.npz,
    atomically, mode 0600 (the inclusion coins are secret)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=canary_set.x, y=canary_set.y, included=canary_set.included,
                        source_index=canary_set.source_index)
    path = Path(run_dir) / CANARY_FILE
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)  # the secret coins: owner only, like run.key
    return path


def load_canaries(run_dir: Path) -> CanarySet | None:
    """The run's canaries, or None if it had none. Raises RunDirError if the file is unreadable."""
    path = Path(run_dir) / CANARY_FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as archive:
            canary_set = CanarySet(x=archive["x"].astype(np.float32), y=archive["y"].astype(np.int32),
                                   included=archive["included"].astype(bool),
                                   source_index=archive["source_index"].astype(np.int64))
    except (OSError, KeyError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot read the canaries ({exc.__class__.__name__})") from None
    m = canary_set.m
    if not (canary_set.x.shape[0] == m == len(canary_set.included) == len(canary_set.source_index)):
        raise RunDirError(f"{path}: the canary arrays have inconsistent lengths")
    return canary_set
