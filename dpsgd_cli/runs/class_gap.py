"""Who pays for privacy: per-class test accuracy of a DP run next to its non-private
twin (same data, model and schedule, `privacy.enabled: false`), and what each class loses.

DP-SGD is known to cost under-represented and hard classes the most (Bagdasaryan et al. 2019): clipping
bounds the influence of the examples with large gradients, which are mostly those of such classes.
Both runs are compared at their last finished epoch. No TensorFlow; matplotlib only in `gap_figure`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpsgd_cli.errors import RunDirError
from dpsgd_cli.runs.summaries import RunInfo, read_run


@dataclass(frozen=True)
class ClassGap:
    label: int
    name: str
    private: float
    nonprivate: float

    @property
    def loss(self) -> float:
        """Accuracy points the class loses to privacy (positive = DP is worse)."""
        return self.nonprivate - self.private


def _last(run: RunInfo, what: str):
    if run.metrics is None:
        raise RunDirError(f"{run.run_dir}: the {what} run has no finished epoch")
    return run.metrics.iloc[-1]


def class_gaps(dp_dir: str | Path, twin_dir: str | Path) -> tuple[list[ClassGap], RunInfo, RunInfo]:
    """Per-class accuracy of the DP run and its non-private twin, the classes sorted by loss (largest
    first). RunDirError when either run has no epoch, the roles are swapped or the datasets differ."""
    dp, twin = read_run(Path(dp_dir)), read_run(Path(twin_dir))
    if not dp.private or twin.private:
        raise RunDirError(f"{dp_dir} must be a private run and {twin_dir} its non-private twin "
                          "(privacy.enabled: false)")
    datasets = dp.settings.get("data.dataset"), twin.settings.get("data.dataset")
    if datasets[0] != datasets[1]:
        raise RunDirError(f"the runs use different datasets ({datasets[0]} and {datasets[1]})")
    a, b = _last(dp, "private"), _last(twin, "non-private")
    names = dp.class_names
    gaps = [ClassGap(k, names[k], float(a[f"test_accuracy_class_{k}"]), float(b[f"test_accuracy_class_{k}"]))
            for k in range(len(names))]
    return sorted(gaps, key=lambda g: -g.loss), dp, twin


def gap_figure(gaps: list[ClassGap], title: str = ""):
    """Bars per class (in label order): non-private and DP accuracy, the loss written above each pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ordered = sorted(gaps, key=lambda g: g.label)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = range(len(ordered))
    ax.bar([x - 0.2 for x in xs], [g.nonprivate for g in ordered], width=0.4, label="non-private twin")
    ax.bar([x + 0.2 for x in xs], [g.private for g in ordered], width=0.4, label="DP")
    for x, g in zip(xs, ordered):
        ax.annotate(f"−{100 * g.loss:.1f}" if g.loss >= 0 else f"+{-100 * g.loss:.1f}",
                    (x, max(g.private, g.nonprivate) + 0.01), ha="center", fontsize="small")
    ax.set_xticks(list(xs), [g.name for g in ordered], rotation=20)
    ax.set(ylim=(0, 1.08), ylabel="test accuracy",
           title=title or "per-class test accuracy: what each class loses to privacy (points)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    return fig
