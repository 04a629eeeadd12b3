"""Sweeps: a base config × a grid of values, each point an ordinary run under `results/<sweep-name>/`.

`plan_sweep` parses `--grid key=v1,v2` items, builds one validated config per point of the cartesian
product (named after the grid keys, e.g. `noise_multiplier=1.1_batch_size=128`) and finds which points
already finished. `run_sweep` trains the others through `runner.run(cfg, overwrite=True)`, so an
unfinished directory of an earlier attempt is replaced, and then rewrites `summary.csv`.

The summary describes every finished run found in the sweep directory (not only this invocation's
points), and is rebuilt under a file lock: independent invocations on the same sweep (`make -j2`, one
per point) never lose each other's rows. Reading helpers (`load_runs`, `varied_keys`, `summary_row`)
also serve `dpsgd plot` and `dpsgd report`. This module never prints; progress goes to callbacks. It
imports `results` (pandas) only when it reads or writes run files, so `dpsgd --help` stays quick.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.config import ExperimentConfig, flatten, load_config, replace
from dpsgd_cli.errors import ConfigError, RunDirError, TrainingError

SUMMARY_FILE = "summary.csv"
LOCK_FILE = ".summary.lock"
FINISHED = "finished"
# Keys that say where a run lives or where its data is read from, not what the run is.
NOT_SETTINGS = frozenset({"name", "output_dir", "data.data_dir"})
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
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridAxis:
    """One `--grid key=v1,v2,...`: the dotted config key, the values as typed, and as YAML reads them."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


def parse_grid(items: Iterable[str]) -> list[GridAxis]:
    """Parse `key=v1,v2` items (values read as YAML scalars, like `--set`). Raises ConfigError."""
    axes: list[GridAxis] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(key.split(".")):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., "
                              "e.g. privacy.noise_multiplier=1.1,1.2")
        if key in ("name", "output_dir"):
            raise ConfigError(f"--grid {item!r}: the sweep sets {key} of each run itself; use --name or "
                              "--set output_dir=DIR for the sweep")
        if any(axis.key == key for axis in axes):
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        texts = tuple(t.strip() for t in text.split(","))
        if not all(texts):
            raise ConfigError(f"--grid {item!r}: empty value; separate values with single commas")
        values = tuple(_yaml_scalar(t) for t in texts)
        if any(a == b and type(a) is not bool for i, a in enumerate(values) for b in values[i + 1:]):
            raise ConfigError(f"--grid {item!r}: a value is listed twice")
        axes.append(GridAxis(key, texts, values))
    return axes


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def grid_points(axes: Sequence[GridAxis]) -> list[tuple[int, ...]]:
    """Index tuples of the cartesian product, the first axis varying slowest (as in nested loops)."""
    return list(itertools.product(*(range(len(axis.values)) for axis in axes)))


def value_text(value: Any) -> str:
    """A config value as it appears in a run name or a legend: 1.1, 128, 1e-05, true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def run_name(assignment: Sequence[tuple[str, Any]]) -> str:
    """A readable run-directory name from (dotted key, value) pairs: `noise_multiplier=1.1_batch_size=128`.

    Keys go by their last dotted part unless two of them share it. Characters a directory name should
    not hold become '-'."""
    lasts = [key.rsplit(".", 1)[-1] for key, _ in assignment]
    parts = []
    for (key, value), last in zip(assignment, lasts):
        shown = last if lasts.count(last) == 1 else key
        parts.append(f"{shown}={value_text(value)}")
    return _UNSAFE.sub("-", "_".join(parts))


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One point of a sweep. `state`: new, unfinished (will be replaced), finished (skipped), changed
    (finished with another config: an error unless the sweep overwrites)."""

    name: str
    assignment: tuple[tuple[str, Any], ...]
    cfg: ExperimentConfig
    state: str
    differences: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


@dataclass(frozen=True)
class SweepPlan:
    name: str
    sweep_dir: Path
    axes: tuple[GridAxis, ...]
    runs: tuple[PlannedRun, ...]

    @property
    def keys(self) -> list[str]:
        return [axis.key for axis in self.axes]

    def to_train(self, overwrite: bool = False) -> list[PlannedRun]:
        return [r for r in self.runs if overwrite or r.state != FINISHED]


def plan_sweep(config: str | Path | None, overrides: Sequence[str] = (), grid: Sequence[str] = (),
               name: str | None = None) -> SweepPlan:
    """Validate every point's config before anything trains, and find which points already finished.

    The sweep is named `name` (default: the base config's name) and lives in `<output_dir>/<name>/`.
    With no grid the sweep holds one run named like the base config. Raises ConfigError."""
    axes = parse_grid(grid)
    base = load_config(config, list(overrides))
    sweep_name = name or base.name
    sweep_dir = Path(base.output_dir) / sweep_name
    if not _PLAIN_NAME.match(sweep_name):
        raise ConfigError(f"--name {sweep_name!r}: must be a plain directory name "
                          "(letters, digits, . _ - = +)")
    runs = []
    for point in grid_points(axes):
        settings = [f"{axis.key}={axis.texts[i]}" for axis, i in zip(axes, point)]
        cfg = load_config(config, [*overrides, *settings])
        values = flatten(cfg.to_dict())
        assignment = tuple((axis.key, values.get(axis.key, axis.values[i])) for axis, i in zip(axes, point))
        run = run_name(assignment) if axes else base.name
        cfg = replace(cfg, output_dir=str(sweep_dir), name=run)
        state, differences = run_state(cfg)
        runs.append(PlannedRun(run, assignment, cfg, state, differences))
    if len({r.name for r in runs}) < len(runs):
        raise ConfigError("--grid: two points get the same run name; use plainer values")
    return SweepPlan(sweep_name, sweep_dir, tuple(axes), tuple(runs))


