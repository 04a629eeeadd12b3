"""A search's private folder, key and trials: K and every trial's hyperparameters drawn from the key.

Layout under `output_dir` for a search named NAME: `NAME.private/` (mode 0700; never publish it) holds
`run.key` (the search's key, 0600), `search.yaml` (its settings, 0600), `trials/trial-IIII/` (each trial
an ordinary run directory), `scores/trial-IIII.yaml` (each trial's noisy score, 0600) and, once the
winner is published, `selected.yaml`; `NAME/` is the publication (`publish`). The key and the settings
file are created once, by whichever process comes first, so array jobs may start together.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.atomic import atomic_write_text
from dpsgd_cli.config import ExperimentConfig, flatten, replace
from dpsgd_cli.errors import OutputError, RunDirError
from dpsgd_cli.experiment.tune.plan import Candidate, SearchPlan
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.run_key import KEY_FILE, RunKey, load_run_key, new_run_key, save_run_key
from dpsgd_cli.runs.run_dir import SEARCH_FILE, RunDir

TRIALS_DIR, SCORES_DIR, SELECTED_FILE = "trials", "scores", "selected.yaml"
# config keys that may differ when a search is continued: where it lives, where the data are read from
_RELOCATABLE = ("output_dir", "data.data_dir")


@dataclass(frozen=True)
class Trial:
    """Trial `index`: its drawn hyperparameters (`assignment`, in the space's order), its run config and
    run key, and its candidate (privacy parameters)."""

    index: int
    assignment: tuple[tuple[str, Any], ...]
    cfg: ExperimentConfig
    candidate: Candidate
    key: RunKey = field(repr=False)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


@dataclass(frozen=True)
class Search:
    plan: SearchPlan
    key: RunKey = field(repr=False)
    trials: tuple[Trial, ...]

    @property
    def count(self) -> int:
        """K: private (the terminal and the private folder only)."""
        return len(self.trials)

    def score_path(self, trial: Trial) -> Path:
        return self.plan.private_dir / SCORES_DIR / f"{trial.name}.yaml"


def open_search(plan: SearchPlan, *, overwrite: bool = False) -> Search:
    """Create the search's private folder, key and settings file (or find them, if this search was started
    before: its settings must be the same), and draw K and every trial. `overwrite`: delete an earlier
    search of this name (private folder and publication) first. RunDirError if the folders are not
    this search's."""
    private = plan.private_dir
    if overwrite:
        _remove_search(plan)
    _check_publish_dir(plan)
    try:
        private.mkdir(parents=True, exist_ok=True)
        os.chmod(private, 0o700)
    except OSError as exc:
        raise OutputError(f"{private}: cannot create ({exc.strerror or exc.__class__.__name__})") from None
    settings = yaml.safe_dump(plan.settings_document(), sort_keys=False, allow_unicode=True)
    stored = _create_once(private / SEARCH_FILE, settings)
    if stored != settings:
        _check_same_settings(plan, stored)
    key = _search_key(plan)
    return Search(plan, key, draw_trials(plan, key))


def draw_trials(plan: SearchPlan, key: RunKey) -> tuple[Trial, ...]:
    """K ~ the search's distribution, then each trial's hyperparameters, each from its own stream of the
    key: never from the data or from another trial's results."""
    count = plan.count.sample(key.generator(tuning.STREAM_TRIAL_COUNT))
    trials = []
    for index in range(count):
        rng = key.generator(tuning.STREAM_TRIAL_SETTINGS, index)
        picks, assignment = [], []
        for axis in plan.tune.space:
            if axis.is_range:
                value = axis.draw(rng)
            else:
                picks.append(axis.pick(rng))
                value = axis.values[picks[-1]]
            assignment.append((axis.key, value))
        candidate = plan.candidate(tuple(picks))
        name = f"trial-{index:04d}"
        cfg = replace(plan.base, **dict(assignment), **{
            "name": name, "output_dir": str(plan.private_dir / TRIALS_DIR),
            "data.train_size": plan.train_size, "privacy.noise_multiplier": candidate.noise_multiplier,
            "privacy.target_epsilon": None})
        trials.append(Trial(index, tuple(assignment), cfg, candidate, tuning.trial_key(key, index)))
    return tuple(trials)


