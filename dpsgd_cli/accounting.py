"""Privacy accounting: the ε of DP-SGD, with the numbers of Google's dp-accounting, fast enough for a CLI.

The mechanism of one DP-SGD step is the Poisson-subsampled Gaussian: each example is in the batch with
probability q, the clipped sum (sensitivity C under add/remove-one adjacency) gets N(0, (σC)²) noise.
With microbatches of k > 1 examples one example can move a clipped microbatch by 2C, so the step is
accounted as a Gaussian with noise multiplier σ/2.

Two accountants, both giving dp-accounting's numbers (tests check them against `RdpAccountant` and
`PLDAccountant` called on the same event):

* RDP: dp-accounting's `RdpAccountant` (default orders, add/remove-one adjacency), composed
  incrementally for a curve. It is imported through `dp_library`, without the rest of dp-accounting
  (whose PLD modules take 1.4–2.2 s to import on a 2-core machine).
* PLD: dp-accounting's privacy loss distribution of one step, composed by `pld_composition`.

Calibration of σ for a target ε is in `calibration`; the guarantee in words in `privacy_statement`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dpsgd_cli.dp_library import dp_module
from dpsgd_cli.pld_composition import PLD_DISCRETIZATION, PldComposer, PldTooLargeError, pld_composer

ACCOUNTANTS = ("rdp", "pld")


def accounting_noise_multiplier(noise_multiplier: float, microbatch_size: int) -> float:
    """σ the accountant must use: σ for per-example clipping, σ/2 for microbatches of > 1 example."""
    return noise_multiplier / 2.0 if microbatch_size > 1 else noise_multiplier


def check_args(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    """ValueError unless σ ≥ 0, q in (0, 1] and δ in (0, 1)."""
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be ≥ 0, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def check_accountant(accountant: str) -> None:
    """ValueError unless `accountant` is one of ACCOUNTANTS."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


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


def _pld_epsilons(noise_multiplier: float, sampling_rate: float, steps: Sequence[int],
                  delta: float) -> list[float]:
    composer = pld_composer(noise_multiplier, sampling_rate)
    composer.reserve(max(steps))
    return [composer.epsilon(k, delta) for k in steps]


# ---------------------------------------------------------------------------------------------------
# Public API


def epsilon_curve(noise_multiplier: float, sampling_rate: float, steps: Sequence[int], delta: float,
                  accountant: str = "rdp") -> list[float]:
    """ε after each number of steps in `steps` (best in increasing order), at δ; σ is the accounting σ.

    inf when σ = 0, 0 at 0 steps."""
    check_args(noise_multiplier, sampling_rate, delta)
    check_accountant(accountant)
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
        check_args(noise_multiplier, sampling_rate, delta)
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.steps = 0
        self._total_steps = total_steps
        self._pld: PldComposer | None = None
        self._cache: dict[tuple[str, int], float] = {}

    @classmethod
    def for_event(cls, event, delta: float, total_steps: int | None = None) -> PrivacyLedger:
        """A ledger that composes `event` (one step's `step_event`: a Gaussian, possibly Poisson-sampled)
        once per `advance`d step."""
        q = getattr(event, "sampling_probability", 1.0)
        gaussian = getattr(event, "event", event)
        return cls(gaussian.noise_multiplier, q, delta, total_steps)

    def advance(self, steps: int) -> None:
        """Account for `steps` more steps."""
        if steps > 0:
            self.steps += steps

    def epsilon(self, accountant: str, steps: int | None = None) -> float:
        """ε after the steps accounted so far, or after `steps` steps (e.g. to look one epoch ahead)."""
        check_accountant(accountant)
        steps = self.steps if steps is None else int(steps)
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




