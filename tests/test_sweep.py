"""Tests for dpsgd_cli.experiment.sweep and `dpsgd sweep` / `dpsgd report`: grid parsing, naming, skip logic,
summary."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.errors import ConfigError, RunDirError, TrainingError
from dpsgd_cli.experiment.sweep import grid_points, parse_grid, plan_sweep, run_name, run_sweep, summarize
from dpsgd_cli.runs.results import METRIC_COLUMNS, write_metrics, write_yaml
from dpsgd_cli.runs.summaries import SUMMARY_COLUMNS, load_runs, varied_keys, write_summary

GRID = ["privacy.noise_multiplier=1.1,1.2", "data.batch_size=64,128"]
NAMES = ["noise_multiplier=1.1_batch_size=64", "noise_multiplier=1.1_batch_size=128",
         "noise_multiplier=1.2_batch_size=64", "noise_multiplier=1.2_batch_size=128"]


def _read_summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("*/*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Grid parsing and naming (no training)
# ------------------------------------------------------------------------------------------------
def test_parse_grid_reads_yaml_scalars():
    axes = parse_grid(["privacy.noise_multiplier=1.1, 1.2", "data.batch_size=64,128",
                       "model.activation=tanh"])
    assert [a.key for a in axes] == ["privacy.noise_multiplier", "data.batch_size", "model.activation"]
    assert axes[0].values == (1.1, 1.2) and axes[1].values == (64, 128) and axes[2].values == ("tanh",)
    assert axes[0].texts == ("1.1", "1.2")


@pytest.mark.parametrize("item, message", [
    ("privacy.noise_multiplier", "expected KEY=V1,V2"),
    ("=1,2", "expected KEY=V1,V2"),
    ("privacy..x=1", "expected KEY=V1,V2"),
    ("data.batch_size=64,,128", "empty value"),
    ("data.batch_size=64,64.0", "listed twice"),
    ("name=a,b", "sets name of each run itself"),
])
def test_parse_grid_rejects_bad_items(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([item])


def test_parse_grid_rejects_a_key_given_twice():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["data.batch_size=64", "data.batch_size=128"])


def test_grid_points_are_the_cartesian_product_first_axis_slowest():
    axes = parse_grid(["a.x=1,2", "b.y=3,4,5"])
    assert grid_points(axes) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grid_points([]) == [()]


def test_run_names_are_readable_and_safe():
    assert run_name([("privacy.noise_multiplier", 1.1), ("data.batch_size", 128)]) == \
        "noise_multiplier=1.1_batch_size=128"
    assert run_name([("privacy.delta", 1e-5), ("privacy.enabled", False)]) == "delta=1e-05_enabled=false"
    assert run_name([("a.epochs", 1), ("b.epochs", 2)]) == "a.epochs=1_b.epochs=2"  # same last part
    assert run_name([("model.activation", "a/b c")]) == "activation=a-b-c"


def test_plan_validates_every_point_before_training(data_dir, tmp_path):
    sets = [f"data.data_dir={data_dir}", f"output_dir={tmp_path}", "privacy.noise_multiplier=1.0"]
    plan = plan_sweep(None, sets, GRID, name="grid")
    assert plan.sweep_dir == tmp_path / "grid" and [r.name for r in plan.runs] == NAMES
    assert [r.state for r in plan.runs] == ["new"] * 4
    last = plan.runs[-1].cfg
    assert (last.privacy.noise_multiplier, last.data.batch_size, last.name) == (1.2, 128, NAMES[-1])
    assert last.run_dir == tmp_path / "grid" / NAMES[-1]
    assert plan_sweep(None, sets, ["privacy.l2_norm_clip=1"], name="grid").runs[0].name == "l2_norm_clip=1.0"
    with pytest.raises(ConfigError, match="data.batch_size: must be ≥ 1"):
        plan_sweep(None, sets, ["data.batch_size=64,0"], name="grid")
    with pytest.raises(ConfigError, match="--name"):
        plan_sweep(None, sets, GRID, name="../x")
    assert not (tmp_path / "grid").exists()


def test_no_grid_is_one_run_named_after_the_config(tmp_path):
    plan = plan_sweep(Path(__file__).parent.parent / "configs" / "fashion_mnist_sigma1.2.yaml",
                      [f"output_dir={tmp_path}"], [], name="reproduce")
    assert [r.name for r in plan.runs] == ["fashion_mnist_sigma1.2"]
    assert plan.runs[0].run_dir == tmp_path / "reproduce" / "fashion_mnist_sigma1.2"


def test_varied_keys_prefer_the_grid_order_and_ignore_names_paths_and_missing_keys():
    settings = [{"name": "a", "output_dir": "x", "data.batch_size": 64, "privacy.noise_multiplier": 1.1,
                 "privacy.canaries": 0},
                {"name": "b", "output_dir": "y", "data.batch_size": 128, "privacy.noise_multiplier": 1.1},
                {"name": "c", "output_dir": "z", "data.batch_size": 64, "privacy.noise_multiplier": 1.2}]
    assert varied_keys(settings) == ["data.batch_size", "privacy.noise_multiplier"]
    assert varied_keys(settings, ["privacy.noise_multiplier", "seed"]) == [
        "privacy.noise_multiplier", "data.batch_size"]


# ------------------------------------------------------------------------------------------------
# Running: skip, replace, refuse (a fake run_fn writes what runner.run writes)
# ------------------------------------------------------------------------------------------------
class FakeRunner:
    """Stands in for runner.run: writes metrics.csv and run.yaml (status finished), counts its calls."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[str] = []
        self.keys: list = []
        self.fail_on = fail_on

    def __call__(self, cfg, *, on_step=None, on_epoch=None, overwrite=False, run_key=None):
        assert overwrite, "a sweep must replace what an earlier attempt left"
        self.calls.append(cfg.name)
        self.keys.append(run_key)
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml({"status": "running", "config": cfg.to_dict()}, run_dir / "run.yaml")
        if cfg.name == self.fail_on:
            raise TrainingError("loss is nan at epoch 1")
        records = [fake_record(e, cfg.privacy.noise_multiplier or 1.0, cfg.data.batch_size)
                   for e in range(1, cfg.training.epochs + 1)]
        write_metrics(records, run_dir / "metrics.csv")
        write_yaml({"status": "finished", "config": cfg.to_dict(),
                    "resolved": {"noise_multiplier": cfg.privacy.noise_multiplier}}, run_dir / "run.yaml")
        return type("Result", (), {"records": records})()


