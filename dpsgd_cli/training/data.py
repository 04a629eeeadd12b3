"""Load a run's data: Fashion-MNIST / MNIST from canonical IDX `.gz` files (or the Keras download), or
any other source of `data.dataset` (`training.sources`: CIFAR, .npz, image folder, CSV), as float32 arrays.

Fashion-MNIST / MNIST images come back as [N, 28, 28, 1] float32 in [0, 1] (pixel / 255), labels as [N]
int32 in 0..9; other sources with their own shape and K classes (labels 0..K−1).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsgd_cli.config import ExperimentConfig, resolved_data_dir
from dpsgd_cli.errors import DataError
from dpsgd_cli.labels import CLASS_NAMES

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}


@dataclass(frozen=True)
class Dataset:
    """Train and test splits; see the module docstring for shapes and ranges."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # [N, K, *input]: the model inputs of each training example's K views (augmentation multiplicity,
    # `augmentation.with_views`; view 0 is x_train's row), or None: one view, x_train itself
    train_views: np.ndarray | None = None
    class_names: tuple[str, ...] = ()  # label k's name; () = the 10 classes of the built-in datasets
    # one training record, the unit of privacy (what the privacy statement's "one example" is)
    record: str = "one 28×28 grayscale image with its label"

    @property
    def num_classes(self) -> int:
        return len(self.class_names) or 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one training input (of the images, before any feature transform)."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_config_data(cfg: ExperimentConfig) -> Dataset:
    """The data of `cfg.data` (`data.dataset`, `data.data_dir` or $DPSGD_DATA_DIR, `data.path`,
    `data.label_column`), cut to `data.train_size` / `data.test_size`."""
    d = cfg.data
    return load_dataset(d.dataset, resolved_data_dir(cfg), d.train_size, d.test_size, path=d.path,
                        label_column=d.label_column)


def count_records(cfg: ExperimentConfig) -> int:
    """n: the training records `cfg`'s data give (after data.train_size), loading them (for data.path)."""
    return len(load_config_data(cfg).y_train)


def load_dataset(name: str, data_dir: str | Path | None, train_size: int | None = None,
                 test_size: int | None = None, *, path: str | Path | None = None,
                 label_column: str = "label") -> Dataset:
    """Read `name` from `data_dir` (IDX `.gz` files in `<data_dir>/<name>/` or `<data_dir>/`), or
    download it with Keras when `data_dir` is None; any other source through `sources.load_source` (from
    `data_dir`, or `path` for the file sources). `train_size`/`test_size` keep the first examples."""
    if name not in CLASS_NAMES:
        return _from_source(name, data_dir, train_size, test_size, path, label_column)
    if data_dir is None:
        arrays = _keras_download(name)
    else:
        folder = _dataset_folder(Path(data_dir), name)
        arrays = tuple(_read_idx(folder / FILES[key], key) for key in FILES)
    x_train, y_train, x_test, y_test = arrays
    _check_pair(x_train, y_train, "train")
    _check_pair(x_test, y_test, "test")
    return Dataset(
        name=name,
        x_train=_normalise(x_train[:train_size]),
        y_train=y_train[:train_size].astype(np.int32),
        x_test=_normalise(x_test[:test_size]),
        y_test=y_test[:test_size].astype(np.int32),
        class_names=CLASS_NAMES[name],
        record=f"one 28×28 grayscale image of the {TITLES[name]} training set with its label",
    )


def _from_source(name: str, data_dir, train_size, test_size, path, label_column) -> Dataset:
    from dpsgd_cli.training.sources import load_source

    data = load_source(name, data_dir=data_dir, path=path, label_column=label_column)
    return Dataset(name=name, x_train=data.x_train[:train_size], y_train=data.y_train[:train_size],
                   x_test=data.x_test[:test_size], y_test=data.y_test[:test_size],
                   class_names=data.class_names, record=data.record)


def _dataset_folder(data_dir: Path, name: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (set data.data_dir or DPSGD_DATA_DIR "
                        f"to a folder holding {name}/{FILES['train_images']} and the other IDX files)")
    sub = data_dir / name
    return sub if sub.is_dir() else data_dir


def _read_idx(path: Path, key: str) -> np.ndarray:
    """Parse one IDX file; images must be [N, 28, 28] uint8, labels [N] uint8 in 0..9."""
    hint = "download it from the dataset's official page, or unset data_dir to use the Keras download"
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: dataset file not found ({hint})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc.__class__.__name__}); {hint}") from None
    is_images = key.endswith("images")
    header = 16 if is_images else 8
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {hint}")
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    expected_magic = IMAGE_MAGIC if is_images else LABEL_MAGIC
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x} "
                        f"({'images' if is_images else 'labels'})")
    shape = (count, 28, 28) if is_images else (count,)
    if is_images and raw[8:16] != (28).to_bytes(4, "big") * 2:
        raise DataError(f"{path}: images are not 28×28")
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: holds {body.size} bytes of data, expected {int(np.prod(shape))} "
                        f"for {count} {'images' if is_images else 'labels'}; the file is truncated "
                        "or corrupt")
    array = body.reshape(shape)
    if not is_images and array.size and array.max() > 9:
        raise DataError(f"{path}: labels must be 0..9, found {int(array.max())}")
    return array


def _check_pair(images: np.ndarray, labels: np.ndarray, split: str) -> None:
    if len(images) != len(labels):
        raise DataError(f"{split} split: {len(images)} images but {len(labels)} labels")


def _normalise(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[..., None]


def _keras_download(name: str) -> tuple[np.ndarray, ...]:
    """The path a user with internet takes when no data directory is given."""
    import keras

    loader = {"fashion_mnist": keras.datasets.fashion_mnist, "mnist": keras.datasets.mnist}[name]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(f"cannot download {name} with Keras ({exc.__class__.__name__}); set "
                        "DPSGD_DATA_DIR or data.data_dir to a folder with the IDX .gz files") from None
    return x_train, y_train, x_test, y_test


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, split: str) -> None:
    """Write uint8 images [N, 28, 28] and labels [N] as IDX `.gz` files (`split` = 'train' or 'test').

    Used by tests and demos to create small datasets in the canonical format."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    n = len(images)
    head = IMAGE_MAGIC.to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(head + images.astype(np.uint8).tobytes()))
    head = LABEL_MAGIC.to_bytes(4, "big") + n.to_bytes(4, "big")
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(head + labels.astype(np.uint8).tobytes()))


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over the arrays a run trains and evaluates on (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def write_validation_split(data_dir: str | Path | None, out_dir: str | Path, name: str,
                           validation_size: int = 10000) -> Path:
    """Hold the last `validation_size` training examples out as a validation set: write `<out_dir>/<name>/`
    with the first n − validation_size training examples as its training split and the held-out ones as
    its test split, and return that folder. A run with `data.data_dir: <out_dir>` then trains and is
    accounted on the rest and evaluates on the held-out examples: tune hyper-parameters there, never on
    the test set."""
    full = load_dataset(name, data_dir)
    n = len(full.y_train) - validation_size
    if not 0 < validation_size < len(full.y_train):
        raise DataError(f"validation_size: must be in 1..{len(full.y_train) - 1}, got {validation_size}")
    folder = Path(out_dir) / name
    pixels = np.rint(full.x_train[..., 0] * 255.0).astype(np.uint8)
    write_idx(folder, pixels[:n], full.y_train[:n], "train")
    write_idx(folder, pixels[n:], full.y_train[n:], "test")
    return folder
