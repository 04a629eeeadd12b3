"""Empirical privacy audit of a finished run: `audit_run(run_dir) -> AuditReport`, written as audit.json.

Two attacks, both on the run's final model (``model.weights.h5``), scoring an example by −loss:

1. **Loss-threshold membership inference** (Yeom et al. 2018; Shokri et al. 2017): members are the run's real
   training examples (in a run written when canaries copied training images, those not copied); non-members
   are examples the run never trained on — the training split's examples past ``data.train_size`` when the run
   used a slice (same distribution as the members), otherwise the test split. Reported: ROC AUC, attacker
   advantage (max TPR − FPR), TPR at low FPR, and an ε lower bound from Clopper–Pearson intervals on TPR/FPR
   at a threshold chosen on one random half of the scores and evaluated on the other half
   (:func:`~dpsgd_cli.audit.bounds.best_threshold_epsilon_lower_bound`). That bound treats the examples of
   *one* trained model as independent trials, which they are not: it is a heuristic indicator of leakage, not
   a guarantee.
2. **One-run canary audit** (Steinke, Nasr, Jagielski 2023), when the run had ``privacy.canaries: m``
   (see :mod:`dpsgd_cli.audit.canaries`). The guesses are fixed before membership is looked at: the
   ``round(GUESS_FRACTION·m)`` canaries with the lowest loss are guessed "in", as many with the highest
   loss "out", the rest abstain. The count of correct guesses gives ε_lb by Theorem 3 of the paper: if
   training is (ε, δ)-DP (δ = the run's δ) then ε_lb ≤ ε with probability ≥ ``confidence``. This is a
   valid lower bound on the ε of the mechanism; for a correct implementation it stays below the
   accountant's ε. Canaries are ordinary training examples for the accounting.

Library code: raises DpsgdError subclasses, never prints. TensorFlow is imported only when a model is
loaded.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpsgd_cli.atomic import atomic_write_bytes, atomic_write_text
from dpsgd_cli.audit import bounds as ab
from dpsgd_cli.audit.canaries import CanarySet, load_canaries
from dpsgd_cli.config import ExperimentConfig, resolved_data_dir
from dpsgd_cli.errors import ConfigError, RunDirError
from dpsgd_cli.runs.run_dir import AUDIT_FILE, FINISHED, WEIGHTS_FILE, RunDir
from dpsgd_cli.training import features
from dpsgd_cli.training.data import load_dataset

GUESS_FRACTION = 0.2  # of m canaries guessed "in", and as many guessed "out"; fixed before looking
LOW_FPRS = (0.01, 0.001)
EVAL_BATCH = 1000

THRESHOLD_NOTE = ("heuristic: treats the examples of one trained model as independent trials, so it is "
                  "not a guarantee")
CANARY_GUARANTEE = ("Canaries are ordinary training examples for the accounting: the run's (ε, δ) covers "
                    "each included canary like any other example. If training is (ε, δ)-DP, the canary "
                    "bound exceeds ε with probability at most 1 − confidence (Steinke, Nasr, Jagielski "
                    "2023, Theorem 3), so it is a valid lower bound on the ε of the mechanism.")


@dataclass(frozen=True)
class AuditReport:
    """`summary` is the JSON-ready result (what audit.json holds); the score arrays are for plotting."""

    summary: dict[str, Any]
    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    canary_scores: np.ndarray | None = None
    canary_included: np.ndarray | None = None


@dataclass(frozen=True)
class _Run:
    run_dir: Path
    doc: dict[str, Any]
    cfg: ExperimentConfig


def load_run(run_dir: Path) -> _Run:
    """Read and check run.yaml of a finished run that saved its final weights."""
    rd = RunDir(run_dir)
    if not rd.has_run_file():
        raise RunDirError(f"{rd.path}: not a run directory (no run.yaml); run `dpsgd train` first")
    doc = rd.document()
    if doc.get("status") != FINISHED:
        raise RunDirError(f"{rd.path}: the run is not finished (status {doc.get('status')!r}); "
                          "audit a finished run")
    if not rd.weights_file.is_file():
        raise RunDirError(f"{rd.path}: no {WEIGHTS_FILE} (runs before dpsgd saved its final model "
                          "cannot be audited; train it again)")
    return _Run(rd.path, doc, rd.config())


def load_model(run: _Run):
    """The run's model (built-in CNN or `model.builder`) with its final weights."""
    from dpsgd_cli.training.model import model_from_config

    model = model_from_config(run.cfg.model, run.cfg.seed)
    try:
        model.load_weights(run.run_dir / WEIGHTS_FILE)
    except Exception as exc:  # h5py/keras raise many types
        raise RunDirError(f"{run.run_dir / WEIGHTS_FILE}: cannot load the weights "
                          f"({exc.__class__.__name__}: {exc})") from None
    return model


def model_inputs(run: _Run, x: np.ndarray) -> np.ndarray:
    """`x` (images or their features) as the run's model saw them: normalised by the statistics a
    `model.feature_norm: private_stats` run released (run.yaml, resolved.feature_norm), else as is."""
    stats = (run.doc.get("resolved") or {}).get("feature_norm")
    if not stats:
        return x
    from dpsgd_cli.training.feature_norm import normalize

    return normalize(x, np.asarray(stats["mean"], np.float32), np.asarray(stats["variance"], np.float32))


