"""Shared fixtures: a data directory (the real IDX files if DPSGD_DATA_DIR is set, else a small synthetic
one in the canonical format) and helpers to build small configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dpsgd_cli.training.data import write_idx

# rich fixes a console's width at creation from COLUMNS, and pytest-xdist's workers start with COLUMNS=80:
# without it, the CLI's console follows the COLUMNS a test passes to CliRunner, as in a serial run
os.environ.pop("COLUMNS", None)


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Learnable 28×28 uint8 images: class k lights up a horizontal band at rows 2k+4..2k+6, plus noise."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4:2 * k + 7, 4:24] = 230
    return images


@pytest.fixture(scope="session", autouse=True)
def _planner_off(tmp_path_factory):
    """Runs in tests use the default formulation without timing the device (tests/test_planner.py turns
    the planner on, with its cache in a temporary folder); a cache is never written to the home folder."""
    saved = {k: os.environ.get(k) for k in ("DPSGD_PLANNER", "DPSGD_PLAN_CACHE")}
    os.environ["DPSGD_PLANNER"] = "off"
    os.environ["DPSGD_PLAN_CACHE"] = str(tmp_path_factory.mktemp("plan_cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A folder holding fashion_mnist/ and mnist/ IDX files usable as data.data_dir."""
    real = os.environ.get("DPSGD_DATA_DIR")
    if real:
        return real
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for name in ("fashion_mnist", "mnist"):
        for split, n in (("train", 3000), ("test", 1000)):
            labels = rng.integers(0, 10, size=n).astype(np.uint8)
            write_idx(Path(root) / name, _synthetic_images(labels, rng), labels, split)
    return str(root)


@pytest.fixture
def tiny_overrides(data_dir, tmp_path) -> list[str]:
    """--set overrides for a run of a few seconds on a small slice, writing under tmp_path."""
    return [f"data.data_dir={data_dir}", "data.train_size=512", "data.test_size=200", "data.batch_size=64",
            "training.epochs=2", "privacy.noise_multiplier=1.1", f"output_dir={tmp_path / 'results'}"]
