"""Tabular data: a folder holding `train.csv` and `test.csv` (`data.dataset: csv`, `data.path`).

Each file has a header row; the column `data.label_column` (default `label`) holds whole-number labels
0..K−1, every other column a numeric feature. Both files have the same columns (in any order; the test
file's are put in the training file's order). Features are float32 [N, D], used as they are (no scaling);
numbers are parsed with round-trip precision, so a value written with Python's `repr` reads back exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources.base import SourceData, as_inputs, as_labels, check_splits

FILES = {"train": "train.csv", "test": "test.csv"}


def load(folder: Path, label_column: str = "label") -> SourceData:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (data.path of a csv source: a folder holding "
                        f"{FILES['train']} and {FILES['test']})")
    train = _read(folder / FILES["train"], label_column)
    test = _read(folder / FILES["test"], label_column)
    features = [c for c in train.columns if c != label_column]
    extra = [c for c in test.columns if c not in train.columns]
    missing = [c for c in train.columns if c not in test.columns]
    if extra or missing:
        what = (f"lacks the column(s) {', '.join(map(repr, missing[:5]))}" if missing
                else f"has column(s) the training file lacks: {', '.join(map(repr, extra[:5]))}")
        raise DataError(f"{folder / FILES['test']}: {what}; both files need the same columns")
    arrays = []
    for name, frame in ((FILES["train"], train), (FILES["test"], test)):
        where = folder / name
        arrays.append(as_inputs(_numeric(frame[features], where), str(where)))
        arrays.append(as_labels(_numeric(frame[[label_column]], where)[:, 0], f"{where}: column "
                                f"{label_column!r}"))
    x_train, y_train, x_test, y_test = arrays
    names = check_splits(x_train, y_train, x_test, y_test, str(folder))
    return SourceData(x_train, y_train, x_test, y_test, names,
                      record=f"one row of {FILES['train']} (its {len(features)} features and its label)",
                      origin=str(folder))


def _read(path: Path, label_column: str):
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found (a csv source's data.path holds {FILES['train']} and "
                        f"{FILES['test']})")
    try:
        frame = pd.read_csv(path, float_precision="round_trip")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file; it needs a header row and one row per record") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        text = " ".join(str(exc).split())[:160]
        raise DataError(f"{path}: not a readable CSV table ({text})") from None
    if label_column not in frame.columns:
        raise DataError(f"{path}: no label column {label_column!r} (data.label_column); its columns: "
                        f"{', '.join(map(str, frame.columns[:8]))}{' …' if len(frame.columns) > 8 else ''}")
    if len(frame.columns) < 2:
        raise DataError(f"{path}: has only the label column; it needs at least one feature column")
    duplicated = frame.columns[frame.columns.duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: column {duplicated[0]!r} appears twice")
    return frame


def _numeric(frame, where: Path) -> np.ndarray:
    """The frame's values as numbers; DataError naming the first non-numeric cell."""
    for column in frame.columns:
        kind = frame[column].dtype.kind
        if kind not in "iufb":
            values = frame[column]
            import pandas as pd

            parsed = pd.to_numeric(values, errors="coerce")
            bad = np.flatnonzero(parsed.isna() & values.notna())
            row = int(bad[0]) if bad.size else 0
            raise DataError(f"{where}: column {column!r} is not numeric (row {row + 1}: "
                            f"{str(values.iloc[row])[:30]!r}); every column but the label must hold numbers")
    return frame.to_numpy(dtype=np.float64)
