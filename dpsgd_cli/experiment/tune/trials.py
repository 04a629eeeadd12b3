"""Running a search's trials: each trained by the ordinary run function into the private folder, then
scored (its count of correct predictions plus the noise of the search key's score stream).

A killed search run again finds its scored trials and skips them, resumes the unfinished one from its
checkpoint (or restarts it with the same key, which repeats it) and draws the same scores' noise, so it
ends as an uninterrupted search would (exactly so in reproducible mode). This module never prints.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import yaml

from dpsgd_cli.config import resolved_data_dir
from dpsgd_cli.errors import RunDirError, TrainingError
from dpsgd_cli.experiment.tune.plan import SearchPlan
from dpsgd_cli.experiment.tune.search import Search, Trial, _write_private
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.run_key import load_run_key
from dpsgd_cli.runs.run_dir import FINISHED, RunDir, check_run_dir

EVAL_BATCH = 1000


SCORED, DIVERGED, TRAINED, UNFINISHED, NEW = "scored", "diverged", "trained", "unfinished", "new"


def trial_state(search: Search, trial: Trial) -> str:
    """scored (done), diverged (done, never selected), trained (finished, not scored yet), unfinished or
    new."""
    score = _read_score(search, trial)
    if score is not None:
        return DIVERGED if "diverged" in score else SCORED
    rd = RunDir(trial.run_dir)
    if not rd.has_run_file():
        return UNFINISHED if trial.run_dir.exists() else NEW
    try:
        finished = rd.document().get("status") == FINISHED
    except RunDirError:
        return UNFINISHED
    return TRAINED if finished and rd.weights_file.is_file() else UNFINISHED


def _read_score(search: Search, trial: Trial) -> dict[str, Any] | None:
    path = search.score_path(trial)
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
    except Exception:  # damaged: score again (the noise is the key's, so the score repeats)
        return None
    return doc if isinstance(doc, dict) and ("noisy_score" in doc or "diverged" in doc) else None


TrialStart = Callable[[Trial, str], None]
TrialEnd = Callable[[Trial, dict[str, Any]], None]


def run_trials(search: Search, indices: Sequence[int] | None = None, *,
               run_fn: Callable[..., Any] | None = None, on_trial_start: TrialStart | None = None,
               on_trial_end: TrialEnd | None = None,
               on_step: Callable | None = None, on_epoch: Callable | None = None) -> list[Trial]:
    """Train and score the trials `indices` (default: all K) that are not done yet; return them.

    A trial whose training diverges (TrainingError) is recorded as diverged and never selected. Ctrl-C
    (RunInterrupted) and other errors stop the search; what finished is kept. `run_fn` defaults to
    `experiment.run.run`."""
    if run_fn is None:
        from dpsgd_cli.experiment.run import run as run_fn  # TensorFlow only now
    chosen = search.trials if indices is None else [search.trials[i] for i in indices]
    scorer = _Scorer(search.plan)
    done = []
    for trial in chosen:
        state = trial_state(search, trial)
        if state in (SCORED, DIVERGED):
            continue
        if on_trial_start:
            on_trial_start(trial, state)
        if state != TRAINED:
            try:
                _train(trial, state, run_fn, on_step, on_epoch)
            except TrainingError as exc:
                result = {"diverged": str(exc)}
                _write_private(search.score_path(trial), result)
                if on_trial_end:
                    on_trial_end(trial, result)
                done.append(trial)
                continue
        correct = scorer.correct(trial)
        rng = search.key.generator(tuning.STREAM_SCORE_NOISE, trial.index)
        noisy = tuning.noisy_score(correct, search.plan.tune.score_noise_multiplier, rng)
        result = {"noisy_score": noisy, "examples": search.plan.score_examples}
        _write_private(search.score_path(trial), result)
        if on_trial_end:
            on_trial_end(trial, {**result, "test_accuracy": _final(trial).get("test_accuracy")})
        done.append(trial)
    return done


def _train(trial: Trial, state: str, run_fn, on_step, on_epoch) -> None:
    """Resume the trial from its checkpoint when its folder allows it, else (re)start it with its key —
    the same key, so a restarted trial repeats what the first attempt would have done."""
    if state == UNFINISHED:
        try:
            check_run_dir(trial.run_dir, resume=True)
            resumable = load_run_key(trial.run_dir) == trial.key
        except RunDirError:
            resumable = False
        if resumable:
            run_fn(trial.cfg, on_step=on_step, on_epoch=on_epoch, resume=True)
            return
        shutil.rmtree(trial.run_dir)  # in the private folder: a trial killed before it could be resumed
    run_fn(trial.cfg, on_step=on_step, on_epoch=on_epoch, overwrite=True, run_key=trial.key)


def _final(trial: Trial) -> dict[str, Any]:
    try:
        return dict(RunDir(trial.run_dir).document().get("final") or {})
    except RunDirError:
        return {}


class _Scorer:
    """Counts a trial's correct predictions on the scoring examples: the held-out end of the training
    split (or, with `tune.holdout: 0`, the trial's training examples), as its model sees them."""

    def __init__(self, plan: SearchPlan):
        self.plan = plan
        self._data: tuple[np.ndarray, np.ndarray] | None = None
        self._inputs: dict[str, np.ndarray] = {}

    def _examples(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None:
            from dpsgd_cli.training.data import load_dataset

            base = self.plan.base
            data = load_dataset(base.data.dataset, resolved_data_dir(base), self.plan.dataset_size, 1,
                                path=base.data.path, label_column=base.data.label_column)
            if len(data.y_train) != self.plan.dataset_size:
                raise RunDirError(f"the training split now has {len(data.y_train)} examples, the search "
                                  f"started with {self.plan.dataset_size}; use the same data")
            start = self.plan.train_size if self.plan.tune.holdout else 0
            self._data = (data.x_train[start:], data.y_train[start:])
        return self._data

    def correct(self, trial: Trial) -> int:
        from dpsgd_cli.audit import membership
        from dpsgd_cli.training import features

        images, labels = self._examples()
        arch = trial.cfg.model.architecture
        if arch not in self._inputs:
            self._inputs[arch] = features.model_inputs(images, arch)
        run = membership.load_run(trial.run_dir)
        model = membership.load_model(run)
        x = membership.model_inputs(run, self._inputs[arch])
        hits = 0
        for start in range(0, len(labels), EVAL_BATCH):
            logits = np.asarray(model(x[start:start + EVAL_BATCH], training=False))
            hits += int((logits.argmax(axis=1) == labels[start:start + EVAL_BATCH]).sum())
        return hits
