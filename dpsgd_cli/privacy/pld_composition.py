"""The PLD accountant's ε for DP-SGD: dp-accounting's privacy loss distribution of one step, composed
any number of times by powers of its Fourier transform.

dp-accounting builds the PLD of one Poisson-subsampled Gaussian step (connect-the-dots, pessimistic, i.e.
an upper bound, discretization 1e-4). It is composed k times the way `PrivacyLossDistribution.
self_compose` does it — raise its discrete Fourier transform to the k-th power, keep the window outside
which the Chernoff bound leaves at most 1e-15 of mass, and count that 1e-15 as infinite loss
(pessimistic) — and ε is read off with the same rule as `get_epsilon_for_delta`, vectorized. For an ε
curve (one point per epoch) the transform is computed once at the length the last point needs and
multiplied up from one point to the next, so each epoch costs one inverse FFT instead of a full
composition. Tests check every number against `PLDAccountant` called on the same event.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy.dp_library import dp_module

if TYPE_CHECKING:
    from numpy.typing import NDArray

PLD_DISCRETIZATION = 1e-4  # value_discretization_interval of the PLD (dp-accounting's default)
PLD_TAIL_MASS = 1e-15  # mass a composition may move to infinite loss (dp-accounting's default)
PLD_MAX_STEP_BINS = 1_000_000  # one step's PLD larger than this takes too long to build (σ very small)
PLD_MAX_BINS = 1 << 22  # compositions wider than this would take too much memory (σ very small)
PLD_MAX_CURVE_WORK = 200_000_000  # points × bins of one ε curve: each point is an inverse FFT (≈ 20 s here)


class PldTooLargeError(AccountingInputError):
    """The PLD at this σ, after this many steps, would be too large to compute: too little noise or too many
    steps for the PLD accountant (only the RDP accountant answers there; ε is huge anyway when σ is that
    small). `parameter` is "accountant", or "curve" when only the number of curve points is too large."""

    def __init__(self, message: str, parameter: str = "accountant"):
        super().__init__(message, parameter)


class PmfPowers:
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
        self._spectrum: NDArray | None = None  # set by _resize, which the first compose calls
        self._power: NDArray | None = None
        self._count = 0
        self._step_powers: dict[int, NDArray] = {}

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
        self._resize(upper - lower + 1, k)

    def _resize(self, width: int, k: int) -> None:
        from scipy import fft

        length = fft.next_fast_len(max(width, len(self.probs)), real=True)
        if length <= self._length:
            return
        if length > PLD_MAX_BINS:
            raise PldTooLargeError(f"the PLD composed over {k:,} steps would need {length:,} bins (more than "
                                   f"{PLD_MAX_BINS:,}): too little noise for that many steps for the PLD "
                                   "accountant; use the RDP accountant")
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
            self._resize(2 * width, k)
        spectrum = self._spectrum
        if spectrum is None:  # cannot happen: the length starts at 0, so the first call resizes
            raise RuntimeError("PmfPowers.compose: no transform")
        if self._power is None or k < self._count:
            self._power = spectrum**k
        elif k > self._count:
            gap = k - self._count
            if gap not in self._step_powers:
                if len(self._step_powers) >= 4:
                    self._step_powers.clear()
                self._step_powers[gap] = spectrum**gap
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


class PldComposer:
    """ε by the PLD accountant after any number of steps of one (σ, q) step."""

    def __init__(self, noise_multiplier: float, sampling_rate: float):
        from dp_accounting.pld import privacy_loss_distribution

        self.noise_multiplier, self.sampling_rate = noise_multiplier, sampling_rate
        self._full_batch = sampling_rate >= 1.0
        if self._full_batch:
            return  # Gaussian without sampling: composes in closed form, see epsilon()
        check_pld_size(noise_multiplier, sampling_rate)
        step = privacy_loss_distribution.from_gaussian_mechanism(
            noise_multiplier, sampling_prob=sampling_rate,
            value_discretization_interval=PLD_DISCRETIZATION, use_connect_dots=True)
        pmfs = [step._pmf_remove] if step._symmetric else [step._pmf_remove, step._pmf_add]
        self._powers = [PmfPowers(p) for p in pmfs]

    def reserve(self, steps: int) -> None:
        """Prepare for compositions of up to `steps` steps; PldTooLargeError if they would be too large."""
        if self._full_batch:
            if steps > 0:
                self._check_full_batch(steps)
            return
        for p in self._powers:
            p.reserve(steps)

    def point_cost(self, steps: int) -> int:
        """Bins one ε after up to `steps` steps works through (after `reserve(steps)`): the transform length
        of each composed pmf, or for full batches the bins of the Gaussian PLD built for each point."""
        if self._full_batch:
            return math.ceil(_gaussian_pld_bins(self.noise_multiplier / math.sqrt(max(steps, 1)), 1.0))
        return sum(p._length for p in self._powers)

    def _check_full_batch(self, steps: int) -> None:
        """k full-batch steps are one Gaussian with σ/√k, whose PLD grows as √k/σ: refuse it before it is
        built (at σ/√k = 0.03 it would already take tens of seconds and gigabytes)."""
        sigma = self.noise_multiplier / math.sqrt(steps)
        bins = _gaussian_pld_bins(sigma, 1.0)
        if bins > PLD_MAX_STEP_BINS:
            many = f"{steps:,} full-batch steps" if steps > 1 else "1 full-batch step"
            verb = "compose to" if steps > 1 else "is"
            raise PldTooLargeError(f"{many} at σ = {self.noise_multiplier:g} {verb} "
                                   f"one Gaussian with σ/√steps = {sigma:.3g}, whose PLD would need "
                                   f"{bins:,.0f} bins (more than {PLD_MAX_STEP_BINS:,}): too little noise "
                                   "for the PLD accountant; use the RDP accountant")

    def epsilon(self, steps: int, delta: float) -> float:
        if steps == 0:
            return 0.0
        if self._full_batch:
            # k Gaussian steps are one Gaussian with σ/√k: dp-accounting's PLDAccountant does the same.
            from dp_accounting import pld

            self._check_full_batch(steps)
            events = dp_module("dp_event")
            acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
            acc.compose(events.SelfComposedDpEvent(events.GaussianDpEvent(self.noise_multiplier), steps))
            return float(acc.get_epsilon(delta))
        return max(p.epsilon(steps, delta) for p in self._powers)


def _gaussian_pld_bins(noise_multiplier: float, sampling_rate: float) -> float:
    """Bins of the PLD dp-accounting's connect-the-dots would build for one (σ, q) Gaussian step: the range
    of its privacy loss over the discretization, the larger of the two adjacencies."""
    from dp_accounting.pld import privacy_loss_mechanism as plm

    bins = 0.0
    for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
        bounds = plm.GaussianPrivacyLoss(noise_multiplier, sampling_prob=sampling_rate,
                                         adjacency_type=adjacency).connect_dots_bounds()
        bins = max(bins, (bounds.epsilon_upper - bounds.epsilon_lower) / PLD_DISCRETIZATION)
    return bins


def check_pld_size(noise_multiplier: float, sampling_rate: float) -> None:
    """Refuse, before building it, a step PLD with more than PLD_MAX_STEP_BINS bins (the range of the
    privacy loss dp-accounting's connect-the-dots would discretize)."""
    bins = _gaussian_pld_bins(noise_multiplier, sampling_rate)
    if bins > PLD_MAX_STEP_BINS:
        raise PldTooLargeError(f"σ = {noise_multiplier:g} at q = {sampling_rate:.6g} is too little noise "
                               "for the PLD accountant (one step's PLD alone would need "
                               f"{bins:,.0f} bins); use the RDP accountant")


@functools.lru_cache(maxsize=4)
def pld_composer(noise_multiplier: float, sampling_rate: float) -> PldComposer:
    """A `PldComposer`, kept for the last few (σ, q) asked (calibration asks for the same σ again)."""
    return PldComposer(float(noise_multiplier), float(sampling_rate))
