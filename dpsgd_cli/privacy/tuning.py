"""What a private hyperparameter search spends (Papernot & Steinke, "Hyperparameter Tuning with Rényi
Differential Privacy", ICLR 2022). No TensorFlow.

The search runs a random number K of trials, K drawn from a secret key independently of the data; each
trial draws its hyperparameters from a fixed space (also from the key, independently of the data and of
the other trials), trains with DP-SGD and releases a noisy score; only the best-scoring trial is published.
Its RDP is dp-accounting's `RepeatAndSelectDpEvent(trial event, mean, shape)`:

* K's distribution (`TrialCount`): Poisson (shape ∞; K may be 0: nothing is published), or truncated
  negative binomial of shape η ≥ 0 — logarithmic (η = 0), geometric (η = 1), any other η > 0 —, all
  given by their mean (≥ 1, the range of dp-accounting's analysis).
* One trial (`TrialPrivacy`) is the feature-statistics releases (if any), `steps` Poisson-subsampled
  Gaussian steps and the score: a count with sensitivity 1 under add/remove-one adjacency plus Gaussian
  noise of std `score_noise_multiplier`. Its RDP curve is dp-accounting's `RdpAccountant` on that event.
* Trials whose candidates differ in (q, steps, σ): a trial is a random mixture of the candidates (with the
  drawn hyperparameters part of its output), and the Rényi divergence of such a mixture is at most the
  largest of its parts at each order. So the element-wise maximum of the candidates' RDP curves is an RDP
  curve of one trial; dp-accounting's repeat-and-select conversion (the very function its RdpAccountant
  applies to a `RepeatAndSelectDpEvent`) turns it into the search's RDP, and `compute_epsilon` into ε.

Calibration (`calibrate_search`): each distinct candidate first gets the smallest σ for which a search of
that candidate alone meets the target; then all are scaled by the smallest common factor (≥ 1) for which
the mixture does. With one candidate that is exactly the smallest σ of the whole search.

Randomness: the search key (a `RunKey`, secret by default) seeds K, the trials' hyperparameters and the
scores' noise (numpy generators, one stream each); trial i's own run key is derived from it
(`trial_key`), so no trial shares noise with another and a rerun of a trial repeats it exactly.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.accounting import NOISE_MULTIPLIER_MAX, NOISE_MULTIPLIER_MIN
from dpsgd_cli.privacy.dp_library import dp_module
from dpsgd_cli.privacy.run_key import KEY_BYTES, RunKey

# K's distribution → dp-accounting's shape (None: the truncated negative binomial's own shape)
DISTRIBUTIONS = {"poisson": math.inf, "logarithmic": 0.0, "geometric": 1.0,
                 "truncated_negative_binomial": None}
# Streams of the search key (a key used for nothing else, so they never meet a run key's streams)
STREAM_TRIAL_COUNT = 1
STREAM_TRIAL_SETTINGS = 2
STREAM_SCORE_NOISE = 3
CALIBRATION_RTOL = 1e-6  # calibrated σ (or scale) within this relative distance above the smallest valid
_TRIAL_KEY = b"dpsgd tune trial key v1\0"


# ---------------------------------------------------------------------------------------------------
# K, the number of trials


@dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials K: `distribution` (a key of DISTRIBUTIONS), its `mean`
    (≥ 1) and, for `truncated_negative_binomial`, its `shape` η ≥ 0."""

    distribution: str
    mean: float
    shape: float | None = None

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise AccountingInputError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                                       f"{self.distribution!r}", "distribution")
        if not (isinstance(self.mean, (int, float)) and 1 <= self.mean < math.inf):
            raise AccountingInputError(f"the mean number of trials must be ≥ 1 (the range of the analysis), "
                                       f"got {self.mean}", "mean")
        tnb = self.distribution == "truncated_negative_binomial"
        if tnb and not (self.shape is not None and 0 <= self.shape < math.inf):
            raise AccountingInputError(f"the truncated negative binomial needs a shape ≥ 0, got {self.shape}",
                                       "shape")
        if not tnb and self.shape is not None:
            raise AccountingInputError(f"a shape is only for truncated_negative_binomial, not for "
                                       f"{self.distribution}", "shape")

    @property
    def accounting_shape(self) -> float:
        """dp-accounting's `shape`: ∞ for Poisson, η for the truncated negative binomial family."""
        fixed = DISTRIBUTIONS[self.distribution]
        if fixed is not None:
            return fixed
        if self.shape is None:
            raise AccountingInputError(f"{self.distribution} needs a shape", "shape")
        return float(self.shape)

    @functools.cached_property
    def gamma(self) -> float:
        """γ of the truncated negative binomial family (the success probability), from the mean as
        dp-accounting's analysis computes it (so the K drawn is the K accounted); NaN for Poisson."""
        shape = self.accounting_shape
        if math.isinf(shape):
            return math.nan
        return float(dp_module("rdp").rdp_privacy_accountant._gamma_truncated_negative_binomial(shape,
                                                                                               self.mean))

    def sample(self, rng: np.random.Generator) -> int:
        """One K. Truncated negative binomial: P(K = k) ∝ (1 − γ)^k ∏_{l<k} (l + η)/(l + 1), k ≥ 1 (for
        η = 0 the logarithmic law (1 − γ)^k / (k log(1/γ)), for η = 1 the geometric γ(1 − γ)^(k−1)).
        Poisson: P(K = k) = e^(−μ) μ^k / k!, k ≥ 0."""
        shape = self.accounting_shape
        if math.isinf(shape):
            return int(rng.poisson(self.mean))
        gamma = self.gamma
        if gamma >= 1:  # mean 1: always one trial
            return 1
        if shape == 0:
            return int(rng.logseries(1 - gamma))
        if shape == 1:
            return int(rng.geometric(gamma))
        while True:  # the negative binomial (failures before η successes) conditioned on K ≥ 1
            k = int(rng.negative_binomial(shape, gamma))
            if k >= 1:
                return k

    def describe(self) -> str:
        """E.g. 'a truncated negative binomial distribution (shape 0.5) of mean 8'."""
        shape = f" (shape {self.shape:g})" if self.shape is not None else ""
        name = self.distribution.replace("_", " ")
        article = "an" if name[0] in "aeiou" else "a"
        return f"{article} {name} distribution{shape} of mean {self.mean:g}"


