"""`dpsgd audit RUN_DIR`: measure privacy empirically (membership inference and the canary audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.cli.tables import print_table


@app.command()
@user_errors
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's directory, e.g. results/quickstart.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
    = False,
    roc: Annotated[Path | None, typer.Option("--roc", help="Also draw the ROC curves to this PNG file.")]
    = None,
    confidence: Annotated[float, typer.Option(help="Confidence level of the ε lower bounds.")] = 0.95,
    data_dir: Annotated[str | None, typer.Option(
        help="Data folder, if not the one in run.yaml / $DPSGD_DATA_DIR.")] = None,
) -> None:
    """Attack a finished run's final model and bound its ε from below; write RUN_DIR/audit.json.

    Loss-threshold membership inference: ROC AUC, attacker advantage, ε lower bound.

    Runs trained with privacy.canaries: the one-run canary audit (Steinke, Nasr, Jagielski 2023).
    """
    from dpsgd_cli.audit.membership import audit_run, plot_roc, write_audit  # TensorFlow is imported only now

    report = audit_run(run_dir, confidence=confidence, data_dir=data_dir)
    path = write_audit(report, run_dir)
    if roc is not None:
        plot_roc(report, roc)
    if as_json:
        typer.echo(json.dumps(report.summary, indent=2, allow_nan=False, ensure_ascii=False))
        return
    s = report.summary
    print_table(audit_table(s), console)
    console.print(_guarantees(s), highlight=False)
    console.print(f"verdict: {s['verdict']}", highlight=False)
    console.print(f"wrote {path}" + (f" and {roc}" if roc is not None else ""), highlight=False)


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def audit_table(s: dict[str, Any]) -> Table:
    conf = f"{s['confidence']:.0%}"
    mia = s["membership_inference"]
    table = Table(title=f"privacy audit of {s['run']} (δ = {s['delta']:g})", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("details")
    table.add_row("ROC AUC, loss threshold", _fmt(mia["auc"], ".4f"),
                  f"{mia['n_members']} members vs {mia['n_nonmembers']} non-members")
    table.add_row("attacker advantage", _fmt(mia["advantage"], ".4f"), "max TPR − FPR")
    for f, t in mia["tpr_at_fpr"].items():
        table.add_row(f"TPR at FPR {float(f):.1%}", _fmt(t, ".4f"), "")
    table.add_row("ε lower bound, threshold*", _fmt(mia["epsilon_lower_bound"], ".3f"),
                  f"{conf} conf., heuristic")
    canary = s.get("canary_audit")
    if canary is not None:
        table.add_row("ε lower bound, canaries", _fmt(canary["epsilon_lower_bound"], ".3f"),
                      f"{conf} conf.; {canary['correct']}/{canary['guesses']} guesses right")
        table.add_row("canary AUC", _fmt(canary["auc"], ".4f"),
                      f"{canary['m']} canaries, {canary['included']} trained on")
    eps = s["accountant_epsilon"]
    if s["private"]:
        table.add_row("accountant ε (PLD)", _fmt(eps["pld"], ".3f"),
                      f"RDP {_fmt(eps['rdp'], '.3f')}, σ = {_fmt(s['noise_multiplier'])}")
    else:
        table.add_row("accountant ε", "∞", "non-private run")
    table.add_row("test accuracy", _fmt(s.get("test_accuracy"), ".4f"), "final epoch")
    return table


def _guarantees(s: dict[str, Any]) -> str:
    conf = f"{s['confidence']:.0%}"
    mia = s["membership_inference"]
    text = (f"Non-members: {mia['nonmember_source']}. * The threshold-attack bound (Clopper–Pearson on "
            "TPR/FPR, threshold picked on a random half of the scores) is an indicator only: its "
            f"{conf} confidence assumes independent trials, while all examples here share one model.")
    if s.get("canary_audit") is not None:
        text += (f" The canary bound is a valid lower bound on the ε of the training algorithm at {conf} "
                 "confidence: if training is (ε, δ)-DP it exceeds ε with probability at most "
                 f"{1 - s['confidence']:.0%}. The canaries are ordinary training examples for the "
                 "accounting; the accountant's ε covers them like any other example.")
    else:
        text += " For a rigorous lower bound, train with privacy.canaries: m (e.g. 500) and audit again."
    return text
