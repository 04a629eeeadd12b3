"""Privacy accounting: the ε of DP-SGD, with the numbers of Google's dp-accounting, fast enough for a CLI.

The mechanism of one DP-SGD step is the Poisson-subsampled Gaussian: each example is in the batch with
probability q, the clipped sum (sensitivity C under add/remove-one adjacency) gets N(0, (σC)²) noise.
With microbatches of k > 1 examples one example can move a clipped microbatch by 2C, so the step is
accounted as a Gaussian with noise multiplier σ/2.

Two accountants, both giving dp-accounting's numbers (tests check them against `RdpAccountant` and
`PLDAccountant` called on the same event):

* RDP: dp-accounting's `RdpAccountant` (default orders, add/remove-one adjacency): the RDP of one step is
  computed once and multiplied by the step count, as the accountant composes k identical steps, so a curve
  costs one RDP computation. It is imported through `dp_library`, without the rest of dp-accounting
  (whose PLD modules take 1.4–2.2 s to import on a 2-core machine).
* PLD: dp-accounting's privacy loss distribution of one step, composed by `pld_composition`.

The accountants take σ in [NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX] (or σ = 0: ε = ∞) and at most
MAX_STEPS steps; outside that their floating-point arithmetic breaks down (σ² underflows or overflows, the
rounding of each step's privacy loss adds up over the steps) and they would crash or report a wrong ε,
such as 0 for σ = 1e-160. Such inputs raise `AccountingInputError`, a ValueError that names the input.

Calibration of σ for a target ε is in `calibration`; the guarantee in words in `privacy_statement`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence

from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy.dp_library import dp_module
from dpsgd_cli.privacy.pld_composition import (
    PLD_DISCRETIZATION,
    PLD_MAX_CURVE_WORK,
    PLD_TAIL_MASS,
    PldComposer,
    PldTooLargeError,
    pld_composer,
)

ACCOUNTANTS = ("rdp", "pld")
NOISE_MULTIPLIER_MIN = 1e-4  # less noise: ε is astronomical (≈ 10⁷ or more per step) and σ² soon underflows
NOISE_MULTIPLIER_MAX = 1e6  # more noise is never needed, and the RDP of a step falls below rounding error
MAX_STEPS = 10**9  # more steps: the rounding error of one step's RDP (≈ 1e-16) times the steps starts to show


def accounting_noise_multiplier(noise_multiplier: float, microbatch_size: int) -> float:
    """σ the accountant must use: σ for per-example clipping, σ/2 for microbatches of > 1 example."""
    return noise_multiplier / 2.0 if microbatch_size > 1 else noise_multiplier


def check_args(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    """AccountingInputError (a ValueError) unless σ = 0 or NOISE_MULTIPLIER_MIN ≤ σ ≤ NOISE_MULTIPLIER_MAX,
    q in (0, 1] and δ in (0, 1)."""
    if not noise_multiplier >= 0:
        raise AccountingInputError(f"noise multiplier must be ≥ 0, got {noise_multiplier}",
                                   "noise_multiplier")
    if 0 < noise_multiplier < NOISE_MULTIPLIER_MIN:
        raise AccountingInputError(
            f"σ = {noise_multiplier:g} is below {NOISE_MULTIPLIER_MIN:g}, the least noise the accountants "
            f"take: ε is astronomical there (over 10⁷ per step), and below it their arithmetic breaks down",
            "noise_multiplier")
    if noise_multiplier > NOISE_MULTIPLIER_MAX:
        raise AccountingInputError(
            f"σ = {noise_multiplier:g} is above {NOISE_MULTIPLIER_MAX:g}, the most noise the accountants "
            "take (more is never needed; beyond it one step's privacy loss falls below their rounding error)",
            "noise_multiplier")
    if not 0 < sampling_rate <= 1:
        raise AccountingInputError(f"sampling rate must be in (0, 1], got {sampling_rate}", "sampling_rate")
    if not 0 < delta < 1:
        raise AccountingInputError(f"delta must be in (0, 1), got {delta}", "delta")


def check_steps(steps: int) -> None:
    """AccountingInputError unless 0 ≤ steps ≤ MAX_STEPS."""
    if not 0 <= steps <= MAX_STEPS:
        if steps < 0:
            raise AccountingInputError(f"steps must be ≥ 0, got {steps}", "steps")
        raise AccountingInputError(
            f"{steps:,} steps are more than the {MAX_STEPS:,} the accountants take (beyond that the rounding "
            "error of each step's privacy loss adds up)", "steps")


def check_accountant(accountant: str) -> None:
    """AccountingInputError unless `accountant` is one of ACCOUNTANTS."""
    if accountant not in ACCOUNTANTS:
        raise AccountingInputError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}",
                                   "accountant")


def check_pld_delta(delta: float) -> None:
    """AccountingInputError unless δ is above the tail mass the PLD accountant counts as infinite loss (at or
    below it, its ε is ∞ whatever the noise)."""
    if not delta > PLD_TAIL_MASS:
        raise AccountingInputError(
            f"δ = {delta:g} is not above {PLD_TAIL_MASS:g}, the probability the PLD accountant sets aside as "
            "infinite privacy loss, so its ε would be ∞; give a larger δ or use the RDP accountant", "delta")


# ---------------------------------------------------------------------------------------------------
# dp-accounting events and accountants (for callers that want the library objects; imported lazily)


def step_event(noise_multiplier: float, sampling_rate: float):
    """One step as a dp-accounting event: Gaussian with multiplier `noise_multiplier` (already the
    accounting σ) on a Poisson sample at rate q. q = 1 means the full batch (no amplification)."""
    events = dp_module("dp_event")
    gaussian = events.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gaussian
    return events.PoissonSampledDpEvent(sampling_rate, gaussian)


def training_event(noise_multiplier: float, sampling_rate: float, steps: int):
    """`steps` compositions of `step_event`."""
    return dp_module("dp_event").SelfComposedDpEvent(step_event(noise_multiplier, sampling_rate), steps)


def make_accountant(accountant: str):
    """A fresh dp-accounting accountant (add/remove-one adjacency): 'rdp' or 'pld'."""
    check_accountant(accountant)
    if accountant == "rdp":
        return dp_module("rdp").RdpAccountant()
    from dp_accounting import pld

    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


# ---------------------------------------------------------------------------------------------------
# RDP: dp-accounting's RdpAccountant (composition is exact addition of Rényi divergences)


class _UnconvergedOrders(logging.Filter):
    """Drops dp-accounting's warning that the series of a fractional RDP order did not converge: that order
    is then left out of the ε (an upper bound either way), nothing for the user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _without_unconverged_warnings() -> Iterator[None]:
    log, quiet = logging.getLogger("absl"), _UnconvergedOrders()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


