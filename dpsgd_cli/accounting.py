"""Privacy accounting with Google's dp-accounting: pure functions, no TensorFlow.

The mechanism of one DP-SGD step is the Poisson-subsampled Gaussian: each example is in the batch with
probability q, the clipped sum (sensitivity C under add/remove-one adjacency) gets N(0, (σC)²) noise.
With microbatches of k > 1 examples one example can move a clipped microbatch by 2C, so the step is
accounted as a Gaussian with noise multiplier σ/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
PLD_DISCRETIZATION = 1e-4


def accounting_noise_multiplier(noise_multiplier: float, microbatch_size: int) -> float:
    """σ the accountant must use: σ for per-example clipping, σ/2 for microbatches of > 1 example."""
    return noise_multiplier / 2.0 if microbatch_size > 1 else noise_multiplier


def step_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    """One step: Gaussian with multiplier `noise_multiplier` (already the accounting σ) on a Poisson
    sample at rate q. q = 1 means the full batch, i.e. no amplification by sampling."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def training_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` compositions of `step_event`."""
    return dp_accounting.SelfComposedDpEvent(step_event(noise_multiplier, sampling_rate), steps)


def make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant (add/remove-one adjacency): 'rdp' or 'pld'."""
    if accountant == "rdp":
        return rdp.RdpAccountant()
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after `steps` steps at δ; inf when σ = 0, 0 when steps = 0."""
    _check_args(noise_multiplier, sampling_rate, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(training_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def _check_args(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be ≥ 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class PrivacyLedger:
    """ε spent so far, both accountants, advanced step by step as training runs.

    RDP composes exactly by addition. PLD composes the step's PLD (built once) with itself; per
    advance it costs one convolution, so a per-epoch curve is cheap compared with recomputing.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float):
        _check_args(noise_multiplier, sampling_rate, delta)
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.steps = 0
        self._rdp = make_accountant("rdp")
        self._pld_step = None
        self._pld_total = None
        self._pld_cache: dict[int, object] = {}

    def advance(self, steps: int) -> None:
        """Account for `steps` more steps."""
        if steps <= 0:
            return
        self.steps += steps
        if self.noise_multiplier == 0:
            return
        self._rdp.compose(training_event(self.noise_multiplier, self.sampling_rate, steps))
        block = self._pld_block(steps)
        self._pld_total = block if self._pld_total is None else self._pld_total.compose(block)

    def _pld_block(self, steps: int):
        if steps not in self._pld_cache:
            if self._pld_step is None:
                self._pld_step = pld.privacy_loss_distribution.from_gaussian_mechanism(
                    self.noise_multiplier, sampling_prob=self.sampling_rate,
                    value_discretization_interval=PLD_DISCRETIZATION, use_connect_dots=True)
            self._pld_cache[steps] = self._pld_step.self_compose(steps)
        return self._pld_cache[steps]

    def epsilon(self, accountant: str) -> float:
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if accountant == "rdp":
            return float(self._rdp.get_epsilon(self.delta))
        if accountant == "pld":
            return float(self._pld_total.get_epsilon_for_delta(self.delta))
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "rdp", microbatch_size: int = 1) -> float:
    """Smallest σ (the one training uses) whose ε after `steps` steps is ≤ `target_epsilon`.

    Uses dp-accounting's mechanism calibration (bisection to a relative tolerance of 1e-4 on σ); for
    microbatches of > 1 example the accountant sees σ/2, so the returned σ is twice the accounting σ.
    """
    _check_args(1.0, sampling_rate, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    factor = 2.0 if microbatch_size > 1 else 1.0
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda s: training_event(s, sampling_rate, steps),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-5,
    )
    return float(sigma) * factor


@dataclass(frozen=True)
class PrivacyFacts:
    """What an ε number assumes; rendered by `privacy_statement`."""

    noise_multiplier: float
    accounting_noise_multiplier: float
    l2_norm_clip: float
    sampling_rate: float
    steps: int
    delta: float
    sampling: str
    microbatch_size: int
    epsilon_rdp: float
    epsilon_pld: float


def privacy_statement(f: PrivacyFacts) -> str:
    """The guarantee in plain words, with every assumption it rests on."""
    parts = [
        f"({f.epsilon_pld:.3g}, {f.delta:g})-DP by the PLD accountant "
        f"(RDP accountant: ε = {f.epsilon_rdp:.3g}) under add/remove-one-example adjacency,",
        f"for {f.steps} steps of the Gaussian mechanism with noise multiplier σ = {f.noise_multiplier:g} "
        f"on gradients clipped to L2 norm C = {f.l2_norm_clip:g},",
        f"assuming Poisson sampling at rate q = {f.sampling_rate:.6g}.",
    ]
    if f.microbatch_size > 1:
        parts.append(f"Microbatches of {f.microbatch_size} examples double the sensitivity, so it is "
                     f"accounted with σ/2 = {f.accounting_noise_multiplier:g}.")
    if f.sampling == "poisson":
        parts.append("The run sampled its batches exactly so (Poisson, nothing dropped).")
    else:
        parts.append("The run actually used shuffled fixed-size batches, for which the Poisson analysis is "
                     "an optimistic assumption: the true ε of shuffling can be much larger "
                     "(Chua et al., 2024).")
    return " ".join(parts)
