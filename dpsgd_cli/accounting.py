"""Privacy accounting: the ε of DP-SGD, with the numbers of Google's dp-accounting, fast enough for a CLI.

The mechanism of one DP-SGD step is the Poisson-subsampled Gaussian: each example is in the batch with
probability q, the clipped sum (sensitivity C under add/remove-one adjacency) gets N(0, (σC)²) noise.
With microbatches of k > 1 examples one example can move a clipped microbatch by 2C, so the step is
accounted as a Gaussian with noise multiplier σ/2.

Two accountants, both giving dp-accounting's numbers (tests check them against `RdpAccountant` and
`PLDAccountant` called on the same event):

* RDP: dp-accounting's `RdpAccountant` (default orders, add/remove-one adjacency), composed
  incrementally for a curve. Importing dp-accounting (scipy.stats, scipy.signal, scipy.optimize) takes
  1.4–2.2 s on a 2-core machine; it is imported lazily, only when an ε is asked for.
* PLD: dp-accounting's privacy loss distribution of one step (connect-the-dots, pessimistic, i.e. an
  upper bound, discretization 1e-4), composed k times the way `PrivacyLossDistribution.self_compose`
  does it — raise its discrete Fourier transform to the k-th power, keep the window outside which the
  Chernoff bound leaves at most 1e-15 of mass, and count that 1e-15 as infinite loss (pessimistic) — and
  ε read off with the same rule as `get_epsilon_for_delta`, vectorized. For an ε curve (one point per
  epoch) the transform is computed once at the length the last point needs and multiplied up from one
  point to the next, so each epoch costs one inverse FFT instead of a full composition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4  # value_discretization_interval of the PLD (dp-accounting's default)
PLD_TAIL_MASS = 1e-15  # mass a composition may move to infinite loss (dp-accounting's default)
CALIBRATION_RTOL = 1e-5  # calibrated σ is within this relative distance above the smallest valid σ
PLD_MAX_STEP_BINS = 1_000_000  # one step's PLD larger than this takes too long to build (σ very small)
PLD_MAX_BINS = 1 << 22  # compositions wider than this would take too much memory (σ very small)

def accounting_noise_multiplier(noise_multiplier: float, microbatch_size: int) -> float:
    """σ the accountant must use: σ for per-example clipping, σ/2 for microbatches of > 1 example."""
    return noise_multiplier / 2.0 if microbatch_size > 1 else noise_multiplier


def _check_args(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be ≥ 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class PldTooLargeError(ValueError):
    """The PLD at this σ would be too large to compute (σ so small that ε is huge anyway)."""


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


# ---------------------------------------------------------------------------------------------------
# dp-accounting events and accountants (for callers that want the library objects; imported lazily)


def step_event(noise_multiplier: float, sampling_rate: float):
    """One step as a dp-accounting event: Gaussian with multiplier `noise_multiplier` (already the
    accounting σ) on a Poisson sample at rate q. q = 1 means the full batch (no amplification)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def training_event(noise_multiplier: float, sampling_rate: float, steps: int):
    """`steps` compositions of `step_event`."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(step_event(noise_multiplier, sampling_rate), steps)


def make_accountant(accountant: str):
    """A fresh dp-accounting accountant (add/remove-one adjacency): 'rdp' or 'pld'."""
    _check_accountant(accountant)
    if accountant == "rdp":
        from dp_accounting import rdp

        return rdp.RdpAccountant()
    from dp_accounting import pld

    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


# ---------------------------------------------------------------------------------------------------
# RDP: dp-accounting's RdpAccountant (composition is exact addition of Rényi divergences)


def _rdp_epsilons(noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float) -> list[float]:
    """ε by dp-accounting's RdpAccountant after each entry of `steps` (composed incrementally)."""
    acc = make_accountant("rdp")
    done, found = 0, {}
    for k in sorted(set(steps)):
        if k > done:
            acc.compose(training_event(noise_multiplier, sampling_rate, k - done))
            done = k
        found[k] = 0.0 if k == 0 else float(acc.get_epsilon(delta))
    return [found[k] for k in steps]


# ---------------------------------------------------------------------------------------------------
# PLD: dp-accounting's PLD of one step, self-composed by powers of its Fourier transform