@functools.lru_cache(maxsize=32)
def _rdp_of_one_step(noise_multiplier: float, sampling_rate: float):
    """(orders, RDP of one step at each order) by dp-accounting's RdpAccountant.

    An order whose RDP comes out below zero is set to ∞, i.e. left out, as dp-accounting leaves out orders
    whose series does not converge: the true RDP is ≥ 0, and a negative one is rounding error (tiny q, or
    σ²/q beyond 1e16), from which dp-accounting's `compute_epsilon` would report ε = 0."""
    import numpy as np

    acc = make_accountant("rdp")
    with _without_unconverged_warnings():
        acc.compose(step_event(noise_multiplier, sampling_rate))
    # RdpAccountant keeps its orders and RDP as private attributes; the tests pin that k·(this) is its ε.
    rdp = np.array(acc._rdp, dtype=np.float64)
    rdp[rdp < 0] = np.inf
    return np.array(acc._orders), rdp


def _rdp_epsilons(noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float) -> list[float]:
    """ε by dp-accounting's RdpAccountant after each entry of `steps`: k identical steps have k times the
    RDP of one (what `RdpAccountant.compose` of a self-composed event adds), converted by its
    `compute_epsilon`."""
    orders, per_step = _rdp_of_one_step(noise_multiplier, sampling_rate)
    compute_epsilon = dp_module("rdp").compute_epsilon
    found = {k: 0.0 if k == 0 else float(compute_epsilon(orders, k * per_step, delta)[0]) for k in set(steps)}
    return [found[k] for k in steps]


def _release_events(releases: Sequence[float]) -> list:
    return [dp_module("dp_event").GaussianDpEvent(r) for r in releases]


@functools.lru_cache(maxsize=8)
def _rdp_of_releases(releases: tuple[float, ...]):
    """(orders, RDP) of full-batch Gaussian releases by dp-accounting's RdpAccountant (the orders are
    `_rdp_of_one_step`'s: both use the accountant's defaults)."""
    import numpy as np

    acc = make_accountant("rdp")
    acc.compose(dp_module("dp_event").ComposedDpEvent(_release_events(releases)))
    return np.array(acc._orders), np.array(acc._rdp, dtype=np.float64)


def _epsilons_with_releases(noise_multiplier: float, sampling_rate: float, steps: Sequence[int], delta: float,
                            accountant: str, releases: tuple[float, ...]) -> list[float]:
    """ε after each entry of `steps` of DP-SGD composed with the full-batch Gaussian `releases` made before
    it. RDP: the releases' RDP added to k steps' (as RdpAccountant.compose adds them); PLD: dp-accounting's
    PLDAccountant on the ComposedDpEvent, directly (slower than `PldComposer`, exact by construction)."""
    events = dp_module("dp_event")
    found: dict[int, float] = {}
    for k in sorted(set(steps)):
        if noise_multiplier == 0 and k > 0:
            found[k] = math.inf
        elif accountant == "rdp":
            orders, total = _rdp_of_releases(releases)
            if k:
                step_orders, per_step = _rdp_of_one_step(noise_multiplier, sampling_rate)
                assert list(step_orders) == list(orders)
                total = total + k * per_step
            found[k] = float(dp_module("rdp").compute_epsilon(orders, total, delta)[0])
        else:
            parts = _release_events(releases)
            if k:
                parts.append(events.SelfComposedDpEvent(step_event(noise_multiplier, sampling_rate), k))
            found[k] = float(make_accountant("pld").compose(events.ComposedDpEvent(parts)).get_epsilon(delta))
    return [found[k] for k in steps]


