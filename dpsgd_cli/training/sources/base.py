"""`SourceData` and the checks every source applies to its arrays (bad data is one line each)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsgd_cli.errors import DataError


@dataclass(frozen=True)
class SourceData:
    """Both splits of a source. Inputs float32 [N, *input_shape] (pixels scaled to [0, 1] where the source
    holds 8-bit pixels), labels int32 [N] in 0..K−1 with every class present in the training split.

    `record`: what one training record is (the unit of privacy: adding or removing one such record is what
    ε bounds), e.g. "one row of train.csv"; `origin`: where the data were read from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    record: str
    origin: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def as_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels [N] (or [N, 1]) as int32; DataError unless they are whole numbers ≥ 0."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one number per record, got an array of shape {y.shape}")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise DataError(f"{where}: labels must be whole numbers 0..K−1, got values of type {y.dtype}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DataError(f"{where}: labels must be whole numbers 0..K−1; record {bad[0]} has "
                            f"{y[bad[0]].item()!r} ({bad.size} such labels)")
    negative = np.flatnonzero(y < 0)
    if negative.size:
        raise DataError(f"{where}: labels must be whole numbers 0..K−1; record {negative[0]} has "
                        f"{y[negative[0]].item()!r} ({negative.size} negative labels)")
    if y.size and y.max() >= 2**31:
        raise DataError(f"{where}: label {y.max().item()!r} is too large; labels are 0..K−1")
    return y.astype(np.int32)


def as_inputs(x: np.ndarray, where: str) -> np.ndarray:
    """Inputs as float32: uint8 arrays are pixels, scaled to [0, 1] (pixel / 255, as the built-in datasets);
    other numeric arrays are used as they are. A [N, H, W] array gets a channel axis (grayscale images).
    DataError for non-numeric, empty or non-finite values."""
    x = np.asarray(x)
    if x.dtype.kind not in "iufb":
        raise DataError(f"{where}: features must be numbers, got values of type {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{where}: inputs must have one row per record (at least 2 dimensions), got shape "
                        f"{x.shape}")
    out = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if out.ndim == 3:
        out = out[..., None]
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(out), -1).any(axis=1))[0])
        raise DataError(f"{where}: record {row} has a NaN or infinite feature ({int(bad.sum())} such values "
                        "in all); remove or impute them before training")
    return out


def check_splits(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 where: str, class_names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The class names (given, else "0".."K−1" with K = largest training label + 1) after checking: as many
    labels as inputs in each split, records in each split, the same input shape in both, every class among
    0..K−1 present in the training split, no test label the training split lacks."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(f"{where}: the {split} split has {len(x)} inputs but {len(y)} labels")
        if not len(y):
            raise DataError(f"{where}: the {split} split has no records")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{where}: training inputs have shape {x_train.shape[1:]} but test inputs "
                        f"{x_test.shape[1:]}; both splits need the same shape")
    k = len(class_names) if class_names is not None else int(y_train.max()) + 1
    counts = np.bincount(y_train, minlength=k)
    if len(counts) > k:
        raise DataError(f"{where}: training label {int(y_train.max())} is out of range 0..{k - 1}")
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        name = class_names[empty[0]] if class_names is not None else str(empty[0])
        raise DataError(f"{where}: class {name!r} has no training record ({empty.size} empty classes in "
                        f"0..{k - 1}); labels must be 0..K−1 with every class present")
    if k < 2:
        raise DataError(f"{where}: the training split has only one class; a classifier needs at least two")
    unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
    if unseen:
        shown = [class_names[u] if class_names is not None and u < len(class_names) else u for u in unseen]
        raise DataError(f"{where}: the test split has labels the training split lacks: "
                        f"{', '.join(map(str, shown[:5]))}{' …' if len(shown) > 5 else ''}")
    return tuple(class_names) if class_names is not None else tuple(str(c) for c in range(k))