def fake_record(epoch: int, sigma: float, batch_size: int) -> dict:
    record = dict.fromkeys(METRIC_COLUMNS, 0.5)
    record.update(epoch=epoch, step=epoch * 10, test_accuracy=0.5 + 0.1 * epoch / sigma,
                  epsilon_rdp=epoch / sigma, epsilon_pld=0.8 * epoch / sigma, delta=1e-5,
                  noise_multiplier=sigma, batch_size=batch_size, elapsed_s=2.0 * epoch)
    return record


@pytest.fixture
def sets(data_dir, tmp_path) -> list[str]:
    return [f"data.data_dir={data_dir}", f"output_dir={tmp_path}", "privacy.noise_multiplier=1.0",
            "training.epochs=2"]


def test_rerun_skips_finished_and_replaces_unfinished(sets, tmp_path):
    fake = FakeRunner()
    outcome = run_sweep(plan_sweep(None, sets, GRID, name="grid"), run_fn=fake)
    assert fake.calls == NAMES and len(outcome.trained) == 4
    # An interrupted attempt: one run still says "running".
    broken = tmp_path / "grid" / NAMES[2] / "run.yaml"
    doc = yaml.safe_load(broken.read_text())
    broken.write_text(yaml.safe_dump({**doc, "status": "running"}))
    plan = plan_sweep(None, sets, GRID, name="grid")
    assert [r.state for r in plan.runs] == ["finished", "finished", "unfinished", "finished"]
    again = FakeRunner()
    outcome = run_sweep(plan, run_fn=again)
    assert again.calls == [NAMES[2]] and len(outcome.skipped) == 3
    assert len(_read_summary(tmp_path / "grid" / "summary.csv")) == 4


