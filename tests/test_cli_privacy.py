"""`dpsgd epsilon` and `dpsgd noise`: the numbers are dp-accounting's, the options resolve as documented,
`--config` agrees with what `dpsgd train` will do, bad arguments fail in one line, no TensorFlow."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.plan import plan_privacy

ROOT = Path(__file__).parent.parent
TUTORIAL = ["--batch-size", "256", "--dataset-size", "60000", "--sigma", "1.1"]  # TF Privacy's MNIST tutorial
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def library_epsilon(sigma, q, steps, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    return float(acc.compose(event).get_epsilon(delta))


def test_tutorial_setting_json_has_the_fields_and_dp_accountings_numbers():
    out = run_json("epsilon", *TUTORIAL, "--epochs", "60", "--accountant", "all")
    for key in ("epsilon_rdp", "epsilon_pld", "delta", "steps", "sampling_rate", "noise_multiplier",
                "accountant", "statement", "steps_convention", "accounting_noise_multiplier"):
        assert key in out, key
    assert out["steps"] == math.ceil(60 * 60000 / 256) == 14063
    assert out["sampling_rate"] == 256 / 60000 and out["delta"] == 1e-5 and out["accountant"] == "all"
    for acc in ("rdp", "pld"):
        assert out[f"epsilon_{acc}"] == pytest.approx(
            library_epsilon(1.1, 256 / 60000, 14063, 1e-5, acc), rel=1e-6)
    assert out["epsilon_pld"] < out["epsilon_rdp"]
    statement = out["statement"]
    for words in ("add/remove-one", "Poisson sampling at rate q = 0.00426667", "PLD accountant",
                  "RDP accountant", "1e-05", "14063 steps"):
        assert words in statement, words


def test_default_output_is_a_table_and_the_statement():
    result = invoke("epsilon", *TUTORIAL, "--steps", "1000")
    assert result.exit_code == 0, result.output
    assert "ε (RDP)" in result.stdout and "add/remove-one" in result.stdout
    assert f"{accounting.epsilon(1.1, 256 / 60000, 1000, 1e-5):.4g}" in result.stdout


def test_epochs_steps_and_sampling_rate_agree():
    by_epochs = run_json("epsilon", *TUTORIAL, "--epochs", "2.5")
    assert by_epochs["steps"] == math.ceil(2.5 * 60000 / 256)
    assert by_epochs["steps_convention"] == "poisson: ceil(E*n/B)"
    by_steps = run_json("epsilon", *TUTORIAL, "--steps", str(by_epochs["steps"]))
    assert by_steps["epsilon_rdp"] == by_epochs["epsilon_rdp"]
    by_rate = run_json("epsilon", "--sigma", "1.1", "--sampling-rate", str(256 / 60000), "--epochs", "2.5")
    assert by_rate["steps"] == by_epochs["steps"] and by_rate["epsilon_rdp"] == by_epochs["epsilon_rdp"]
    shuffled = run_json("epsilon", *TUTORIAL, "--epochs", "3", "--sampling", "shuffle")
    assert shuffled["steps"] == 3 * (60000 // 256) and shuffled["steps_convention"] == "shuffle: E*floor(n/B)"
    assert "optimistic" in shuffled["statement"] and "Chua et al., 2024" in shuffled["statement"]


def test_delta_and_accountant_options():
    out = run_json("epsilon", *TUTORIAL, "--steps", "500", "--delta", "1e-7", "--accountant", "pld")
    assert "epsilon_rdp" not in out and out["delta"] == 1e-7 and out["accountant"] == "pld"
    assert out["epsilon_pld"] == pytest.approx(library_epsilon(1.1, 256 / 60000, 500, 1e-7, "pld"), rel=1e-6)


def test_microbatches_are_accounted_with_half_sigma():
    micro = run_json("epsilon", *TUTORIAL, "--steps", "1000", "--num-microbatches", "128")
    assert micro["microbatch_size"] == 2 and micro["accounting_noise_multiplier"] == pytest.approx(0.55)
    assert micro["epsilon_rdp"] == pytest.approx(accounting.epsilon(0.55, 256 / 60000, 1000, 1e-5), rel=1e-12)
    assert "σ/2" in micro["statement"]
    per_example = run_json("epsilon", *TUTORIAL, "--steps", "1000", "--num-microbatches", "256")
    assert per_example["microbatch_size"] == 1
    assert per_example["epsilon_rdp"] == pytest.approx(accounting.epsilon(1.1, 256 / 60000, 1000, 1e-5))


def test_per_epoch_curve_json_and_csv(tmp_path):
    out = run_json("epsilon", *TUTORIAL, "--epochs", "3", "--per-epoch", "--accountant", "all")
    rows = out["per_epoch"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["steps"] for r in rows] == [math.ceil(e * 60000 / 256) for e in (1, 2, 3)]
    assert rows[-1]["epsilon_rdp"] == out["epsilon_rdp"] and rows[-1]["epsilon_pld"] == out["epsilon_pld"]
    assert rows[0]["epsilon_pld"] < rows[1]["epsilon_pld"] < rows[2]["epsilon_pld"]
    path = tmp_path / "curve.csv"
    result = invoke("epsilon", "--sigma", "1.0", "--sampling-rate", "0.01", "--steps", "250", "--csv", path)
    assert result.exit_code == 0, result.output
    with path.open() as handle:
        table = list(csv.DictReader(handle))
    assert [(float(r["epoch"]), int(r["steps"])) for r in table] == [(1, 100), (2, 200), (2.5, 250)]
    assert float(table[-1]["epsilon_rdp"]) == pytest.approx(accounting.epsilon(1.0, 0.01, 250, 1e-5))
    shown = invoke("epsilon", "--sigma", "1.0", "--sampling-rate", "0.01", "--steps", "300", "--per-epoch")
    assert shown.exit_code == 0 and "ε after each epoch" in shown.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _plan(config: Path, *overrides: str, n: int | None = None):
    cfg = load_config(config, list(overrides))
    from dpsgd_cli.config import dataset_size

    return cfg, plan_privacy(cfg, n if n is not None else dataset_size(cfg))


def test_config_reports_what_the_run_will_use():
    config = ROOT / "configs" / "mnist_tutorial.yaml"
    out = run_json("epsilon", "--config", config, "--accountant", "all")
    cfg, plan = _plan(config)
    assert out["steps"] == plan.total_steps == 14063 and out["sampling_rate"] == plan.sampling_rate
    assert out["noise_multiplier"] == plan.noise_multiplier == 1.1 and out["source"] == "config"
    assert out["epsilon_rdp"] == pytest.approx(
        library_epsilon(plan.accounting_noise_multiplier, plan.sampling_rate, plan.total_steps, 1e-5, "rdp"),
        rel=1e-6)
    assert "C = 1" in out["statement"] and "The config samples its batches exactly so" in out["statement"]
    changed = run_json("epsilon", "--config", config, "--set", "training.epochs=10")
    assert changed["steps"] == math.ceil(10 * 60000 / 256)


def test_config_with_shuffling_microbatches_and_train_size(tmp_path):
    config = _write(tmp_path / "shuffle.yaml", """\
        name: s
        data: {dataset: fashion_mnist, batch_size: 64, sampling: shuffle, train_size: 1000}
        training: {epochs: 4}
        privacy: {noise_multiplier: 1.3, num_microbatches: 16, delta: 1.0e-6}
        """)
    out = run_json("epsilon", "--config", config, "--per-epoch")
    _, plan = _plan(config)
    assert out["steps"] == plan.total_steps == 4 * (1000 // 64)
    assert out["dataset_size"] == 1000 and out["delta"] == 1e-6
    assert out["microbatch_size"] == plan.microbatch_size == 4
    assert out["accounting_noise_multiplier"] == plan.accounting_noise_multiplier == pytest.approx(0.65)
    assert [r["steps"] for r in out["per_epoch"]] == [15, 30, 45, 60]
    assert "The config uses shuffled fixed-size batches" in out["statement"]
    assert "optimistic" in out["statement"] and "Chua et al., 2024" in out["statement"]


@pytest.mark.slow  # σ calibrated with the PLD accountant
def test_config_with_target_epsilon_calibrates_like_the_run(tmp_path):
    config = _write(tmp_path / "target.yaml", """\
        name: t
        data: {batch_size: 50, train_size: 2000}
        training: {epochs: 3}
        privacy: {target_epsilon: 2.0}
        """)
    out = run_json("epsilon", "--config", config, "--accountant", "pld")
    _, plan = _plan(config)
    assert out["noise_multiplier"] == plan.noise_multiplier and out["target_epsilon"] == 2.0
    assert out["epsilon_pld"] <= 2.0


def test_config_counts_all_canaries_like_the_run(tmp_path):
    """q = B/(n + m) with all m canaries, included or not: the mechanism never depends on the secret
    inclusion coins, and `dpsgd epsilon --config` needs no data to know it."""
    config = _write(tmp_path / "canaries.yaml", """\
        name: c
        seed: 3
        data: {batch_size: 32, train_size: 500}
        training: {epochs: 2}
        privacy: {noise_multiplier: 1.0, canaries: 40}
        """)
    out = run_json("epsilon", "--config", config)
    assert out["dataset_size"] == 540
    assert out["sampling_rate"] == 32 / 540 and out["steps"] == math.ceil(2 * 540 / 32)


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("pld", marks=pytest.mark.slow)])
def test_noise_round_trips_through_epsilon(accountant):
    steps = ["--epochs", "100"] if accountant == "rdp" else ["--steps", "120"]
    size = ["--batch-size", "256", "--dataset-size", "60000"] if accountant == "rdp" else [
        "--sampling-rate", "0.025"]
    out = run_json("noise", "--target-epsilon", "3", *steps, *size, "--accountant", accountant)
    for key in ("noise_multiplier", "noise_multiplier_exact", f"epsilon_{accountant}", "target_epsilon",
                "steps", "sampling_rate", "delta", "statement"):
        assert key in out, key
    sigma, exact = out["noise_multiplier"], out["noise_multiplier_exact"]
    q, k = out["sampling_rate"], out["steps"]
    assert float(f"{sigma:.4g}") == sigma and exact <= sigma <= exact * (1 + 1e-3)  # 4 digits, rounded up
    for s in (sigma, exact):
        assert accounting.epsilon(s, q, k, 1e-5, accountant) <= 3
    assert accounting.epsilon(exact * (1 - 1e-4), q, k, 1e-5, accountant) > 3
    assert accounting.epsilon(sigma * (1 - 2e-3), q, k, 1e-5, accountant) > 3
    echoed = run_json("epsilon", "--sigma", str(sigma), *steps, *size, "--accountant", accountant)
    assert echoed[f"epsilon_{accountant}"] == out[f"epsilon_{accountant}"] <= 3


def test_noise_with_microbatches_doubles_sigma_and_prints_it():
    base = ["noise", "--target-epsilon", "2", "--steps", "1000", "--batch-size", "64", "--dataset-size",
            "6400"]
    single = run_json(*base)
    micro = run_json(*base, "--num-microbatches", "16")
    assert micro["noise_multiplier_exact"] == pytest.approx(2 * single["noise_multiplier_exact"], rel=1e-12)
    shown = invoke(*base)
    assert shown.exit_code == 0 and f"σ = {single['noise_multiplier']:.4g}" in shown.stdout


@pytest.mark.parametrize("args", [
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "0"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "-1"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--delta", "0"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--delta", "1"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--delta", "-1e-5"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--sampling-rate", "1.5", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--batch-size", "500", "--dataset-size", "100", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--batch-size", "50", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--sigma", "1"],
    ["epsilon", "--sampling-rate", "0.01", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--epochs", "1", "--sampling-rate", "0.01", "--sigma", "1"],
    ["epsilon", "--steps", "0", "--sampling-rate", "0.01", "--sigma", "1"],
    ["epsilon", "--epochs", "0", "--sampling-rate", "0.01", "--sigma", "1"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--batch-size", "5", "--dataset-size", "500",
     "--sigma", "1"],
    ["epsilon", "--steps", "100", "--batch-size", "64", "--dataset-size", "640", "--sigma", "1",
     "--num-microbatches", "5"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--num-microbatches", "5"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--accountant", "moments"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "1", "--sampling", "random"],
    ["epsilon", "--epochs", "100", "--sampling-rate", "0.01", "--sigma", "1", "--sampling", "shuffle"],
    ["epsilon", "--epochs", "2.5", "--batch-size", "10", "--dataset-size", "100", "--sigma", "1",
     "--sampling", "shuffle"],
    ["epsilon", "--config", "configs/mnist_tutorial.yaml", "--steps", "100"],
    ["epsilon", "--config", "does-not-exist.yaml"],
    ["epsilon", "--config", "configs/fashion_mnist_nonprivate.yaml"],
    ["noise", "--steps", "100", "--sampling-rate", "0.01"],
    ["noise", "--target-epsilon", "0", "--steps", "100", "--sampling-rate", "0.01"],
    ["noise", "--target-epsilon", "1", "--sampling-rate", "0.01"],
    ["noise", "--target-epsilon", "1", "--steps", "100", "--sampling-rate", "0.01", "--delta", "2"],
    ["noise", "--target-epsilon", "1", "--steps", "100", "--batch-size", "300", "--dataset-size", "200"],
    ["noise", "--target-epsilon", "1", "--steps", "100", "--sampling-rate", "0.01", "--accountant", "all"],
    ["noise", "--target-epsilon", "500", "--steps", "100", "--sampling-rate", "0.01", "--accountant", "pld"],
    ["epsilon", "--steps", "100", "--sampling-rate", "0.01", "--sigma", "0.05", "--accountant", "pld"],
])
def test_bad_arguments_fail_in_one_line_with_exit_code_2(args, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_a_real_command_fails_cleanly_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "dpsgd_cli", "epsilon", "--steps", "10", "--sampling-rate",
                           "0.01", "--sigma", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --sigma must be > 0")


NO_TF_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from dpsgd_cli.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(json.dumps({name: name in sys.modules for name in ("tensorflow", "keras", "dp_accounting.pld",
                                                          "scipy.signal")}))
"""


