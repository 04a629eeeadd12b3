"""IDX reading: real files when DPSGD_DATA_DIR is set, and clear errors for missing or corrupt files."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.data import FILES, load_dataset, write_idx


def test_loads_shapes_ranges(data_dir):
    data = load_dataset("fashion_mnist", data_dir, train_size=1000, test_size=300)
    assert data.x_train.shape == (1000, 28, 28, 1) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (300, 28, 28, 1) and data.y_test.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert set(np.unique(data.y_train)) <= set(range(10))


@pytest.mark.skipif(not os.environ.get("DPSGD_DATA_DIR"), reason="needs the real files")
def test_real_files_match_published_statistics():
    for name, mean in (("fashion_mnist", 0.2860), ("mnist", 0.1307)):
        data = load_dataset(name, os.environ["DPSGD_DATA_DIR"])
        assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
        assert abs(float(data.x_train.mean()) - mean) < 1e-4


def _copy(data_dir, tmp_path):
    target = tmp_path / "fashion_mnist"
    target.mkdir()
    for filename in FILES.values():
        shutil.copy(os.path.join(data_dir, "fashion_mnist", filename), target / filename)
    return target


def test_missing_file_names_it(data_dir, tmp_path):
    folder = _copy(data_dir, tmp_path)
    (folder / FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: dataset file not found"):
        load_dataset("fashion_mnist", tmp_path)


def test_corrupt_files_are_reported(data_dir, tmp_path):
    folder = _copy(data_dir, tmp_path)
    target = folder / FILES["train_labels"]
    target.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_dataset("fashion_mnist", tmp_path)
    target.write_bytes(gzip.compress((0x0803).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5)))
    with pytest.raises(DataError, match="magic"):
        load_dataset("fashion_mnist", tmp_path)
    target.write_bytes(gzip.compress((0x0801).to_bytes(4, "big") + (60000).to_bytes(4, "big") + bytes(10)))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("fashion_mnist", tmp_path)


def test_write_idx_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    write_idx(tmp_path / "mnist", images, labels, "train")
    write_idx(tmp_path / "mnist", images[:3], labels[:3], "test")
    data = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(np.round(data.x_train[..., 0] * 255).astype(np.uint8), images)
    np.testing.assert_array_equal(data.y_test, labels[:3])


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_dataset("mnist", tmp_path / "nope")


def test_validation_split_holds_out_the_last_training_examples(tmp_path):
    from dpsgd_cli.training.data import write_validation_split

    rng = np.random.default_rng(4)  # a small dataset of its own: writing 60 000 real images takes ~15 s
    data_dir = tmp_path / "idx"
    for split_name, n in (("train", 400), ("test", 50)):
        write_idx(data_dir / "fashion_mnist", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
                  rng.integers(0, 10, n).astype(np.uint8), split_name)
    full = load_dataset("fashion_mnist", data_dir)
    write_validation_split(data_dir, tmp_path / "out", "fashion_mnist", validation_size=100)
    split = load_dataset("fashion_mnist", tmp_path / "out")
    n = len(full.y_train) - 100
    np.testing.assert_array_equal(split.x_train, full.x_train[:n])
    np.testing.assert_array_equal(split.y_train, full.y_train[:n])
    np.testing.assert_array_equal(split.x_test, full.x_train[n:])  # evaluation on held-out training data
    np.testing.assert_array_equal(split.y_test, full.y_train[n:])
    with pytest.raises(DataError, match="validation_size"):
        write_validation_split(data_dir, tmp_path / "out", "fashion_mnist", validation_size=len(full.y_train))
