"""A NumPy `.npz` file holding `x_train`, `y_train`, `x_test`, `y_test` (`data.dataset: npz`, `data.path`).

Inputs: [N, H, W] (grayscale images: a channel axis is added), [N, H, W, C] images or [N, D] feature
vectors; uint8 arrays are taken as pixels and scaled to [0, 1], other numbers are used as they are.
Labels: whole numbers 0..K−1. The file is read without pickle (object arrays are refused).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources.base import SourceData, as_inputs, as_labels, check_splits

KEYS = ("x_train", "y_train", "x_test", "y_test")


def load(path: Path) -> SourceData:
    arrays = _read(path)
    x_train = as_inputs(arrays["x_train"], f"{path}: x_train")
    x_test = as_inputs(arrays["x_test"], f"{path}: x_test")
    y_train = as_labels(arrays["y_train"], f"{path}: y_train")
    y_test = as_labels(arrays["y_test"], f"{path}: y_test")
    names = check_splits(x_train, y_train, x_test, y_test, str(path))
    return SourceData(x_train, y_train, x_test, y_test, names,
                      record=f"one row of x_train with its label (y_train) in {path.name}", origin=str(path))


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: .npz file not found (data.path)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in KEYS if k not in archive.files]
            if missing:
                raise DataError(f"{path}: lacks {', '.join(missing)}; an .npz source holds the arrays "
                                f"{', '.join(KEYS)} (it has: {', '.join(archive.files) or 'none'})")
            return {k: archive[k] for k in KEYS}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path}: holds object arrays (pickled Python objects); save numeric arrays "
                            "only") from None
        raise DataError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None
