"""The recipe configs at ε = 3 (`*_eps3.yaml`) run end to end on a slice of the data for one epoch and record
ε; their non-private twins (`*_nonprivate.yaml` of the same recipe, for `dpsgd class-gap`) differ only in
privacy and learning rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpsgd_cli.config import load_config
from dpsgd_cli.experiment import run as runner
from dpsgd_cli.runs.run_dir import WEIGHTS_FILE

CONFIGS = Path(__file__).parent.parent / "configs"
BEST = ("fashion_mnist_scatter_pointwise_eps3", "fashion_mnist_scatter_linear_eps3",
        "fashion_mnist_scatter_cnn_64_128_eps3", "mnist_scatter_cnn_32_64_eps3",
        "fashion_mnist_tfp_cnn_tanh_eps3")
TWINS = {"fashion_mnist_scatter_pointwise_nonprivate": "fashion_mnist_scatter_pointwise_eps3",
         "fashion_mnist_scatter_linear_nonprivate": "fashion_mnist_scatter_linear_eps3",
         "fashion_mnist_scatter_cnn_64_128_nonprivate": "fashion_mnist_scatter_cnn_64_128_eps3",
         "mnist_scatter_cnn_32_64_nonprivate": "mnist_scatter_cnn_32_64_eps3",
         "fashion_mnist_tfp_cnn_tanh_nonprivate": "fashion_mnist_tfp_cnn_tanh_eps3"}


@pytest.mark.parametrize("name", BEST)
def test_best_config_targets_epsilon_3(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.privacy.target_epsilon == 3.0 and cfg.privacy.delta == 1e-5 and cfg.privacy.enabled
    assert cfg.privacy.noise_multiplier is None and cfg.data.sampling == "poisson"


def _run_on_a_slice(name, data_dir, tmp_path, monkeypatch, *extra):
    """One epoch of configs/<name>.yaml on 1024 training and 200 test examples, features cached in tmp."""
    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(CONFIGS / f"{name}.yaml", [
        f"data.data_dir={data_dir}", "data.train_size=1024", "data.test_size=200", "data.batch_size=256",
        "training.epochs=1", f"output_dir={tmp_path / 'results'}", *extra])
    result = runner.run(cfg)
    (record,) = result.records
    return result, record


@pytest.mark.slow
@pytest.mark.parametrize("name", BEST)
def test_best_config_runs_on_a_slice(name, data_dir, tmp_path, monkeypatch):
    result, record = _run_on_a_slice(name, data_dir, tmp_path, monkeypatch,
                                     "training.physical_batch_size=128")
    assert record["epsilon_pld"] == pytest.approx(3.0, rel=1e-3)  # σ calibrated for this run's length
    assert math.isfinite(record["epsilon_rdp"]) and record["epsilon_rdp"] > record["epsilon_pld"]
    assert 0.0 <= record["test_accuracy"] <= 1.0 and result.noise_multiplier > 0
    assert (result.run_dir / WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("twin", TWINS)
def test_twin_differs_from_its_best_config_only_in_privacy_and_learning_rate(twin):
    cfg, best = load_config(CONFIGS / f"{twin}.yaml"), load_config(CONFIGS / f"{TWINS[twin]}.yaml")
    assert not cfg.privacy.enabled and best.privacy.enabled
    assert cfg.training.learning_rate < best.training.learning_rate  # lr 4 diverges on unclipped gradients
    assert (cfg.data, cfg.model, cfg.seed) == (best.data, best.model, best.seed)
    same = ("epochs", "optimizer", "momentum", "lr_schedule", "ema_decay", "physical_batch_size")
    assert all(getattr(cfg.training, k) == getattr(best.training, k) for k in same)
    bounds = ("feature_norm_clip_mean", "feature_norm_clip_square")  # the same clipped feature statistics
    assert all(getattr(cfg.privacy, k) == getattr(best.privacy, k) for k in bounds)


@pytest.mark.slow
@pytest.mark.parametrize("twin", TWINS)
def test_twin_runs_on_a_slice(twin, data_dir, tmp_path, monkeypatch):
    result, record = _run_on_a_slice(twin, data_dir, tmp_path, monkeypatch)
    assert 0.0 <= record["test_accuracy"] <= 1.0 and math.isfinite(record["train_loss"])
    assert (result.run_dir / WEIGHTS_FILE).is_file()