def per_example_losses(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Softmax cross-entropy of each example under `model` (inference mode), float64 [N]."""
    from dpsgd_cli.training.engine import per_example_loss

    out = [per_example_loss(model(x[i:i + EVAL_BATCH], training=False), y[i:i + EVAL_BATCH]).numpy()
           for i in range(0, len(y), EVAL_BATCH)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def membership_split(run: _Run, canary_set: CanarySet | None, data_dir: str | None = None):
    """(x_member, y_member, x_nonmember, y_nonmember, nonmember_source) for the threshold attack."""
    cfg = run.cfg
    folder = data_dir or resolved_data_dir(cfg)
    full = load_dataset(cfg.data.dataset, folder, path=cfg.data.path, label_column=cfg.data.label_column)
    n_real = len(full.y_train) if cfg.data.train_size is None else min(cfg.data.train_size, len(full.y_train))
    _check_dataset_size(run, n_real, canary_set)
    keep = np.ones(n_real, dtype=bool)
    if canary_set is not None:  # synthetic canaries copy no record; an older run's copied some
        copied = canary_set.source_index >= 0
        source = canary_set.source_index[copied]
        if source.size and (source.max() >= n_real
                            or not np.array_equal(canary_set.x[copied], full.x_train[source])):
            raise RunDirError(f"{run.run_dir}: the canaries were not drawn from the data found now; point "
                              "--data-dir at the data the run used")
        keep[source] = False
    full = features.prepare(full, cfg.model.architecture)  # ScatterNet models score features (cached)
    x_in, y_in = model_inputs(run, full.x_train[:n_real][keep]), full.y_train[:n_real][keep]
    rest = len(full.y_train) - n_real
    if rest > 0:
        stop = n_real + min(rest, len(y_in))
        return x_in, y_in, model_inputs(run, full.x_train[n_real:stop]), full.y_train[n_real:stop], (
            f"training split examples {n_real}..{stop - 1} (not in the run)")
    return x_in, y_in, model_inputs(run, full.x_test), full.y_test, "test split"


def _check_dataset_size(run: _Run, n_real: int, canary_set: CanarySet | None) -> None:
    expected = run.doc.get("resolved", {}).get("dataset_size")
    # n of q = B/n counts all m canaries (earlier runs counted the included ones only)
    options = {n_real} if canary_set is None else {n_real + canary_set.m,
                                                   n_real + int(canary_set.included.sum())}
    got = max(options)
    if expected is not None and expected not in options:
        raise RunDirError(f"{run.run_dir}: the run trained on {expected} examples but the data found now "
                          f"give {got}; point --data-dir at the data the run used")


def audit_run(run_dir: Path, *, confidence: float = 0.95, data_dir: str | None = None,
              guess_fraction: float = GUESS_FRACTION) -> AuditReport:
    """Run both attacks on a finished run (see the module docstring) and return the report."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence: must be in (0, 1), got {confidence}")
    if not 0.0 < guess_fraction <= 0.5:
        raise ConfigError(f"guess_fraction: must be in (0, 0.5], got {guess_fraction}")
    run = load_run(run_dir)
    canary_set = load_canaries(run.run_dir)
    x_in, y_in, x_out, y_out, source = membership_split(run, canary_set, data_dir)
    if len(y_in) < 2 or len(y_out) < 2:
        raise RunDirError(f"{run.run_dir}: need at least 2 members and 2 non-members to audit "
                          f"(found {len(y_in)} and {len(y_out)})")
    model = load_model(run)
    member = -per_example_losses(model, x_in, y_in)
    nonmember = -per_example_losses(model, x_out, y_out)
    delta = float(run.cfg.privacy.delta)
    summary = _header(run, delta, confidence)
    summary["membership_inference"] = _threshold_attack(member, nonmember, delta, confidence, source,
                                                        run.cfg.seed)
    canary_scores = None
    if canary_set is not None:
        canary_x = model_inputs(run, features.transform_images(canary_set.x, run.cfg.model.architecture))
        canary_scores = -per_example_losses(model, canary_x, canary_set.y)
        summary["canary_audit"] = _canary_audit(canary_scores, canary_set.included, delta, confidence,
                                                guess_fraction)
    summary["verdict"] = _verdict(summary)
    return AuditReport(summary, member, nonmember, canary_scores,
                       None if canary_set is None else canary_set.included)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _header(run: _Run, delta: float, confidence: float) -> dict[str, Any]:
    final = run.doc.get("final", {}) or {}
    private = bool(run.cfg.privacy.enabled)
    return {
        "run": run.cfg.name,
        "run_dir": str(run.run_dir),
        "private": private,
        "noise_multiplier": run.doc.get("resolved", {}).get("noise_multiplier"),
        "delta": delta,
        "confidence": confidence,
        "test_accuracy": final.get("test_accuracy"),
        "accountant_epsilon": {
            "pld": _finite_or_none(final.get("epsilon_pld")) if private else None,
            "rdp": _finite_or_none(final.get("epsilon_rdp")) if private else None,
        },
    }


