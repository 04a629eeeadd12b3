"""Sweeps: a base config × a grid of values, each point an ordinary run under `results/<sweep-name>/`.

`plan_sweep` parses `--grid key=v1,v2` items, builds one validated config per point of the cartesian
product (named after the grid keys, e.g. `noise_multiplier=1.1_batch_size=128`) and finds which points
already finished. `run_sweep` trains the others through `runner.run(cfg, overwrite=True)`, so an
unfinished directory of an earlier attempt is replaced, and then rewrites `summary.csv`.

The summary describes every finished run found in the sweep directory (not only this invocation's
points), and is rebuilt under a file lock: independent invocations on the same sweep (`make -j2`, one
per point) never lose each other's rows (see `run_summaries`, which also serves `dpsgd plot` and
`dpsgd report`). This module never prints; progress goes to callbacks. It imports `results` (pandas)
only when it reads run files, so `dpsgd --help` stays quick.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.config import ExperimentConfig, flatten, load_config, replace
from dpsgd_cli.errors import ConfigError, RunDirError, TrainingError
from dpsgd_cli.privacy.run_key import RunKey, new_run_key
from dpsgd_cli.runs.run_dir import FINISHED, RunDir
from dpsgd_cli.runs.summaries import NOT_SETTINGS, value_text, write_summary

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
        if key.startswith("tracking."):
            raise ConfigError(f"--grid {item!r}: a sweep's points share their trackers; set {key} with --set")
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

    def only(self, index: int) -> SweepPlan:
        """The plan reduced to grid point `index` (0-based, in `--list` order): one job of a cluster
        array runs one point. Raises ConfigError when out of range."""
        if not 0 <= index < len(self.runs):
            raise ConfigError(f"--index: {index} is not a point of this sweep; use 0..{len(self.runs) - 1} "
                              "(see dpsgd sweep --list)")
        return SweepPlan(self.name, self.sweep_dir, self.axes, (self.runs[index],))


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
    rd = RunDir(cfg.run_dir)
    if not rd.has_run_file():
        return "new", ()
    try:
        doc = rd.document()
    except RunDirError:
        return "unfinished", ()
    if doc.get("status") != FINISHED:
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


def point_key(planned: PlannedRun) -> RunKey:
    """The run key of one sweep point: a fresh secret key, or in reproducible mode the key of (seed, the
    point's name), so that no two points of a sweep share noise or batches."""
    cfg = planned.cfg
    return new_run_key(reproducible=cfg.privacy.reproducible, seed=cfg.seed, label=planned.name)


def run_sweep(plan: SweepPlan, *, overwrite: bool = False, run_fn: Callable[..., Any] | None = None,
              on_run_start: RunStartCallback | None = None, on_run_end: RunEndCallback | None = None,
              on_step: Callable | None = None, on_epoch: Callable | None = None,
              summary: bool = True) -> SweepOutcome:
    """Train the plan's unfinished points one after another, then (if `summary`) rewrite the sweep's
    summary.csv. Jobs of a cluster array pass `summary=False` and one last job calls `summarize`.

    `overwrite`: re-train finished points too. A point that finished with a different config raises
    RunDirError before anything trains (unless `overwrite`). A run that diverges (TrainingError) is
    recorded in `failed` and the sweep goes on; other errors and Ctrl-C stop it (the interrupted run's
    directory stays unfinished and is replaced next time). `run_fn` defaults to `runner.run`.

    With `tracking.mlflow` the points are child runs of one parent MLflow run per sweep directory (found
    again by a later invocation on the same sweep)."""
    changed = [r for r in plan.runs if r.state == "changed"]
    if changed and not overwrite:
        first = changed[0]
        more = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
        raise RunDirError(f"{first.run_dir}: finished with a different config "
                          f"({'; '.join(first.differences)}){more}; "
                          "pass --overwrite to re-train, or give the sweep another --name")
    if run_fn is None:
        from dpsgd_cli.experiment.run import run as run_fn  # TensorFlow is imported only now
    outcome = SweepOutcome()
    todo = plan.to_train(overwrite)
    outcome.skipped = [r for r in plan.runs if r not in todo]
    parent = _tracking_parent(plan, todo)
    status = "failed"
    try:
        for index, planned in enumerate(todo, start=1):
            if on_run_start:
                on_run_start(index, len(todo), planned)
            extra = {"tracking_parent": parent} if parent else {}
            try:
                result = run_fn(planned.cfg, on_step=on_step, on_epoch=on_epoch, overwrite=True,
                                run_key=point_key(planned), **extra)
            except TrainingError as exc:
                outcome.failed.append((planned, str(exc)))
                result = exc
            else:
                outcome.trained.append(planned)
            if on_run_end:
                on_run_end(index, len(todo), planned, result)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if parent:
            from dpsgd_cli.runs.trackers.mlflow_store import close_sweep_parent

            close_sweep_parent(todo[0].cfg, parent, status)
        if summary and plan.sweep_dir.is_dir():
            outcome.summary_path = write_summary(plan.sweep_dir, plan.keys)
    return outcome


def _tracking_parent(plan: SweepPlan, todo: list[PlannedRun]) -> str | None:
    """The sweep's parent MLflow run when its points log to MLflow (the first point's tracking settings;
    the grid cannot vary them), else None."""
    if not todo or not todo[0].cfg.tracking.mlflow:
        return None
    from dpsgd_cli.runs.trackers import require_packages
    from dpsgd_cli.runs.trackers.mlflow_store import open_sweep_parent

    require_packages(todo[0].cfg)
    return open_sweep_parent(todo[0].cfg, plan.name, plan.sweep_dir)


def summarize(plan: SweepPlan) -> Path:
    """Rebuild the sweep's summary.csv from the runs in its directory, training nothing."""
    if not plan.sweep_dir.is_dir():
        raise RunDirError(f"{plan.sweep_dir}: no such sweep directory; nothing to summarize")
    return write_summary(plan.sweep_dir, plan.keys)
