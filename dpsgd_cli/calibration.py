"""The smallest noise multiplier σ that keeps ε within a budget.

dp-accounting's `calibrate_dp_mechanism` (a bracket search, then Brent's method on ε(σ) − target) runs
over the very ε `accounting.epsilon` reports: RDP by dp-accounting's `RdpAccountant`, PLD by
`pld_composition`. Each σ's ε is computed once and cached — the bracket search, Brent's method and the
final feasibility check ask for some σ more than once, and each RDP ε costs about 50 ms.
"""

from __future__ import annotations

import functools
import math

from dpsgd_cli import accounting
from dpsgd_cli.dp_library import dp_module
from dpsgd_cli.pld_composition import PldTooLargeError

CALIBRATION_RTOL = 1e-5  # calibrated σ is within this relative distance above the smallest valid σ (σ ≥ 0.25)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "rdp", microbatch_size: int = 1) -> float:
    """Smallest σ (the one training uses) whose ε after `steps` steps at δ is ≤ `target_epsilon`.

    The returned σ has ε ≤ the target as `accounting.epsilon` computes it, and is within CALIBRATION_RTOL
    relative (2.5e-6 absolute for σ < 0.25) above the smallest such σ. PLD is bracketed by the RDP answer
    (PLD's ε is the tighter bound, so its σ is smaller). For microbatches of > 1 example the accountant
    sees σ/2, so the returned σ is twice the accounting σ.
    """
    accounting.check_args(1.0, sampling_rate, delta)
    accounting.check_accountant(accountant)
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


@functools.lru_cache(maxsize=256)
def _epsilon_at(sigma: float, sampling_rate: float, steps: int, delta: float, accountant: str) -> float:
    return accounting.epsilon(sigma, sampling_rate, steps, delta, accountant)


class _EpsilonOfSigma:
    """Stands in for a dp-accounting accountant in `calibrate_dp_mechanism`, which calls only `ledger`,
    `compose` and `get_epsilon`: the "event" it composes is the accounting σ itself, and its ε is the
    cached `accounting.epsilon` at that σ."""

    def __init__(self, accountant: str, sampling_rate: float, steps: int):
        self.ledger = dp_module("dp_event").NoOpDpEvent()
        self.accountant, self.sampling_rate, self.steps = accountant, sampling_rate, steps
        self.sigma = math.nan

    def compose(self, sigma: float) -> _EpsilonOfSigma:
        self.sigma = float(sigma)
        return self

    def get_epsilon(self, delta: float) -> float:
        return _epsilon_at(self.sigma, self.sampling_rate, self.steps, delta, self.accountant)


def _search(accountant: str, target: float, delta: float, sampling_rate: float, steps: int, bracket,
            tol: float) -> float:
    calibration = dp_module("mechanism_calibration")
    try:
        return float(calibration.calibrate_dp_mechanism(
            lambda: _EpsilonOfSigma(accountant, sampling_rate, steps), lambda sigma: sigma, target, delta,
            bracket_interval=bracket, tol=tol))
    except ValueError as exc:  # calibrate_dp_mechanism re-raises errors inside brentq as ValueError
        if isinstance(exc.__cause__, PldTooLargeError):
            raise exc.__cause__ from None
        raise


def _feasible(accountant: str, sigma: float, target: float, delta: float, sampling_rate: float,
              steps: int) -> float:
    """σ, nudged up until its ε ≤ target (Brent's method stops within `tol` of the root, either side)."""
    step = CALIBRATION_RTOL * max(sigma, 0.25) / 4
    while _epsilon_at(sigma, sampling_rate, steps, delta, accountant) > target:
        sigma += step
    return sigma


def _calibrate_rdp(target: float, delta: float, sampling_rate: float, steps: int) -> float:
    """Smallest σ with RDP ε ≤ target."""
    calibration = dp_module("mechanism_calibration")
    try:
        sigma = _search("rdp", target, delta, sampling_rate, steps,
                        calibration.LowerEndpointAndGuess(1e-4, 1.0), tol=CALIBRATION_RTOL / 4)
    except ValueError as exc:
        raise ValueError(f"cannot calibrate σ for ε ≤ {target}: {exc}") from None
    return _feasible("rdp", sigma, target, delta, sampling_rate, steps)


def _calibrate_pld(target: float, delta: float, sampling_rate: float, steps: int, sigma_rdp: float) -> float:
    """Smallest σ with PLD ε ≤ target, searched below `sigma_rdp` (which satisfies it)."""
    calibration = dp_module("mechanism_calibration")
    tol = CALIBRATION_RTOL * sigma_rdp / 2
    sigma = None
    for low in (0.7 * sigma_rdp, 0.25 * sigma_rdp):  # PLD needs less noise than RDP, usually 80-95%
        try:
            sigma = _search("pld", target, delta, sampling_rate, steps,
                            calibration.ExplicitBracketInterval(low, sigma_rdp), tol)
            break
        except PldTooLargeError:
            raise
        except ValueError:  # did not bracket the answer
            continue
    if sigma is None:
        sigma = _search("pld", target, delta, sampling_rate, steps,
                        calibration.LowerEndpointAndGuess(1e-3, sigma_rdp), tol)
    return _feasible("pld", sigma, target, delta, sampling_rate, steps)
