"""dpsgd_cli.privacy.tuning: K's distributions against their formulas (statistical), the search's ε against
dp-accounting's RepeatAndSelectDpEvent, the mixture bound, the calibration, the score's noise, the keys."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.privacy.tuning import TrialCount, TrialPrivacy

DELTA = 1e-5
SCORE = 20.0
FAMILIES = [TrialCount("poisson", 3.0), TrialCount("logarithmic", 4.0), TrialCount("geometric", 4.0),
            TrialCount("truncated_negative_binomial", 5.0, 0.5),
            TrialCount("truncated_negative_binomial", 6.0, 2.5)]


def reference_pmf(count: TrialCount, k: int) -> float:
    """P(K = k) by the formulas of Papernot & Steinke 2022 (Definition 1; Poisson: the usual law)."""
    if count.distribution == "poisson":
        return math.exp(-count.mean + k * math.log(count.mean) - math.lgamma(k + 1))
    if k < 1:
        return 0.0
    gamma, eta = count.gamma, count.accounting_shape
    if eta == 0:
        return (1 - gamma) ** k / (k * math.log(1 / gamma))
    log_product = math.lgamma(k + eta) - math.lgamma(eta) - math.lgamma(k + 1)  # ∏_{l<k} (l+η)/(l+1)
    return math.exp(k * math.log(1 - gamma) + log_product) / (gamma ** -eta - 1)


@pytest.mark.parametrize("count", FAMILIES, ids=lambda c: f"{c.distribution}-{c.shape}")
def test_the_formula_with_accountings_gamma_has_the_asked_mean(count):
    ks = np.arange(0, 4000)
    pmf = np.array([reference_pmf(count, int(k)) for k in ks])
    assert pmf.sum() == pytest.approx(1.0, abs=1e-9)
    assert float((ks * pmf).sum()) == pytest.approx(count.mean, rel=1e-6)


@pytest.mark.parametrize("count", FAMILIES, ids=lambda c: f"{c.distribution}-{c.shape}")
def test_drawn_counts_follow_the_formula(count):
    """Chi-square goodness of fit of 20 000 draws against P(K = k), tail pooled; and the sample mean."""
    rng = np.random.default_rng(12345)
    draws = np.array([count.sample(rng) for _ in range(20000)])
    if count.distribution != "poisson":
        assert draws.min() >= 1
    top = 1
    while sum(reference_pmf(count, k) for k in range(top + 1, 10 * top + 50)) * len(draws) > 20:
        top += 1
    low = 0 if count.distribution == "poisson" else 1
    expected = np.array([reference_pmf(count, k) for k in range(low, top + 1)])
    expected = np.append(expected, 1 - expected.sum()) * len(draws)
    observed = np.array([(draws == k).sum() for k in range(low, top + 1)] + [(draws > top).sum()])
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    std_error = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - count.mean) < 5 * std_error


def test_a_wrong_distribution_fails_the_fit():
    """The goodness-of-fit check has power: geometric draws do not pass as logarithmic of the same mean."""
    rng = np.random.default_rng(1)
    draws = np.array([TrialCount("geometric", 4.0).sample(rng) for _ in range(20000)])
    log = TrialCount("logarithmic", 4.0)
    expected = np.array([reference_pmf(log, k) for k in range(1, 30)])
    expected = np.append(expected, 1 - expected.sum()) * len(draws)
    observed = np.array([(draws == k).sum() for k in range(1, 30)] + [(draws >= 30).sum()])
    assert stats.chisquare(observed, expected).pvalue < 1e-6


def test_mean_one_is_always_one_trial():
    rng = np.random.default_rng(0)
    for dist in ("logarithmic", "geometric"):
        assert {TrialCount(dist, 1.0).sample(rng) for _ in range(50)} == {1}


@pytest.mark.parametrize("kwargs,parameter", [
    ({"distribution": "binomial", "mean": 4.0}, "distribution"),
    ({"distribution": "poisson", "mean": 0.0}, "mean"),
    ({"distribution": "poisson", "mean": 0.5}, "mean"),
    ({"distribution": "geometric", "mean": -1.0}, "mean"),
    ({"distribution": "truncated_negative_binomial", "mean": 4.0}, "shape"),
    ({"distribution": "truncated_negative_binomial", "mean": 4.0, "shape": -0.5}, "shape"),
    ({"distribution": "poisson", "mean": 4.0, "shape": 1.0}, "shape"),
])
def test_bad_counts_are_refused(kwargs, parameter):
    with pytest.raises(AccountingInputError) as info:
        TrialCount(**kwargs)
    assert info.value.parameter == parameter


# ---------------------------------------------------------------------------------------------------
# ε of the search

BEST = TrialPrivacy(4.106, 8192 / 60000, 440)  # configs/fashion_mnist_best.yaml at σ for PLD ε = 3


def library_search_epsilon(trial: TrialPrivacy, count: TrialCount, score: float = SCORE) -> float:
    """dp-accounting's RdpAccountant on RepeatAndSelectDpEvent(trial event, mean, shape), built here."""
    events = dp_accounting.dp_event
    parts = [events.GaussianDpEvent(r) for r in trial.releases]
    parts.append(events.SelfComposedDpEvent(events.PoissonSampledDpEvent(
        trial.sampling_rate, events.GaussianDpEvent(trial.noise_multiplier)), trial.steps))
    parts.append(events.GaussianDpEvent(score))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(events.RepeatAndSelectDpEvent(events.ComposedDpEvent(parts), count.mean,
                                              count.accounting_shape))
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("count", FAMILIES, ids=lambda c: f"{c.distribution}-{c.shape}")
@pytest.mark.parametrize("trial", [BEST, TrialPrivacy(1.1, 256 / 60000, 2344, (8.0, 8.0))],
                         ids=["best", "releases"])
