"""`dpsgd export`: a publishable copy holds what ε covers and nothing else (no TensorFlow: run directories
are written by hand)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_cli_train import error_line, invoke, tree

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError, OutputError, RunDirError
from dpsgd_cli.privacy.run_key import KEY_FILE, new_run_key, save_run_key
from dpsgd_cli.runs.export import export_run
from dpsgd_cli.runs.results import METRIC_COLUMNS, write_metrics, write_yaml


def _finished_run(run_dir: Path, *extra: str) -> Path:
    cfg = load_config(None, ["privacy.noise_multiplier=1.1", f"output_dir={run_dir.parent}",
                             f"name={run_dir.name}", *extra])
    run_dir.mkdir(parents=True)
    write_yaml({"status": "finished", "config": cfg.to_dict()}, run_dir / "run.yaml")
    records = [{**dict.fromkeys(METRIC_COLUMNS, 0.25), "epoch": e, "train_loss": 1.0 / e} for e in (1, 2)]
    write_metrics(records, run_dir / "metrics.csv")
    save_run_key(new_run_key(reproducible=cfg.privacy.reproducible, seed=0), run_dir)
    for name in ("checkpoint.ckpt", "canaries.npz", "model.weights.h5", "curves.png", "audit.json",
                 "notes.txt"):
        (run_dir / name).write_bytes(name.encode())
    return run_dir


def test_export_keeps_what_epsilon_covers_and_nothing_else(tmp_path):
    run_dir = _finished_run(tmp_path / "runs" / "r")
    written = export_run(run_dir, tmp_path / "pub")
    assert sorted(p.name for p in written) == ["audit.json", "curves.png", "metrics.csv", "model.weights.h5",
                                               "run.yaml"]
    for name in ("audit.json", "curves.png", "model.weights.h5", "run.yaml"):
        assert (tmp_path / "pub" / name).read_bytes() == (run_dir / name).read_bytes()
    published = pd.read_csv(tmp_path / "pub" / "metrics.csv")
    original = pd.read_csv(run_dir / "metrics.csv")
    assert "train_loss" not in published and "train_accuracy" not in published
    pd.testing.assert_frame_equal(published, original.drop(columns=["train_loss", "train_accuracy"]))
    assert not list(tmp_path.glob(".pub.export.*"))  # no staging folder left


def test_export_refusals(tmp_path):
    run_dir = _finished_run(tmp_path / "runs" / "r")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(OutputError, match="not an empty folder"):
        export_run(run_dir, tmp_path / "full")
    with pytest.raises(OutputError, match="inside the run directory"):
        export_run(run_dir, run_dir / "pub")
    with pytest.raises(RunDirError, match="no run.yaml"):
        export_run(tmp_path / "full", tmp_path / "pub")
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    write_yaml({**doc, "status": "running"}, run_dir / "run.yaml")
    with pytest.raises(RunDirError, match="not finished"):
        export_run(run_dir, tmp_path / "pub")
    reproducible = _finished_run(tmp_path / "runs" / "seeded", "privacy.reproducible=true")
    with pytest.raises(ConfigError, match="reproducible mode.*--allow-reproducible"):
        export_run(reproducible, tmp_path / "pub")
    written = export_run(reproducible, tmp_path / "pub", allow_reproducible=True)
    assert KEY_FILE not in [p.name for p in written]


def test_cli_export_errors_are_one_line_and_write_nothing(tmp_path):
    run_dir = _finished_run(tmp_path / "runs" / "r", "privacy.reproducible=true")
    before = tree(tmp_path)
    result = invoke("export", run_dir, tmp_path / "pub")
    assert result.exit_code == 2 and "--allow-reproducible" in error_line(result)
    assert tree(tmp_path) == before and not (tmp_path / "pub").exists()
    result = invoke("export", run_dir, tmp_path / "pub", "--allow-reproducible")
    assert result.exit_code == 0 and "exported 5 files" in result.output