class _PmfPowers:
    """k-fold compositions of one dense PLD pmf of dp-accounting, for any k, as `self_compose` makes them.

    The transform is kept at a fixed length (grown when a larger k needs it) and, for increasing k,
    multiplied up from the previous k, so a curve of compositions costs one inverse FFT per point.
    """

    def __init__(self, pmf, tail_mass: float = PLD_TAIL_MASS):
        import numpy as np
        from scipy import special

        dense = pmf.to_dense_pmf()
        # dp-accounting's DensePLDPmf keeps these as private attributes; tests pin the behaviour.
        self.probs = np.asarray(dense._probs, dtype=np.float64)
        self.lower_loss = int(dense._lower_loss)
        self.infinity_mass = float(dense._infinity_mass)
        self.discretization = float(dense._discretization)
        self.tail_mass = tail_mass
        m = len(self.probs)
        # log moment generating function at the orders of common.compute_self_convolve_bounds
        self._orders = [float(o) for o in np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / m]
        index = np.arange(m)
        self._log_mgfs = [float(special.logsumexp(index * o, b=self.probs)) for o in self._orders]
        self._length = 0
        self._spectrum = None
        self._power = None
        self._count = 0
        self._step_powers: dict[int, object] = {}

    def bounds(self, k: int) -> tuple[int, int]:
        """Index range outside which the k-fold composition has at most `tail_mass` (Chernoff bound):
        dp-accounting's common.compute_self_convolve_bounds, with the log-MGFs computed once."""
        upper, lower = (len(self.probs) - 1) * k, 0
        for order, log_mgf in zip(self._orders, self._log_mgfs):
            bound = (k * log_mgf + math.log(2 / self.tail_mass)) / order
            if not math.isfinite(bound):
                continue
            if order > 0:
                upper = min(upper, math.ceil(bound))
            else:
                lower = max(lower, math.floor(bound))
        return lower, upper

    def reserve(self, k: int) -> None:
        """Size the transform for compositions of up to k steps."""
        lower, upper = self.bounds(k)
        self._resize(upper - lower + 1)

    def _resize(self, width: int) -> None:
        from scipy import fft

        length = fft.next_fast_len(max(width, len(self.probs)), real=True)
        if length <= self._length:
            return
        if length > PLD_MAX_BINS:
            raise PldTooLargeError(f"the composed PLD would need {length:,} bins (more than "
                                   f"{PLD_MAX_BINS:,}): too little noise for the PLD accountant; use the RDP "
                                   "accountant")
        self._length = length
        self._spectrum = fft.rfft(self.probs, length)
        self._power, self._count, self._step_powers = None, 0, {}

    def compose(self, k: int):
        """(index of the lowest loss, probabilities, infinity mass) of the k-fold composition."""
        import numpy as np
        from scipy import fft

        lower, upper = self.bounds(k)
        width = upper - lower + 1
        if width > self._length:
            self._resize(2 * width)
        if self._power is None or k < self._count:
            self._power = self._spectrum**k
        elif k > self._count:
            gap = k - self._count
            if gap not in self._step_powers:
                if len(self._step_powers) >= 4:
                    self._step_powers.clear()
                self._step_powers[gap] = self._spectrum**gap
            self._power = self._power * self._step_powers[gap]
        self._count = k
        circular = fft.irfft(self._power, self._length)
        start = lower % self._length  # the DFT wraps around: index j sits at j mod length
        probs = circular[start:start + width]
        if len(probs) < width:
            probs = np.concatenate((probs, circular[:width - len(probs)]))
        infinity = self.tail_mass - math.expm1(k * math.log1p(-self.infinity_mass))
        return self.lower_loss * k + lower, probs, infinity

    def epsilon(self, k: int, delta: float) -> float:
        lower, probs, infinity = self.compose(k)
        return pmf_epsilon_for_delta(lower, probs, infinity, self.discretization, delta)


def pmf_epsilon_for_delta(lower_index: int, probs, infinity_mass: float, discretization: float,
                          delta: float, chunk: int = 1 << 14) -> float:
    """Smallest ε whose hockey-stick divergence is ≤ δ for a pmf on losses (lower_index + i)·disc.

    The rule of dp-accounting's pld_pmf._get_epsilon_for_delta — a Python loop over the losses from the
    top that stops where ε is found — vectorized over chunks of losses, with cumulative sums in the
    same order of summation (so the same floating-point sums).
    """
    import numpy as np

    if infinity_mass > delta:
        return math.inf
    n = len(probs)
    reversed_probs = np.asarray(probs, dtype=np.float64)[::-1]
    mass_upper, mass_lower = float(infinity_mass), 0.0
    for start in range(0, n, chunk):
        p = reversed_probs[start:start + chunk]
        losses = (lower_index + n - 1 - np.arange(start, start + len(p))) * discretization  # descending
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            upper = np.cumsum(np.concatenate(([mass_upper], p)))  # upper[i]: mass before adding item i
            lower = np.cumsum(np.concatenate(([mass_lower], np.exp(-losses) * p)))
            before_u, before_l = upper[:-1], lower[:-1]
            ok = (before_u > delta) & (before_l > 0)
            ratio = np.where(ok, (before_u - delta) / np.where(ok, before_l, 1.0), 1.0)
            stop = ok & (np.log(ratio) >= losses)
            underflow = (upper[1:] >= delta) & (lower[1:] == 0)
        first_stop = int(np.argmax(stop)) if stop.any() else len(p)
        first_underflow = int(np.argmax(underflow)) if underflow.any() else len(p)
        if first_underflow < first_stop:
            return max(0.0, float(losses[first_underflow]))
        mass_upper, mass_lower = float(upper[first_stop]), float(lower[first_stop])
        if first_stop < len(p):
            break
    if mass_upper <= mass_lower + delta:
        return 0.0
    if mass_lower <= 0:
        return math.inf
    return math.log((mass_upper - delta) / mass_lower)