# ---------------------------------------------------------------------------------------------------
# One trial's privacy, and the search's


@dataclass(frozen=True)
class TrialPrivacy:
    """The privacy parameters of one candidate trial: `noise_multiplier` is the accounting σ (σ/2 for
    microbatches of > 1 example), `sampling_rate` q, `steps`, `releases` the noise multipliers of
    full-batch Gaussian mechanisms before training (feature statistics). The score is added by the
    functions below (its noise multiplier is the search's, the same for every trial)."""

    noise_multiplier: float
    sampling_rate: float
    steps: int
    releases: tuple[float, ...] = ()

    def with_noise(self, noise_multiplier: float) -> TrialPrivacy:
        return TrialPrivacy(noise_multiplier, self.sampling_rate, self.steps, self.releases)


def trial_event(trial: TrialPrivacy, score_noise_multiplier: float):
    """The dp-accounting event of one trial: its releases, its DP-SGD steps and its noisy score."""
    events = dp_module("dp_event")
    parts = [events.GaussianDpEvent(r) for r in trial.releases]
    if trial.steps:
        parts.append(accounting.training_event(trial.noise_multiplier, trial.sampling_rate, trial.steps))
    parts.append(events.GaussianDpEvent(score_noise_multiplier))
    return events.ComposedDpEvent(parts)


def check_trial(trial: TrialPrivacy, score_noise_multiplier: float, delta: float) -> None:
    """AccountingInputError unless the accountants take these numbers (σ > 0: a trial without noise
    has ε = ∞, refused rather than reported)."""
    if trial.noise_multiplier == 0:
        raise AccountingInputError("a trial without noise (σ = 0) has ε = ∞", "noise_multiplier")
    accounting.check_args(trial.noise_multiplier, trial.sampling_rate, delta)
    accounting.check_steps(trial.steps)
    named = [(r, "releases") for r in trial.releases] + [(score_noise_multiplier, "score_noise_multiplier")]
    for release, parameter in named:
        if not NOISE_MULTIPLIER_MIN <= release <= NOISE_MULTIPLIER_MAX:
            raise AccountingInputError(f"a release's noise multiplier must be in [{NOISE_MULTIPLIER_MIN:g}, "
                                       f"{NOISE_MULTIPLIER_MAX:g}], got {release:g}", parameter)