def _search_key(plan: SearchPlan) -> RunKey:
    """The search's key, created once (the first job to get there wins; the others read it)."""
    private, mode = plan.private_dir, "reproducible" if plan.base.privacy.reproducible else "secret"
    if not (private / KEY_FILE).is_file():
        key = new_run_key(reproducible=plan.base.privacy.reproducible, seed=plan.base.seed,
                          label=f"tune/{plan.name}")
        staging = Path(tempfile.mkdtemp(dir=private, prefix=".key."))
        try:
            save_run_key(key, staging)
            os.link(staging / KEY_FILE, private / KEY_FILE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OutputError(f"{private / KEY_FILE}: cannot write ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    key = load_run_key(private)
    if key.mode != mode:
        wanted = str(plan.base.privacy.reproducible).lower()
        raise RunDirError(f"{private}: the search's key is {key.mode} but privacy.reproducible is {wanted}; "
                          "a search keeps the mode it started with (pass --overwrite to start a new search)")
    return key


def _create_once(path: Path, text: str) -> str:
    """Write `text` to `path` (0600) unless it exists; return what the file holds."""
    if not path.exists():
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            atomic_write_text(staging, text, mode=0o600)
            os.link(staging, path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        finally:
            staging.unlink(missing_ok=True)
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc.__class__.__name__})") from None


def _check_same_settings(plan: SearchPlan, stored_text: str) -> None:
    where = plan.private_dir / SEARCH_FILE
    try:
        stored = yaml.safe_load(stored_text)
        old = flatten({"config": stored["config"], "tune": stored["tune"], "n": stored["dataset_size"]})
    except Exception:  # a damaged file: yaml, key and type errors
        raise RunDirError(f"{where}: damaged; pass --overwrite to start a new search") from None
    new = flatten({"config": plan.base.to_dict(), "tune": plan.tune.to_dict(), "n": plan.dataset_size})
    changed = sorted(k for k in old.keys() | new.keys()
                     if k.removeprefix("config.") not in _RELOCATABLE and old.get(k) != new.get(k))
    if changed:
        names = {"n": "the number of training examples"}
        shown = ", ".join(names.get(k, k.removeprefix("config.")) for k in changed[:5])
        raise RunDirError(f"{plan.private_dir}: a search with other settings ({shown}) was started here; it "
                          "keeps its settings: run it with them, or pass --overwrite to start a new search "
                          "(which spends its own ε), or give another --name")


def _check_publish_dir(plan: SearchPlan) -> None:
    publish = plan.publish_dir
    if publish.exists() and not (plan.private_dir / SEARCH_FILE).is_file():
        if not publish.is_dir() or any(publish.iterdir()):
            raise RunDirError(f"{publish}: exists and is not this search's publication; choose another "
                              "--name or output_dir")


def _remove_search(plan: SearchPlan) -> None:
    """--overwrite: delete this search's private folder and publication (only if they are a search's)."""
    private, publish = plan.private_dir, plan.publish_dir
    if private.exists() and not (private / SEARCH_FILE).is_file():
        raise RunDirError(f"{private}: is not a search's private folder; refusing to delete it")
    if publish.exists() and publish.is_dir() and any(publish.iterdir()):
        try:
            doc = RunDir(publish).document()
        except RunDirError:
            doc = {}
        if "search" not in doc:
            raise RunDirError(f"{publish}: is not a search's publication; refusing to delete it")
    for folder in (private, publish):
        if folder.exists():
            shutil.rmtree(folder)


def _write_private(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), mode=0o600)


def trial_text(trial: Trial) -> str:
    """The drawn hyperparameters, short: 'learning_rate=3.2 l2_norm_clip=0.1'."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.assignment)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)