class _PldComposer:
    """ε by the PLD accountant after any number of steps of one (σ, q) step."""

    def __init__(self, noise_multiplier: float, sampling_rate: float):
        from dp_accounting.pld import privacy_loss_distribution

        self.noise_multiplier, self.sampling_rate = noise_multiplier, sampling_rate
        self._full_batch = sampling_rate >= 1.0
        if self._full_batch:
            return  # Gaussian without sampling: composes in closed form, see epsilon()
        _check_pld_size(noise_multiplier, sampling_rate)
        step = privacy_loss_distribution.from_gaussian_mechanism(
            noise_multiplier, sampling_prob=sampling_rate,
            value_discretization_interval=PLD_DISCRETIZATION, use_connect_dots=True)
        pmfs = [step._pmf_remove] if step._symmetric else [step._pmf_remove, step._pmf_add]
        self._powers = [_PmfPowers(p) for p in pmfs]

    def reserve(self, steps: int) -> None:
        if not self._full_batch:
            for p in self._powers:
                p.reserve(steps)

    def epsilon(self, steps: int, delta: float) -> float:
        if steps == 0:
            return 0.0
        if self._full_batch:
            # k Gaussian steps are one Gaussian with σ/√k: dp-accounting's PLDAccountant does the same.
            acc = make_accountant("pld")
            acc.compose(training_event(self.noise_multiplier, 1.0, steps))
            return float(acc.get_epsilon(delta))
        return max(p.epsilon(steps, delta) for p in self._powers)


def _check_pld_size(noise_multiplier: float, sampling_rate: float) -> None:
    """Refuse, before building it, a step PLD with more than PLD_MAX_STEP_BINS bins (the range of the
    privacy loss dp-accounting's connect-the-dots would discretize)."""
    from dp_accounting.pld import privacy_loss_mechanism as plm

    for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
        bounds = plm.GaussianPrivacyLoss(noise_multiplier, sampling_prob=sampling_rate,
                                         adjacency_type=adjacency).connect_dots_bounds()
        bins = (bounds.epsilon_upper - bounds.epsilon_lower) / PLD_DISCRETIZATION
        if bins > PLD_MAX_STEP_BINS:
            raise PldTooLargeError(f"σ = {noise_multiplier:g} at q = {sampling_rate:.6g} is too little noise "
                                   "for the PLD accountant (one step's PLD alone would need "
                                   f"{bins:,.0f} bins); use the RDP accountant")


def _pld_epsilons(noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float) -> list[float]:
    composer = _pld_composer(float(noise_multiplier), float(sampling_rate))
    composer.reserve(max(steps))
    return [composer.epsilon(k, delta) for k in steps]


# ---------------------------------------------------------------------------------------------------
# Public API


