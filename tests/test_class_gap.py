"""`dpsgd class-gap`: per-class accuracy of a DP run against its non-private twin."""

from __future__ import annotations

from test_plots import PNG_MAGIC, write_run
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.runs.class_gap import class_gaps
from dpsgd_cli.runs.results import read_metrics, write_metrics


def _runs(tmp_path):
    dp = write_run(tmp_path, "dp", "privacy.noise_multiplier=1.1", epochs=3)
    twin = write_run(tmp_path, "twin", "privacy.enabled=false", epochs=3)
    metrics = read_metrics(dp / "metrics.csv")
    metrics.loc[metrics.index[-1], "test_accuracy_class_6"] = 0.2  # "Shirt" pays most
    write_metrics(metrics.to_dict("records"), dp / "metrics.csv")
    return dp, twin


def test_class_gaps_sorted_by_loss(tmp_path):
    dp, twin = _runs(tmp_path)
    gaps, _, _ = class_gaps(dp, twin)
    assert gaps[0].label == 6 and gaps[0].name == "Shirt"
    assert gaps[0].loss == (0.5 + 0.04 * 6) - 0.2
    assert all(g.loss == 0 for g in gaps[1:])


def test_cli_table_figure_and_swapped_roles(tmp_path):
    dp, twin = _runs(tmp_path)
    out = tmp_path / "gap.png"
    result = CliRunner().invoke(app, ["class-gap", str(dp), str(twin), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Shirt" in result.output and "54.00" in result.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    swapped = CliRunner().invoke(app, ["class-gap", str(twin), str(dp)])
    assert swapped.exit_code != 0 and "non-private twin" in swapped.output
