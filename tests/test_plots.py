"""Tests for dpsgd_cli.runs.plots and `dpsgd plot`: figures are checked as matplotlib objects, files as
PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.config import load_config
from dpsgd_cli.errors import RunDirError
from dpsgd_cli.labels import CLASS_NAMES
from dpsgd_cli.runs.plots import curves_figure, per_class_figure, plot_runs
from dpsgd_cli.runs.results import METRIC_COLUMNS, write_metrics, write_yaml
from dpsgd_cli.runs.summaries import load_runs, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, name: str, *sets: str, epochs: int = 5, status: str = "finished",
              resolved_sigma: float | None = None) -> Path:
    """A run directory as runner.run leaves it (metrics.csv, run.yaml), with made-up numbers."""
    cfg = load_config(None, [f"output_dir={root}", f"name={name}", *sets])
    sigma = resolved_sigma or cfg.privacy.noise_multiplier or 0.0
    records = []
    for epoch in range(1, epochs + 1):
        record = dict.fromkeys(METRIC_COLUMNS, 0.0)
        record.update({f"test_accuracy_class_{k}": 0.5 + 0.04 * k for k in range(10)})
        eps = epoch / sigma if cfg.privacy.enabled else float("inf")
        record.update(epoch=epoch, step=epoch * 10, test_accuracy=0.6 + 0.05 * epoch - 0.1 * sigma,
                      epsilon_rdp=eps, epsilon_pld=0.8 * eps, delta=cfg.privacy.delta, elapsed_s=3.0 * epoch,
                      noise_multiplier=sigma, batch_size=cfg.data.batch_size)
        records.append(record)
    write_metrics(records, cfg.run_dir / "metrics.csv")
    write_yaml({"status": status, "config": cfg.to_dict(), "resolved": {"noise_multiplier": sigma}},
               cfg.run_dir / "run.yaml")
    return cfg.run_dir


@pytest.fixture
def sigma_sweep(tmp_path) -> Path:
    for sigma in ("1.2", "1.1"):
        write_run(tmp_path / "reproduce", f"fashion_mnist_sigma{sigma}", f"privacy.noise_multiplier={sigma}")
    return tmp_path / "reproduce"


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_curves_have_one_line_per_run_and_a_legend_of_what_differs(sigma_sweep):
    runs, keys = load_runs([sigma_sweep])
    assert keys == ["privacy.noise_multiplier"]
    fig = curves_figure(runs, keys)
    acc_ax, eps_ax = fig.axes
    assert len(acc_ax.get_lines()) == 2
    assert _legend_texts(acc_ax) == ["σ = 1.1", "σ = 1.2"]
    assert len(eps_ax.get_lines()) == 4  # PLD (solid) and RDP (dashed) per run
    assert _legend_texts(eps_ax) == ["σ = 1.1", "σ = 1.2", "PLD accountant", "RDP accountant"]
    assert [line.get_linestyle() for line in eps_ax.get_lines()] == ["-", "--", "-", "--"]
    x, y = acc_ax.get_lines()[0].get_data()
    assert list(x) == [1, 2, 3, 4, 5] and y[0] == pytest.approx(0.6 + 0.05 - 0.11)
    assert "Fashion-MNIST" in fig._suptitle.get_text() and "σ" not in fig._suptitle.get_text()


def test_non_private_run_has_an_accuracy_line_but_no_epsilon_line(sigma_sweep):
    write_run(sigma_sweep, "fashion_mnist_nonprivate", "privacy.enabled=false")
    runs, keys = load_runs([sigma_sweep])
    fig = curves_figure(runs, keys)
    acc_ax, eps_ax = fig.axes
    assert len(acc_ax.get_lines()) == 3 and len(eps_ax.get_lines()) == 4
    assert "non-private" in _legend_texts(acc_ax)


def test_target_epsilon_runs_show_the_calibrated_sigma(tmp_path):
    for b, sigma in ((64, 0.7), (256, 1.1)):
        write_run(tmp_path / "batch", f"batch_size={b}", f"data.batch_size={b}", "privacy.target_epsilon=3",
                  resolved_sigma=sigma)
    runs, keys = load_runs([tmp_path / "batch"])
    assert keys == ["data.batch_size"]
    assert run_labels(runs, keys) == ["batch size = 64, σ ≈ 0.7", "batch size = 256, σ ≈ 1.1"]


def test_identical_configs_fall_back_to_run_names(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / "s", name, "privacy.noise_multiplier=1.1")
    runs, keys = load_runs([tmp_path / "s"])
    assert keys == [] and run_labels(runs, keys) == ["a", "b"]


def test_per_class_chart_has_a_bar_per_class_and_run(sigma_sweep):
    runs, keys = load_runs([sigma_sweep])
    fig = per_class_figure(runs, keys)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 10
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASS_NAMES["fashion_mnist"])
    heights = [p.get_height() for p in ax.patches[:10]]
    assert heights == pytest.approx([0.5 + 0.04 * k for k in range(10)])
    assert fig.legends and fig.legends[0].get_texts()[0].get_text().startswith("σ = 1.1:")


def test_plot_runs_writes_nonempty_pngs(sigma_sweep, tmp_path):
    written, drawn = plot_runs([sigma_sweep])
    assert written == [sigma_sweep / "curves.png", sigma_sweep / "curves-per-class.png",
                       sigma_sweep / "curves-tradeoff.png"] and len(drawn) == 2
    out = tmp_path / "figs" / "seed.png"
    written, _ = plot_runs([sigma_sweep / "fashion_mnist_sigma1.1", sigma_sweep / "fashion_mnist_sigma1.2"],
                           out, per_class=False)
    assert written == [out, out.with_name("seed-tradeoff.png")]
    for path in (sigma_sweep / "curves.png", sigma_sweep / "curves-per-class.png", out):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(out.parent.glob(".*"))  # no temporary file left behind


def test_unfinished_run_is_drawn_as_far_as_it_got_and_an_empty_one_is_an_error(tmp_path):
    write_run(tmp_path / "s", "part", "privacy.noise_multiplier=1.1", epochs=2, status="running")
    written, drawn = plot_runs([tmp_path / "s"])
    assert len(drawn) == 1 and len(drawn[0].metrics) == 2
    empty = tmp_path / "empty" / "run"
    empty.mkdir(parents=True)
    write_yaml({"status": "running", "config": {}}, empty / "run.yaml")
    with pytest.raises(RunDirError, match="no run has finished an epoch"):
        plot_runs([empty])


def test_cli_plot(sigma_sweep, tmp_path):
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(app, ["plot", str(sigma_sweep), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and (tmp_path / "cmp-per-class.png").stat().st_size > 0
    assert "wrote" in result.output
    result = CliRunner().invoke(app, ["plot", str(sigma_sweep), "--out", str(tmp_path / "x.pdf")])
    assert result.exit_code == 1 and "must be a .png file" in result.output


def test_report_of_runs_in_progress(sigma_sweep):
    write_run(sigma_sweep, "fashion_mnist_sigma1.5", "privacy.noise_multiplier=1.5", epochs=2,
              status="running")
    result = CliRunner().invoke(app, ["report", str(sigma_sweep)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "running" in result.output and "status" in result.output and "15 s" in result.output


def test_plots_module_does_not_import_tensorflow():
    code = "import sys, dpsgd_cli.runs.plots; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tradeoff_figure_draws_accuracy_against_pld_epsilon_and_published_points(tmp_path):
    from dpsgd_cli.runs.tradeoff import PUBLISHED, tradeoff_figure

    private = write_run(tmp_path, "dp", "privacy.noise_multiplier=1.1", epochs=4)
    write_run(tmp_path, "np", "privacy.enabled=false", epochs=4)
    runs, keys = load_runs([tmp_path])
    ax = tradeoff_figure(runs, keys).axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert len(curves) == 1  # the non-private run has no ε
    metrics = load_runs([private])[0][0].metrics
    assert list(curves[0].get_xdata()) == list(metrics["epsilon_pld"])
    assert list(curves[0].get_ydata()) == list(metrics["test_accuracy"])
    points = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert sorted(p.get_ydata()[0] for p in points) == sorted(a for _, a in PUBLISHED["fashion_mnist"])
    written, _ = plot_runs([tmp_path], tmp_path / "c.png")
    assert tmp_path / "c-tradeoff.png" in written
    assert (tmp_path / "c-tradeoff.png").read_bytes()[:8] == PNG_MAGIC
