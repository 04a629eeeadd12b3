"""`dpsgd bench`: time non-private and DP-SGD steps side by side and write results/bench/bench.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from dpsgd_cli.cli.app import app, console, fail, user_errors
from dpsgd_cli.cli.tables import print_table

ALL_PATHS = ("plain,nonprivate,nonprivate_fast,vectorized_map,fast,nonprivate_planned,planned,epoch,memory,"
             "layers")


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
    paths: Annotated[str, typer.Option(
        help="Comma-separated: plain (a plain TensorFlow GradientTape step, the floor), nonprivate, "
             "nonprivate_fast, vectorized_map, fast (each XLA setting), "
             "nonprivate_planned, planned (the planner's choice), epoch (whole Fashion-MNIST epochs through "
             "the trainer, batch 256), memory (peak memory of the plain, Keras, planned and fast steps at "
             "--memory-batch, each in a fresh process), layers (each weight layer's work alone, "
             "non-private and under each DP formulation, and the noise draw: what privacy costs per "
             "layer).")] = ALL_PATHS,
    steps: Annotated[int, typer.Option(min=5, help="Timed steps per row (median reported).")] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed steps after the first call.")] = 3,
    out: Annotated[Path, typer.Option(help="CSV to write (memory rows: bench_memory.csv beside it, layer "
                                           "rows: bench_layers.csv).")] = Path(
        "results/bench/bench.csv"),
    memory_batch: Annotated[int, typer.Option(min=1, help="Batch size of the memory rows.")] = 1024,
    devices: Annotated[str | None, typer.Option(
        help="Comma-separated replica counts, e.g. 1,2: instead of the other rows, the DP step under "
             "tf.distribute (mirrored) on that many GPUs, else logical CPUs.")] = None,
) -> None:
    """Seconds per training step of the non-private and the DP steps, in one process and one run.

    Prints the machine (CPU model name, family, model; TensorFlow and oneDNN settings), a table (median
    step time, examples/s, compile time, memory, DP / non-private ratios, the fastest non-private step
    including a plain TensorFlow step), the plan the planner chose, and writes it as CSV with the machine
    in every row."""
    chosen = [p.strip() for p in paths.split(",") if p.strip()]
    if not chosen or any(p not in ALL_PATHS.split(",") for p in chosen):
        fail(f"--paths: choose from {ALL_PATHS.replace(',', ', ')}, got {paths!r}")
    jit_modes = {"both": (False, True), "on": (True,), "off": (False,)}.get(jit)
    if jit_modes is None:
        fail(f"--jit: choose both, on or off, got {jit!r}")
    if devices is not None:
        _run_devices(_ints(devices, "--devices"), _ints(batch_sizes, "--batch-sizes"), steps, warmup, out)
        return
    _run(_ints(batch_sizes, "--batch-sizes"), jit_modes, chosen, steps, warmup, out, memory_batch)


def _run_devices(counts: list[int], batch_sizes: list[int], steps: int, warmup: int, out: Path) -> None:
    import tensorflow as tf

    from dpsgd_cli.runs.results import write_table
    from dpsgd_cli.training import bench as harness
    from dpsgd_cli.training import distribute

    if not tf.config.list_physical_devices("GPU"):
        distribute.split_cpu(max(counts))  # logical CPUs, before TensorFlow starts its devices
    machine = _print_machine()
    console.print(f"DP step under MirroredStrategy with {', '.join(map(str, counts))} device(s), {steps} "
                  f"timed steps each (load average {_load()})", highlight=False)
    rows = []
    for batch in batch_sizes:
        try:
            rows += harness.device_rows(counts, batch, steps=steps, warmup=warmup)
        except ValueError as exc:
            fail(f"--devices: {exc}")
    table = Table(title="DP step per replica count (median), same process")
    for column in ("replicas", "devices", "batch", "ms/step", "examples/s", "compile s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["replicas"]), r["devices"], str(r["batch_size"]), f"{1000 * r['step_s']:.2f}",
                      f"{r['examples_per_s']:,.0f}", f"{r['compile_s']:.1f}")
    print_table(table, console)
    write_table([{**r, **machine} for r in rows], out)
    console.print(f"wrote {out} (load average now {_load()})", highlight=False)


def _print_machine() -> dict[str, Any]:
    """Print the machine's two lines (CPU; TensorFlow settings) and return its CSV columns."""
    from dpsgd_cli.training import machine as machine_info

    machine = machine_info.machine_row()
    for line in machine_info.describe(machine):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return machine


