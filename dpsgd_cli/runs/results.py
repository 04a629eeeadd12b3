"""Run outputs: per-epoch records → a pandas DataFrame with a fixed column order, written atomically.
pandas is imported only by the functions that use it.

Every write is atomic (see `dpsgd_cli.atomic`): a crash never leaves a half-written metrics.csv or
run.yaml, readers see the old file or the new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dpsgd_cli.atomic import atomic_write_text
from dpsgd_cli.labels import NUM_CLASSES

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, kw_only=True)
class EpochRecord(Mapping):
    """One row of metrics.csv: the state of a run after `epoch` epochs (`step` steps in all).

    Losses are mean softmax cross-entropy in nats; accuracies fractions in [0, 1]; train_loss and
    train_accuracy are averages over the epoch's steps of the examples each step trained on, before its
    update, and train_nonfinite_units counts the units (examples, or microbatches) the epoch's steps
    dropped for a non-finite gradient norm or loss (all three computed on the private batches without
    noise: not covered by ε); test_* on the whole test split after the epoch;
    ε at `delta` by each accountant (inf for a non-private run); `elapsed_s` wall seconds since the start.
    Also a read-only mapping from the CSV column names (`METRIC_COLUMNS`) to values."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    epsilon_rdp: float
    epsilon_pld: float
    delta: float
    noise_multiplier: float
    l2_norm_clip: float
    batch_size: int
    learning_rate: float
    elapsed_s: float
    train_nonfinite_units: float = 0.0
    test_accuracy_per_class: tuple[float, ...] = ()

    def row(self) -> dict[str, Any]:
        """The CSV row: the scalar fields, then `test_accuracy_class_<k>` for each class."""
        scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != _PER_CLASS}
        per_class = {f"test_accuracy_class_{k}": v for k, v in enumerate(self.test_accuracy_per_class)}
        return {**scalars, **per_class}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EpochRecord:
        """Inverse of `row` (e.g. a record kept in a checkpoint)."""
        scalars = {f.name: row[f.name] if f.default is dataclasses.MISSING else row.get(f.name, f.default)
                   for f in dataclasses.fields(cls) if f.name != _PER_CLASS}
        per_class = tuple(row[f"test_accuracy_class_{k}"] for k in range(class_count(row)))
        return cls(**scalars, test_accuracy_per_class=per_class)

    def __getitem__(self, column: str) -> Any:
        return self.row()[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self.row())

    def __len__(self) -> int:
        return len(self.row())


_PER_CLASS = "test_accuracy_per_class"
SCALAR_COLUMNS = tuple(f.name for f in dataclasses.fields(EpochRecord) if f.name != _PER_CLASS)


def metric_columns(num_classes: int = NUM_CLASSES) -> tuple[str, ...]:
    """The columns of metrics.csv for data of `num_classes` classes."""
    return (*SCALAR_COLUMNS, *(f"test_accuracy_class_{k}" for k in range(num_classes)))


METRIC_COLUMNS = metric_columns(NUM_CLASSES)  # the built-in datasets' (10 classes)


def class_count(row: Iterable[str]) -> int:
    """K of the per-class columns `test_accuracy_class_0` … `_{K−1}` among a row's keys (or columns)."""
    keys = set(row)
    k = 0
    while f"test_accuracy_class_{k}" in keys:
        k += 1
    return k


# What the run's (ε, δ) covers: the weights and what is computed from them alone (test metrics), ε, and
# the run's public settings. `dpsgd export` and the trackers publish these columns and no other.
COVERED_COLUMNS = (
    "epoch", "step", "test_loss", "test_accuracy", "epsilon_rdp", "epsilon_pld", "delta", "noise_multiplier",
    "l2_norm_clip", "batch_size", "learning_rate", *(f"test_accuracy_class_{k}" for k in range(NUM_CLASSES)),
)
# Computed from the private batches without noise (train_*), or timings that grow with the realised
# (secret) Poisson batch sizes: they stay in the run directory.
PRIVATE_COLUMNS = tuple(c for c in METRIC_COLUMNS if c not in COVERED_COLUMNS)


def is_covered(column: str) -> bool:
    """Whether metrics.csv's `column` is covered by ε: one of COVERED_COLUMNS, or the per-class test
    accuracy of any class (data with more than 10 classes)."""
    return column in COVERED_COLUMNS or column.startswith("test_accuracy_class_")


def metrics_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Records (one per epoch: EpochRecord or a mapping of columns) as a DataFrame whose columns are
    exactly `metric_columns(K)`, K the records' number of per-class columns."""
    import pandas as pd  # imported when first needed: reading run.yaml alone does not need it

    frame = pd.DataFrame([dict(r) for r in records])
    if frame.empty:
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    columns = metric_columns(class_count(frame.columns))
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"metrics records lack columns: {missing}")
    return frame.loc[:, list(columns)]


def write_metrics(records: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Write the per-epoch metrics CSV atomically (floats printed with full round-trip precision)."""
    atomic_write_text(path, metrics_frame(records).to_csv(index=False))


def read_metrics(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path)


def write_yaml(data: dict[str, Any], path: Path) -> None:
    """Write a YAML document atomically, keys in the given order."""
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def write_table(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """Write any list of flat records as CSV, atomically (columns in first-seen order)."""
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(list(rows)).to_csv(index=False))
