"""CIFAR-10 and CIFAR-100 (`data.dataset: cifar10` / `cifar100`): 32×32 RGB images, pixels in [0, 1].

Offline from the canonical Python version (the folder `cifar-10-batches-py` with `data_batch_1` … `_5`,
`test_batch`, `batches.meta`; or `cifar-100-python` with `train`, `test`, `meta`, fine labels) in
`data.data_dir` (or `data.data_dir` being that folder); else Keras's download. The files are pickles:
they are read with an unpickler that builds only dicts, lists, strings, numbers and NumPy arrays, so a
crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources.base import SourceData, as_inputs, as_labels, check_splits


@dataclass(frozen=True)
class Layout:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels: bytes  # the label key of a batch dict
    names: bytes  # the class-name key of the meta dict
    classes: int
    title: str


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                      "batches.meta", b"labels", b"label_names", 10, "CIFAR-10"),
    "cifar100": Layout("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names",
                       100, "CIFAR-100"),
}
PIXELS = 32 * 32 * 3


def load(name: str, data_dir: str | Path | None) -> SourceData:
    layout = LAYOUTS[name]
    if data_dir is None:
        x_train, y_train, x_test, y_test = _keras_download(name)
        cached = Path.home() / ".keras" / "datasets" / layout.folder / layout.meta
        names = _names(cached, layout, strict=False)
        origin = "Keras download"
    else:
        folder = _folder(Path(data_dir), layout)
        x_train, y_train = _read_batches([folder / f for f in layout.train], layout)
        x_test, y_test = _read_batches([folder / layout.test], layout)
        names = _names(folder / layout.meta, layout, strict=True)
        origin = str(folder)
    where = origin if data_dir is not None else f"{layout.title} ({origin})"
    x_train, x_test = as_inputs(x_train, where), as_inputs(x_test, where)
    y_train, y_test = as_labels(y_train, where), as_labels(y_test, where)
    if y_train.size and y_train.max() >= layout.classes:
        raise DataError(f"{where}: label {int(y_train.max())} is out of range for {layout.title} "
                        f"(0..{layout.classes - 1})")
    names = check_splits(x_train, y_train, x_test, y_test, where, class_names=names)
    return SourceData(x_train, y_train, x_test, y_test, names,
                      record=f"one 32×32 colour image of the {layout.title} training set with its label",
                      origin=origin)


def _folder(data_dir: Path, layout: Layout) -> Path:
    if (data_dir / layout.folder).is_dir():
        return data_dir / layout.folder
    if data_dir.name == layout.folder and data_dir.is_dir():
        return data_dir
    raise DataError(f"{data_dir / layout.folder}: folder not found (data.data_dir must hold the canonical "
                    f"{layout.folder} folder of {layout.title}'s Python version; or leave data.data_dir "
                    "and DPSGD_DATA_DIR unset to download it with Keras)")


def _read_batches(paths: list[Path], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels [N] of the batch files, in order."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        data, y = batch.get(b"data"), batch.get(layout.labels)
        if data is None or y is None:
            missing = [k.decode() for k in (b"data", layout.labels) if batch.get(k) is None]
            raise DataError(f"{path}: lacks {', '.join(missing)}; not a {layout.title} batch file")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
            raise DataError(f"{path}: data must be uint8 rows of {PIXELS} pixels (1024 red, 1024 green, 1024 "
                            f"blue), got {data.dtype} {data.shape}")
        y = np.asarray(y)
        if len(y) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _names(path: Path, layout: Layout, strict: bool) -> tuple[str, ...]:
    """The class names in the meta file; "0".."K−1" when it is absent and not `strict`."""
    if not path.is_file() and not strict:
        return tuple(str(k) for k in range(layout.classes))
    names = _unpickle(path).get(layout.names)
    if not isinstance(names, list) or len(names) != layout.classes:
        raise DataError(f"{path}: lacks the {layout.classes} class names ({layout.names.decode()})")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


class _SafeUnpickler(pickle.Unpickler):
    """Builds built-in containers, numbers, strings and NumPy arrays; refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return {"_reconstruct": _reconstruct, "encode": _latin1}.get(name) or getattr(np, name)


def _reconstruct(cls, shape, dtype):
    """What NumPy's pickles call to make an empty array before filling it; only plain ndarrays."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("refused an array subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _latin1(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol 2 (`_codecs.encode(text, 'latin1')`); no other codec."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _unpickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (part of the canonical CIFAR Python version)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    try:
        value = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle raises many types
        raise DataError(f"{path}: not a CIFAR pickle file ({exc.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:80]})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: holds a {type(value).__name__}, not the dict of a CIFAR file")
    return value


def _keras_download(name: str) -> tuple[np.ndarray, ...]:
    import keras

    loader = {"cifar10": keras.datasets.cifar10, "cifar100": keras.datasets.cifar100}[name]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(f"cannot download {name} with Keras ({exc.__class__.__name__}); set data.data_dir "
                        f"to a folder holding {LAYOUTS[name].folder}") from None
    return x_train, y_train, x_test, y_test


def write_batches(folder: Path, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                  class_names: tuple[str, ...]) -> Path:
    """Write uint8 images [N, 32, 32, 3] and labels per split ('train', 'test') as the canonical Python
    version's pickle files in `folder/<layout folder>` (CIFAR-10's training images go to data_batch_1 … 5,
    split as evenly as they go); used by tests and demos. Returns that folder."""
    layout = LAYOUTS[name]
    out = folder / layout.folder
    out.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        files = layout.train if split == "train" else (layout.test,)
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), PIXELS).astype(np.uint8)
        for file, index in zip(files, np.array_split(np.arange(len(rows)), len(files))):
            batch = {b"data": rows[index], layout.labels: [int(v) for v in labels[index]],
                     b"batch_label": f"{split} batch".encode()}
            (out / file).write_bytes(pickle.dumps(batch, protocol=2))
    (out / layout.meta).write_bytes(pickle.dumps({layout.names: [n.encode() for n in class_names]},
                                                 protocol=2))
    return out
