"""dpsgd_cli.privacy.calibration: the σ it returns meets the target and a slightly smaller σ does not,
for our ε
and for dp-accounting's own accountants; each σ's ε is computed once."""

from __future__ import annotations

import math

import pytest
from test_accounting import library_epsilon

from dpsgd_cli.config import load_config
from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy import accounting, calibration
from dpsgd_cli.privacy.accounting import epsilon
from dpsgd_cli.privacy.calibration import calibrate_noise_multiplier
from dpsgd_cli.privacy.plan import plan_privacy


@pytest.mark.parametrize("accountant,target,q,steps", [
    ("rdp", 3.0, 256 / 60000, 23438),
    ("rdp", 0.5, 0.1, 10),
    ("rdp", 8.0, 1.0, 100),
    pytest.param("pld", 2.0, 50 / 2000, 120, marks=pytest.mark.slow),  # plan_privacy test below
])
def test_calibrated_sigma_reaches_target_and_a_slightly_smaller_one_does_not(accountant, target, q, steps):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant)
    assert epsilon(sigma, q, steps, 1e-5, accountant) <= target
    assert epsilon(sigma * (1 - 1e-4), q, steps, 1e-5, accountant) > target
    # and so for dp-accounting's own accountant too, up to its last digits
    assert library_epsilon(sigma, q, steps, 1e-5, accountant) <= target * (1 + 1e-9)
    if accountant == "pld":  # the tighter accountant needs less noise
        assert sigma < calibrate_noise_multiplier(target, 1e-5, q, steps, "rdp")


def test_calibration_rejects_bad_targets():
    for target in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError):
            calibrate_noise_multiplier(target, 1e-5, 0.01, 100)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 0)


def test_target_epsilon_in_a_train_config_is_calibrated_by_plan_privacy():
    """privacy.target_epsilon: runner.plan_privacy calibrates σ with PLD; the run then ends at ε ≤ target."""
    cfg = load_config(None, ["data.train_size=2000", "data.batch_size=50", "training.epochs=3",
                             "privacy.target_epsilon=2.0"])
    plan = plan_privacy(cfg, 2000)
    assert plan.total_steps == 120 and plan.sampling_rate == 50 / 2000
    eps = epsilon(plan.accounting_noise_multiplier, plan.sampling_rate, plan.total_steps, 1e-5, "pld")
    assert eps <= 2.0
    smaller = plan.accounting_noise_multiplier * (1 - 1e-4)
    assert epsilon(smaller, plan.sampling_rate, plan.total_steps, 1e-5, "pld") > 2.0


def test_each_sigma_is_evaluated_once(monkeypatch):
    """The bracket search, Brent's method and the feasibility check ask for some σ again: the cache
    answers those, so the number of ε computations is the number of distinct σ."""
    asked = []
    real = accounting.epsilon

    def counting(sigma, *args, **kwargs):
        asked.append(sigma)
        return real(sigma, *args, **kwargs)

    monkeypatch.setattr(accounting, "epsilon", counting)
    calibration._calibrate.cache_clear()
    calibration._epsilon_at.cache_clear()
    calibrate_noise_multiplier(3.0, 1e-5, 256 / 60000, 23438, "rdp")
    assert asked and len(asked) == len(set(asked))



def test_targets_no_sigma_the_accountants_take_can_meet_are_refused_with_their_name():
    """dp-accounting's bracket search gives up with NoBracketIntervalFoundError on these. A target that even
    σ = 1e-4 meets, or that even σ = 1e6 misses, is a ValueError that says so and names the target."""
    with pytest.raises(AccountingInputError, match="so large that even σ = 0.0001") as refused:
        calibrate_noise_multiplier(1e9, 1e-5, 256 / 60000, 1)
    assert refused.value.parameter == "target_epsilon"
    with pytest.raises(AccountingInputError, match=r"out of reach: even σ = 1e\+06") as refused:
        calibrate_noise_multiplier(1e-3, 1e-5, 1.0, 10**9)
    assert refused.value.parameter == "target_epsilon"
    with pytest.raises(AccountingInputError) as refused:
        calibrate_noise_multiplier(1.0, 1e-20, 0.01, 100, "pld")
    assert refused.value.parameter == "delta"


def test_a_tiny_target_that_epsilon_zero_meets_is_answered():
    """ε = 0 is reached at a finite σ (dp-accounting's RDP conversion: δ covers the rest)."""
    sigma = calibrate_noise_multiplier(1e-300, 1e-5, 0.01, 100)
    assert epsilon(sigma, 0.01, 100, 1e-5) == 0.0 < epsilon(sigma * (1 - 1e-4), 0.01, 100, 1e-5)
