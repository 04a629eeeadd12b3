"""Tests for dpsgd_cli.audit.membership and `dpsgd audit`: two small runs through runner.run, audited
end to end.

The hand-worked conversions from counts to ε live in tests/test_audit_bounds.py; here we check that a run
is loaded and attacked correctly, that an overfit non-private model leaks membership, and that with σ
large the canary audit's lower bound stays below the accountant's ε.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.audit import canaries
from dpsgd_cli.audit import membership as audit
from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.errors import ConfigError, RunDirError
from dpsgd_cli.experiment.run import run
from dpsgd_cli.training.data import load_dataset, write_idx

TRAIN = 64


@pytest.fixture(scope="module")
def random_label_data_dir(data_dir, tmp_path_factory):
    """The first 1000 training and 200 test images of the `data_dir` fixture (real or synthetic) with
    uniformly random training labels. A network fits random labels only by memorising each example
    (Zhang et al. 2017), so every member carries a membership signal; with the true labels, the
    synthetic classes are perfectly separable and a model that generalises perfectly leaks little."""
    data = load_dataset("fashion_mnist", data_dir, train_size=1000, test_size=200)
    labels = np.random.default_rng(2023).integers(0, 10, 1000)  # not 0: the synthetic fixture uses 0
    root = tmp_path_factory.mktemp("random_label_idx")
    as_bytes = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)  # noqa: E731
    write_idx(root / "fashion_mnist", as_bytes(data.x_train), labels, "train")
    write_idx(root / "fashion_mnist", as_bytes(data.x_test), data.y_test, "test")
    return str(root)


def _train(data_dir, out, name, train_size, *extra):
    cfg = load_config(None, [f"data.data_dir={data_dir}", f"data.train_size={train_size}",
                             "data.test_size=200", f"output_dir={out}", f"name={name}", "seed=0", *extra])
    return run(cfg).run_dir


@pytest.fixture(scope="module")
def overfit_run(random_label_data_dir, tmp_path_factory):
    """Non-private, Adam at a high learning rate, 40 epochs (160 steps) on 64 randomly labelled examples."""
    out = tmp_path_factory.mktemp("audit_runs")
    return _train(random_label_data_dir, out, "overfit", TRAIN, "privacy.enabled=false", "data.batch_size=16",
                  "training.epochs=40", "training.learning_rate=0.005")


@pytest.fixture(scope="module")
def noisy_run(data_dir, tmp_path_factory):
    """DP-SGD with σ = 20 on 128 examples plus 64 canaries: the accountant's ε is small."""
    out = tmp_path_factory.mktemp("audit_runs")
    return _train(data_dir, out, "noisy", 2 * TRAIN, "privacy.noise_multiplier=20", "data.batch_size=32",
                  "training.epochs=2", "training.learning_rate=0.005", "privacy.canaries=64")


@pytest.mark.slow
def test_overfit_nonprivate_model_leaks_membership(overfit_run):
    report = audit.audit_run(overfit_run)
    mia = report.summary["membership_inference"]
    # by chance (no leakage) the AUC of 64 vs 64 scores has standard deviation ≈ 0.051; 0.7 is 4 of them
    assert mia["auc"] > 0.7, mia
    assert mia["advantage"] > 0.25, mia
    assert mia["mean_loss_members"] < mia["mean_loss_nonmembers"]
    # members: the 64 examples trained on; non-members: as many from the train split past train_size
    assert mia["n_members"] == TRAIN == mia["n_nonmembers"]
    assert "not in the run" in mia["nonmember_source"]
    assert report.summary["private"] is False and report.summary["accountant_epsilon"]["pld"] is None
    assert "canary_audit" not in report.summary and report.canary_scores is None


@pytest.mark.slow
def test_large_sigma_canary_bound_stays_below_the_accountant(noisy_run):
    report = audit.audit_run(noisy_run)
    s = report.summary
    eps = s["accountant_epsilon"]["pld"]
    assert s["private"] and 0 < eps < 1.5, eps
    c = s["canary_audit"]
    assert (c["m"], c["k_pos"], c["k_neg"], c["guesses"]) == (64, 13, 13, 26)
    assert 0 <= c["correct"] <= c["guesses"]
    assert 0 <= c["epsilon_lower_bound"] <= eps
    assert s["membership_inference"]["epsilon_lower_bound"] <= eps
    canary_verdict = s["verdict"].split("; ")[0]  # the canary half itself, not the heuristic half
    assert canary_verdict == f"canary ε lower bound {c['epsilon_lower_bound']:.3g} ≤ accountant ε {eps:.3g}"
    # members: all 128 real examples (the canaries are synthetic: no real image is copied into one)
    assert s["membership_inference"]["n_members"] == 2 * TRAIN
    canary_set = canaries.load_canaries(noisy_run)
    np.testing.assert_array_equal(report.canary_included, canary_set.included)
    doc = yaml.safe_load((noisy_run / "run.yaml").read_text())
    # q = B/(n + m) counts all m canaries, never their secret inclusion coins
    assert doc["resolved"]["dataset_size"] == 2 * TRAIN + 64
    assert doc["resolved"]["sampling_rate"] == 32 / (2 * TRAIN + 64)


