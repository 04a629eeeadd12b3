"""Run outputs: per-epoch records → a pandas DataFrame with a fixed column order, written atomically.
pandas is imported only by the functions that use it.

Every write is atomic (see `dpsgd_cli.atomic`): a crash never leaves a half-written metrics.csv or
run.yaml, readers see the old file or the new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dpsgd_cli.atomic import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

NUM_CLASSES = 10
METRIC_COLUMNS = (
    "epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
    "epsilon_rdp", "epsilon_pld", "delta", "noise_multiplier", "l2_norm_clip", "batch_size",
    "learning_rate", "elapsed_s",
    *(f"test_accuracy_class_{k}" for k in range(NUM_CLASSES)),
)


def metrics_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Records (one per epoch) as a DataFrame whose columns are exactly METRIC_COLUMNS."""
    import pandas as pd  # imported when first needed: reading run.yaml alone does not need it

    frame = pd.DataFrame(list(records))
    missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
    if frame.empty:
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    if missing:
        raise ValueError(f"metrics records lack columns: {missing}")
    return frame.loc[:, list(METRIC_COLUMNS)]


def write_metrics(records: Iterable[dict[str, Any]], path: Path) -> None:
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
