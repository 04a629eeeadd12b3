"""The privacy/utility trade-off figure: test accuracy against PLD ε, one curve per private
run (a point per epoch), with the best published DP-SGD results on the run's dataset marked.

The published points are those of Tramèr & Boneh 2021 and Cheng et al. 2022 at their "ε = 3", drawn at
the ε the same runs have by today's PLD accounting (≈ 2.38, δ = 1e-5; ≈ 2.59 by RDP).
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpsgd_cli.runs.summaries import RunInfo, run_labels

PUBLISHED_EPSILON_PLD = 2.38
PUBLISHED = {  # dataset → [(label, test accuracy)] at PUBLISHED_EPSILON_PLD, δ = 1e-5
    "fashion_mnist": [("Tramèr & Boneh: tanh CNN", 0.860), ("Cheng et al.: DPNAS", 0.881),
                      ("Tramèr & Boneh: ScatterNet + CNN", 0.890),
                      ("Tramèr & Boneh: ScatterNet + linear", 0.897)],
    "mnist": [("Tramèr & Boneh: tanh CNN", 0.981), ("Cheng et al.: DPNAS", 0.986),
              ("Tramèr & Boneh: ScatterNet + CNN", 0.987), ("Tramèr & Boneh: ScatterNet + linear", 0.987)],
}
MARKERS = ("s", "D", "^", "v")


def tradeoff_figure(runs: Sequence[RunInfo], keys: Sequence[str]) -> Figure:
    """Test accuracy vs ε (PLD) of every private run with finished epochs; published points as markers."""
    runs = [r for r in runs if r.metrics is not None and r.private]
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for run, label in zip(runs, run_labels(runs, keys)):
        m = run.metrics
        ax.plot(m["epsilon_pld"], m["test_accuracy"], marker="o", markersize=2.5, label=label)
    datasets = {r.settings.get("data.dataset") for r in runs}
    for dataset in sorted(d for d in datasets if d in PUBLISHED):
        prefix = f"{dataset}: " if len(datasets) > 1 else ""
        for (label, accuracy), marker in zip(PUBLISHED[dataset], MARKERS):
            ax.plot([PUBLISHED_EPSILON_PLD], [accuracy], marker=marker, color="black", linestyle="none",
                    markerfacecolor="none", markersize=8, label=f"{prefix}{label} (published)")
    if runs:
        top = max(float(r.metrics["test_accuracy"].max()) for r in runs)
        ax.set_ylim(max(0.0, min(0.8, top - 0.15)), min(1.0, top + 0.03))
    ax.set(xlabel="ε (PLD accountant, δ as each run)", ylabel="test accuracy",
           title="privacy/utility trade-off: a point per epoch" if runs else "no private runs")
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(loc="lower right", fontsize="small")
    return fig


def tradeoff_path(out):
    return out.with_name(f"{out.stem}-tradeoff{out.suffix or '.png'}")