def _run(batch_sizes, jit_modes, paths, steps, warmup, out: Path, memory_batch: int = 1024) -> None:
    from dpsgd_cli.runs.results import write_table
    from dpsgd_cli.training import bench as harness

    machine = _print_machine()
    cases = harness.default_cases(batch_sizes, jit_modes, [p for p in paths if p in harness.PATHS])
    cases += harness.planned_cases(batch_sizes, [p for p in paths if p in harness.PLANNED_PATHS])
    epochs = "epoch" in paths
    console.print(f"{len(cases)} step rows{' and 2 whole-epoch rows' if epochs else ''}, {steps} timed steps "
                  f"each (load average {_load()}); this takes a few minutes", highlight=False, soft_wrap=True)
    rows = harness.run_benchmark(
        cases, steps=steps, warmup=warmup,
        on_compiled=lambda r: console.print(f"  compiled {_case_name(r)} in {r['compile_s']:.1f} s",
                                            highlight=False),
        on_row=lambda r: console.print(_row_line(r), highlight=False))
    if epochs:
        for row in harness.epoch_rows():
            console.print(_row_line(row), highlight=False)
            rows.append(row)
    if rows:
        harness.add_ratios(rows)
        for table in bench_tables(rows):
            print_table(table, console)
        for line in summary_lines(rows):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        write_table([{**r, **machine} for r in rows], out)
        console.print(f"wrote {out} (load average now {_load()})", highlight=False)
    if "layers" in paths:
        for batch in batch_sizes:
            layers = harness.layer_rows(batch, steps=steps, warmup=warmup)
            print_table(layer_table(layers, batch), console)
            write_table([{**r, **machine} for r in layers], out.with_name(
                "bench_layers.csv" if len(batch_sizes) == 1 else f"bench_layers_{batch}.csv"))
    if "memory" in paths:
        memory = harness.memory_rows(memory_batch)
        for line in memory_lines(memory):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        write_table([{**r, **machine} for r in memory], out.with_name("bench_memory.csv"))


def _load() -> str:
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The plans chosen, dpsgd's non-private step / the plain TensorFlow step, and DP / fastest non-private
    per batch size (and per whole epoch)."""
    from dpsgd_cli.training.bench import NONPRIVATE_PATHS

    lines = [f"plan at batch {r['batch_size']} ({r['path']}): {r['plan']}"
             + (f", planned in {r['planning_s']:.1f} s" if r.get("planning_s") else "")
             for r in rows if r["path"] in ("nonprivate_planned", "planned")]
    for batch in sorted({r["batch_size"] for r in rows}):
        at_batch = [r for r in rows if r["batch_size"] == batch and r["capacity"] == batch]
        nonprivate = [r for r in at_batch if r["path"] in NONPRIVATE_PATHS]
        plain = [r for r in at_batch if r["path"] == "plain"]
        dpsgd = [r for r in at_batch if r["path"] in NONPRIVATE_PATHS and r["path"] != "plain"]
        dp = [r for r in at_batch if r["path"] in ("planned", "fast", "vectorized_map")]
        if plain and dpsgd:
            floor, own = _fastest(plain), _fastest(dpsgd)
            lines.append(f"batch {batch}: dpsgd's fastest non-private step {1000 * own['step_s']:.2f} ms "
                         f"({_name(own)}) / plain TensorFlow step {1000 * floor['step_s']:.2f} ms "
                         f"({_name(floor)}) = {own['step_s'] / floor['step_s']:.2f}")
        if nonprivate and dp:
            best, fast = _fastest(nonprivate), _fastest(dp)
            lines.append(f"batch {batch}: fastest DP step {1000 * fast['step_s']:.2f} ms ({_name(fast)}) / "
                         f"fastest non-private {1000 * best['step_s']:.2f} ms ({_name(best)}) = "
                         f"{fast['step_s'] / best['step_s']:.2f}")
    epoch = {r["path"]: r for r in rows if r["path"].startswith("epoch")}
    if len(epoch) == 2:
        dp_s, nonprivate_s = epoch["epoch_dp"]["epoch_s"], epoch["epoch_nonprivate"]["epoch_s"]
        lines.append(f"whole epoch (batch {epoch['epoch_dp']['batch_size']}, Poisson): DP {dp_s:.1f} s / "
                     f"non-private {nonprivate_s:.1f} s = {dp_s / nonprivate_s:.2f}")
    return lines


def _fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: r["step_s"])


def memory_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per memory row: peak MB and the ratio to the smallest non-private step's."""
    return [f"memory at batch {r['batch_size']}: {r['path'].removeprefix('memory_'):<18} "
            f"{r['peak_mb']:7.1f} MB  ×{r['ratio_to_nonprivate']:.2f} the non-private step"
            + (f"  ({r['plan']})" if r.get("plan") else "") for r in rows]


