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
from dpsgd_cli.runs.results import COVERED_COLUMNS, METRIC_COLUMNS, PRIVATE_COLUMNS, write_metrics, write_yaml

PRIVATE_FIGURE = b"\x89PNG a figure drawn from private statistics"


def _finished_run(run_dir: Path, *extra: str) -> Path:
    cfg = load_config(None, ["privacy.noise_multiplier=1.1", f"output_dir={run_dir.parent}",
                             f"name={run_dir.name}", *extra])
    run_dir.mkdir(parents=True)
    write_yaml({"status": "finished", "config": cfg.to_dict(), "privacy_statement": "(1, 1e-05)-DP …"},
               run_dir / "run.yaml")
    records = [{**dict.fromkeys(METRIC_COLUMNS, 0.25), "epoch": e, "train_loss": 1.0 / e,
                "elapsed_s": 3.5 * e} for e in (1, 2)]
    write_metrics(records, run_dir / "metrics.csv")
    save_run_key(new_run_key(reproducible=cfg.privacy.reproducible, seed=0), run_dir)
    for name in ("checkpoint.ckpt", "canaries.npz", "model.weights.h5", "audit.json", "notes.txt"):
        (run_dir / name).write_bytes(name.encode())
    for name in ("curves.png", "roc.png"):  # e.g. `dpsgd audit --roc RUN/roc.png`
        (run_dir / name).write_bytes(PRIVATE_FIGURE)
    (run_dir / "losses.csv").write_text("example,loss\n0,0.1\n")
    return run_dir


DRAWN = ["curves-per-class.png", "curves-tradeoff.png", "curves.png"]


def test_export_keeps_what_epsilon_covers_and_nothing_else(tmp_path):
    """No audit.json (its statistics are computed on the private examples without noise), no figure or
    table found in the run directory (the figures are drawn again from the covered columns), no key,
    checkpoint or canaries."""
    run_dir = _finished_run(tmp_path / "runs" / "r")
    written = export_run(run_dir, tmp_path / "pub")
    assert sorted(p.name for p in written) == sorted(["metrics.csv", "model.weights.h5", "run.yaml", *DRAWN])
    assert (tmp_path / "pub" / "model.weights.h5").read_bytes() == (run_dir / "model.weights.h5").read_bytes()
    for name in DRAWN:
        data = (tmp_path / "pub" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data != PRIVATE_FIGURE
    assert yaml.safe_load((tmp_path / "pub" / "run.yaml").read_text()) == yaml.safe_load(
        (run_dir / "run.yaml").read_text())
    published = pd.read_csv(tmp_path / "pub" / "metrics.csv")
    original = pd.read_csv(run_dir / "metrics.csv")
    assert set(published.columns) <= set(COVERED_COLUMNS)
    assert "train_loss" not in published and "train_accuracy" not in published
    pd.testing.assert_frame_equal(published, original[[c for c in original if c in COVERED_COLUMNS]])
    assert not list(tmp_path.glob(".pub.export.*"))  # no staging folder left


def test_exported_metrics_hold_no_timings(tmp_path):
    """elapsed_s grows with the realised (secret) Poisson batch sizes: it is not published."""
    run_dir = _finished_run(tmp_path / "runs" / "r")
    export_run(run_dir, tmp_path / "pub")
    published = pd.read_csv(tmp_path / "pub" / "metrics.csv")
    assert "elapsed_s" in pd.read_csv(run_dir / "metrics.csv") and "elapsed_s" not in published
    assert not [c for c in published if c.endswith("_s") or "time" in c]


def test_every_metrics_column_is_classified_covered_or_private():
    """A new column must be put on one side: export publishes only the covered ones."""
    assert set(COVERED_COLUMNS) | set(PRIVATE_COLUMNS) == set(METRIC_COLUMNS)
    assert not set(COVERED_COLUMNS) & set(PRIVATE_COLUMNS)
    assert {"train_loss", "train_accuracy", "elapsed_s"} <= set(PRIVATE_COLUMNS)


def test_include_private_adds_the_uncovered_files_and_says_so(tmp_path):
    run_dir = _finished_run(tmp_path / "runs" / "r")
    written = export_run(run_dir, tmp_path / "pub", include_private=True)
    names = sorted(p.name for p in written)
    assert names == sorted(["audit.json", "curves.png", "losses.csv", "metrics.csv", "model.weights.h5",
                            "roc.png", "run.yaml"])
    for name in ("audit.json", "curves.png", "roc.png", "losses.csv", "metrics.csv", "model.weights.h5"):
        assert (tmp_path / "pub" / name).read_bytes() == (run_dir / name).read_bytes(), name
    doc = yaml.safe_load((tmp_path / "pub" / "run.yaml").read_text())
    statement = doc["privacy_statement"]
    assert statement.startswith("(1, 1e-05)-DP …")
    assert "not covered" in statement and "audit.json" in statement and "metrics.csv" in statement
    assert doc["export"]["include_private"] is True
    assert sorted(doc["export"]["not_covered"]) == ["audit.json", "curves.png", "losses.csv", "metrics.csv",
                                                    "roc.png"]
    for never in ("run.key", "checkpoint.ckpt", "canaries.npz", "notes.txt"):
        assert never not in names


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
    assert result.exit_code == 0 and "exported 6 files" in result.output
    assert not (tmp_path / "pub" / "audit.json").exists()
    result = invoke("export", run_dir, tmp_path / "pub-private", "--allow-reproducible", "--include-private")
    assert result.exit_code == 0 and "audit.json" in result.output and "not covered" in result.output