@pytest.mark.parametrize("args, needs_pld", [
    (["epsilon", *TUTORIAL, "--epochs", "100"], False),
    (["noise", "--target-epsilon", "3", "--epochs", "100", "--batch-size", "256", "--dataset-size", "60000"],
     False),
    (["epsilon", "--config", "configs/fashion_mnist_sigma1.1.yaml", "--per-epoch"], True),
    (["epsilon", *TUTORIAL, "--steps", "100", "--accountant", "pld"], True),
])
def test_commands_import_neither_tensorflow_nor_what_they_do_not_need(args, needs_pld):
    """Run in a fresh interpreter: answering never loads TensorFlow or Keras, and an RDP-only question
    does not load dp-accounting's PLD modules or scipy.signal (the slow imports, see dp_library)."""
    proc = subprocess.run([sys.executable, "-c", NO_TF_SCRIPT, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["tensorflow"] is False and loaded["keras"] is False
    if not needs_pld:
        assert loaded["dp_accounting.pld"] is False and loaded["scipy.signal"] is False


def test_config_with_augmentation_multiplicity_keeps_sigma_and_says_so():
    config = ROOT / "configs" / "mnist_tutorial.yaml"
    plain = run_json("epsilon", "--config", config, "--accountant", "all")
    views = run_json("epsilon", "--config", config, "--accountant", "all",
                     "--set", "data.augmentation=mirror")
    assert views["epsilon_rdp"] == plain["epsilon_rdp"] and views["epsilon_pld"] == plain["epsilon_pld"]
    assert views["accounting_noise_multiplier"] == plain["accounting_noise_multiplier"] == 1.1
    assert "2 augmented views" in views["statement"] and "augmented" not in plain["statement"]


def test_config_with_private_feature_statistics_composes_their_release():
    config = ROOT / "configs" / "mnist_tutorial.yaml"
    sets = ["--set", "model.architecture=scatter_linear", "--set", "model.feature_norm=private_stats"]
    out = run_json("epsilon", "--config", config, "--accountant", "all", *sets)
    cfg, plan = _plan(config, "model.architecture=scatter_linear", "model.feature_norm=private_stats")
    step = dp_accounting.PoissonSampledDpEvent(plan.sampling_rate, dp_accounting.GaussianDpEvent(1.1))
    release = dp_accounting.GaussianDpEvent(8.0)
    event = dp_accounting.ComposedDpEvent([release, release,
                                           dp_accounting.SelfComposedDpEvent(step, plan.total_steps)])
    assert out["releases"] == [8.0, 8.0]
    assert out["epsilon_rdp"] == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(1e-5), rel=1e-9)
    assert out["epsilon_rdp"] > library_epsilon(1.1, plan.sampling_rate, plan.total_steps, 1e-5, "rdp")
    assert "released the features' per-channel mean and mean square" in out["statement"]
