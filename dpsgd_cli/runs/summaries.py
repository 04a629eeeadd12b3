"""Finished runs read back from disk, and what summarizes them: rows of summary.csv, the tables of
`dpsgd report`, the titles and legend labels of `dpsgd plot`.

A run is whatever directory holds a run.yaml (`find_run_dirs`); `load_runs` reads them and finds which
settings differ between them (`varied_keys`), which is what labels and columns name. summary.csv is
rebuilt under a file lock, so independent sweep invocations on one directory never lose each other's
rows. pandas is imported only when run files are read or written.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgd_cli.config import flatten, resolve_aliases
from dpsgd_cli.errors import RunDirError
from dpsgd_cli.runs.run_dir import FINISHED, RunDir

SUMMARY_FILE = "summary.csv"
LOCK_FILE = ".summary.lock"
# Keys that say where a run lives, where its data are read from or where it is tracked, not what the run is.
NOT_SETTINGS = frozenset({"name", "output_dir", "data.data_dir", "tracking.tensorboard", "tracking.mlflow",
                          "tracking.mlflow_experiment", "tracking.training_metrics"})
SUMMARY_COLUMNS = ("noise_multiplier", "epochs", "final_test_accuracy", "best_test_accuracy", "best_epoch",
                   "epsilon_rdp", "epsilon_pld", "delta", "wall_time_s")
# How plots and tables name a config key; keys not listed go by their last dotted part.
SHORT_NAMES = {
    "privacy.noise_multiplier": "σ", "privacy.l2_norm_clip": "C", "privacy.target_epsilon": "target ε",
    "privacy.delta": "δ", "privacy.num_microbatches": "microbatches", "privacy.enabled": "private",
    "data.batch_size": "batch size", "training.learning_rate": "lr", "training.epochs": "epochs",
}
DATASET_TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
# Settings worth naming in a title when all runs share them.
TITLE_KEYS = ("privacy.noise_multiplier", "privacy.target_epsilon", "privacy.l2_norm_clip",
              "data.batch_size", "training.learning_rate", "training.optimizer")


def value_text(value: Any) -> str:
    """A config value as it appears in a run name or a legend: 1.1, 128, 1e-05, true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class RunInfo:
    """A run directory as read from disk. `metrics` is a DataFrame, or None before the first epoch."""

    run_dir: Path
    doc: dict[str, Any]
    metrics: Any

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def status(self) -> str:
        return str(self.doc.get("status", "unknown"))

    @property
    def settings(self) -> dict[str, Any]:
        return flatten(resolve_aliases(self.doc.get("config") or {}))

    @property
    def noise_multiplier(self) -> float | None:
        resolved = self.doc.get("resolved") or {}
        sigma = resolved.get("noise_multiplier", self.settings.get("privacy.noise_multiplier"))
        return None if sigma is None else float(sigma)

    @property
    def private(self) -> bool:
        return bool(self.settings.get("privacy.enabled", True))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label k's name: the built-in dataset's, else what run.yaml records (`resolved.data`), else
        "0".."K−1" for the per-class columns of metrics.csv."""
        from dpsgd_cli.labels import CLASS_NAMES
        from dpsgd_cli.runs.results import class_count

        dataset = self.settings.get("data.dataset", "fashion_mnist")
        recorded = ((self.doc.get("resolved") or {}).get("data") or {}).get("class_names")
        if dataset in CLASS_NAMES:
            return CLASS_NAMES[dataset]
        if recorded:
            return tuple(map(str, recorded))
        count = class_count(self.metrics.columns) if self.metrics is not None else 0
        return tuple(str(k) for k in range(count))


def read_run(run_dir: Path) -> RunInfo:
    """Read run.yaml and metrics.csv of one run. Raises RunDirError if run.yaml is unreadable."""
    from dpsgd_cli.runs.results import read_metrics

    rd = RunDir(run_dir)
    doc = rd.document()
    metrics = read_metrics(rd.metrics_file) if rd.metrics_file.is_file() else None
    if metrics is not None and metrics.empty:
        metrics = None
    return RunInfo(rd.path, doc, metrics)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run directory (holds run.yaml) or a sweep directory (its subdirectories that do).
    Raises RunDirError for a path that is neither."""
    found: list[Path] = []
    for path in map(Path, paths):
        if RunDir(path).has_run_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(p for p in path.iterdir() if RunDir(p).has_run_file())
            if not candidates:
                raise RunDirError(f"{path}: no runs here (no run.yaml in it or in its subdirectories)")
        else:
            raise RunDirError(f"{path}: no such run or sweep directory")
        found += [c for c in candidates if c.resolve() not in {f.resolve() for f in found}]
    return found


def load_runs(paths: Iterable[str | Path], preferred: Sequence[str] = (),
              finished_only: bool = False) -> tuple[list[RunInfo], list[str]]:
    """The runs under `paths` (see find_run_dirs) and the config keys that differ between them, runs
    sorted by those keys' values (numbers numerically)."""
    runs = [read_run(d) for d in find_run_dirs(paths)]
    if finished_only:
        runs = [r for r in runs if r.status == FINISHED]
    keys = varied_keys([r.settings for r in runs], preferred)
    runs.sort(key=lambda r: tuple(_sort_key(r.settings.get(k)) for k in keys))
    return runs, keys