def test_search_epsilon_is_dp_accountings_repeat_and_select(count, trial):
    ours = tuning.search_epsilon([trial, trial], SCORE, count, DELTA)
    assert ours == pytest.approx(library_search_epsilon(trial, count), rel=1e-12)


def test_known_numbers_of_the_best_recipe():
    """Without the score: one trial RDP 3.26, eight composed 10.8, logarithmic 8 → 5.18, Poisson 8 →
    6.43 (dp-accounting). The score (σ 20) adds a little to each."""
    tiny = 1e6  # a score with almost no privacy cost
    logarithmic, poisson = TrialCount("logarithmic", 8), TrialCount("poisson", 8)
    assert tuning.search_epsilon([BEST], tiny, logarithmic, DELTA) == pytest.approx(5.18, abs=0.01)
    assert tuning.search_epsilon([BEST], tiny, poisson, DELTA) == pytest.approx(6.43, abs=0.01)
    assert tuning.naive_epsilon([BEST] * 8, tiny, DELTA) == pytest.approx(10.80, abs=0.01)
    with_score = tuning.search_epsilon([BEST], SCORE, TrialCount("logarithmic", 8), DELTA)
    assert 5.18 < with_score < 5.5


def test_naive_composition_is_dp_accountings_self_composition():
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.dp_event.SelfComposedDpEvent(tuning.trial_event(BEST, SCORE), 5))
    assert tuning.naive_epsilon([BEST] * 5, SCORE, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    assert tuning.naive_epsilon([], SCORE, DELTA) == 0.0


def test_mixture_bounds_every_candidate_and_equals_identical_ones():
    count = TrialCount("logarithmic", 8.0)
    candidates = [BEST, TrialPrivacy(3.0, 4096 / 60000, 880), TrialPrivacy(6.0, 0.3, 200, (8.0, 8.0))]
    orders, mixed = tuning.mixture_rdp(candidates, SCORE)
    for c in candidates:
        own_orders, own = tuning.trial_rdp(c, SCORE)
        assert np.array_equal(orders, own_orders) and np.all(mixed >= own)
        assert tuning.search_epsilon(candidates, SCORE, count, DELTA) >= tuning.search_epsilon([c], SCORE,
                                                                                              count, DELTA)
    # at each order the maximum is one candidate's value, so the bound is no looser than it must be
    curves = np.stack([tuning.trial_rdp(c, SCORE)[1] for c in candidates])
    assert np.all((curves == mixed).any(axis=0))
    assert np.array_equal(tuning.mixture_rdp([BEST, BEST], SCORE)[1], tuning.trial_rdp(BEST, SCORE)[1])
    assert tuning.search_epsilon([BEST] * 3, SCORE, count, DELTA) == tuning.search_epsilon([BEST], SCORE,
                                                                                           count, DELTA)


def test_the_search_costs_less_than_composing_its_mean_number_of_trials():
    for count in FAMILIES:
        mean = math.ceil(count.mean)
        assert tuning.search_epsilon([BEST], SCORE, count, DELTA) < tuning.naive_epsilon([BEST] * mean, SCORE,
                                                                                         DELTA)


# ---------------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize("count", [TrialCount("logarithmic", 8.0), TrialCount("poisson", 8.0),
                                   TrialCount("truncated_negative_binomial", 8.0, 0.5)],
                         ids=["logarithmic", "poisson", "tnb"])
