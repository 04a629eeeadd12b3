"""The smallest noise multiplier σ that keeps ε within a budget.

dp-accounting's `calibrate_dp_mechanism` (Brent's method on ε(σ) − target) runs over the very ε
`accounting.epsilon` reports: RDP by dp-accounting's `RdpAccountant`, PLD by `pld_composition`. Its bracket
is searched here, within the σ the accountants take ([NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX]): a
target that even the least noise meets, or that even the most noise misses, is an `AccountingInputError`
saying so, where dp-accounting's own search would give up with NoBracketIntervalFoundError. Each σ's ε is
computed once and cached — the bracket search, Brent's method and the final feasibility check ask for
some σ more than once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from dpsgd_cli.errors import AccountingInputError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.accounting import NOISE_MULTIPLIER_MAX, NOISE_MULTIPLIER_MIN
from dpsgd_cli.privacy.dp_library import dp_module

CALIBRATION_RTOL = 1e-5  # calibrated σ is within this relative distance above the smallest valid σ


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "rdp", microbatch_size: int = 1,
                               releases: tuple[float, ...] = ()) -> float:
    """Smallest σ (the one training uses) whose ε after `steps` steps at δ is ≤ `target_epsilon`.

    The returned σ has ε ≤ the target as `accounting.epsilon` computes it, and is within CALIBRATION_RTOL
    relative above the smallest such σ. PLD is bracketed by the RDP answer (PLD's ε is the tighter bound,
    so its σ is usually smaller). For microbatches of > 1 example the accountant sees σ/2, so the returned
    σ is twice the accounting σ. `releases`: full-batch Gaussian mechanisms composed with the steps (see
    `accounting.epsilon_curve`); what they spend is not left for the steps. AccountingInputError (a
    ValueError naming the input) for inputs the accountants do not take and for targets no σ they take can
    meet.
    """
    accounting.check_args(1.0, sampling_rate, delta)
    accounting.check_accountant(accountant)
    if not 0 < target_epsilon < math.inf:
        raise AccountingInputError(f"target epsilon must be > 0, got {target_epsilon}", "target_epsilon")
    if steps <= 0:
        raise AccountingInputError(f"steps must be ≥ 1, got {steps}", "steps")
    accounting.check_steps(steps)
    if accountant == "pld":
        accounting.check_pld_delta(delta)
    factor = 2.0 if microbatch_size > 1 else 1.0
    releases = tuple(float(r) for r in releases)
    if releases:
        alone = accounting.epsilon(1.0, sampling_rate, 0, delta, accountant, releases)
        if alone >= target_epsilon:
            raise AccountingInputError(
                f"ε = {target_epsilon:g} is spent before training: the releases made before it (noise "
                f"multipliers {', '.join(f'{r:g}' for r in releases)}) already cost ε = {alone:.3g}; allow a "
                "larger ε or add noise to the releases", "target_epsilon")
    sigma = _calibrate(float(target_epsilon), float(delta), float(sampling_rate), int(steps), accountant,
                       releases)
    return sigma * factor


@functools.lru_cache(maxsize=32)
def _calibrate(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
               accountant: str, releases: tuple[float, ...] = ()) -> float:
    sigma = _calibrate_one("rdp", target_epsilon, delta, sampling_rate, steps, guess=1.0, first_step=2.0,
                           releases=releases)
    if accountant == "pld":  # PLD needs less noise than RDP, usually 80-95%: first look just below it
        sigma = _calibrate_one("pld", target_epsilon, delta, sampling_rate, steps, guess=sigma,
                               first_step=1 / 0.7, releases=releases)
    return sigma


@functools.lru_cache(maxsize=256)
def _epsilon_at(sigma: float, sampling_rate: float, steps: int, delta: float, accountant: str,
                releases: tuple[float, ...] = ()) -> float:
    return accounting.epsilon(sigma, sampling_rate, steps, delta, accountant, releases)


class _EpsilonOfSigma:
    """Stands in for a dp-accounting accountant in `calibrate_dp_mechanism`, which calls only `ledger`,
    `compose` and `get_epsilon`: the "event" it composes is the accounting σ itself, and its ε is the
    cached `accounting.epsilon` at that σ."""

    def __init__(self, accountant: str, sampling_rate: float, steps: int, releases: tuple[float, ...] = ()):
        self.ledger = dp_module("dp_event").NoOpDpEvent()
        self.accountant, self.sampling_rate, self.steps = accountant, sampling_rate, steps
        self.releases = releases
        self.sigma = math.nan

    def compose(self, sigma: float) -> _EpsilonOfSigma:
        self.sigma = float(sigma)
        return self

    def get_epsilon(self, delta: float) -> float:
        return _epsilon_at(self.sigma, self.sampling_rate, self.steps, delta, self.accountant, self.releases)


def _calibrate_one(accountant: str, target: float, delta: float, sampling_rate: float, steps: int, *,
                   guess: float, first_step: float, releases: tuple[float, ...] = ()) -> float:
    """Smallest σ with ε ≤ target by `accountant`: bracket, Brent's method, then nudged to be feasible."""
    def eps(sigma: float) -> float:
        return _epsilon_at(sigma, sampling_rate, steps, delta, accountant, releases)

    low, high = _bracket(eps, target, guess, first_step, accountant)
    calibration = dp_module("mechanism_calibration")
    try:
        sigma = float(calibration.calibrate_dp_mechanism(
            lambda: _EpsilonOfSigma(accountant, sampling_rate, steps, releases), lambda s: s, target, delta,
            bracket_interval=calibration.ExplicitBracketInterval(low, high), tol=CALIBRATION_RTOL / 4 * low))
    except ValueError as exc:  # calibrate_dp_mechanism re-raises errors inside brentq as ValueError
        if isinstance(exc.__cause__, AccountingInputError):
            raise exc.__cause__ from None
        raise
    return _feasible(eps, sigma, target)