def varied_keys(settings: Sequence[dict[str, Any]], preferred: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values are not the same in all `settings` (flattened configs), `preferred`
    first (kept even if constant, when present), then in config order. Names and paths do not count,
    nor does a key that some runs lack (written by an older version)."""
    keys = [k for k in preferred if any(k in s for s in settings)]
    for key in dict.fromkeys(k for s in settings for k in s):
        if key in keys or key in NOT_SETTINGS:
            continue
        values = [s[key] for s in settings if key in s]  # a key missing from an older run counts as equal
        if any(v != values[0] for v in values[1:]):
            keys.append(key)
    return keys


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, value_text(value))


def short_name(key: str) -> str:
    """σ for privacy.noise_multiplier, batch size for data.batch_size, ... (see SHORT_NAMES)."""
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def run_labels(runs: Sequence[RunInfo], keys: Sequence[str]) -> list[str]:
    """Legend labels naming what differs: "σ = 1.1", "batch size = 64, σ ≈ 0.831", "non-private"."""
    sigmas = {round(r.noise_multiplier, 6) for r in runs if r.private and r.noise_multiplier is not None}
    show_resolved_sigma = "privacy.noise_multiplier" not in keys and len(sigmas) > 1
    labels = []
    for run in runs:
        parts = [] if run.private else ["non-private"]
        for key in keys:
            if key == "privacy.enabled" or (not run.private and key.startswith("privacy.")):
                continue
            parts.append(f"{short_name(key)} = {value_text(run.settings.get(key))}")
        if show_resolved_sigma and run.private and run.settings.get("privacy.noise_multiplier") is None:
            parts.append(f"σ ≈ {run.noise_multiplier:.3g}")
        labels.append(", ".join(parts) or run.name)
    if len(set(labels)) < len(labels):  # e.g. identical configs: fall back to directory names
        labels = [f"{label} ({run.name})" if label != run.name else label for label, run in zip(labels, runs)]
    return labels


def shared_title(runs: Sequence[RunInfo], keys: Sequence[str]) -> str:
    """What all runs share: dataset, DP-SGD or not, and the TITLE_KEYS settings that are equal."""
    first = runs[0].settings
    dataset = first.get("data.dataset")
    parts = [DATASET_TITLES.get(dataset, str(dataset))] if all(
        r.settings.get("data.dataset") == dataset for r in runs) else []
    if all(r.private for r in runs):
        parts.append("DP-SGD")
    for key in TITLE_KEYS:
        value = first.get(key)
        if key in keys or value is None or any(r.settings.get(key) != value for r in runs):
            continue
        if key.startswith("privacy.") and not all(r.private for r in runs):
            continue
        parts.append(value if key == "training.optimizer" else f"{short_name(key)} = {value_text(value)}")
    return ", ".join(parts)


def summary_row(run: RunInfo, keys: Sequence[str] = ()) -> dict[str, Any]:
    """One summary line: the run's name, its values of `keys`, and SUMMARY_COLUMNS (NaN when unknown)."""
    row: dict[str, Any] = {"run": run.name, **{k: run.settings.get(k) for k in keys}}
    row.update(dict.fromkeys(SUMMARY_COLUMNS, math.nan))
    row["noise_multiplier"] = run.noise_multiplier if run.private else 0.0
    row["delta"] = run.settings.get("privacy.delta", math.nan)
    m = run.metrics
    if m is not None:
        last = m.iloc[-1]
        best = int(m["test_accuracy"].to_numpy().argmax())
        row.update(epochs=int(last["epoch"]), final_test_accuracy=float(last["test_accuracy"]),
                   best_test_accuracy=float(m["test_accuracy"].iloc[best]),
                   best_epoch=int(m["epoch"].iloc[best]), epsilon_rdp=float(last["epsilon_rdp"]),
                   epsilon_pld=float(last["epsilon_pld"]), delta=float(last["delta"]),
                   wall_time_s=float(last["elapsed_s"]))
    return row


def report_notes(runs: Sequence[RunInfo]) -> list[str]:
    """What a reader of a comparison must know beyond the numbers: runs whose ε rests on a secret seed
    (reproducible mode), and that choosing among private runs spends privacy of its own."""
    notes = [f"{run.name}: trained in reproducible mode (privacy.reproducible: true): its noise and batches "
             "derive from its seed, so its ε holds only while the seed and the config stay secret"
             for run in runs if run.private and run.settings.get("privacy.reproducible")]
    if sum(run.private for run in runs) > 1:
        notes.append("choosing hyper-parameters (or a run) by these runs' accuracy on the private data "
                     "spends privacy beyond each run's ε")
    return notes


def summary_text(runs: Sequence[RunInfo], keys: Sequence[str]) -> str:
    """The summary CSV of `runs`: columns run, the varied keys, then SUMMARY_COLUMNS."""
    columns = ["run", *keys, *SUMMARY_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = summary_row(run, keys)
        writer.writerow({k: _csv_value(row[k]) for k in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return value_text(value)
    return repr(value) if isinstance(value, float) else value


def write_summary(sweep_dir: Path, preferred: Sequence[str] = ()) -> Path:
    """Rewrite `<sweep_dir>/summary.csv` from every finished run in it, under an exclusive lock (so
    concurrent sweeps on the same directory serialise here), atomically. Returns its path."""
    from dpsgd_cli.atomic import atomic_write_text

    sweep_dir = Path(sweep_dir)
    path = sweep_dir / SUMMARY_FILE
    with _locked(sweep_dir / LOCK_FILE):
        dirs = [p for p in sorted(sweep_dir.iterdir()) if RunDir(p).has_run_file()]
        runs, keys = load_runs(dirs, preferred, finished_only=True) if dirs else ([], list(preferred))
        atomic_write_text(path, summary_text(runs, keys))
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
