"""dpsgd_cli.privacy.pld_composition: the window bounds and the ε rule equal dp-accounting's on any pmf (the
composed ε themselves are checked against PLDAccountant in test_accounting)."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import pld
from dp_accounting.pld import common, pld_pmf

from dpsgd_cli.privacy import pld_composition


def test_pld_bounds_and_epsilon_rule_match_dp_accounting():
    step = pld.privacy_loss_distribution.from_gaussian_mechanism(1.0, sampling_prob=0.05)
    for pmf in (step._pmf_remove, step._pmf_add):
        powers = pld_composition.PmfPowers(pmf)
        for k in (1, 7, 100, 1000):
            assert powers.bounds(k) == common.compute_self_convolve_bounds(pmf._probs, k, 1e-15)
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        probs = rng.random(n) ** 8
        probs *= (1 - 1e-6 * (trial % 3)) / probs.sum()
        lower = int(rng.integers(-300, 50))
        infinity = [0.0, 1e-7, 1e-3][trial % 3]
        for delta in (1e-6, 1e-4, 1e-2, 0.3):
            expected = pld_pmf.DensePLDPmf(0.01, lower, probs, infinity, True).get_epsilon_for_delta(delta)
            got = pld_composition.pmf_epsilon_for_delta(lower, probs, infinity, 0.01, delta, chunk=37)
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (trial, delta)