def _bracket(eps: Callable[[float], float], target: float, guess: float, first_step: float,
             accountant: str) -> tuple[float, float]:
    """(low, high) within [NOISE_MULTIPLIER_MIN, NOISE_MULTIPLIER_MAX], high ≤ 2·low, with ε(low) > target
    ≥ ε(high) (ε falls as σ grows). From `guess` the search steps by `first_step`, squaring the step each
    time (so the whole range is crossed in about ten ε), then halves the bracket in log scale."""
    guess = min(max(guess, NOISE_MULTIPLIER_MIN), NOISE_MULTIPLIER_MAX)
    step = first_step
    if eps(guess) > target:  # more noise needed
        low = guess
        while True:
            if low >= NOISE_MULTIPLIER_MAX:
                raise AccountingInputError(
                    f"ε = {target:g} is out of reach: even σ = {NOISE_MULTIPLIER_MAX:g}, the most noise the "
                    f"accountants take, gives ε = {eps(low):.3g} ({accountant.upper()}); allow a larger ε",
                    "target_epsilon")
            high = min(low * step, NOISE_MULTIPLIER_MAX)
            if eps(high) <= target:
                break
            low, step = high, step * step
    else:  # the guess is enough: is less noise?
        high = guess
        while True:
            if high <= NOISE_MULTIPLIER_MIN:
                raise AccountingInputError(
                    f"ε = {target:g} is so large that even σ = {NOISE_MULTIPLIER_MIN:g}, the least noise the "
                    f"accountants take, stays within it (ε = {eps(high):.3g}, {accountant.upper()}): a "
                    "budget that large protects nothing; ask for a smaller ε", "target_epsilon")
            low = max(high / step, NOISE_MULTIPLIER_MIN)
            if eps(low) > target:
                break
            high, step = low, step * step
    while high > 2 * low:
        middle = math.sqrt(low * high)
        if eps(middle) > target:
            low = middle
        else:
            high = middle
    return low, high


def _feasible(eps: Callable[[float], float], sigma: float, target: float) -> float:
    """σ, nudged up until its ε ≤ target (Brent's method stops within `tol` of the root, either side)."""
    step = CALIBRATION_RTOL * sigma / 4
    while eps(sigma) > target:
        sigma += step
    return sigma
