"""Every table is readable at 80 columns and in a pipe: no header or cell cut to "…" (dpsgd_cli.cli.tables),
the `dpsgd bench` tables included."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from dpsgd_cli.cli import app
from dpsgd_cli.cli.bench import bench_tables
from dpsgd_cli.cli.tables import fits, fitted, print_table, vertical
from dpsgd_cli.cli.train import summary_table
from dpsgd_cli.config import load_config
from dpsgd_cli.runs.results import METRIC_COLUMNS, write_metrics, write_yaml

# the longest path names and the widest figures a benchmark row can hold
BENCH_PATHS = ("nonprivate", "nonprivate_fast", "vectorized_map", "fast", "nonprivate_planned", "planned",
               "epoch_nonprivate", "epoch_dp")


def _bench_rows() -> list[dict]:
    return [dict(path=path, batch_size=1024, capacity=1408, jit_compile=i % 2 == 0, step_s=9.87654,
                 examples_per_s=987654.0, ratio_to_nonprivate=123.45, ratio_to_nonprivate_fast=12.34,
                 ratio_to_fastest_nonprivate=99.99, compile_s=123.4, peak_rss_mb=12345.0)
            for i, path in enumerate(BENCH_PATHS)]


def _draw(renderable, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def _header_words(table: Table) -> list[str]:
    return [word for column in table.columns for word in str(column.header).split()]


def test_bench_tables_fit_80_columns_whole():
    for table in bench_tables(_bench_rows()):
        assert fits(table, Console(width=80, file=io.StringIO()))
        drawn = _draw(table, 80)
        assert "…" not in drawn
        assert max(len(line.rstrip()) for line in drawn.splitlines()) <= 80
        for word in _header_words(table):
            assert word in drawn, word
        starts = [line.split()[0] for line in drawn.splitlines() if line.strip()]
        for path in BENCH_PATHS:
            assert path in starts, path


def test_bench_tables_hold_every_figure_of_each_row():
    rows = _bench_rows()
    times, ratios = bench_tables(rows)
    drawn = _draw(times, 80) + _draw(ratios, 80)
    for figure in ("9876.54", "987,654", "1408", "123.4", "12345", "123.45", "12.34", "99.99"):
        assert figure in drawn, figure


def test_a_table_too_wide_for_the_terminal_becomes_one_block_per_row():
    table = Table(title="wide")
    headers = [f"a long header number {i}" for i in range(8)]
    for header in headers:
        table.add_column(header, no_wrap=True)
    table.add_row(*(f"value_{i}_without_spaces" for i in range(8)))
    table.add_row(*(f"second_{i}" for i in range(8)))
    console = Console(width=80, file=io.StringIO())
    assert "…" in _draw(table, 80)  # rich alone would cut it
    assert not fits(table, console)
    drawn = _draw(fitted(table, console), 80)
    assert "…" not in drawn
    for i, header in enumerate(headers):
        assert f"{header}  value_{i}_without_spaces" in drawn
        assert f"second_{i}" in drawn
    assert drawn.index("value_7") < drawn.index("second_0")  # row by row


def test_vertical_joins_multi_line_headers():
    table = Table()
    table.add_column("÷ fastest\nnonprivate")
    table.add_row("2.50")
    assert "÷ fastest nonprivate  2.50" in _draw(vertical(table), 80)


def test_a_table_that_fits_is_printed_as_a_table():
    table = summary_table({"epoch": 3, "test_accuracy": 0.8123, "epsilon_pld": 1.234, "epsilon_rdp": 1.5,
                           "delta": 1e-5, "elapsed_s": 61.0}, 1.1)
    out = io.StringIO()
    print_table(table, Console(file=out, width=80, color_system=None))
    assert "┃ epoch ┃ test accuracy ┃" in out.getvalue() and "…" not in out.getvalue()


def _fake_run(output_dir, name: str, overrides: list[str]) -> None:
    cfg = load_config(None, [f"output_dir={output_dir}", f"name={name}", "training.epochs=2", *overrides])
    cfg.run_dir.mkdir(parents=True)
    sigma = cfg.privacy.noise_multiplier
    records = []
    for epoch in (1, 2):
        record = dict.fromkeys(METRIC_COLUMNS, 0.5)
        record.update(epoch=epoch, step=10 * epoch, test_accuracy=0.7 + 0.01 * epoch,
                      epsilon_rdp=epoch / sigma, epsilon_pld=0.9 * epoch / sigma, delta=1e-5,
                      noise_multiplier=sigma,
                      batch_size=cfg.data.batch_size, elapsed_s=3700.0 * epoch)
        records.append(record)
    write_metrics(records, cfg.run_dir / "metrics.csv")
    write_yaml({"status": "finished", "config": cfg.to_dict(), "resolved": {"noise_multiplier": sigma}},
               cfg.run_dir / "run.yaml")


@pytest.mark.parametrize("columns", ["80", "60"])
def test_report_of_runs_differing_in_many_keys_is_readable(tmp_path, columns):
    settings = [("0.5", "64", "0.001", "sgd", "tanh"), ("1.5", "1024", "0.02", "adam", "relu")]
    for i, (sigma, batch, lr, optimizer, activation) in enumerate(settings):
        _fake_run(tmp_path, f"run_{i}",
                  [f"privacy.noise_multiplier={sigma}", f"data.batch_size={batch}",
                   f"training.learning_rate={lr}", f"training.optimizer={optimizer}",
                   f"model.activation={activation}"])
    result = CliRunner().invoke(app, ["report", str(tmp_path)], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    table_lines = [line for line in result.output.splitlines() if not line.startswith("note:")]
    assert max(len(line.rstrip()) for line in table_lines) <= int(columns)
    for text in ("batch size", "activation", "optimizer", "lr", "σ", "final acc", "best acc (epoch)",
                 "ε PLD", "ε RDP", "time", "0.7200", "1024", "adam", "relu", "0.001", "2h 03m"):
        assert text in result.output, text
    assert f"{2 / 1.5:.3f}" in result.output  # ε RDP of the second run