@pytest.mark.slow
@pytest.mark.parametrize("noise_removed", [False, True])
def test_the_canary_audit_notices_missing_noise(data_dir, tmp_path, monkeypatch, noise_removed):
    """A run that claims σ = 20 for 240 steps: with its noise, the one-run canary bound stays below the
    accountant's ε; with the noise patched away it memorises its canaries, the bound exceeds the
    accountant's ε and the verdict's canary half says so."""
    from dpsgd_cli.training import engine

    if noise_removed:
        monkeypatch.setattr(engine, "gaussian_noise",
                            lambda variables, stddev, seed: [engine.tf.zeros_like(v) for v in variables])
    run_dir = _train(data_dir, tmp_path, "claims-sigma-20", 2 * TRAIN, "privacy.noise_multiplier=20",
                     "data.batch_size=32", "training.epochs=40", "training.learning_rate=0.005",
                     "privacy.canaries=64")
    s = audit.audit_run(run_dir).summary
    eps, c = s["accountant_epsilon"]["pld"], s["canary_audit"]
    bound = f"canary ε lower bound {c['epsilon_lower_bound']:.3g}"
    assert eps < 1.0, eps
    if noise_removed:
        assert c["epsilon_lower_bound"] > eps, (eps, c)
        assert s["verdict"].split("; ")[0].startswith(f"{bound} EXCEEDS accountant ε {eps:.3g}")
    else:
        assert c["epsilon_lower_bound"] <= eps, (eps, c)
        assert s["verdict"].split("; ")[0] == f"{bound} ≤ accountant ε {eps:.3g}"


@pytest.mark.slow
def test_audit_json_is_written_atomically_and_strict(overfit_run):
    report = audit.audit_run(overfit_run)
    path = audit.write_audit(report, overfit_run)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert data == json.loads(json.dumps(report.summary))
    assert not list(overfit_run.glob(".audit.json.*"))


@pytest.mark.slow
def test_cli_prints_the_table_and_json_and_draws_the_roc(overfit_run, noisy_run, tmp_path):
    runner = CliRunner()
    png = tmp_path / "roc.png"
    result = runner.invoke(app, ["audit", str(noisy_run), "--roc", str(png)])
    assert result.exit_code == 0, result.output
    for text in ("ROC AUC", "attacker advantage", "ε lower bound, threshold", "ε lower bound, canaries",
                 "accountant ε", "95% conf", "valid lower bound", "audit.json"):
        assert text in " ".join(result.output.split()), text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["audit", str(overfit_run), "--json", "--confidence", "0.9"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["confidence"] == 0.9 and 0.0 <= data["membership_inference"]["auc"] <= 1.0
    assert json.loads((overfit_run / "audit.json").read_text())["confidence"] == 0.9


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, overfit_run):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["audit", str(overfit_run), "--roc", str(tmp_path / "roc.svg")])
    assert result.exit_code == 2 and ".png" in result.output


@pytest.mark.slow
def test_unfinished_or_weightless_runs_are_refused(overfit_run, tmp_path):
    doc = yaml.safe_load((overfit_run / "run.yaml").read_text())
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**doc, "status": "running"}))
    with pytest.raises(RunDirError, match="not finished"):
        audit.audit_run(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RunDirError, match="model.weights.h5"):
        audit.audit_run(tmp_path)
    with pytest.raises(ConfigError, match="confidence"):
        audit.audit_run(overfit_run, confidence=1.0)


def test_guess_counts_depend_on_m_only():
    assert audit.canary_guess_counts(500) == (100, 100)
    assert audit.canary_guess_counts(3, 0.5) == (1, 1)
    assert audit.canary_guess_counts(1) == (0, 0)


def test_canary_audit_of_a_perfect_attack_matches_the_one_run_bound():
    # 40 canaries, members have the 20 highest scores: the 8 guessed in and the 8 guessed out are all right
    scores = np.arange(40.0)
    included = scores >= 20
    out = audit._canary_audit(scores, included, delta=0.0, confidence=0.95, guess_fraction=0.2)
    assert (out["guesses"], out["correct"], out["auc"]) == (16, 16, 1.0)
    # δ = 0: P[Bin(16, q) = 16] = q^16 ≤ 0.05  ⇔  q ≥ 0.05^(1/16);  ε = log(q / (1 − q))
    q = 0.05 ** (1 / 16)
    assert out["epsilon_lower_bound"] == pytest.approx(np.log(q / (1 - q)), abs=1e-5)


@pytest.mark.slow
def test_a_scatternet_run_with_canaries_trains_and_is_audited_on_features(tmp_path, monkeypatch):
    """ScatterNet models take features: the run trains on features of its real images (cached) plus its
    canaries' (computed apart), and the audit scores members, non-members and canaries as features."""
    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "features"))
    rng = np.random.default_rng(5)
    root = tmp_path / "idx"
    for split, n in (("train", 160), ("test", 80)):  # a whole (small) dataset: the audit loads all of it
        write_idx(root / "fashion_mnist", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
                  rng.integers(0, 10, n).astype(np.uint8), split)
    run_dir = _train(root, tmp_path / "runs", "scatter", 160, "model.architecture=scatter_linear",
                     "privacy.noise_multiplier=5", "data.batch_size=32", "training.epochs=1",
                     "privacy.canaries=16", "training.optimizer=sgd", "training.learning_rate=0.5")
    rows = sorted(len(np.load(f)) for f in (tmp_path / "features").glob("*.npy"))
    assert rows == [80, 160]  # the real training and test images only: the canaries are not cached
    report = audit.audit_run(run_dir)
    assert report.summary["canary_audit"]["m"] == 16
    assert len(report.canary_scores) == 16 and np.isfinite(report.canary_scores).all()
    assert np.isfinite(report.member_scores).all() and len(report.member_scores) > 0