def test_calibration_meets_the_target_and_less_noise_would_not(count):
    (sigma,) = tuning.calibrate_search([BEST], SCORE, count, DELTA, 3.0)
    assert library_search_epsilon(BEST.with_noise(sigma), count) <= 3.0
    assert library_search_epsilon(BEST.with_noise(sigma * 0.999), count) > 3.0
    if count.distribution == "logarithmic":  # about 7 per trial at mean 8 (one trial PLD ε ≈ 1.6)
        assert 6.5 < sigma < 7.5


def test_calibration_of_different_candidates():
    count = TrialCount("logarithmic", 8.0)
    candidates = [BEST, TrialPrivacy(1.0, 4096 / 60000, 880), TrialPrivacy(1.0, 2048 / 60000, 440, (8.0,)),
                  BEST]
    sigmas = tuning.calibrate_search(candidates, SCORE, count, DELTA, 3.0)
    assert sigmas[0] == sigmas[3] and len(set(sigmas)) == 3
    scaled = [c.with_noise(s) for c, s in zip(candidates, sigmas)]
    assert tuning.search_epsilon(scaled, SCORE, count, DELTA) <= 3.0
    less = [c.with_noise(s * 0.999) for c, s in zip(candidates, sigmas)]
    assert tuning.search_epsilon(less, SCORE, count, DELTA) > 3.0
    # each candidate gets at least the noise a search of it alone would need
    for c, s in zip(candidates, sigmas):
        (alone,) = tuning.calibrate_search([c], SCORE, count, DELTA, 3.0)
        assert s >= alone


def test_a_target_the_scores_alone_exceed_is_refused():
    count = TrialCount("poisson", 10.0)
    floor = tuning.score_alone_epsilon(2.0, count, DELTA)
    with pytest.raises(AccountingInputError, match="scores alone") as info:
        tuning.calibrate_search([BEST], 2.0, count, DELTA, floor * 0.99)
    assert info.value.parameter == "target_epsilon"
    (sigma,) = tuning.calibrate_search([BEST], 2.0, count, DELTA, floor * 1.5)
    assert tuning.search_epsilon([BEST.with_noise(sigma)], 2.0, count, DELTA) <= floor * 1.5


# ---------------------------------------------------------------------------------------------------
# Score and keys


def test_the_score_noise_has_the_stated_std():
    rng = np.random.default_rng(7)
    n, sigma = 20000, 20.0
    scores = np.array([tuning.noisy_score(300, sigma, rng) for _ in range(n)])
    assert abs(scores.mean() - 300) < 5 * sigma / math.sqrt(n)
    # (n−1)s²/σ² is χ²(n−1): a two-sided 1e-4 interval
    statistic = (n - 1) * scores.var(ddof=1) / sigma**2
    assert stats.chi2.ppf(5e-5, n - 1) < statistic < stats.chi2.ppf(1 - 5e-5, n - 1)
    # and the test has power: a std 5 % larger than the noise's is rejected
    assert (n - 1) * scores.var(ddof=1) / (sigma * 1.05) ** 2 < stats.chi2.ppf(5e-5, n - 1)


def test_trial_keys_are_distinct_derived_and_keep_the_mode():
    search = new_run_key(reproducible=True, seed=3, label="tune/x")
    keys = [tuning.trial_key(search, i) for i in range(100)]
    assert len({k.material for k in keys}) == 100 and {k.mode for k in keys} == {"reproducible"}
    assert tuning.trial_key(search, 5) == keys[5]
    assert search.material not in {k.material for k in keys}
    secret = new_run_key(reproducible=False, seed=3)
    assert tuning.trial_key(secret, 0).mode == "secret" and tuning.trial_key(secret, 0) != keys[0]