def run_state(cfg: ExperimentConfig) -> tuple[str, tuple[str, ...]]:
    """(state, differing keys) of the run directory `cfg` would write; see PlannedRun."""
    from dpsgd_cli.results import read_yaml

    path = cfg.run_dir / "run.yaml"
    if not path.is_file():
        return "new", ()
    try:
        doc = read_yaml(path)
    except (OSError, yaml.YAMLError):
        return "unfinished", ()
    if not isinstance(doc, dict) or doc.get("status") != FINISHED:
        return "unfinished", ()
    stored = flatten(doc.get("config") or {})
    planned = flatten(cfg.to_dict())
    differences = tuple(f"{key}: {value_text(stored[key])} → {value_text(planned[key])}"
                        for key in planned
                        if key in stored and key not in NOT_SETTINGS and stored[key] != planned[key])
    return ("changed", differences) if differences else (FINISHED, ())


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
RunStartCallback = Callable[[int, int, PlannedRun], None]
RunEndCallback = Callable[[int, int, PlannedRun, Any], None]


@dataclass
class SweepOutcome:
    trained: list[PlannedRun] = field(default_factory=list)
    skipped: list[PlannedRun] = field(default_factory=list)
    failed: list[tuple[PlannedRun, str]] = field(default_factory=list)
    summary_path: Path | None = None


def run_sweep(plan: SweepPlan, *, overwrite: bool = False, run_fn: Callable[..., Any] | None = None,
              on_run_start: RunStartCallback | None = None, on_run_end: RunEndCallback | None = None,
              on_step: Callable | None = None, on_epoch: Callable | None = None) -> SweepOutcome:
    """Train the plan's unfinished points one after another, then rewrite the sweep's summary.csv.

    `overwrite`: re-train finished points too. A point that finished with a different config raises
    RunDirError before anything trains (unless `overwrite`). A run that diverges (TrainingError) is
    recorded in `failed` and the sweep goes on; other errors and Ctrl-C stop it (the interrupted run's
    directory stays unfinished and is replaced next time). `run_fn` defaults to `runner.run`."""
    changed = [r for r in plan.runs if r.state == "changed"]
    if changed and not overwrite:
        first = changed[0]
        more = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
        raise RunDirError(f"{first.run_dir}: finished with a different config "
                          f"({'; '.join(first.differences)}){more}; "
                          "pass --overwrite to re-train, or give the sweep another --name")
    if run_fn is None:
        from dpsgd_cli.runner import run as run_fn  # TensorFlow is imported only now
    outcome = SweepOutcome()
    todo = plan.to_train(overwrite)
    outcome.skipped = [r for r in plan.runs if r not in todo]
    try:
        for index, planned in enumerate(todo, start=1):
            if on_run_start:
                on_run_start(index, len(todo), planned)
            try:
                result = run_fn(planned.cfg, on_step=on_step, on_epoch=on_epoch, overwrite=True)
            except TrainingError as exc:
                outcome.failed.append((planned, str(exc)))
                result = exc
            else:
                outcome.trained.append(planned)
            if on_run_end:
                on_run_end(index, len(todo), planned, result)
    finally:
        if plan.sweep_dir.is_dir():
            outcome.summary_path = write_summary(plan.sweep_dir, plan.keys)
    return outcome


# ------------------------------------------------------------------------------------------------
# Reading runs back: summary.csv, report and plots
# ------------------------------------------------------------------------------------------------
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
        return flatten(self.doc.get("config") or {})

    @property
    def noise_multiplier(self) -> float | None:
        resolved = self.doc.get("resolved") or {}
        sigma = resolved.get("noise_multiplier", self.settings.get("privacy.noise_multiplier"))
        return None if sigma is None else float(sigma)

    @property
    def private(self) -> bool:
        return bool(self.settings.get("privacy.enabled", True))


def read_run(run_dir: Path) -> RunInfo:
    """Read run.yaml and metrics.csv of one run. Raises RunDirError if run.yaml is unreadable."""
    from dpsgd_cli.results import read_metrics, read_yaml

    run_dir = Path(run_dir)
    try:
        doc = read_yaml(run_dir / "run.yaml")
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{run_dir / 'run.yaml'}: cannot read ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise RunDirError(f"{run_dir / 'run.yaml'}: not a run description")
    metrics_path = run_dir / "metrics.csv"
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else None
    if metrics is not None and metrics.empty:
        metrics = None
    return RunInfo(run_dir, doc, metrics)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run directory (holds run.yaml) or a sweep directory (its subdirectories that do).
    Raises RunDirError for a path that is neither."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "run.yaml").is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(p for p in path.iterdir() if (p / "run.yaml").is_file())
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
        dirs = [p for p in sorted(sweep_dir.iterdir()) if (p / "run.yaml").is_file()]
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