@pytest.mark.parametrize("reproducible", [False, True])
def test_every_point_gets_its_own_key(sets, reproducible):
    """No two points of a sweep share noise or batches, in either mode; reproducible keys repeat."""
    fake = FakeRunner()
    extra = [f"privacy.reproducible={str(reproducible).lower()}"]
    run_sweep(plan_sweep(None, sets + extra, GRID, name="grid"), run_fn=fake)
    materials = [k.material for k in fake.keys]
    assert len(set(materials)) == len(NAMES) == len(materials)
    assert {k.mode for k in fake.keys} == {"reproducible" if reproducible else "secret"}
    again = FakeRunner()
    run_sweep(plan_sweep(None, sets + extra, GRID, name="grid"), run_fn=again, overwrite=True)
    assert ([k.material for k in again.keys] == materials) is reproducible


def test_cluster_array_one_point_per_job_then_one_summary(sets, tmp_path):
    """`--index K` trains point K only and leaves summary.csv alone; `summarize` writes it once at the
    end. Every point is run by exactly one index."""
    plan = plan_sweep(None, sets, GRID, name="grid")
    fakes = []
    for k in range(len(plan.runs)):
        fake = FakeRunner()
        outcome = run_sweep(plan_sweep(None, sets, GRID, name="grid").only(k), run_fn=fake, summary=False)
        assert fake.calls == [NAMES[k]] and outcome.summary_path is None
        assert not (tmp_path / "grid" / "summary.csv").exists()
        fakes.append(fake)
    path = summarize(plan_sweep(None, sets, GRID, name="grid"))
    assert len(_read_summary(path)) == len(NAMES)
    with pytest.raises(ConfigError, match=r"--index: 4 is not a point of this sweep; use 0\.\.3"):
        plan.only(4)


