"""Pure math for empirical privacy auditing (numpy + scipy only; never imports TensorFlow).

Conventions used throughout:

* A *score* is any real number where higher means "more likely a training member"; for loss-based
  attacks use ``score = -loss``. An example is guessed "member" when ``score >= threshold``.
* ε is in nats (natural log), δ is a probability, ``confidence`` is the probability (e.g. 0.95) with
  which a reported ε lower bound is valid, so ``1 - confidence`` is the tolerated false-alarm rate.

Three tools:

1. Membership-inference metrics: :func:`roc_curve`, :func:`roc_auc`, :func:`attacker_advantage`.
2. Multi-run threshold audit (Jagielski et al. 2020; Nasr et al. 2021): Clopper–Pearson bounds on
   TPR/FPR turned into an ε lower bound via the (ε, δ)-DP hypothesis-testing inequalities.
3. One-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv 2305.08846).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import special, stats

__all__ = [
    "OneRunAudit",
    "ThresholdAudit",
    "attacker_advantage",
    "best_threshold_epsilon_lower_bound",
    "choose_guesses",
    "epsilon_lower_bound_from_counts",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "roc_auc",
    "roc_curve",
    "score_guesses",
]

_EPS_SEARCH_MAX = 60.0  # nats; expit(60) == 1 in float64, so every p-value has crossed any β < 1 by then


class ThresholdAudit(NamedTuple):
    """Result of :func:`best_threshold_epsilon_lower_bound`; tpr/fpr are empirical rates on the
    evaluation scores (the held-out half when ``holdout=True``), n_pos/n_neg their counts."""

    epsilon: float
    threshold: float
    tpr: float
    fpr: float
    n_pos: int
    n_neg: int


class OneRunAudit(NamedTuple):
    """Result of :func:`one_run_audit`: ε lower bound and the (m, r, v) it was computed from."""

    epsilon: float
    m: int
    r: int
    v: int


# ---------------------------------------------------------------------------------------------------
# 1. Membership-inference metrics
# ---------------------------------------------------------------------------------------------------


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return arr


def _counts_at_or_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t, how many scores are >= t."""
    return scores.size - np.searchsorted(np.sort(scores), thresholds, side="left")


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "member iff score >= t", one point per distinct score plus t = +inf.

    Returns ``(fpr, tpr, thresholds)``; thresholds are strictly decreasing, starting at ``+inf``
    (the point (0, 0)) and ending at the smallest score (the point (1, 1)). Ties are handled exactly.
    """
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = _counts_at_or_above(pos, thresholds) / pos.size
    fpr = _counts_at_or_above(neg, thresholds) / neg.size
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], tpr]),
        np.concatenate([[np.inf], thresholds]),
    )


def roc_auc(member_scores, nonmember_scores) -> float:
    """Area under the ROC (trapezoid rule) = P[member score > non-member score] + ½·P[tie]."""
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    return float(np.trapezoid(tpr, fpr))


def attacker_advantage(member_scores, nonmember_scores) -> float:
    """max over thresholds of TPR − FPR (Yeom et al. 2018), in [0, 1]; 0 = no better than chance."""
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    return float(np.max(tpr - fpr))


# ---------------------------------------------------------------------------------------------------
# 2. Threshold-attack ε lower bound with Clopper–Pearson intervals
# ---------------------------------------------------------------------------------------------------


def _cp_upper(k, n, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on a binomial rate at level 1 − alpha (1 when k == n)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    bound = stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1.0))
    return np.where(k >= n, 1.0, bound)


def _cp_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound on a binomial rate at level 1 − alpha (0 when k == 0)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    bound = stats.beta.ppf(alpha, np.maximum(k, 1.0), n - k + 1.0)
    return np.where(k <= 0, 0.0, bound)


def _check_delta_confidence(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def epsilon_lower_bound_from_counts(tp, n_pos, fp, n_neg, delta: float = 1e-5, confidence: float = 0.95):
    """ε lower bound (nats, ≥ 0) from one threshold test's counts, valid with prob. ≥ ``confidence``.

    ``tp`` of ``n_pos`` members and ``fp`` of ``n_neg`` non-members were guessed "member". Any
    (ε, δ)-DP mechanism forces TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, so with a lower
    bound TPR_lo and an upper bound FPR_hi,
    ε_lb = max(0, log((TPR_lo − δ)/FPR_hi), log((1 − FPR_hi − δ)/(1 − TPR_lo))).
    Confidence split (Bonferroni): each one-sided Clopper–Pearson bound is taken at level
    1 − (1 − confidence)/2, so both hold simultaneously with probability ≥ ``confidence``.
    Assumes the n_pos + n_neg trials are independent (e.g. one trained model per trial); applying it
    to many examples of a single model is a heuristic — use the one-run audit for that.
    Array arguments broadcast; a scalar input gives a Python float.
    """
    _check_delta_confidence(delta, confidence)
    tp, n_pos, fp, n_neg = (np.asarray(a) for a in (tp, n_pos, fp, n_neg))
    if np.any(n_pos < 1) or np.any(n_neg < 1):
        raise ValueError("n_pos and n_neg must be >= 1")
    if np.any((tp < 0) | (tp > n_pos) | (fp < 0) | (fp > n_neg)):
        raise ValueError("need 0 <= tp <= n_pos and 0 <= fp <= n_neg")
    alpha = (1.0 - confidence) / 2.0
    tpr_lo = _cp_lower(tp, n_pos, alpha)  # < 1 always, since alpha > 0
    fpr_hi = _cp_upper(fp, n_neg, alpha)  # > 0 always
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_a = np.log(np.clip(tpr_lo - delta, 0.0, None) / fpr_hi)
        eps_b = np.log(np.clip(1.0 - fpr_hi - delta, 0.0, None) / (1.0 - tpr_lo))
    eps = np.maximum(np.maximum(eps_a, eps_b), 0.0)
    return float(eps) if eps.ndim == 0 else eps


def _split_halves(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(x.size)
    half = x.size // 2
    return x[perm[:half]], x[perm[half:]]


def best_threshold_epsilon_lower_bound(
    member_scores,
    nonmember_scores,
    delta: float = 1e-5,
    confidence: float = 0.95,
    *,
    holdout: bool = True,
    seed: int = 0,
) -> ThresholdAudit:
    """Scan thresholds "member iff score >= t" and report the best Clopper–Pearson ε lower bound.

    ``holdout=True`` (default): each score set is randomly halved (``seed``); the threshold that
    maximises the bound on the first halves is then evaluated once on the second halves, so the
    reported bound keeps its ``confidence`` guarantee (at the price of half the samples).
    ``holdout=False`` picks and evaluates the threshold on the same scores: this maximises over many
    correlated tests, so the bound is slightly optimistic (its true coverage is below ``confidence``);
    use it only for exploration. The threshold returned is the midpoint of the gap between selection
    scores that gives the best bound (ties: the highest such gap). Same independence assumption as
    :func:`epsilon_lower_bound_from_counts`.
    """
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    if holdout:
        if pos.size < 2 or neg.size < 2:
            raise ValueError("holdout=True needs at least 2 member and 2 non-member scores")
        rng = np.random.default_rng(seed)
        (pos_sel, pos_eval), (neg_sel, neg_eval) = _split_halves(pos, rng), _split_halves(neg, rng)
    else:
        pos_sel, pos_eval, neg_sel, neg_eval = pos, pos, neg, neg
    candidates = np.unique(np.concatenate([pos_sel, neg_sel]))[::-1]
    eps_sel = epsilon_lower_bound_from_counts(
        _counts_at_or_above(pos_sel, candidates), pos_sel.size,
        _counts_at_or_above(neg_sel, candidates), neg_sel.size, delta, confidence,
    )
    j = int(np.argmax(np.atleast_1d(eps_sel)))
    threshold = float(candidates[j])
    if j + 1 < candidates.size:  # any t in (next lower score, candidate] gives the same selection counts
        mid = 0.5 * (threshold + float(candidates[j + 1]))
        threshold = mid if mid > candidates[j + 1] else threshold
    tp = int(np.sum(pos_eval >= threshold))
    fp = int(np.sum(neg_eval >= threshold))
    eps = epsilon_lower_bound_from_counts(tp, pos_eval.size, fp, neg_eval.size, delta, confidence)
    n_pos, n_neg = pos_eval.size, neg_eval.size
    return ThresholdAudit(eps, threshold, tp / n_pos, fp / n_neg, n_pos, n_neg)


# ---------------------------------------------------------------------------------------------------
# 3. One-run canary audit (Steinke, Nasr, Jagielski 2023)
# ---------------------------------------------------------------------------------------------------


def _check_mrv(m: int, r: int, v: int) -> None:
    if not all(isinstance(x, (int, np.integer)) for x in (m, r, v)):
        raise ValueError(f"m, r, v must be integers, got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ v correct of r guesses] under the null "the mechanism is (ε, δ)-DP".

    Steinke–Nasr–Jagielski 2023, Theorem 3 (pure-DP case: Proposition 5): with f(k) = P[W ≥ k],
    W ~ Binomial(r, e^ε/(1 + e^ε)),  p = f(v) + 2·m·δ·max_{1≤i≤m} (f(v − i) − f(v)) / i,  capped at 1.
    For i ≥ v the numerator is the constant 1 − f(v), so the max is attained at some i ≤ v.
    """
    _check_mrv(m, r, v)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    p = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[W >= v]
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        gaps = np.cumsum(stats.binom.pmf(v - i, r, q))  # f(v - i) - f(v) = P[v - i <= W <= v - 1]
        p += 2.0 * m * delta * float(np.max(gaps / i))
    return min(p, 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95, *, tol: float = 1e-7
) -> float:
    """Largest ε (nats, ≥ 0) that the one-run test rejects at level β = 1 − ``confidence``.

    Setting (Steinke, Nasr, Jagielski, NeurIPS 2023, Sec. 3, Theorem 3): m canaries, each included in
    training independently with probability ½ (independent of everything else); after one run the
    auditor, looking only at the output, makes r ≤ m guesses (abstains on m − r) and v are correct.
    If the training algorithm is (ε, δ)-DP w.r.t. adding/removing one canary, then
    P[≥ v correct] ≤ :func:`one_run_p_value` (m, r, v, ε, δ); for δ = 0 the count of correct guesses
    is stochastically dominated by Binomial(r, e^ε/(1+e^ε)) (Proposition 5). ε is rejected when that
    p-value ≤ β. As in the paper's Appendix D we search ε numerically, but conservatively: we return
    the first crossing p(ε) = β (scan on a 0.25-nat grid, then bisection to ``tol``), so a δ term
    that made p(ε) non-monotone could not push the result past a non-rejected ε on the grid.
    Theorem numbering follows the NeurIPS version; the arXiv versions number some results differently.
    """
    _check_mrv(m, r, v)
    _check_delta_confidence(delta, confidence)
    beta = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, step = 0.0, 0.25
    while lo < _EPS_SEARCH_MAX and one_run_p_value(m, r, v, lo + step, delta) <= beta:
        lo += step
    hi = min(lo + step, _EPS_SEARCH_MAX)
    while hi - lo > tol:  # invariant: p(lo) <= beta < p(hi)
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def choose_guesses(canary_scores, k_pos: int, k_neg: int) -> np.ndarray:
    """Guesses in {+1 member, −1 non-member, 0 abstain}: the ``k_pos`` highest scores are guessed in,
    the ``k_neg`` lowest guessed out, the rest abstain (ties broken by position, stably)."""
    scores = _as_scores(canary_scores, "canary_scores")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > scores.size:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= {scores.size}, got {k_pos}, {k_neg}")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=np.int8)
    guesses[order[:k_pos]] = 1
    guesses[order[scores.size - k_neg:]] = -1
    return guesses


def score_guesses(guesses, is_member) -> tuple[int, int]:
    """(r, v): number of non-abstaining guesses and how many of them are correct."""
    g = np.asarray(guesses)
    member = np.asarray(is_member, dtype=bool)
    if g.shape != member.shape or g.ndim != 1 or not np.all(np.isin(g, (-1, 0, 1))):
        raise ValueError("guesses must be a 1-D array in {-1, 0, 1} with the same shape as is_member")
    truth = np.where(member, 1, -1)
    return int(np.count_nonzero(g)), int(np.sum(g == truth))


def one_run_audit(
    canary_scores, is_member, k_pos: int, k_neg: int, delta: float = 0.0, confidence: float = 0.95
) -> OneRunAudit:
    """Convenience: :func:`choose_guesses` → :func:`score_guesses` → :func:`one_run_epsilon_lower_bound`.

    ``k_pos``/``k_neg`` must be fixed before looking at ``is_member`` (choosing them to maximise the
    bound afterwards invalidates its confidence).
    """
    guesses = choose_guesses(canary_scores, k_pos, k_neg)
    r, v = score_guesses(guesses, is_member)
    m = guesses.size
    return OneRunAudit(one_run_epsilon_lower_bound(m, r, v, delta, confidence), m, r, v)
