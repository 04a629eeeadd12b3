"""The best-recipe configs (issue 15) run end to end on a slice of the data for one epoch and record ε."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpsgd_cli.config import load_config
from dpsgd_cli.runs.run_dir import WEIGHTS_FILE
from dpsgd_cli.training import runner

CONFIGS = Path(__file__).parent.parent / "configs"
BEST = ("fashion_mnist_best", "mnist_best", "fashion_mnist_tutorial_cnn_best")


@pytest.mark.parametrize("name", BEST)
def test_best_config_targets_epsilon_3(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-5 and cfg.privacy.enabled
    assert cfg.privacy.noise_multiplier is None and cfg.data.sampling == "poisson"


@pytest.mark.slow
@pytest.mark.parametrize("name", BEST)
def test_best_config_runs_on_a_slice(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(CONFIGS / f"{name}.yaml", [
        f"data.data_dir={data_dir}", "data.train_size=1024", "data.test_size=200", "data.batch_size=256",
        "training.physical_batch_size=128", "training.epochs=1", f"output_dir={tmp_path / 'results'}"])
    result = runner.run(cfg)
    (record,) = result.records
    assert record["epsilon_pld"] == pytest.approx(3.0, rel=1e-3)  # σ calibrated for this run's length
    assert math.isfinite(record["epsilon_rdp"]) and record["epsilon_rdp"] > record["epsilon_pld"]
    assert 0.0 <= record["test_accuracy"] <= 1.0 and result.noise_multiplier > 0
    assert (result.run_dir / WEIGHTS_FILE).is_file()
