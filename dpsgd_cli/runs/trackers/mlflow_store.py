"""MLflow: one MLflow run per dpsgd run in the experiment `tracking.mlflow_experiment` of the store
`tracking.mlflow` (true: MLFLOW_TRACKING_URI, else MLflow's default, a SQLite file `mlflow.db` in the
current folder; or any tracking URI). Logged: the hyperparameters as params, per epoch (MLflow's step =
the epoch) the metrics `tracked_metrics` allows, the privacy statement as the tag `privacy_statement`,
and at the end run.yaml and the run's plots as artefacts. A sweep's points are child runs
(`mlflow.parentRunId`) of one parent run per sweep directory. Uses `MlflowClient` only (no global active
run), so nothing leaks between runs of one process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpsgd_cli.config import ExperimentConfig
from dpsgd_cli.errors import ConfigError, OutputError

STATEMENT_TAG = "privacy_statement"
RUN_DIR_TAG = "dpsgd.run_dir"
SWEEP_DIR_TAG = "dpsgd.sweep_dir"
PARENT_TAG = "mlflow.parentRunId"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
BATCH = 100  # params per log_batch call (MLflow's limit)


def tracking_uri(setting: Any) -> str:
    """The store of `tracking.mlflow`: a URI as given, or for true MLFLOW_TRACKING_URI, else
    sqlite:///<current folder>/mlflow.db (absolute, so every process of a sweep finds the same store)."""
    if isinstance(setting, str):
        return setting
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client_for(uri: str):
    """An MlflowClient of `uri`; ConfigError (one line) when the store cannot be opened."""
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # creating a SQLite store logs its migrations at INFO (set after
        logging.getLogger(name).setLevel(logging.WARNING)  # the import, which configures mlflow's logger)

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reaches the store now, not at the first epoch
    except Exception as exc:  # the store's errors come in many types (SQL, HTTP, URI parsing)
        raise ConfigError(f"tracking.mlflow: cannot open the MLflow store {uri} ({_one_line(exc)})") from None
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing; in a local SQLite store its artefacts go to
    `mlartifacts/` beside the database file (not the current folder)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MlflowTracker:
    def __init__(self, client, uri: str, run_id: str, cfg: ExperimentConfig):
        self.client, self.uri, self.run_id, self.cfg = client, uri, run_id, cfg
        self.last_epoch = 0

    @classmethod
    def connect(cls, cfg: ExperimentConfig, run_dir: Path, *, run_id: str | None = None,
                parent_run_id: str | None = None) -> MlflowTracker:
        """Create the MLflow run (a child of `parent_run_id` if given), or continue `run_id` (a resume)."""
        uri = tracking_uri(cfg.tracking.mlflow)
        client = client_for(uri)
        try:
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
            else:
                tags = {RUN_DIR_TAG: str(Path(run_dir).resolve()),
                        "dpsgd.randomness": "reproducible" if cfg.privacy.reproducible else "secret"}
                if parent_run_id:
                    tags[PARENT_TAG] = parent_run_id
                exp = experiment_id(client, cfg.tracking.mlflow_experiment, uri)
                run_id = client.create_run(exp, run_name=cfg.name, tags=tags).info.run_id
        except Exception as exc:
            raise ConfigError(f"tracking.mlflow: cannot create a run in {uri} ({_one_line(exc)})") from None
        return cls(client, uri, run_id, cfg)

    def start(self, params: Mapping[str, Any], logged: Sequence[Mapping[str, Any]]) -> None:
        """Log the params (a resumed run has them already) and the epochs the run lacks."""
        from mlflow.entities import Param

        present = {m.step for m in self._call(self.client.get_metric_history, self.run_id, "test_accuracy")}
        if not present:
            items = [Param(k, str(v)) for k, v in params.items()]
            for i in range(0, len(items), BATCH):
                self._call(self.client.log_batch, self.run_id, params=items[i:i + BATCH])
        for values in logged:
            if values["epoch"] not in present:
                self.log_epoch(values)

    def log_epoch(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        epoch, now = int(values["epoch"]), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in values.items() if k != "epoch"]
        self._call(self.client.log_batch, self.run_id, metrics=metrics)
        self.last_epoch = epoch

    def finish(self, statement: str, run_dir: Path) -> None:
        """The statement as a tag; run.yaml and the run's plots as artefacts (plots/)."""
        from dpsgd_cli.runs.plots import plot_runs
        from dpsgd_cli.runs.run_dir import RUN_FILE

        self._call(self.client.set_tag, self.run_id, STATEMENT_TAG, statement)
        self._call(self.client.log_artifact, self.run_id, str(Path(run_dir) / RUN_FILE))
        with tempfile.TemporaryDirectory(prefix="dpsgd-plots-") as folder:
            written, _ = plot_runs([run_dir], Path(folder) / "curves.png")
            for png in written:
                self._call(self.client.log_artifact, self.run_id, str(png), "plots")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise OutputError(f"tracking.mlflow: {self.uri}: {fn.__name__} failed "
                              f"({_one_line(exc)})") from None


def open_sweep_parent(cfg: ExperimentConfig, sweep_name: str, sweep_dir: Path) -> str | None:
    """The id of the sweep's parent MLflow run (found by its sweep directory, else created), or None when
    `cfg` does not log to MLflow. Separate invocations on one sweep (one point each) share the parent."""
    if not cfg.tracking.mlflow:
        return None
    uri = tracking_uri(cfg.tracking.mlflow)
    client = client_for(uri)
    where = str(Path(sweep_dir).resolve())
    try:
        exp = experiment_id(client, cfg.tracking.mlflow_experiment, uri)
        found = client.search_runs([exp], filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{_quoted(where)}'",
                                   max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        return client.create_run(exp, run_name=sweep_name, tags={SWEEP_DIR_TAG: where}).info.run_id
    except Exception as exc:
        raise ConfigError(f"tracking.mlflow: cannot create the sweep's run in {uri} ({_one_line(exc)})") \
            from None


def close_sweep_parent(cfg: ExperimentConfig, run_id: str | None, status: str) -> None:
    if run_id is None:
        return
    try:
        client_for(tracking_uri(cfg.tracking.mlflow)).set_terminated(run_id, STATUS.get(status, "FAILED"))
    except Exception:  # never hides the sweep's own outcome
        pass


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
