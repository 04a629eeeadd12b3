"""A private hyperparameter search: `plan_search` → `open_search` → `run_trials` → `select_and_publish`.

Layout under `output_dir` (for a search named NAME):

* `NAME.private/` (mode 0700; never publish it): `run.key` (the search's key, 0600), `search.yaml` (its
  settings, 0600), `trials/trial-IIII/` (each trial an ordinary run directory, run by `run.run`),
  `scores/trial-IIII.yaml` (each trial's noisy score, 0600) and, once the winner is published,
  `selected.yaml` (which trial won, how many ran, the naive composition; 0600).
* `NAME/`: the published winner, written only by the selection: run.yaml (its config — hence its
  hyperparameters —, σ, q, steps, test accuracy, noisy score, the search's ε and statement) and its
  weights. Nothing in it depends on K, on the trial's index or on any other trial.

Everything random comes from the search's key (see `privacy.tuning`): K, each trial's hyperparameters
(drawn before any trial runs, from the key alone), each trial's run key, each score's noise. A killed
search run again with the same config finds its key and settings, skips the scored trials, resumes the
unfinished one from its checkpoint (or restarts it with the same key, which repeats it) and draws the same
scores' noise, so it ends as an uninterrupted search would (exactly so in reproducible mode). Trials can
run as separate jobs (`run_trials(..., indices=[i])`, e.g. one per array task): they share the key and
settings files, created once by whichever job comes first.

Modules: `plan` (settings, candidates, σ and ε), `search` (the private folder, the key, the draws),
`trials` (training and scoring), `publish` (selection and publication). None of them prints; progress goes
to callbacks.
"""

from dpsgd_cli.experiment.tune.plan import Candidate, SearchPlan, plan_search
from dpsgd_cli.experiment.tune.publish import (
    Selection,
    missing_trials,
    publication,
    publish,
    select_and_publish,
)
from dpsgd_cli.experiment.tune.search import Search, Trial, draw_trials, open_search, trial_text
from dpsgd_cli.experiment.tune.trials import run_trials, trial_state

__all__ = ["Candidate", "Search", "SearchPlan", "Selection", "Trial", "draw_trials", "missing_trials",
           "open_search", "plan_search", "publication", "publish", "run_trials", "select_and_publish",
           "trial_state", "trial_text"]
