"""Poisson and shuffle sampling against independent references: the Binomial law of batch sizes and of
each example's count, pairwise independence of steps, hand-computed epoch boundaries; and the key: batches
are a function of the run key, never of the public seed."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.privacy.sampling import Sampler, poisson_capacity, steps_after_epochs, steps_in_epoch


def _key(seed: int = 0, label: str = ""):
    return new_run_key(reproducible=True, seed=seed, label=label)


def _memberships(sampler: Sampler, epochs) -> np.ndarray:
    """[steps, population] 0/1 matrix: which examples each step used (all chunks)."""
    rows = []
    for epoch in epochs:
        for batch in sampler.epoch(epoch):
            row = np.zeros(sampler.population, np.int64)
            for idx, mask in batch.chunks:
                np.add.at(row, idx[mask > 0], 1)
            rows.append(row)
    return np.array(rows)


def test_poisson_inclusion_rate_is_q_and_counts_are_binomial():
    n, b = 2000, 50
    sampler = Sampler(sampling="poisson", batch_size=b, dataset_size=n, key=_key(1))
    member = _memberships(sampler, range(1, 6))
    steps, q = len(member), b / n
    assert member.max() == 1  # an example is never sampled twice in one step
    rate = member.mean()
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / member.size), (rate, q)
    # each example's count over the steps is Binomial(steps, q): a chi-square goodness-of-fit test
    counts = member.sum(axis=0)
    top = int(stats.binom.ppf(0.999, steps, q))
    observed = np.bincount(np.minimum(counts, top), minlength=top + 1)
    expected = stats.binom.pmf(np.arange(top + 1), steps, q) * n
    expected[-1] += stats.binom.sf(top, steps, q) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_poisson_batch_sizes_are_binomial_n_q():
    n, b = 1000, 100
    sampler = Sampler(sampling="poisson", batch_size=b, dataset_size=n, key=_key(2))
    sizes = np.array([batch.size for epoch in range(1, 41) for batch in sampler.epoch(epoch)])
    assert len(sizes) == 400
    assert abs(sizes.mean() - b) < 5 * math.sqrt(b * (1 - b / n) / len(sizes))
    assert abs(sizes.var() / (b * (1 - b / n)) - 1) < 0.3  # the sample variance's sd is ≈ 7% here
    assert stats.kstest(sizes, stats.binom(n, b / n).cdf).pvalue > 1e-3  # conservative for a discrete law


def test_steps_are_independent():
    """Under Poisson sampling two steps share an example with probability q²: P(in t and in t+1) = q²."""
    n, b = 1000, 200
    member = _memberships(Sampler(sampling="poisson", batch_size=b, dataset_size=n, key=_key(3)),
                          range(1, 11)).astype(float)
    q = b / n
    both = (member[:-1] * member[1:]).mean()
    se = math.sqrt(q * q * (1 - q * q) / member[1:].size)
    assert abs(both - q * q) < 6 * se, (both, q * q)


def test_batches_depend_on_the_key_not_the_seed():
    def batches(key, sampling):
        s = Sampler(sampling=sampling, batch_size=32, dataset_size=500, key=key)
        return [idx[mask > 0].tolist() for b in s.epoch(2) for idx, mask in b.chunks]

    for sampling in ("poisson", "shuffle"):
        assert batches(_key(3), sampling) == batches(_key(3), sampling)
        assert batches(_key(3), sampling) != batches(_key(4), sampling)
        assert batches(_key(3, "a"), sampling) != batches(_key(3, "b"), sampling)  # sweep points differ
        fresh = [new_run_key(reproducible=False, seed=3) for _ in range(2)]
        assert batches(fresh[0], sampling) != batches(fresh[1], sampling)  # same seed, secret keys


def test_population_smaller_than_n_keeps_rate_b_over_n():
    """With canaries only the included ones are present, yet q stays B/(n + m)."""
    sampler = Sampler(sampling="poisson", batch_size=40, dataset_size=1000, population=900, key=_key(5))
    member = _memberships(sampler, range(1, 21))
    assert member.shape[1] == 900 and sampler.sampling_rate == 40 / 1000
    assert abs(member.mean() - 0.04) < 5 * math.sqrt(0.04 * 0.96 / member.size)
    with pytest.raises(ValueError, match="population"):
        Sampler(sampling="shuffle", batch_size=40, dataset_size=1000, population=900, key=_key(5))


def test_padding_masks_and_overflow_chunks_keep_every_example():
    sampler = Sampler(sampling="poisson", batch_size=100, dataset_size=1000, key=_key())
    chosen = np.arange(0, 1000, 3)  # 334 examples: more than the capacity
    chunks = sampler.pad(chosen)
    assert len(chunks) == math.ceil(len(chosen) / sampler.capacity)
    assert all(idx.shape == (sampler.capacity,) and mask.shape == (sampler.capacity,) for idx, mask in chunks)
    kept = np.concatenate([idx[mask > 0] for idx, mask in chunks])
    np.testing.assert_array_equal(kept, chosen)
    empty = sampler.pad(np.array([], dtype=np.int64))
    assert len(empty) == 1 and empty[0][1].sum() == 0


def test_capacity_makes_overflow_rare():
    n, b = 60000, 256
    cap = poisson_capacity(b, n)
    assert cap == 288  # 256 + ⌈2·√(256·(1 − 256/60000))⌉ = 256 + 32, a multiple of 8
    assert stats.binom.sf(cap, n, b / n) < 0.05


def test_shuffle_is_a_permutation_of_full_batches():
    sampler = Sampler(sampling="shuffle", batch_size=64, dataset_size=1000, key=_key())
    batches = list(sampler.epoch(1))
    assert len(batches) == 1000 // 64
    seen = np.concatenate([b.chunks[0][0] for b in batches])
    assert len(set(seen.tolist())) == len(seen) == 15 * 64
    assert all(b.chunks[0][1].all() for b in batches)


@pytest.mark.parametrize("n,b,boundaries", [
    (1000, 64, [16, 32, 47, 63]),  # e·1000/64 = 15.625 e, rounded up
    (512, 64, [8, 16, 24, 32]),
    (60000, 256, [235, 469, 704, 938]),  # 234.375 e
])
def test_epoch_boundaries_are_ceil_e_n_over_b(n, b, boundaries):
    assert boundaries == [math.ceil(Fraction(e * n, b)) for e in (1, 2, 3, 4)]  # the reference itself
    assert [steps_after_epochs(e, b, n, "poisson") for e in (1, 2, 3, 4)] == boundaries
    assert [steps_in_epoch(e, b, n, "poisson") for e in (1, 2, 3, 4)] == list(np.diff([0, *boundaries]))
    assert steps_after_epochs(3, b, n, "shuffle") == 3 * (n // b)
    sampler = Sampler(sampling="poisson", batch_size=b, dataset_size=n, key=_key())
    assert [batch.step for batch in sampler.epoch(2)] == list(range(boundaries[0], boundaries[1]))