def test_cli_list_index_and_summary_only(sets, tmp_path):
    args = ["sweep", *[a for s in sets for a in ("--set", s)], *[a for g in GRID for a in ("--grid", g)],
            "--name", "grid"]
    listed = CliRunner().invoke(app, [*args, "--list"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [f"{k}\t{name}\tnew" for k, name in enumerate(NAMES)]
    bad = CliRunner().invoke(app, [*args, "--index", "9"])
    assert bad.exit_code == 2 and "--index: 9 is not a point" in bad.output and "Traceback" not in bad.output
    both = CliRunner().invoke(app, [*args, "--index", "1", "--list"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    assert not (tmp_path / "grid").exists()  # nothing written by any of these
    run_sweep(plan_sweep(None, sets, GRID, name="grid"), run_fn=FakeRunner(), summary=False)
    rebuilt = CliRunner().invoke(app, [*args, "--summary-only"])
    assert rebuilt.exit_code == 0 and len(_read_summary(tmp_path / "grid" / "summary.csv")) == 4


def test_changed_config_is_refused_unless_overwrite(sets):
    run_sweep(plan_sweep(None, sets, GRID, name="grid"), run_fn=FakeRunner())
    plan = plan_sweep(None, [*sets, "training.epochs=3"], GRID, name="grid")
    assert {r.state for r in plan.runs} == {"changed"}
    assert plan.runs[0].differences == ("training.epochs: 2 → 3",)
    fake = FakeRunner()
    with pytest.raises(RunDirError, match=r"different config \(training.epochs: 2 → 3\) \(and 3 more"):
        run_sweep(plan, run_fn=fake)
    assert fake.calls == []
    run_sweep(plan, run_fn=fake, overwrite=True)
    assert fake.calls == NAMES


def test_a_diverged_run_is_reported_and_the_sweep_goes_on(sets, tmp_path):
    fake = FakeRunner(fail_on=NAMES[1])
    outcome = run_sweep(plan_sweep(None, sets, GRID, name="grid"), run_fn=fake)
    assert fake.calls == NAMES and [p.name for p, _ in outcome.failed] == [NAMES[1]]
    rows = _read_summary(tmp_path / "grid" / "summary.csv")
    assert [r["run"] for r in rows] == [NAMES[0], NAMES[2], NAMES[3]]  # only finished runs
    assert plan_sweep(None, sets, GRID, name="grid").runs[1].state == "unfinished"


def test_summary_covers_every_finished_run_in_the_sweep_directory(sets, tmp_path):
    """Two invocations on one sweep (as `make -j2` runs them, one point each) share one summary."""
    for sigma in ("1.2", "1.1"):
        run_sweep(plan_sweep(None, sets, [f"privacy.noise_multiplier={sigma}"], name="points"),
                  run_fn=FakeRunner())
    rows = _read_summary(tmp_path / "points" / "summary.csv")
    assert [r["run"] for r in rows] == ["noise_multiplier=1.1", "noise_multiplier=1.2"]  # sorted by σ
    assert list(rows[0]) == ["run", "privacy.noise_multiplier", *SUMMARY_COLUMNS]
    assert float(rows[1]["final_test_accuracy"]) == pytest.approx(0.5 + 0.2 / 1.2)
    assert write_summary(tmp_path / "points").read_text() == (tmp_path / "points" / "summary.csv").read_text()


# ------------------------------------------------------------------------------------------------
# The real thing: a 2×2 sweep of tiny runs through runner.run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    sets = [f"data.data_dir={data_dir}", f"output_dir={out}", "data.train_size=256", "data.test_size=200",
            "training.epochs=1", "privacy.noise_multiplier=1.0"]
    outcome = run_sweep(plan_sweep(None, sets, GRID, name="tiny"))
    return out / "tiny", sets, outcome


@pytest.mark.slow
def test_real_sweep_writes_four_runs_and_a_summary(real_sweep):
    sweep_dir, _, outcome = real_sweep
    assert not outcome.failed and len(outcome.trained) == 4
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(NAMES)
    for name in NAMES:
        doc = yaml.safe_load((sweep_dir / name / "run.yaml").read_text())
        assert doc["status"] == "finished" and doc["config"]["output_dir"] == str(sweep_dir)
    rows = _read_summary(sweep_dir / "summary.csv")
    assert [r["run"] for r in rows] == NAMES
    assert [(r["privacy.noise_multiplier"], r["data.batch_size"]) for r in rows] == [
        ("1.1", "64"), ("1.1", "128"), ("1.2", "64"), ("1.2", "128")]
    for row in rows:
        assert row["epochs"] == "1" and 0 <= float(row["final_test_accuracy"]) <= 1
        assert float(row["best_test_accuracy"]) == float(row["final_test_accuracy"])
        assert 0 < float(row["epsilon_pld"]) < float(row["epsilon_rdp"]) < math.inf
        assert float(row["wall_time_s"]) > 0
    # More noise, same batch size: smaller ε.
    assert float(rows[2]["epsilon_pld"]) < float(rows[0]["epsilon_pld"])


@pytest.mark.slow
def test_real_sweep_rerun_trains_nothing(real_sweep):
    sweep_dir, sets, _ = real_sweep
    before = _mtimes(sweep_dir)
    counter = FakeRunner()
    outcome = run_sweep(plan_sweep(None, sets, GRID, name="tiny"), run_fn=counter)
    assert counter.calls == [] and len(outcome.skipped) == 4
    assert _mtimes(sweep_dir) == before  # no run file was touched
    assert len(_read_summary(sweep_dir / "summary.csv")) == 4


@pytest.mark.slow
def test_cli_report_renders_the_sweep(real_sweep):
    sweep_dir, _, _ = real_sweep
    result = CliRunner().invoke(app, ["report", str(sweep_dir)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for header in ("σ", "batch size", "final acc", "ε PLD", "ε RDP", "time"):
        assert header in result.output
    assert result.output.count("│ 1.1 │") == 2 and result.output.count("│ 1.2 │") == 2
    runs, keys = load_runs([sweep_dir])
    assert keys == ["data.batch_size", "privacy.noise_multiplier"] and len(runs) == 4


@pytest.mark.slow
def test_cli_sweep_dry_run_and_skip(real_sweep):
    _, sets, _ = real_sweep
    args = ["sweep", *[a for s in sets for a in ("--set", s)], "--name", "tiny"]
    args += [a for g in GRID for a in ("--grid", g)]
    result = CliRunner().invoke(app, [*args, "--dry-run"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "4 already finished, 0 to train" in result.output and result.output.count("finished → skip") == 4
    result = CliRunner().invoke(app, [*args, "--quiet"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "summary.csv" in result.output


def test_cli_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run or sweep directory" in result.output
    result = CliRunner().invoke(app, ["sweep", "--grid", "data.batch_size", "--dry-run"])
    assert result.exit_code == 2 and "expected KEY=V1,V2" in result.output
    assert "Traceback" not in result.output



def test_sweep_module_imports_neither_tensorflow_nor_pandas():
    code = ("import sys, dpsgd_cli.experiment.sweep; "
            "print(sorted(m for m in ('tensorflow', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
