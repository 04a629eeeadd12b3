"""Whole runs on a small slice of the data: files written, ε as dp-accounting computes it, reproducible."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import yaml
from dp_accounting import pld, rdp

from dpsgd_cli.config import load_config
from dpsgd_cli.experiment.run import run
from dpsgd_cli.runs.results import METRIC_COLUMNS

ROOT = Path(__file__).parent.parent


def _direct_epsilon(sigma, q, steps, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.slow
def test_dpsgd_train_cli_writes_wellformed_results(data_dir, tmp_path):
    out = tmp_path / "results"
    sets = [f"data.data_dir={data_dir}", "data.train_size=4000", "data.test_size=1000", "data.batch_size=64",
            f"output_dir={out}"]
    cmd = [sys.executable, "-m", "dpsgd_cli", "train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           *[arg for item in sets for arg in ("--set", item)], "--epochs", "3", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = pd.read_csv(out / "quickstart" / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics["epsilon_rdp"].is_monotonic_increasing and metrics["epsilon_pld"].is_monotonic_increasing
    assert (metrics["epsilon_pld"] <= metrics["epsilon_rdp"]).all()
    assert metrics["test_accuracy"].iloc[-1] > 0.5, metrics["test_accuracy"].tolist()  # chance is 0.1
    doc = yaml.safe_load((out / "quickstart" / "run.yaml").read_text())
    assert doc["status"] == "finished" and "Poisson" in doc["privacy_statement"]
    assert doc["versions"]["tensorflow"] and doc["config"]["privacy"]["noise_multiplier"] == 1.1
    assert "test accuracy" in proc.stdout


def _tiny(tiny_overrides, *extra):
    return load_config(None, [*tiny_overrides, *extra])


@pytest.mark.slow
def test_epsilon_equals_dp_accounting_called_directly(tiny_overrides):
    cfg = _tiny(tiny_overrides, "name=direct")
    result = run(cfg)
    last = result.records[-1]
    n, b = 512, 64
    assert last["step"] == math.ceil(2 * n / b)
    for accountant in ("rdp", "pld"):
        expected = _direct_epsilon(1.1, b / n, last["step"], 1e-5, accountant)
        assert last[f"epsilon_{accountant}"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_microbatches_are_accounted_with_half_sigma_and_shuffle_is_flagged(tiny_overrides):
    cfg = _tiny(tiny_overrides, "name=micro", "data.sampling=shuffle", "privacy.num_microbatches=16",
                "training.epochs=1", "training.gradient_path=vectorized_map")
    result = run(cfg)
    steps = 512 // 64
    assert result.records[-1]["step"] == steps
    expected = _direct_epsilon(1.1 / 2, 64 / 512, steps, 1e-5, "rdp")
    assert result.records[-1]["epsilon_rdp"] == pytest.approx(expected, rel=1e-6)
    assert "optimistic" in result.statement and "σ/2" in result.statement


@pytest.mark.slow
def test_same_seed_same_metrics_in_reproducible_mode_only_and_nonprivate_baseline(tiny_overrides):
    first = run(_tiny(tiny_overrides, "name=a", "training.epochs=1", "privacy.reproducible=true"))
    second = run(_tiny(tiny_overrides, "name=b", "training.epochs=1", "privacy.reproducible=true"))
    a = pd.DataFrame(first.records).drop(columns="elapsed_s")
    b = pd.DataFrame(second.records).drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(a, b)
    assert "Reproducible mode" in first.statement and "stay secret" in first.statement
    other = run(_tiny(tiny_overrides, "name=c", "training.epochs=1", "seed=1", "privacy.reproducible=true"))
    assert other.records[-1]["train_loss"] != first.records[-1]["train_loss"]
    secret = run(_tiny(tiny_overrides, "name=s", "training.epochs=1"))  # default: a fresh secret key
    assert secret.records[-1]["train_loss"] != first.records[-1]["train_loss"]
    assert "secret 128-bit key" in secret.statement
    plain = run(_tiny(tiny_overrides, "name=d", "training.epochs=1", "privacy.enabled=false",
                      "privacy.noise_multiplier=null"))
    assert math.isinf(plain.records[-1]["epsilon_rdp"]) and "No differential privacy" in plain.statement
    assert np.isfinite(plain.records[-1]["test_loss"])
