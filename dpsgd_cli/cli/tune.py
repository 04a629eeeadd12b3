"""`dpsgd tune`: a private hyperparameter search whose (ε, δ) covers the search itself.

The terminal belongs to the data owner: it shows K, every trial's hyperparameters, training progress and
noisy score, and the naive composition of the trials that ran. None of that may be published; what may
is the search's publication folder (or `dpsgd export` of it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from dpsgd_cli.cli.app import app, console, err_console, user_errors
from dpsgd_cli.cli.train import (
    ConfigOption,
    SetOption,
    _progress,
    _sigterm_as_interrupt,
    step_and_epoch_printers,
)
from dpsgd_cli.errors import ConfigError

if TYPE_CHECKING:
    from dpsgd_cli.experiment.tune import Search, SearchPlan, Trial

PRIVATE_NOTE = "private: for you only, never publish it"


@app.command()
@user_errors
def tune(
    config: ConfigOption = None,
    space: Annotated[Path | None, typer.Option(
        "--space", help="YAML file holding the search's settings (the keys of a tune: block); replaces the "
                        "config's tune: block.")] = None,
    overrides: SetOption = None,
    name: Annotated[str | None, typer.Option(
        help="Search name: the winner is published to <output_dir>/<name>/, the trials stay in "
             "<output_dir>/<name>.private/ (default: the config's name).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the search's ε, each trial's σ and the naive composition; draw and write "
                          "nothing.")] = False,
    list_trials: Annotated[bool, typer.Option(
        "--list", help="Create the search's key if needed and print its trials, one per line: index, state, "
                       "hyperparameters (tab-separated; private). The index is what --index takes.")] = False,
    index: Annotated[int | None, typer.Option(
        "--index", metavar="I", help="Train and score trial I only (0-based), e.g. $SLURM_ARRAY_TASK_ID; an "
        "I beyond the search's trials does nothing. Then run --select once.")] = None,
    select: Annotated[bool, typer.Option(
        "--select", help="Publish the best trial once every trial has finished; train nothing (the last "
                         "job of a cluster search).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Delete this search's private folder and publication and start a new search (it spends its "
             "own ε).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Search hyperparameters privately: a secret random number of trials, each with hyperparameters drawn
    from the space and a noisy score; only the best trial is published, with an ε that covers the search.

    The space, the distribution of the number of trials and the budget come from the config's tune: block
    (or --space FILE). On a cluster: dpsgd tune --list once, then one job per trial with --index I, then
    dpsgd tune --select."""
    modes = [flag for flag, on in (("--dry-run", dry_run), ("--list", list_trials), ("--select", select),
                                    ("--index", index is not None)) if on]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} exclude each other")
    if overwrite and (dry_run or select or index is not None):
        raise ConfigError("--overwrite starts a new search: use it with a plain dpsgd tune or --list")
    from dpsgd_cli.experiment import tune as tuning

    plan = tuning.plan_search(config, list(overrides or []), space, name)
    _print_plan(plan, tuning)
    if dry_run:
        return
    search = tuning.open_search(plan, overwrite=overwrite)
    console.print(f"trials and scores: {plan.private_dir}/ ({PRIVATE_NOTE})", highlight=False, markup=False)
    if list_trials:
        for trial in search.trials:
            typer.echo(f"{trial.index}\t{tuning.trial_state(search, trial)}\t{tuning.trial_text(trial)}")
        return
    if select:
        _select(search, tuning)
        return
    indices = None
    if index is not None:
        if index < 0:
            raise ConfigError(f"--index: must be ≥ 0, got {index}")
        if index >= search.count:
            console.print(f"trial {index} is not part of this search (it has {search.count} trials; "
                          f"{PRIVATE_NOTE}): nothing to do", highlight=False, markup=False)
            return
        indices = [index]
    _run(search, indices, quiet, tuning)
    if index is None:
        _select(search, tuning)


