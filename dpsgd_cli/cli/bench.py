"""`dpsgd bench`: time non-private and DP-SGD steps side by side and write results/bench/bench.csv."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, fail, user_errors


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        fail(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


@app.command()
@user_errors
def bench(
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "64,256,1024",
    jit: Annotated[str, typer.Option(help="XLA settings to measure: both, on, off.")] = "both",
    paths: Annotated[str, typer.Option(help="Comma-separated: nonprivate, nonprivate_fast, vectorized_map, "
                                            "fast.")] = "nonprivate,nonprivate_fast,vectorized_map,fast",
    steps: Annotated[int, typer.Option(min=5, help="Timed steps per row (median reported).")] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed steps after the first call.")] = 3,
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("results/bench/bench.csv"),
) -> None:
    """Seconds per training step of the non-private and the DP steps, in one process and one run.

    Prints a table (median step time, examples/s, compile time, memory, DP / non-private ratio) and
    writes it as CSV."""
    from dpsgd_cli.bench import PATHS

    chosen = [p.strip() for p in paths.split(",") if p.strip()]
    if not chosen or any(p not in PATHS for p in chosen):
        fail(f"--paths: choose from {', '.join(PATHS)}, got {paths!r}")
    jit_modes = {"both": (False, True), "on": (True,), "off": (False,)}.get(jit)
    if jit_modes is None:
        fail(f"--jit: choose both, on or off, got {jit!r}")
    _run(_ints(batch_sizes, "--batch-sizes"), jit_modes, chosen, steps, warmup, out)


def _run(batch_sizes, jit_modes, paths, steps, warmup, out: Path) -> None:
    from dpsgd_cli.bench import default_cases, run_benchmark
    from dpsgd_cli.results import write_table

    cases = default_cases(batch_sizes, jit_modes, paths)
    console.print(f"{len(cases)} rows, {steps} timed steps each, on {platform.machine()} "
                  f"({_cpu_name()}); this takes a few minutes", highlight=False)
    rows = run_benchmark(cases, steps=steps, warmup=warmup,
                         on_row=lambda r: console.print(_row_line(r), highlight=False))
    console.print(bench_table(rows))
    write_table(rows, out)
    console.print(f"wrote {out}", highlight=False)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _row_line(r: dict[str, Any]) -> str:
    return (f"  {r['path']:<15} batch {r['batch_size']:>5} (capacity {r['capacity']:>5}) "
            f"jit {str(r['jit_compile']):<5} {1000 * r['step_s']:8.2f} ms/step")


def bench_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="seconds per training step (median), same process, same run")
    for column in ("path", "batch", "capacity", "jit", "ms/step", "examples/s", "÷ nonprivate",
                   "÷ nonprivate_fast", "compile s", "peak MB"):
        table.add_column(column, justify="right")
    for r in rows:
        jit = "on" if r["jit_compile"] else "off"
        table.add_row(r["path"], str(r["batch_size"]), str(r["capacity"]), jit,
                      f"{1000 * r['step_s']:.2f}", f"{r['examples_per_s']:,.0f}",
                      f"{r['ratio_to_nonprivate']:.2f}", f"{r['ratio_to_nonprivate_fast']:.2f}",
                      f"{r['compile_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
    return table
