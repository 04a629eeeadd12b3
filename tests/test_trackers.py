"""Trackers (`dpsgd_cli.runs.trackers`): only what the privacy statement covers leaves a run unless the
training metrics are asked for; TensorBoard event files and a real local MLflow store read back equal to
metrics.csv; a resume adds only the missing epochs; a sweep's points are children of one parent run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.runs import trackers
from dpsgd_cli.runs.results import EpochRecord, write_metrics, write_yaml

COVERED = {"test_loss", "test_accuracy", "epsilon_rdp", "epsilon_pld",
           *(f"test_accuracy_class_{k}" for k in range(10))}


def _record(epoch: int, private: bool = True) -> EpochRecord:
    rng = np.random.default_rng(epoch)
    eps = (0.5 * epoch, 0.4 * epoch) if private else (math.inf, math.inf)
    return EpochRecord(epoch=epoch, step=10 * epoch, train_loss=float(rng.random()),
                       train_accuracy=float(rng.random()), test_loss=float(rng.random()),
                       test_accuracy=float(rng.random()), epsilon_rdp=eps[0], epsilon_pld=eps[1],
                       delta=1e-5, noise_multiplier=1.1, l2_norm_clip=1.0, batch_size=64,
                       learning_rate=0.001, elapsed_s=3.25 * epoch,
                       test_accuracy_per_class=tuple(float(v) for v in rng.random(10)))


def test_only_covered_values_are_tracked_by_default():
    record = _record(2)
    assert set(trackers.tracked_metrics(record)) == COVERED
    assert trackers.tracked_metrics(record)["test_accuracy"] == record.test_accuracy
    asked = trackers.tracked_metrics(record, training_metrics=True)
    assert set(asked) == COVERED | {"train_loss", "train_accuracy"}  # never the timings
    # a non-private run has no finite ε to log
    no_eps = COVERED - {"epsilon_rdp", "epsilon_pld"}
    assert set(trackers.tracked_metrics(_record(1, private=False))) == no_eps


def test_the_statement_note_names_the_trackers_only_when_training_metrics_are_sent():
    def note(*sets: str) -> str | None:
        return trackers.coverage_note(load_config(None, ["privacy.noise_multiplier=1", *sets]))

    assert "train_loss and train_accuracy were also sent to TensorBoard;" in note(
        "tracking.tensorboard=true", "tracking.training_metrics=true")
    assert note("tracking.tensorboard=true") is None and note("tracking.training_metrics=true") is None


def _without(monkeypatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))


@pytest.mark.parametrize("key, package", [("tracking.mlflow", "mlflow"),
                                          ("tracking.tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_one_line_and_nothing_is_written(monkeypatch, tmp_path, key, package):
    _without(monkeypatch, package)
    with pytest.raises(ConfigError, match=rf"{key}: needs the {package} package.*; pip install {package} "):
        trackers.require_packages(load_config(None, [f"{key}=true", "privacy.noise_multiplier=1"]))
    result = CliRunner().invoke(app, ["train", "--set", f"{key}=true", "--sigma", "1",
                                      "--set", f"output_dir={tmp_path / 'r'}"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: needs the {package} package")
    assert not (tmp_path / "r").exists()


def _fake_run(tmp_path: Path, cfg, records) -> Path:
    """A run directory as the orchestrator leaves it (run.yaml, metrics.csv), without training."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    write_yaml({"status": "finished", "config": cfg.to_dict(), "privacy_statement": "the statement"},
               run_dir / "run.yaml")
    write_metrics(records, run_dir / "metrics.csv")
    return run_dir


def _mlflow_cfg(tmp_path: Path, *extra: str):
    return load_config(None, [f"tracking.mlflow=sqlite:///{tmp_path / 'mlflow.db'}",
                              "tracking.mlflow_experiment=t", f"output_dir={tmp_path / 'results'}",
                              "privacy.noise_multiplier=1.1", *extra])


def test_mlflow_tracker_logs_covered_metrics_params_statement_and_artefacts(tmp_path):
    from mlflow import MlflowClient

    cfg = _mlflow_cfg(tmp_path)
    records = [_record(1), _record(2)]
    run_dir = _fake_run(tmp_path, cfg, records)
    tracked = trackers.open_trackers(cfg, run_dir)
    tracked.start(trackers.hyperparameters(cfg, {"sampling_rate": 0.01}))
    for record in records:
        tracked.log_epoch(record)
    tracked.finish("the statement", run_dir)
    tracked.close("finished")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracked.ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert set(run.data.metrics) == COVERED
    for key in COVERED:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r.epoch, r[key]) for r in records]
    assert run.data.params["privacy.noise_multiplier"] == "1.1"
    assert run.data.params["resolved.sampling_rate"] == "0.01"
    assert run.data.tags["privacy_statement"] == "the statement"
    assert run.data.tags["dpsgd.run_dir"] == str(run_dir.resolve())
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "run.yaml" in artefacts and "plots/curves.png" in plots
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the current folder