def _threshold_attack(member: np.ndarray, nonmember: np.ndarray, delta: float, confidence: float,
                      source: str, seed: int) -> dict[str, Any]:
    fpr, tpr, _ = ab.roc_curve(member, nonmember)
    bound = ab.best_threshold_epsilon_lower_bound(member, nonmember, delta, confidence, holdout=True,
                                                  seed=seed)
    return {
        "n_members": int(member.size),
        "n_nonmembers": int(nonmember.size),
        "nonmember_source": source,
        "auc": ab.roc_auc(member, nonmember),
        "advantage": ab.attacker_advantage(member, nonmember),
        "tpr_at_fpr": {f"{f:g}": float(np.max(tpr[fpr <= f])) for f in LOW_FPRS},
        "mean_loss_members": float(-member.mean()),
        "mean_loss_nonmembers": float(-nonmember.mean()),
        "epsilon_lower_bound": bound.epsilon,
        "threshold_loss": -bound.threshold,
        "holdout_tpr": bound.tpr,
        "holdout_fpr": bound.fpr,
        "holdout_n_members": bound.n_pos,
        "holdout_n_nonmembers": bound.n_neg,
        "method": "Clopper–Pearson on TPR/FPR at a threshold chosen on a random half, evaluated on the "
                  "other half",
        "note": THRESHOLD_NOTE,
    }


def canary_guess_counts(m: int, guess_fraction: float = GUESS_FRACTION) -> tuple[int, int]:
    """(k_pos, k_neg): how many canaries are guessed in and out; depends on m only, never on membership."""
    k = int(round(guess_fraction * m))
    k = min(k, m // 2)
    return k, k


def _canary_audit(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
                  guess_fraction: float) -> dict[str, Any]:
    m = int(scores.size)
    k_pos, k_neg = canary_guess_counts(m, guess_fraction)
    result = ab.one_run_audit(scores, included, k_pos, k_neg, delta, confidence)
    both = included.any() and (~included).any()
    return {
        "m": m,
        "included": int(included.sum()),
        "k_pos": k_pos,
        "k_neg": k_neg,
        "guesses": result.r,
        "correct": result.v,
        "epsilon_lower_bound": result.epsilon,
        "auc": ab.roc_auc(scores[included], scores[~included]) if both else None,
        "method": "Steinke, Nasr, Jagielski 2023 (one training run), Theorem 3; guesses from canary loss",
        "guarantee": CANARY_GUARANTEE,
    }


def _verdict(summary: dict[str, Any]) -> str:
    eps = summary["accountant_epsilon"]["pld"]
    canary = summary.get("canary_audit")
    if eps is None:
        return "non-private run: no accountant ε to check against"
    lines = []
    if canary is not None:
        ok = canary["epsilon_lower_bound"] <= eps
        lines.append(f"canary ε lower bound {canary['epsilon_lower_bound']:.3g} "
                     + ("≤" if ok else "EXCEEDS") + f" accountant ε {eps:.3g}"
                     + ("" if ok else ": the implementation or the accounting is likely wrong "
                        f"(or a {1 - summary['confidence']:.0%} chance event)"))
    mia = summary["membership_inference"]["epsilon_lower_bound"]
    lines.append(f"threshold-attack ε {mia:.3g} " + ("≤" if mia <= eps else "exceeds")
                 + f" accountant ε {eps:.3g} (heuristic)")
    return "; ".join(lines)


def write_audit(report: AuditReport, run_dir: Path) -> Path:
    """Write report.summary to run_dir/audit.json atomically."""
    path = Path(run_dir) / AUDIT_FILE
    atomic_write_text(path, json.dumps(report.summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    return path


def plot_roc(report: AuditReport, path: Path) -> Path:
    """ROC curves (linear and log–log axes) of the threshold attack, and of the canaries if any, as PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--roc: {path} must be a .png file name")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curves = [("training members vs non-members", report.member_scores, report.nonmember_scores)]
    inc = report.canary_included
    if report.canary_scores is not None and inc is not None and inc.any() and (~inc).any():
        curves.append(("canaries: included vs not", report.canary_scores[inc], report.canary_scores[~inc]))
    fig = Figure(figsize=(10, 4.6))
    axes = fig.subplots(1, 2)
    floor = 0.5 / max(max(pos.size, neg.size) for _, pos, neg in curves)  # log axes: where 0 is drawn
    for label, pos, neg in curves:
        fpr, tpr, _ = ab.roc_curve(pos, neg)
        text = f"{label} (AUC {ab.roc_auc(pos, neg):.3f})"
        axes[0].plot(fpr, tpr, label=text)
        axes[1].plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=text)
    for ax, scale in zip(axes, ("linear", "log")):
        lo = floor if scale == "log" else 0.0
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    s = report.summary
    eps = s["accountant_epsilon"]["pld"]
    fig.suptitle(f"loss-threshold membership inference: {s['run']} "
                 + (f"(accountant ε = {eps:.3g}, δ = {s['delta']:g})" if eps is not None
                    else "(non-private)"))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path