@functools.lru_cache(maxsize=4096)
def trial_rdp(trial: TrialPrivacy, score_noise_multiplier: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP) of one trial by dp-accounting's RdpAccountant (default orders, add/remove-one). An
    order whose RDP rounds below zero is left out (∞), as `accounting` does. Read-only arrays."""
    acc = accounting.make_accountant("rdp")
    with accounting._without_unconverged_warnings():
        acc.compose(trial_event(trial, score_noise_multiplier))
    # RdpAccountant keeps its orders and RDP as private attributes; the tests pin the result against it.
    orders, rdp = np.array(acc._orders, dtype=np.float64), np.array(acc._rdp, dtype=np.float64)
    rdp[rdp < 0] = np.inf
    orders.flags.writeable = rdp.flags.writeable = False
    return orders, rdp


def mixture_rdp(trials: Sequence[TrialPrivacy], score_noise_multiplier: float) -> tuple[np.ndarray,
                                                                                         np.ndarray]:
    """(orders, RDP) bounding a trial that runs any one of `trials` (chosen at random, independently of
    the data): the element-wise maximum of their curves."""
    if not trials:
        raise ValueError("no candidate trial")
    curves = [trial_rdp(t, score_noise_multiplier) for t in dict.fromkeys(trials)]
    orders = curves[0][0]
    return orders, np.max(np.stack([rdp for _, rdp in curves]), axis=0)


def repeat_and_select_rdp(orders: np.ndarray, rdp: np.ndarray, count: TrialCount) -> np.ndarray:
    """The RDP of running a trial of RDP `rdp` K ~ `count` times and releasing only the best: the
    conversion dp-accounting's RdpAccountant applies to a RepeatAndSelectDpEvent (Papernot & Steinke 2022,
    Theorems 2 and 6)."""
    convert = dp_module("rdp").rdp_privacy_accountant._compute_rdp_repeat_and_select
    return np.asarray(convert(orders, rdp, float(count.mean), count.accounting_shape), dtype=np.float64)


def search_epsilon(trials: Sequence[TrialPrivacy], score_noise_multiplier: float, count: TrialCount,
                   delta: float) -> float:
    """ε at δ of the whole search whose trials run any of `trials` (the candidates), by the RDP
    accountant."""
    for t in trials:
        check_trial(t, score_noise_multiplier, delta)
    orders, rdp = mixture_rdp(trials, score_noise_multiplier)
    return _epsilon(orders, repeat_and_select_rdp(orders, rdp, count), delta)


def naive_epsilon(ran: Sequence[TrialPrivacy], score_noise_multiplier: float, delta: float) -> float:
    """ε at δ of composing the trials that ran (each trial's curve added, as if every one were
    published): what the search would cost without the random count and the selection. 0 for none."""
    if not ran:
        return 0.0
    for t in ran:
        check_trial(t, score_noise_multiplier, delta)
    orders = trial_rdp(ran[0], score_noise_multiplier)[0]
    total = np.sum(np.stack([trial_rdp(t, score_noise_multiplier)[1] for t in ran]), axis=0)
    return _epsilon(orders, total, delta)


def score_alone_epsilon(score_noise_multiplier: float, count: TrialCount, delta: float) -> float:
    """ε of a search whose trials released only their scores: the least any search of these settings
    costs, however much noise the training gets."""
    events = dp_module("dp_event")
    acc = accounting.make_accountant("rdp")
    acc.compose(events.GaussianDpEvent(score_noise_multiplier))
    orders, rdp = np.array(acc._orders, dtype=np.float64), np.array(acc._rdp, dtype=np.float64)
    return _epsilon(orders, repeat_and_select_rdp(orders, rdp, count), delta)


def _epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    return float(dp_module("rdp").compute_epsilon(orders, rdp, delta)[0])


# ---------------------------------------------------------------------------------------------------
# Calibration


def calibrate_search(trials: Sequence[TrialPrivacy], score_noise_multiplier: float, count: TrialCount,
                     delta: float, target_epsilon: float) -> list[float]:
    """The accounting σ of each of `trials` (their own σ is ignored) so that the whole search has ε ≤
    `target_epsilon`: each distinct candidate gets the smallest σ for which a search of it alone meets the
    target, then all are multiplied by the smallest common factor for which the mixture does. With 0.1 %
    less noise on every candidate the search would exceed the target (the factor is found to
    CALIBRATION_RTOL). AccountingInputError when the target is out of reach."""
    if not 0 < target_epsilon < math.inf:
        raise AccountingInputError(f"target epsilon must be > 0, got {target_epsilon}", "target_epsilon")
    if not trials:
        raise ValueError("no candidate trial")
    floor = score_alone_epsilon(score_noise_multiplier, count, delta)
    if floor >= target_epsilon:
        raise AccountingInputError(
            f"ε = {target_epsilon:g} is spent by the scores alone: with score noise multiplier "
            f"{score_noise_multiplier:g} and {count.describe()}, the scores cost ε = {floor:.3g}; allow a "
            "larger ε or add noise to the scores", "target_epsilon")
    distinct = list(dict.fromkeys(t.with_noise(1.0) for t in trials))
    own: dict[TrialPrivacy, float] = {}
    for t in distinct:  # neighbouring candidates need similar σ: start each search from the last one
        def alone(s: float, t: TrialPrivacy = t) -> float:
            return search_epsilon([t.with_noise(s)], score_noise_multiplier, count, delta)

        own[t] = _smallest(alone, target_epsilon, start=own[next(reversed(own))] if own else 1.0)
    if len(distinct) > 1:
        def mixture(factor: float) -> float:
            scaled = [t.with_noise(own[t] * factor) for t in distinct]
            return search_epsilon(scaled, score_noise_multiplier, count, delta)

        factor = 1.0 if mixture(1.0) <= target_epsilon else _smallest(mixture, target_epsilon, low=1.0)
        own = {t: sigma * factor for t, sigma in own.items()}
    return [own[t.with_noise(1.0)] for t in trials]


def _smallest(eps: Callable[[float], float], target: float, *, start: float = 1.0,
              low: float | None = None) -> float:
    """The smallest x in [NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX] (or above `low`, where ε > target)
    with eps(x) ≤ target, to CALIBRATION_RTOL: eps falls as x grows. Bracketed by doubling or halving from
    `start` (or `low`), then Brent's method on log x; the returned x always meets the target."""
    from scipy.optimize import brentq

    seen: dict[float, float] = {}

    def noise_bound(x: float) -> float:
        if x not in seen:
            try:
                seen[x] = eps(x)
            except AccountingInputError:
                seen[x] = math.inf  # a σ the accountants do not take (below or above their range)
        return seen[x]

    if low is not None:
        high = low * 2
    else:
        high = min(max(start, NOISE_MULTIPLIER_MIN), NOISE_MULTIPLIER_MAX)
        low = high
    if noise_bound(high) <= target:
        while noise_bound(low) <= target:
            if low <= NOISE_MULTIPLIER_MIN:
                raise AccountingInputError(
                    f"ε = {target:g} is so large that even σ = {NOISE_MULTIPLIER_MIN:g}, the least noise the "
                    "accountants take, stays within it: a budget that large protects nothing; ask for a "
                    "smaller ε", "target_epsilon")
            high, low = low, max(low / 2, NOISE_MULTIPLIER_MIN)
    else:
        while noise_bound(high) > target:
            if high >= NOISE_MULTIPLIER_MAX:
                raise AccountingInputError(
                    f"ε = {target:g} is out of reach: even σ = {NOISE_MULTIPLIER_MAX:g}, the most noise the "
                    "accountants take, exceeds it; allow a larger ε", "target_epsilon")
            low, high = high, min(high * 2, NOISE_MULTIPLIER_MAX)
    root = math.exp(brentq(lambda y: min(noise_bound(math.exp(y)), 1e300) - target, math.log(low),
                           math.log(high), xtol=CALIBRATION_RTOL / 4))
    x = min(max(root, low), high)
    while noise_bound(x) > target:  # Brent stops within xtol of the crossing, on either side
        x = min(x * (1 + CALIBRATION_RTOL / 4), high)
    return x


# ---------------------------------------------------------------------------------------------------
# The score and the keys


def noisy_score(correct: int, score_noise_multiplier: float, rng: np.random.Generator) -> float:
    """The released score of a trial: its count of correct predictions (sensitivity 1 under
    add/remove-one adjacency) plus N(0, score_noise_multiplier²)."""
    return float(correct) + float(rng.normal(0.0, score_noise_multiplier))


def trial_key(search_key: RunKey, index: int) -> RunKey:
    """Trial `index`'s run key: SHA-256 of the search key and the index (same mode as the search key),
    so every trial has its own noise and batches and a rerun of a trial repeats it."""
    digest = hashlib.sha256(_TRIAL_KEY + search_key.material + int(index).to_bytes(8, "big")).digest()
    return RunKey(digest[:KEY_BYTES], search_key.mode)