def _pld_epsilons(noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float) -> list[float]:
    composer = pld_composer(noise_multiplier, sampling_rate)
    top = max(steps)
    composer.reserve(top)
    points = len({k for k in steps if k > 0})
    cost = composer.point_cost(top)
    if points > 1 and points * cost > PLD_MAX_CURVE_WORK:
        raise PldTooLargeError(
            f"a PLD curve of {points:,} points over up to {cost:,} bins each is more work than the "
            f"{PLD_MAX_CURVE_WORK:,} bins the PLD accountant takes for one curve; ask for fewer points, or "
            "use the RDP accountant for the curve", "curve")
    return [composer.epsilon(k, delta) for k in steps]


# ---------------------------------------------------------------------------------------------------
# Public API


def epsilon_curve(noise_multiplier: float, sampling_rate: float, steps: Sequence[int], delta: float,
                  accountant: str = "rdp", releases: Sequence[float] = ()) -> list[float]:
    """ε after each number of steps in `steps` (best in increasing order), at δ; σ is the accounting σ.

    `releases`: noise multipliers of full-batch Gaussian mechanisms (sensitivity 1 in units of their
    noise) run once before training (e.g. `feature_norm`), composed with the steps.
    inf when σ = 0, 0 at 0 steps (the releases' ε when there are any)."""
    check_args(noise_multiplier, sampling_rate, delta)
    check_accountant(accountant)
    steps = [int(k) for k in steps]
    for k in steps:
        check_steps(k)
    if accountant == "pld":
        check_pld_delta(delta)
    if not steps:
        return []
    if releases:
        return _epsilons_with_releases(noise_multiplier, sampling_rate, steps, delta, accountant,
                                       tuple(float(r) for r in releases))
    if noise_multiplier == 0:
        return [0.0 if k == 0 else math.inf for k in steps]
    if accountant == "rdp":
        return _rdp_epsilons(noise_multiplier, sampling_rate, steps, delta)
    if max(steps) == 0:
        return [0.0 for _ in steps]
    return _pld_epsilons(noise_multiplier, sampling_rate, steps, delta)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp", releases: Sequence[float] = ()) -> float:
    """ε after `steps` steps at δ (composed with `releases`, see `epsilon_curve`); inf when σ = 0, 0 when
    steps = 0 and there are no releases."""
    return epsilon_curve(noise_multiplier, sampling_rate, [steps], delta, accountant, releases)[0]


class PrivacyLedger:
    """ε spent so far, by both accountants, advanced as training runs.

    `noise_multiplier` is the accounting σ. ε is computed when asked (and cached for the current step
    count): RDP scales the per-step RDP computed once; PLD powers the per-step transform kept between
    calls, so asking after every epoch costs about one inverse FFT per epoch.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float,
                 total_steps: int | None = None, releases: Sequence[float] = ()):
        check_args(noise_multiplier, sampling_rate, delta)
        self.releases = tuple(float(r) for r in releases)  # full-batch Gaussians before the first step
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.steps = 0
        self._total_steps = total_steps
        self._pld: PldComposer | None = None
        self._cache: dict[tuple[str, int], float] = {}

    @classmethod
    def for_event(cls, event, delta: float, total_steps: int | None = None,
                  releases: Sequence[float] = ()) -> PrivacyLedger:
        """A ledger that composes `event` (one step's `step_event`: a Gaussian, possibly Poisson-sampled)
        once per `advance`d step, after the full-batch Gaussian `releases` (see `epsilon_curve`)."""
        q = getattr(event, "sampling_probability", 1.0)
        gaussian = getattr(event, "event", event)
        return cls(gaussian.noise_multiplier, q, delta, total_steps, releases)

    def advance(self, steps: int) -> None:
        """Account for `steps` more steps."""
        if steps > 0:
            self.steps += steps

    def epsilon(self, accountant: str, steps: int | None = None) -> float:
        """ε after the steps accounted so far, or after `steps` steps (e.g. to look one epoch ahead)."""
        check_accountant(accountant)
        steps = self.steps if steps is None else int(steps)
        if self.releases:
            key = (accountant, steps)
            if key not in self._cache:
                self._cache[key] = epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta,
                                           accountant, self.releases)
            return self._cache[key]
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        key = (accountant, steps)
        if key not in self._cache:
            if accountant == "rdp":
                value = _rdp_epsilons(self.noise_multiplier, self.sampling_rate, [steps], self.delta)[0]
            else:
                try:
                    if self._pld is None:
                        self._pld = PldComposer(self.noise_multiplier, self.sampling_rate)
                        self._pld.reserve(max(steps, self._total_steps or 0))
                    value = self._pld.epsilon(steps, self.delta)
                except PldTooLargeError:  # σ so small that only the (huge) RDP ε is computable
                    value = math.inf
            self._cache[key] = value
        return self._cache[key]




