"""Experiment trackers (TensorBoard, MLflow) fed by the run orchestrator after every epoch.

What may leave a run through a tracker is decided here, once (`tracked_metrics`): the metrics the privacy
statement covers — the test metrics, computed from the weights alone, and ε by both accountants — and,
only when `tracking.training_metrics` is true, `train_loss` and `train_accuracy` (computed on the private
batches without noise; the statement then says they were sent). Never: run.key, the checkpoint, canaries,
timings. The hyperparameters are the config and what it resolves to (σ, q, steps, n), all public.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dpsgd_cli.config import ExperimentConfig
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.runs.results import is_covered

EPSILONS = ("epsilon_rdp", "epsilon_pld")
# covered columns that are the run's settings or counters: logged as params (or as the step), not metrics
SETTINGS = ("epoch", "step", "delta", "noise_multiplier", "l2_norm_clip", "batch_size", "learning_rate")
TRAINING_METRICS = ("train_loss", "train_accuracy")


def tracked_metrics(record: Mapping[str, Any], training_metrics: bool = False) -> dict[str, float]:
    """The values of one epoch's record a tracker may log as metrics: the columns ε covers
    (`results.is_covered`, the rule `dpsgd export` applies) that are not settings — test loss and accuracy,
    per-class test accuracy, ε by each accountant when finite (a non-private run has none) — and the
    training metrics only when asked for."""
    keys = [k for k in record if is_covered(k) and k not in SETTINGS
            and (k not in EPSILONS or math.isfinite(float(record[k])))]
    if training_metrics:
        keys += TRAINING_METRICS
    return {k: float(record[k]) for k in keys}


def enabled(cfg: ExperimentConfig) -> bool:
    return bool(cfg.tracking.tensorboard or cfg.tracking.mlflow)


def coverage_note(cfg: ExperimentConfig) -> str | None:
    """The sentence the privacy statement adds when the training metrics were sent to a tracker."""
    if not (cfg.tracking.training_metrics and enabled(cfg)):
        return None
    where = " and ".join(n for n, on in (("TensorBoard", cfg.tracking.tensorboard),
                                        ("MLflow", cfg.tracking.mlflow)) if on)
    return (f"At the user's request (tracking.training_metrics: true), train_loss and train_accuracy were "
            f"also sent to {where}; they are not covered by this guarantee there either.")


def require_packages(cfg: ExperimentConfig) -> None:
    """ConfigError (one line) when a tracker asked for is not installed; imports nothing heavy."""
    from importlib.util import find_spec

    if cfg.tracking.tensorboard and find_spec("tensorboard") is None:
        raise ConfigError("tracking.tensorboard: needs the tensorboard package, which is not installed; "
                          "pip install tensorboard (or set tracking.tensorboard: false)")
    if cfg.tracking.mlflow and find_spec("mlflow") is None:
        raise ConfigError("tracking.mlflow: needs the mlflow package, which is not installed; "
                          "pip install mlflow (or set tracking.mlflow: false)")


class Tracker(Protocol):
    def start(self, params: Mapping[str, Any], logged: Sequence[Mapping[str, Any]]) -> None: ...
    def log_epoch(self, record: Mapping[str, Any]) -> None: ...
    def finish(self, statement: str, run_dir: Path) -> None: ...
    def close(self, status: str) -> None: ...


@dataclass
class Trackers:
    """The trackers of one run, called as one. `ids`: what run.yaml records so a resume continues the
    same tracker runs (e.g. {"mlflow_run_id": …})."""

    items: list[Any] = field(default_factory=list)
    training_metrics: bool = False
    ids: dict[str, str] = field(default_factory=dict)

    def start(self, params: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = ()) -> None:
        """Log the hyperparameters and the epochs already done (a resumed run's; each tracker skips those
        it holds already)."""
        for tracker in self.items:
            tracker.start(params, [tracked_metrics(r, self.training_metrics) | {"epoch": int(r["epoch"])}
                                   for r in records])

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        values = tracked_metrics(record, self.training_metrics) | {"epoch": int(record["epoch"])}
        for tracker in self.items:
            tracker.log_epoch(values)

    def finish(self, statement: str, run_dir: Path) -> None:
        for tracker in self.items:
            tracker.finish(statement, run_dir)

    def close(self, status: str) -> None:
        """End every tracker's run with `status` (finished, failed, interrupted); never raises."""
        for tracker in self.items:
            try:
                tracker.close(status)
            except Exception:  # a tracker that cannot be closed must not hide the run's own outcome
                pass


def open_trackers(cfg: ExperimentConfig, run_dir: Path, *, recorded: Mapping[str, Any] | None = None,
                  parent_run_id: str | None = None) -> Trackers:
    """The trackers `cfg.tracking` asks for, connected (an MLflow run created, or continued when
    `recorded` holds its id: a resume). Raises ConfigError when a package is missing or the MLflow store
    cannot be reached. TensorBoard's writer is created on `start` (after the run directory is prepared)."""
    require_packages(cfg)
    trackers = Trackers(training_metrics=cfg.tracking.training_metrics)
    if cfg.tracking.tensorboard:
        from dpsgd_cli.runs.trackers.tensorboard import TensorBoardTracker

        trackers.items.append(TensorBoardTracker(run_dir, cfg.name))
    if cfg.tracking.mlflow:
        from dpsgd_cli.runs.trackers.mlflow_store import MlflowTracker

        tracker = MlflowTracker.connect(cfg, run_dir, run_id=(recorded or {}).get("mlflow_run_id"),
                                        parent_run_id=parent_run_id)
        trackers.items.append(tracker)
        trackers.ids.update(mlflow_run_id=tracker.run_id, mlflow_tracking_uri=tracker.uri)
    return trackers


def hyperparameters(cfg: ExperimentConfig, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The public settings of a run, flat: every config key (dotted) and the resolved privacy numbers
    (noise_multiplier, sampling_rate, total_steps, dataset_size); None and lists as text."""
    from dpsgd_cli.config import flatten

    flat = {**flatten(cfg.to_dict()), **{f"resolved.{k}": v for k, v in resolved.items()}}
    return {k: v if isinstance(v, (bool, int, float, str)) else ("null" if v is None else str(v))
            for k, v in flat.items()}