def _name(r: dict[str, Any]) -> str:
    return f"{r['path']}, XLA {'on' if r['jit_compile'] else 'off'}"


def _case_name(r: dict[str, Any]) -> str:
    return f"{r['path']} batch {r['batch_size']} (capacity {r['capacity']}) jit {r['jit_compile']}"


def _row_line(r: dict[str, Any]) -> str:
    return (f"  {r['path']:<18} batch {r['batch_size']:>5} (capacity {r['capacity']:>5}) "
            f"jit {str(r['jit_compile']):<5} {1000 * r['step_s']:8.2f} ms/step")


def layer_table(rows: list[dict[str, Any]], batch: int) -> Table:
    """Per weight layer: its non-private work, its fastest DP formulation, what privacy adds, and every
    formulation's time (ms, median)."""
    from dpsgd_cli.training.bench import layer_limits

    table = Table(title=f"each layer's work alone at batch {batch}, XLA off (median ms; the DP step's floor)")
    for column in ("layer", "non-private", "fastest DP", "DP − non-private", "every DP formulation"):
        table.add_column(column, justify="left" if column in ("layer", "every DP formulation") else "right")
    for limit in layer_limits(rows):
        others = ", ".join(f"{r['choice']} {1000 * r['step_s']:.2f}" for r in rows
                           if r["layer"] == limit["layer"] and r["private"])
        table.add_row(limit["layer"], f"{limit['nonprivate_ms']:.2f}",
                      f"{limit['dp_ms']:.2f} ({limit['dp_choice']})", f"{limit['extra_ms']:+.2f}", others)
    total = sum(limit["extra_ms"] for limit in layer_limits(rows))
    table.add_row("all", "", "", f"{total:+.2f}", "the least a DP step adds to the non-private step")
    return table


def bench_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """The benchmark as two tables narrow enough for 80 columns: the step times, and each step's time as
    a multiple of the non-private steps' (the cost of privacy)."""
    times = _compact_table("milliseconds per training step (median), same process, same run")
    for column in ("path", "batch", "slots", "XLA", "ms/step", "examples\nper s", "compile\ns", "peak\nMB"):
        times.add_column(column, justify="left" if column == "path" else "right")
    ratios = _compact_table("step time ÷ non-private step time, same batch (÷ nonprivate(_fast): same XLA)")
    for column in ("path", "batch", "XLA", "÷\nplain", "÷\nnonprivate", "÷\nnonprivate\n_fast",
                   "÷ fastest\nnonprivate"):
        ratios.add_column(column, justify="left" if column == "path" else "right")
    for r in rows:
        jit = "on" if r["jit_compile"] else "off"
        times.add_row(r["path"], str(r["batch_size"]), str(r["capacity"]), jit, f"{1000 * r['step_s']:.2f}",
                      f"{r['examples_per_s']:,.0f}", f"{r['compile_s']:.1f}",
                      f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "")
        ratios.add_row(r["path"], str(r["batch_size"]), jit, f"{r.get('ratio_to_plain', float('nan')):.2f}",
                       f"{r['ratio_to_nonprivate']:.2f}",
                       f"{r['ratio_to_nonprivate_fast']:.2f}", f"{r['ratio_to_fastest_nonprivate']:.2f}")
    return [times, ratios]


def _compact_table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
