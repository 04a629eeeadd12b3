"""The plan of a private hyperparameter search, resolved before anything runs or is written: the base
config and the tune block, K's distribution, n, every combination of listed values (a candidate) with its
privacy parameters and σ (calibrated for the total ε, or fixed), and the search's ε."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpsgd_cli.config import ExperimentConfig, replace, resolved_data_dir
from dpsgd_cli.config.tune import TuneConfig, load_tune_config
from dpsgd_cli.errors import AccountingInputError, ConfigError
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.accounting import accounting_noise_multiplier
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.tuning import TrialCount, TrialPrivacy

PRIVATE_SUFFIX = ".private"


@dataclass(frozen=True)
class Candidate:
    """One combination of listed values (`picks`: an index per list axis) and its trial's privacy
    (`privacy.noise_multiplier` is the accounting σ; `noise_multiplier` the σ training uses)."""

    picks: tuple[int, ...]
    privacy: TrialPrivacy
    microbatch_size: int

    @property
    def noise_multiplier(self) -> float:
        return self.privacy.noise_multiplier * (2.0 if self.microbatch_size > 1 else 1.0)


@dataclass(frozen=True)
class SearchPlan:
    """A search resolved before anything runs. `dataset_size`: the n examples of the training split the
    search uses; the trials train on the first `train_size`, the score counts `score_examples`."""

    name: str
    base: ExperimentConfig
    tune: TuneConfig
    count: TrialCount
    dataset_size: int
    candidates: tuple[Candidate, ...]
    epsilon: float

    @property
    def output_dir(self) -> Path:
        return Path(self.base.output_dir)

    @property
    def private_dir(self) -> Path:
        return self.output_dir / f"{self.name}{PRIVATE_SUFFIX}"

    @property
    def publish_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def train_size(self) -> int:
        return self.dataset_size - self.tune.holdout

    @property
    def score_examples(self) -> int:
        return self.tune.holdout or self.dataset_size

    @property
    def delta(self) -> float:
        return self.base.privacy.delta

    def candidate(self, picks: tuple[int, ...]) -> Candidate:
        return self.candidates[_mixed_radix(picks, [len(a.values) for a in self.tune.lists])]

    def settings_document(self) -> dict[str, Any]:
        """What search.yaml records (and a continued search must match)."""
        return {"name": self.name, "config": self.base.to_dict(), "tune": self.tune.to_dict(),
                "dataset_size": self.dataset_size}


def plan_search(config: str | Path | None, overrides: Sequence[str] = (),
                space_file: str | Path | None = None, name: str | None = None,
                dataset_size: int | None = None) -> SearchPlan:
    """Validate the search, account every candidate and calibrate σ (or take the fixed σ), before anything
    runs or is written. `dataset_size`: n of the training split (default: counted by loading the data).
    ConfigError, naming the key, for anything wrong."""
    base, tune = load_tune_config(config, list(overrides), space_file)
    if name is not None:
        base = replace(base, name=name)
    if base.tracking.tensorboard or base.tracking.mlflow:
        raise ConfigError("tracking: a private search does not send its trials to a tracker (their number, "
                          "settings and results are what the selection keeps secret); set "
                          "tracking.tensorboard and tracking.mlflow to false")
    if dataset_size is None:
        from dpsgd_cli.training.data import load_dataset

        dataset_size = len(load_dataset(base.data.dataset, resolved_data_dir(base), base.data.train_size,
                                        1, path=base.data.path, label_column=base.data.label_column).y_train)
    train_size = dataset_size - tune.holdout
    if train_size < 1:
        raise ConfigError(f"tune.holdout: {tune.holdout} examples leave none of the {dataset_size} to train "
                          "on; hold out fewer")
    count = _count(tune)
    shapes = [_candidate_privacy(base, tune, picks, train_size) for picks in _all_picks(tune)]
    score = tune.score_noise_multiplier
    try:
        if tune.target_epsilon is not None:
            sigmas = tuning.calibrate_search([p for p, _ in shapes], score, count, base.privacy.delta,
                                             tune.target_epsilon)
        else:
            sigmas = [accounting_noise_multiplier(tune.noise_multiplier, k) for _, k in shapes]
        candidates = tuple(Candidate(picks, p.with_noise(s), k)
                           for picks, (p, k), s in zip(_all_picks(tune), shapes, sigmas))
        epsilon = tuning.search_epsilon([c.privacy for c in candidates], score, count, base.privacy.delta)
    except AccountingInputError as exc:
        key = {"target_epsilon": "tune.target_epsilon", "noise_multiplier": "tune.noise_multiplier",
               "score_noise_multiplier": "tune.score_noise_multiplier"}.get(exc.parameter, "tune")
        raise ConfigError(f"{key}: {exc}") from None
    return SearchPlan(base.name, base, tune, count, dataset_size, candidates, epsilon)


def _count(tune: TuneConfig) -> TrialCount:
    try:
        return TrialCount(tune.distribution, tune.mean, tune.shape)
    except AccountingInputError as exc:  # validated in config.tune already; kept as a guard
        raise ConfigError(f"tune.{exc.parameter}: {exc}") from None


def _all_picks(tune: TuneConfig) -> list[tuple[int, ...]]:
    """Every combination of listed values, the last axis varying fastest (the order of `_mixed_radix`)."""
    return list(itertools.product(*(range(len(a.values)) for a in tune.lists)))


def _mixed_radix(picks: Sequence[int], sizes: Sequence[int]) -> int:
    index = 0
    for pick, size in zip(picks, sizes):
        index = index * size + pick
    return index


def _candidate_privacy(base: ExperimentConfig, tune: TuneConfig, picks: tuple[int, ...],
                       train_size: int) -> tuple[TrialPrivacy, int]:
    """(privacy with σ = 1, microbatch size) of a trial with these listed values (ranges at their low
    end: they do not change ε)."""
    values = dict(zip((a.key for a in tune.lists), (a.values[j] for a, j in zip(tune.lists, picks))))
    values.update({a.key: a.low for a in tune.space if a.is_range})
    try:
        cfg = replace(base, **values, **{"privacy.noise_multiplier": 1.0, "privacy.target_epsilon": None,
                                         "data.train_size": train_size})
        plan = plan_privacy(cfg, train_size)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ConfigError(f"tune.space: the trial {shown} (on the {train_size} examples left after "
                          f"tune.holdout) does not fit: {exc}") from None
    privacy = TrialPrivacy(plan.accounting_noise_multiplier, plan.sampling_rate, plan.total_steps,
                           plan.releases)
    return privacy.with_noise(1.0), plan.microbatch_size