def test_mlflow_resume_adds_only_the_missing_epochs(tmp_path):
    from mlflow import MlflowClient

    cfg = _mlflow_cfg(tmp_path)
    records = [_record(1), _record(2), _record(3)]
    run_dir = _fake_run(tmp_path, cfg, records)
    first = trackers.open_trackers(cfg, run_dir)
    first.start({"a": 1})
    first.log_epoch(records[0])  # then interrupted after the checkpoint of epoch 2, before its log
    first.close("interrupted")
    run_id = first.ids["mlflow_run_id"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    again = trackers.open_trackers(cfg, run_dir, recorded={"mlflow_run_id": run_id})
    again.start({"a": 1}, records[:2])
    again.log_epoch(records[2])
    again.close("finished")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_accuracy")) == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"


def _read_events(logdir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str], set[str]]:
    """Scalars, texts and plugin names of the event files, read with tf.compat.v1.train.summary_iterator."""
    import tensorflow as tf

    scalars, texts, plugins = {}, {}, set()
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                plugins.add(plugin)
                array = tf.make_ndarray(value.tensor)
                if plugin == "scalars":
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
                elif plugin == "text":
                    texts[value.tag] = array.item().decode()
    return scalars, texts, plugins


def test_tensorboard_tracker_writes_scalars_hparams_and_the_statement(tmp_path):
    cfg = load_config(None, ["tracking.tensorboard=true", f"output_dir={tmp_path}",
                             "privacy.noise_multiplier=1"])
    records = [_record(1), _record(2)]
    run_dir = _fake_run(tmp_path, cfg, records)
    tracked = trackers.open_trackers(cfg, run_dir)
    tracked.start(trackers.hyperparameters(cfg, {}))
    for record in records:
        tracked.log_epoch(record)
    tracked.finish("the statement", run_dir)
    tracked.close("finished")
    scalars, texts, plugins = _read_events(run_dir / "tensorboard")
    assert set(scalars) == COVERED and "hparams" in plugins
    for key in COVERED:
        assert scalars[key] == {r.epoch: float(np.float32(r[key])) for r in records}
    assert texts == {"privacy_statement": "the statement"}


# ------------------------------------------------------------------------------------------------
# Trained runs (slow)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_trained_run_reads_back_from_tensorboard_and_mlflow_as_metrics_csv(tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    from dpsgd_cli.experiment.run import run

    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(None, [*tiny_overrides, "tracking.tensorboard=true", f"tracking.mlflow={store}"])
    result = run(cfg)
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    doc = yaml.safe_load((result.run_dir / "run.yaml").read_text())
    scalars, texts, _ = _read_events(result.run_dir / "tensorboard")
    assert set(scalars) == COVERED  # no train_loss, train_accuracy or timings
    for key in COVERED:
        assert scalars[key] == {int(e): float(np.float32(v)) for e, v in zip(metrics["epoch"], metrics[key])}
    assert texts["privacy_statement"] == doc["privacy_statement"] == result.statement

    client = MlflowClient(store)
    mlflow_run = client.get_run(doc["tracking"]["mlflow_run_id"])
    assert set(mlflow_run.data.metrics) == COVERED
    for key in COVERED:
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key))
        assert history == [(int(e), float(v)) for e, v in zip(metrics["epoch"], metrics[key])]
    assert mlflow_run.data.metrics["epsilon_pld"] == doc["final"]["epsilon_pld"] > 0
    assert mlflow_run.data.tags["privacy_statement"] == result.statement
    assert mlflow_run.data.params["privacy.noise_multiplier"] == "1.1"
    assert mlflow_run.info.status == "FINISHED"
    shown = ("test_accuracy", "epsilon_rdp", "epsilon_pld")
    print("\nread back: mlflow", {k: mlflow_run.data.metrics[k] for k in shown},
          "tensorboard", {k: scalars[k] for k in shown})


@pytest.mark.slow
def test_a_sweeps_points_are_children_of_one_parent_and_log_training_metrics_if_asked(tiny_overrides,
                                                                                    tmp_path):
    from mlflow import MlflowClient

    from dpsgd_cli.experiment.sweep import plan_sweep, run_sweep
    from dpsgd_cli.runs.trackers.mlflow_store import open_sweep_parent

    store = f"sqlite:///{tmp_path / 'store.db'}"
    sets = [*tiny_overrides, "training.epochs=1", f"tracking.mlflow={store}",
            "tracking.training_metrics=true"]
    plan = plan_sweep(None, sets, ["privacy.noise_multiplier=1.1,1.5"], name="grid")
    outcome = run_sweep(plan)
    assert len(outcome.trained) == 2
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("dpsgd")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "grid" and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == sorted(p.name for p in plan.runs)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:  # asked for: the training metrics are logged, and the statement says so
        metrics = pd.read_csv(plan.sweep_dir / child.info.run_name / "metrics.csv")
        assert child.data.metrics["train_loss"] == metrics["train_loss"].iloc[-1]
        assert "tracking.training_metrics: true" in child.data.tags["privacy_statement"]
    # a later invocation on the same sweep (one point per job) finds the same parent
    assert open_sweep_parent(plan.runs[0].cfg, "grid", plan.sweep_dir) == parents[0].info.run_id


def test_a_private_search_refuses_trackers(data_dir, tmp_path):
    """A tune's trials are private (how many ran and what they scored is what the selection hides)."""
    from dpsgd_cli.experiment.tune import plan_search

    doc = {"name": "srch", "output_dir": str(tmp_path / "results"),
           "data": {"data_dir": data_dir, "train_size": 640, "batch_size": 64},
           "privacy": {"reproducible": True}, "tracking": {"mlflow": True},
           "tune": {"space": {"training.learning_rate": [0.1, 0.2]}, "distribution": "geometric", "mean": 2,
                    "target_epsilon": 10.0, "holdout": 128, "score_noise_multiplier": 2.0}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="tracking: a private search does not send its trials to a tracker"):
        plan_search(path)
    assert not (tmp_path / "results").exists()