def epsilon_curve(noise_multiplier: float, sampling_rate: float, steps: Sequence[int], delta: float,
                  accountant: str = "rdp") -> list[float]:
    """ε after each number of steps in `steps` (best in increasing order), at δ; σ is the accounting σ.

    inf when σ = 0, 0 at 0 steps."""
    _check_args(noise_multiplier, sampling_rate, delta)
    _check_accountant(accountant)
    steps = [int(k) for k in steps]
    if any(k < 0 for k in steps):
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    if not steps:
        return []
    if noise_multiplier == 0:
        return [0.0 if k == 0 else math.inf for k in steps]
    if accountant == "rdp":
        return _rdp_epsilons(noise_multiplier, sampling_rate, steps, delta)
    if max(steps) == 0:
        return [0.0 for _ in steps]
    return _pld_epsilons(noise_multiplier, sampling_rate, steps, delta)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after `steps` steps at δ; inf when σ = 0, 0 when steps = 0."""
    return epsilon_curve(noise_multiplier, sampling_rate, [steps], delta, accountant)[0]


class PrivacyLedger:
    """ε spent so far, by both accountants, advanced as training runs.

    `noise_multiplier` is the accounting σ. ε is computed when asked (and cached for the current step
    count): RDP scales the per-step RDP computed once; PLD powers the per-step transform kept between
    calls, so asking after every epoch costs about one inverse FFT per epoch.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float,
                 total_steps: int | None = None):
        _check_args(noise_multiplier, sampling_rate, delta)
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.steps = 0
        self._total_steps = total_steps
        self._pld: _PldComposer | None = None
        self._cache: dict[tuple[str, int], float] = {}

    def advance(self, steps: int) -> None:
        """Account for `steps` more steps."""
        if steps > 0:
            self.steps += steps

    def epsilon(self, accountant: str) -> float:
        _check_accountant(accountant)
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        key = (accountant, self.steps)
        if key not in self._cache:
            if accountant == "rdp":
                value = _rdp_epsilons(self.noise_multiplier, self.sampling_rate, [self.steps], self.delta)[0]
            else:
                try:
                    if self._pld is None:
                        self._pld = _PldComposer(self.noise_multiplier, self.sampling_rate)
                        self._pld.reserve(max(self.steps, self._total_steps or 0))
                    value = self._pld.epsilon(self.steps, self.delta)
                except PldTooLargeError:  # σ so small that only the (huge) RDP ε is computable
                    value = math.inf
            self._cache[key] = value
        return self._cache[key]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "rdp", microbatch_size: int = 1) -> float:
    """Smallest σ (the one training uses) whose ε after `steps` steps is ≤ `target_epsilon`.

    The returned σ is within CALIBRATION_RTOL (relative) above the smallest valid σ, and its ε — as
    `epsilon` computes it — is ≤ the target. RDP: dp-accounting's `calibrate_dp_mechanism` with its
    `RdpAccountant`. PLD: `calibrate_dp_mechanism` again, with this module's PLD ε, bracketed by the RDP
    answer (PLD's ε is the tighter bound, so its σ is smaller).
    For microbatches of > 1 example the accountant sees σ/2, so the returned σ is twice the accounting σ.
    """
    _check_args(1.0, sampling_rate, delta)
    _check_accountant(accountant)
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    factor = 2.0 if microbatch_size > 1 else 1.0
    sigma = _calibrate(float(target_epsilon), float(delta), float(sampling_rate), int(steps), accountant)
    return sigma * factor


@functools.lru_cache(maxsize=32)
def _calibrate(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
               accountant: str) -> float:
    sigma = _calibrate_rdp(target_epsilon, delta, sampling_rate, steps)
    if accountant == "pld":
        sigma = _calibrate_pld(target_epsilon, delta, sampling_rate, steps, sigma)
    return sigma


def _calibrate_rdp(target: float, delta: float, sampling_rate: float, steps: int) -> float:
    """Smallest σ with RDP ε ≤ target (dp-accounting's `calibrate_dp_mechanism`), nudged up if needed."""
    import dp_accounting

    try:
        sigma = float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp"), lambda s: training_event(s, sampling_rate, steps), target, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-4, 1.0), tol=CALIBRATION_RTOL / 4))
    except ValueError as exc:
        raise ValueError(f"cannot calibrate σ for ε ≤ {target}: {exc}") from None
    while epsilon(sigma, sampling_rate, steps, delta, "rdp") > target:  # tolerance guard: stay feasible
        sigma *= 1 + CALIBRATION_RTOL / 4
    return sigma


class _PldAsAccountant:
    """The two methods of a dp-accounting accountant that `calibrate_dp_mechanism` calls, answering
    with this module's PLD ε (the "event" it composes is the accounting σ itself), so that repeated σ
    reuse their PLD and ε ≤ target holds for the ε this module reports."""

    def __init__(self, sampling_rate: float, steps: int):
        import dp_accounting

        self.ledger = dp_accounting.NoOpDpEvent()
        self.sampling_rate, self.steps, self.sigma = sampling_rate, steps, None

    def compose(self, sigma: float) -> _PldAsAccountant:
        self.sigma = sigma
        return self

    def get_epsilon(self, delta: float) -> float:
        return _pld_composer(float(self.sigma), self.sampling_rate).epsilon(self.steps, delta)


