"""Tests for dpsgd_cli.audit.bounds: expected numbers are derived by hand in the comments."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpsgd_cli.audit.bounds import (
    attacker_advantage,
    best_threshold_epsilon_lower_bound,
    choose_guesses,
    epsilon_lower_bound_from_counts,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    roc_auc,
    roc_curve,
    score_guesses,
)

# --------------------------------------------------------------------------------------------------
# ROC / AUC / advantage
# --------------------------------------------------------------------------------------------------


def test_roc_curve_small_case_by_hand():
    # members {3, 2}, non-members {1, 2}; thresholds descending: inf, 3, 2, 1
    #   t=inf: TP 0/2, FP 0/2      t=3: TP 1/2, FP 0/2
    #   t=2:   TP 2/2, FP 1/2      t=1: TP 2/2, FP 2/2
    fpr, tpr, thr = roc_curve([3.0, 2.0], [1.0, 2.0])
    np.testing.assert_array_equal(thr, [np.inf, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    # trapezoids: (0→0) 0 + (0→0.5) 0.5·(0.5+1)/2 = 0.375 + (0.5→1) 0.5·1 = 0.5  ⇒ 0.875
    # pairs: (3>1) 1, (3>2) 1, (2>1) 1, (2=2) ½ ⇒ 3.5/4 = 0.875
    assert roc_auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    # TPR − FPR over the points: 0, 0.5, 0.5, 0 ⇒ 0.5
    assert attacker_advantage([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.5)


def test_auc_identical_and_separated():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    assert roc_auc(x, x) == pytest.approx(0.5)  # every pair (i, j) is matched by (j, i); ties count ½
    y = rng.normal(size=2000)
    assert roc_auc(x, y) == pytest.approx(0.5, abs=0.05)  # same distribution: sd of AUC ≈ 0.014
    assert roc_auc(x + 100.0, y) == 1.0
    assert attacker_advantage(x + 100.0, y) == 1.0
    assert roc_auc(y, x + 100.0) == 0.0


def test_auc_equals_mann_whitney_u_with_ties():
    rng = np.random.default_rng(1)
    pos = np.round(rng.normal(0.5, 1.0, size=300), 1)  # rounding creates many ties
    neg = np.round(rng.normal(0.0, 1.0, size=200), 1)
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic  # U of the first sample
    assert roc_auc(pos, neg) == pytest.approx(u / (300 * 200), abs=1e-12)


def test_roc_rejects_bad_input():
    with pytest.raises(ValueError):
        roc_curve([], [1.0])
    with pytest.raises(ValueError):
        roc_curve([np.nan], [1.0])


# --------------------------------------------------------------------------------------------------
# Clopper–Pearson threshold bound
# --------------------------------------------------------------------------------------------------


def _perfect_attack_bound(n: int, delta: float, confidence: float) -> float:
    # Each one-sided bound at level 1 − α/2 with α = 1 − confidence (Bonferroni).
    # FP = 0 of n: upper CP endpoint solves (1 − p)^n = α/2  ⇒  FPR_hi = 1 − (α/2)^(1/n)
    # TP = n of n: lower CP endpoint solves p^n = α/2       ⇒  TPR_lo = (α/2)^(1/n)
    half_alpha = (1.0 - confidence) / 2.0
    tpr_lo = half_alpha ** (1.0 / n)
    fpr_hi = 1.0 - tpr_lo
    assert fpr_hi == pytest.approx(stats.beta.ppf(1 - half_alpha, 1, n), rel=1e-9)  # independent check
    assert tpr_lo == pytest.approx(stats.beta.ppf(half_alpha, n, 1), rel=1e-9)
    return max(math.log((tpr_lo - delta) / fpr_hi), math.log((1 - fpr_hi - delta) / (1 - tpr_lo)), 0.0)


def test_perfect_attack_bound_by_hand():
    # n = 1000, confidence 0.95 ⇒ α/2 = 0.025, ln 0.025 = −3.688879
    #   TPR_lo = exp(−3.688879/1000) = 0.9963179,  FPR_hi = 0.0036821
    #   (0.9963179 − 1e-5)/0.0036821 = 270.58  ⇒  ε_lb = ln 270.58 = 5.6006 (both inequalities agree here)
    expected = _perfect_attack_bound(1000, 1e-5, 0.95)
    assert expected == pytest.approx(5.6006, abs=1e-4)
    got = epsilon_lower_bound_from_counts(1000, 1000, 0, 1000, delta=1e-5, confidence=0.95)
    assert got == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(got) and got > 0


def test_useless_attack_gives_zero():
    assert epsilon_lower_bound_from_counts(500, 1000, 500, 1000, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound_from_counts(0, 1000, 0, 1000, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound_from_counts(1000, 1000, 1000, 1000, 1e-5, 0.95) == 0.0


def test_counts_bound_is_vectorised_and_monotone_in_confidence():
    got = epsilon_lower_bound_from_counts(np.array([600, 800, 990]), 1000, 100, 1000)
    assert got.shape == (3,) and np.all(np.diff(got) > 0)
    assert epsilon_lower_bound_from_counts(900, 1000, 50, 1000, confidence=0.99) < (
        epsilon_lower_bound_from_counts(900, 1000, 50, 1000, confidence=0.9)
    )


def test_best_threshold_perfect_separation():
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(10, 1, 1000), rng.normal(-10, 1, 1000)
    # no holdout: the best threshold separates perfectly ⇒ the n = 1000 hand value 5.6006
    res = best_threshold_epsilon_lower_bound(members, nonmembers, 1e-5, 0.95, holdout=False)
    assert res.epsilon == pytest.approx(_perfect_attack_bound(1000, 1e-5, 0.95), rel=1e-9)
    assert (res.tpr, res.fpr, res.n_pos) == (1.0, 0.0, 1000)
    # holdout: evaluated on 500 + 500 ⇒ TPR_lo = 0.025^(1/500) = 0.992649, ε_lb = ln(135.04) ≈ 4.905
    res = best_threshold_epsilon_lower_bound(members, nonmembers, 1e-5, 0.95)
    assert res.n_pos == res.n_neg == 500
    assert res.epsilon == pytest.approx(_perfect_attack_bound(500, 1e-5, 0.95), rel=1e-9)
    assert res.epsilon == pytest.approx(4.905, abs=1e-3)


def test_best_threshold_no_signal_is_near_zero():
    rng = np.random.default_rng(3)
    res = best_threshold_epsilon_lower_bound(rng.normal(size=1000), rng.normal(size=1000))
    assert res.epsilon < 0.2


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_threshold_bound_is_valid_for_randomized_response(eps):
    # Independent trials of ε-DP randomized response: a member says "in" w.p. q = e^ε/(1+e^ε),
    # a non-member w.p. 1 − q, so TPR = e^ε·FPR exactly; the 95% bound may exceed ε in ≤ 5% of runs.
    q = 1 / (1 + math.exp(-eps))
    exceed = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        tp, fp = rng.binomial(500, q), rng.binomial(500, 1 - q)
        exceed += epsilon_lower_bound_from_counts(tp, 500, fp, 500, delta=0.0, confidence=0.95) > eps
    assert exceed <= 10


# --------------------------------------------------------------------------------------------------
# One-run audit
# --------------------------------------------------------------------------------------------------


def test_one_run_pure_dp_all_correct_by_hand():
    # δ = 0, r = v = 10: p-value(ε) = P[Bin(10, q) ≥ 10] = q^10 with q = e^ε/(1+e^ε).
    # Largest rejected ε at β = 0.05: q^10 = 0.05 ⇒ q = 0.05^(1/10) = exp(−0.2995732) = 0.7411344
    #   ⇒ ε = ln(q/(1 − q)) = ln(0.7411344/0.2588656) = ln(2.863009) = 1.051873
    q = 0.05 ** (1 / 10)
    expected = math.log(q / (1 - q))
    assert expected == pytest.approx(1.051873, abs=1e-6)
    got = one_run_epsilon_lower_bound(10, 10, 10, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-6)
    # m only enters through the δ term
    assert one_run_epsilon_lower_bound(1000, 10, 10, 0.0, 0.95) == pytest.approx(expected, abs=1e-6)


def test_one_run_p_value_delta_term_by_hand():
    # m=2, r=2, v=1, ε=0 (q=½): f(1) = P[Bin(2,½) ≥ 1] = 3/4; i=1: f(0) − f(1) = P[W=0] = 1/4
    #   p = 3/4 + 2·2·δ·(1/4) = 0.75 + δ
    assert one_run_p_value(2, 2, 1, 0.0, 0.01) == pytest.approx(0.76)
    # m=10, r=4, v=3, ε=0: pmf(0..4) = (1, 4, 6, 4, 1)/16, f(3) = 5/16
    #   i=1: 6/16 = 0.375;  i=2: (6+4)/16/2 = 0.3125;  i=3: (6+4+1)/16/3 = 0.229  ⇒ max 0.375
    #   p = 0.3125 + 2·10·δ·0.375 = 0.3125 + 7.5δ; with δ=0.01 ⇒ 0.3875
    assert one_run_p_value(10, 4, 3, 0.0, 0.01) == pytest.approx(0.3875)
    assert one_run_p_value(10, 4, 3, 0.0, 0.0) == pytest.approx(0.3125)


def test_one_run_bound_zero_at_chance_and_grows_with_v():
    assert one_run_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert one_run_epsilon_lower_bound(1000, 100, 55, 1e-5) == 0.0  # P[Bin(100,½) ≥ 55] ≈ 0.18 > 0.05
    bounds = [one_run_epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(50, 101)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    positive = [b for b in bounds if b > 0]
    assert len(positive) > 30 and all(b2 > b1 for b1, b2 in zip(positive, positive[1:], strict=False))


def test_one_run_delta_only_lowers_the_bound():
    pure = one_run_epsilon_lower_bound(1000, 200, 170, 0.0)
    assert 0 < one_run_epsilon_lower_bound(1000, 200, 170, 1e-5) <= pure
    assert one_run_epsilon_lower_bound(1000, 200, 170, 1e-3) < one_run_epsilon_lower_bound(
        1000, 200, 170, 1e-5
    )


def test_one_run_rejects_bad_counts():
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(10, 5, 6)
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(10, 11, 5)
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(10, 5, 3, confidence=1.0)


def test_choose_and_score_guesses():
    scores = np.array([0.1, 5.0, -3.0, 2.0, -1.0, 0.0])
    g = choose_guesses(scores, k_pos=2, k_neg=1)
    np.testing.assert_array_equal(g, [0, 1, -1, 1, 0, 0])  # top two: 5.0, 2.0; bottom one: −3.0
    member = np.array([True, True, True, False, False, False])
    # guesses: idx1 +1 (member ✓), idx2 −1 (member ✗), idx3 +1 (non-member ✗) ⇒ r = 3, v = 1
    assert score_guesses(g, member) == (3, 1)
    np.testing.assert_array_equal(choose_guesses(scores, 0, 0), np.zeros(6))
    with pytest.raises(ValueError):
        choose_guesses(scores, 4, 3)


def _randomized_response_audit(eps: float, m: int, k: int, seed: int, delta: float) -> float:
    # Canary i is in (S_i = +1) or out (−1) w.p. ½; the mechanism releases S_i flipped w.p. 1/(1+e^ε)
    # independently per canary, which is exactly ε-DP w.r.t. any one canary. The auditor scores with
    # the released bit times independent positive noise (post-processing) and guesses on the top/bottom k.
    rng = np.random.default_rng(seed)
    member = rng.random(m) < 0.5
    released = np.where(member, 1.0, -1.0) * np.where(rng.random(m) < 1 / (1 + math.exp(eps)), -1.0, 1.0)
    return one_run_audit(released * (1.0 + rng.random(m)), member, k, k, delta, 0.95).epsilon


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    eps=st.floats(0.1, 3.0),
    m=st.integers(40, 400),
    frac=st.floats(0.1, 0.5),
    delta=st.sampled_from([0.0, 1e-5]),
)
def test_one_run_bound_rarely_exceeds_true_epsilon(eps, m, frac, delta):
    k = max(1, int(frac * m))
    exceed = sum(_randomized_response_audit(eps, m, k, seed, delta) > eps for seed in range(40))
    assert exceed <= 6  # ≤ 5% expected (≈ 2 of 40); 7+ would have probability < 0.3% per example


def test_one_run_detects_a_leaky_mechanism():
    # A mechanism that releases membership exactly: all 200 guesses correct out of m = 1000.
    res = one_run_audit(np.arange(1000.0), np.arange(1000) >= 500, 100, 100, delta=1e-5)
    assert (res.m, res.r, res.v) == (1000, 200, 200)
    assert res.epsilon > 3.0


def test_module_does_not_import_tensorflow():
    code = "import sys, dpsgd_cli.audit.bounds; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
