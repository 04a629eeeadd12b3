"""privacy/question: a question from options counts steps as `dpsgd train` does, and a question from a
config is the plan `dpsgd train` runs (same σ, q, steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpsgd_cli.config import dataset_size, load_config
from dpsgd_cli.errors import ConfigError
from dpsgd_cli.privacy.plan import plan_privacy
from dpsgd_cli.privacy.question import resolve_config, resolve_options, round_up
from dpsgd_cli.privacy.sampling import steps_after_epochs

ROOT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("sampling, epochs", [("poisson", 2.5), ("shuffle", 3), ("poisson", 1)])
def test_epochs_become_the_trainers_step_count(sampling, epochs):
    q = resolve_options(sigma=1.1, steps=None, epochs=epochs, batch_size=256, dataset_size=60_000,
                        sampling_rate=None, num_microbatches=None, sampling=sampling, delta=None,
                        need_sigma=True)
    assert q.steps == steps_after_epochs(epochs, 256, 60_000, sampling)
    assert q.sampling_rate == 256 / 60_000 and q.delta == 1e-5 and q.microbatch_size == 1


def test_microbatches_set_the_unit_size_and_the_accounting_sigma():
    q = resolve_options(sigma=1.0, steps=10, epochs=None, batch_size=256, dataset_size=60_000,
                        sampling_rate=None, num_microbatches=64, sampling=None, delta=None, need_sigma=True)
    assert q.microbatch_size == 4 and q.accounting_sigma == 0.5


def test_a_config_question_is_the_plan_train_runs():
    overrides = ["privacy.noise_multiplier=1.3", "training.epochs=3"]
    question = resolve_config(ROOT_CONFIG, overrides)
    cfg = load_config(ROOT_CONFIG, overrides)
    plan = plan_privacy(cfg, dataset_size(cfg))
    assert (question.noise_multiplier, question.sampling_rate, question.steps, question.microbatch_size) == (
        plan.noise_multiplier, plan.sampling_rate, plan.total_steps, plan.microbatch_size)


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="--sampling must be poisson or shuffle"):
        resolve_options(sigma=1.0, steps=10, epochs=None, batch_size=2, dataset_size=10, sampling_rate=None,
                        num_microbatches=None, sampling="random", delta=None, need_sigma=True)


@pytest.mark.parametrize("x, digits, expected",
                         [(1.23401, 4, 1.235), (1.234, 4, 1.234), (0.0098761, 2, 0.0099)])
def test_round_up_never_goes_below(x, digits, expected):
    assert round_up(x, digits) == expected and round_up(x, digits) >= x