@functools.lru_cache(maxsize=4)
def _pld_composer(noise_multiplier: float, sampling_rate: float) -> _PldComposer:
    return _PldComposer(noise_multiplier, sampling_rate)


def _calibrate_pld(target: float, delta: float, sampling_rate: float, steps: int, sigma_rdp: float) -> float:
    import dp_accounting

    def search(bracket) -> float:
        try:
            return float(dp_accounting.calibrate_dp_mechanism(
                lambda: _PldAsAccountant(sampling_rate, steps), lambda s: s, target, delta,
                bracket_interval=bracket, tol=CALIBRATION_RTOL * sigma_rdp / 2))
        except ValueError as exc:  # calibrate_dp_mechanism re-raises errors inside brentq as ValueError
            if isinstance(exc.__cause__, PldTooLargeError):
                raise exc.__cause__ from None
            raise

    sigma = None
    for low in (0.7 * sigma_rdp, 0.25 * sigma_rdp):  # PLD needs less noise than RDP, usually 80-95%
        try:
            sigma = search(dp_accounting.ExplicitBracketInterval(low, sigma_rdp))
            break
        except PldTooLargeError:
            raise
        except ValueError:  # did not bracket the answer
            continue
    if sigma is None:
        sigma = search(dp_accounting.LowerEndpointAndGuess(1e-3, sigma_rdp))
    step = CALIBRATION_RTOL * sigma / 4
    while _pld_composer(sigma, sampling_rate).epsilon(steps, delta) > target:  # Brent's last resort
        sigma += step
    return sigma


# ---------------------------------------------------------------------------------------------------
# The guarantee in words


@dataclass(frozen=True)
class PrivacyFacts:
    """What an ε number assumes; rendered by `privacy_statement`.

    `epsilon_rdp` / `epsilon_pld`: None when that accountant was not asked. `l2_norm_clip`: None when
    unknown (a question asked on the command line). `source`: what the numbers describe — "run" (a
    finished training run), "config" (an experiment file, before running it) or "options" (numbers typed
    on the command line).
    """

    noise_multiplier: float
    accounting_noise_multiplier: float
    l2_norm_clip: float | None
    sampling_rate: float
    steps: int
    delta: float
    sampling: str
    microbatch_size: int
    epsilon_rdp: float | None
    epsilon_pld: float | None
    source: str = "run"


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.3g}"


def privacy_statement(f: PrivacyFacts) -> str:
    """The guarantee in plain words, with every assumption it rests on."""
    if f.epsilon_pld is not None:
        head = f"({_fmt(f.epsilon_pld)}, {f.delta:g})-DP by the PLD accountant"
        if f.epsilon_rdp is not None:
            head += f" (RDP accountant: ε = {_fmt(f.epsilon_rdp)})"
    elif f.epsilon_rdp is not None:
        head = f"({_fmt(f.epsilon_rdp)}, {f.delta:g})-DP by the RDP accountant"
    else:
        raise ValueError("PrivacyFacts needs epsilon_rdp or epsilon_pld")
    clip = f" on gradients clipped to L2 norm C = {f.l2_norm_clip:g}" if f.l2_norm_clip is not None else ""
    parts = [
        f"{head} under add/remove-one-example adjacency,",
        f"for {f.steps} steps of the Gaussian mechanism with noise multiplier σ = {f.noise_multiplier:g}"
        f"{clip},",
    ]
    if f.sampling_rate >= 1:
        parts.append("each step using the whole dataset (q = 1, no amplification by sampling).")
    else:
        parts.append(f"assuming Poisson sampling at rate q = {f.sampling_rate:.6g} (every example joins "
                     "every step independently with probability q).")
    if f.microbatch_size > 1:
        parts.append(f"Microbatches of {f.microbatch_size} examples double the sensitivity, so it is "
                     f"accounted with σ/2 = {f.accounting_noise_multiplier:g}.")
    if f.sampling == "shuffle":
        who = {"run": "The run used", "config": "The config uses"}.get(f.source, "You asked about")
        parts.append(f"{who} shuffled fixed-size batches, for which the Poisson analysis is an optimistic "
                     "assumption: the true ε of shuffling can be much larger (Chua et al., 2024).")
    elif f.sampling_rate >= 1:
        pass
    elif f.source == "run":
        parts.append("The run sampled its batches exactly so (Poisson, nothing dropped).")
    elif f.source == "config":
        parts.append("The config samples its batches exactly so (data.sampling: poisson, nothing dropped).")
    else:
        parts.append("With shuffled fixed-size batches instead, this Poisson analysis would be an "
                     "optimistic assumption (Chua et al., 2024).")
    return " ".join(parts)