def _print_plan(plan: SearchPlan, tuning: Any) -> None:
    from dpsgd_cli.privacy.tuning import naive_epsilon

    sigmas = sorted({c.noise_multiplier for c in plan.candidates})
    shown = f"{sigmas[0]:.4g}" if len(sigmas) == 1 else f"{sigmas[0]:.4g} to {sigmas[-1]:.4g}"
    score = plan.tune.score_noise_multiplier
    worst = max(plan.candidates, key=lambda c: naive_epsilon([c.privacy], score, plan.delta))
    one = naive_epsilon([worst.privacy], score, plan.delta)
    mean = math.ceil(plan.tune.mean)
    naive = naive_epsilon([worst.privacy] * mean, score, plan.delta)
    console.print(
        f"[bold]search {plan.name}[/]: ε = {plan.epsilon:.4g} (RDP, δ = {plan.delta:g}) for the whole "
        f"search; K ~ {plan.count.describe()}; space: {plan.tune.space_size()}", highlight=False)
    console.print(
        f"σ per trial {shown}; one trial alone ε = {one:.3g}, {mean} trial{'s' if mean != 1 else ''} "
        f"composed naively ε = {naive:.3g} (RDP); scores on {plan.score_examples} examples with noise std "
        f"{score:g}",
        highlight=False, markup=False)


def _run(search: Search, indices: list[int] | None, quiet: bool, tuning: Any) -> None:
    from dpsgd_cli.experiment.run import RunInterrupted

    total = search.count
    progress = _progress(quiet)
    task = progress.add_task("", total=None, info="")
    current: dict[str, Any] = {}

    def on_trial_start(trial: Trial, state: str) -> None:
        current.update(trial=trial, label=f"[trial {trial.index + 1} of {total}]")
        console.print(f"[bold]{escape(current['label'])}[/] {escape(tuning.trial_text(trial))} ({state})",
                      highlight=False)
        progress.reset(task, total=None, description=trial.name, info="")
        progress.start()

    # one line per trial, not per epoch (a search may run dozens of trials): the bar shows the epochs
    on_step, _ = step_and_epoch_printers(
        progress, task, lambda: (current["trial"].name, current["trial"].cfg.training.epochs))

    def on_trial_end(trial: Trial, result: dict[str, Any]) -> None:
        progress.stop()
        if "diverged" in result:
            err_console.print(f"{current['label']} diverged (never selected): {result['diverged']}",
                              highlight=False, markup=False, soft_wrap=True)
            return
        accuracy = result["noisy_score"] / result["examples"]
        test = result.get("test_accuracy")
        console.print(f"{current['label']} noisy score {accuracy:.4f}"
                      + (f", test accuracy {test:.4f}" if test is not None else ""), highlight=False,
                      markup=False)

    try:
        with _sigterm_as_interrupt():
            tuning.run_trials(search, indices, on_trial_start=on_trial_start, on_trial_end=on_trial_end,
                              on_step=on_step)
    except RunInterrupted:
        progress.stop()
        err_console.print("interrupted: finished trials and epochs are kept; run the same command again to "
                          "continue the search", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        progress.stop()


def _select(search: Search, tuning: Any) -> None:
    selection = tuning.select_and_publish(search)
    plan = search.plan
    if selection.winner is None:
        console.print(f"no trial to publish (K = {search.count}, or every trial diverged; {PRIVATE_NOTE}); "
                      "the search's output is 'nothing' and its ε is spent: a new search spends its own",
                      highlight=False, markup=False)
    else:
        accuracy = selection.noisy_score / plan.score_examples
        console.print(f"[bold]published {escape(str(selection.published))}/[/]: "
                      f"{escape(tuning.trial_text(selection.winner))}, noisy score {accuracy:.4f}",
                      highlight=False)
        console.print(tuning.publication(plan, selection.winner, selection.noisy_score)["privacy_statement"],
                      highlight=False, markup=False)
    console.print(f"ε of the search {selection.epsilon:.4g}; naive composition of the {search.count} trials "
                  f"that ran: ε = {selection.naive_epsilon:.4g} (RDP; {PRIVATE_NOTE}: it reveals K)",
                  highlight=False, markup=False)
