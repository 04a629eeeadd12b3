"""Poisson and shuffle sampling: inclusion rate, reproducibility, padding and step counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpsgd_cli.sampling import Sampler, poisson_capacity, steps_after_epochs, steps_in_epoch


def test_poisson_inclusion_rate_is_q():
    n, b = 2000, 50
    sampler = Sampler(sampling="poisson", batch_size=b, dataset_size=n, seed=1)
    counts = np.zeros(n)
    steps = 0
    for epoch in (1, 2, 3, 4, 5):
        for batch in sampler.epoch(epoch):
            steps += 1
            for idx, mask in batch.chunks:
                np.add.at(counts, idx[mask > 0], 1)
    q = b / n
    rate = counts.sum() / (n * steps)
    se = math.sqrt(q * (1 - q) / (n * steps))
    assert abs(rate - q) < 5 * se, (rate, q)
    # every example independently ~ Binomial(steps, q): the per-example variance matches too
    assert abs(counts.var() / (steps * q * (1 - q)) - 1) < 0.15
    assert counts.max() <= steps  # no example twice in one step


def test_same_seed_same_batches_and_different_seed_differs():
    def batches(seed, sampling):
        s = Sampler(sampling=sampling, batch_size=32, dataset_size=500, seed=seed)
        return [idx[mask > 0].tolist() for b in s.epoch(2) for idx, mask in b.chunks]

    for sampling in ("poisson", "shuffle"):
        assert batches(3, sampling) == batches(3, sampling)
        assert batches(3, sampling) != batches(4, sampling)


def test_padding_masks_and_overflow_chunks_keep_every_example():
    sampler = Sampler(sampling="poisson", batch_size=100, dataset_size=1000, seed=0)
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
    assert cap % 8 == 0 and b < cap < 1.2 * b
    from scipy.stats import binom

    assert binom.sf(cap, n, b / n) < 0.05


def test_shuffle_is_a_permutation_of_full_batches():
    sampler = Sampler(sampling="shuffle", batch_size=64, dataset_size=1000, seed=0)
    batches = list(sampler.epoch(1))
    assert len(batches) == 1000 // 64
    seen = np.concatenate([b.chunks[0][0] for b in batches])
    assert len(set(seen.tolist())) == len(seen) == 15 * 64
    assert all(b.chunks[0][1].all() for b in batches)


@pytest.mark.parametrize("n,b", [(60000, 256), (1000, 64), (512, 64)])
def test_epoch_step_counts_add_up(n, b):
    total = sum(steps_in_epoch(e, b, n, "poisson") for e in range(1, 11))
    assert total == steps_after_epochs(10, b, n, "poisson") == math.ceil(10 * n / b)
    assert steps_after_epochs(3, b, n, "shuffle") == 3 * (n // b)
    sampler = Sampler(sampling="poisson", batch_size=b, dataset_size=n, seed=0)
    steps = [batch.step for batch in sampler.epoch(2)]
    first, last = steps_after_epochs(1, b, n, "poisson"), steps_after_epochs(2, b, n, "poisson")
    assert steps == list(range(first, last))
