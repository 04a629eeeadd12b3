"""Figures of runs (matplotlib, headless Agg canvas): test accuracy and ε per epoch, per-class accuracy.

One line (or bar group) per run; the legend names only what differs between the runs ("σ = 1.1" /
"σ = 1.2"), and the title names what they share. Figures are built as `Figure` objects (no pyplot state,
so tests can inspect them) and saved atomically. This module never prints.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dpsgd_cli.atomic import atomic_write_bytes
from dpsgd_cli.errors import OutputError, RunDirError
from dpsgd_cli.labels import CLASS_NAMES
from dpsgd_cli.runs.summaries import RunInfo, load_runs, run_labels, shared_title, value_text

MARKER_EPOCHS = 25  # draw point markers when a run has at most this many epochs
LEGEND_CHARS = 140  # about how many legend characters fit across a 12-inch figure


def curves_figure(runs: Sequence[RunInfo], keys: Sequence[str]) -> Figure:
    """Two panels: test accuracy vs epoch (one line per run) and ε vs epoch (per private run, PLD solid
    and RDP dashed in the run's colour). Runs without any finished epoch are left out."""
    runs = [r for r in runs if r.metrics is not None]
    labels = run_labels(runs, keys)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, eps_ax = fig.subplots(1, 2)
    colors = _colors(len(runs))
    for run, label, color in zip(runs, labels, colors):
        m = run.metrics
        style = _style(len(m))
        acc_ax.plot(m["epoch"], m["test_accuracy"], color=color, label=label, **style)
        if run.private:
            eps_ax.plot(m["epoch"], m["epsilon_pld"], color=color, label=label, **style)
            eps_ax.plot(m["epoch"], m["epsilon_rdp"], color=color, linestyle="--", label="_nolegend_",
                        **style)
    acc_ax.set(title="test accuracy", xlabel="epoch", ylabel="test accuracy")
    deltas = {r.settings.get("privacy.delta") for r in runs if r.private}
    eps_ax.set(title="ε" + (f" (δ = {value_text(deltas.pop())})" if len(deltas) == 1 else ""),
               xlabel="epoch", ylabel="ε")
    for ax in (acc_ax, eps_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if runs:
        acc_ax.legend(loc="best")
    if any(r.private for r in runs):
        handles, texts = eps_ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="0.3"), Line2D([], [], color="0.3", linestyle="--")]
        eps_ax.legend(handles, [*texts, "PLD accountant", "RDP accountant"], loc="upper left")
    else:
        eps_ax.text(0.5, 0.5, "no private runs", ha="center", va="center", transform=eps_ax.transAxes)
    fig.suptitle(shared_title(runs, keys) if runs else "no epochs yet")
    return fig


def per_class_figure(runs: Sequence[RunInfo], keys: Sequence[str]) -> Figure:
    """Per-class test accuracy at each run's last epoch: one bar per run in each class's group."""
    runs = [r for r in runs if r.metrics is not None]
    labels = run_labels(runs, keys)
    names = runs[0].class_names if runs else CLASS_NAMES["fashion_mnist"]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(len(runs), 1)
    legend = []
    for i, (run, label, color) in enumerate(zip(runs, labels, _colors(len(runs)))):
        last = run.metrics.iloc[-1]
        heights = [float(last[f"test_accuracy_class_{k}"]) for k in range(len(names))]
        xs = [k - 0.4 + width * (i + 0.5) for k in range(len(names))]
        legend.append(f"{label}: {float(last['test_accuracy']):.3f} overall (epoch {int(last['epoch'])})")
        ax.bar(xs, heights, width=width, color=color, label=legend[-1])
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) <= 20 else 90,
                  fontsize=None if len(names) <= 20 else 6)
    ax.set(ylim=(0, 1), ylabel="test accuracy", title="per-class test accuracy at the last epoch")
    ax.grid(True, axis="y", alpha=0.3)
    if runs:
        columns = max(1, min(len(runs), LEGEND_CHARS // (max(map(len, legend)) + 8)))
        fig.legend(loc="outside lower center", ncols=columns)
        fig.suptitle(shared_title(runs, keys))
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _style(epochs: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if epochs <= MARKER_EPOCHS else {}


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG at `path` atomically (see `dpsgd_cli.atomic`). Raises OutputError."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def default_output(paths: Sequence[str | Path]) -> Path:
    """Where `dpsgd plot` writes without --out: curves.png in the directory given, or in the deepest
    directory containing all of them."""
    folder = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    return folder / "curves.png"


def per_class_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-per-class{out.suffix or '.png'}")


def plot_runs(paths: Iterable[str | Path], out: str | Path | None = None,
              per_class: bool = True) -> tuple[list[Path], list[RunInfo]]:
    """Read the runs under `paths`, write the curves PNG (and the per-class PNG); return the files
    written and the runs drawn. Raises RunDirError when no run has a finished epoch."""
    paths = list(paths)
    runs, keys = load_runs(paths)
    drawn = [r for r in runs if r.metrics is not None]
    if not drawn:
        raise RunDirError(f"{', '.join(map(str, paths))}: no run has finished an epoch yet; nothing to plot")
    out = Path(out) if out is not None else default_output(paths)
    if out.suffix.lower() != ".png":
        raise OutputError(f"--out {out}: must be a .png file")
    return draw_runs(drawn, keys, out, per_class), drawn


def draw_runs(runs: Sequence[RunInfo], keys: Sequence[str], out: Path, per_class: bool = True) -> list[Path]:
    """Write the curves PNG at `out`, the per-class PNG beside it and, when a run is private, the
    accuracy-vs-ε PNG with the published points; return the files written. They draw test metrics and
    ε only (what a run's ε covers)."""
    written = [save_figure(curves_figure(runs, keys), out)]
    if per_class:
        written.append(save_figure(per_class_figure(runs, keys), per_class_path(out)))
    if any(r.private for r in runs):  # accuracy vs ε with the published points
        from dpsgd_cli.runs.tradeoff import tradeoff_figure, tradeoff_path

        written.append(save_figure(tradeoff_figure(runs, keys), tradeoff_path(out)))
    return written

