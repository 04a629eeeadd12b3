"""Data sources beyond the built-in IDX datasets: CIFAR-10/100, a NumPy `.npz` file, an image folder and a
CSV table. Each loader returns a `SourceData`: float32 inputs, int32 labels 0..K−1 and what one record is.

No TensorFlow here (the Keras download of CIFAR imports Keras only when it runs). Every problem with the
data raises `DataError` with one line naming the file and what is wrong; nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources.base import SourceData

# data.dataset → the loader's module (imported when used); these need `data.path`
FILE_SOURCES = ("npz", "image_folder", "csv")
CIFAR = ("cifar10", "cifar100")
SOURCES = (*CIFAR, *FILE_SOURCES)

__all__ = ["CIFAR", "FILE_SOURCES", "SOURCES", "SourceData", "load_source"]


def load_source(name: str, *, data_dir: str | Path | None = None, path: str | Path | None = None,
                label_column: str = "label") -> SourceData:
    """Load the source `name` (one of `SOURCES`). CIFAR comes from `data_dir` (the canonical
    `cifar-10-batches-py` / `cifar-100-python` folder in it) or the Keras download when `data_dir` is None;
    the file sources read `path`; `label_column` names the CSV's label column."""
    if name in CIFAR:
        from dpsgd_cli.training.sources import cifar

        return cifar.load(name, data_dir)
    if name not in FILE_SOURCES:
        raise DataError(f"data.dataset: unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")
    if path is None:
        raise DataError(f"data.path: data.dataset {name} reads its data from data.path; set it")
    if name == "npz":
        from dpsgd_cli.training.sources import npz

        return npz.load(Path(path))
    if name == "image_folder":
        from dpsgd_cli.training.sources import image_folder

        return image_folder.load(Path(path))
    from dpsgd_cli.training.sources import csv_table

    return csv_table.load(Path(path), label_column)
