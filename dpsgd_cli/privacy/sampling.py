"""Which training examples each step uses: Poisson sampling (what the accounting assumes) or shuffling.

Every step yields index arrays padded to a fixed `capacity` plus a 0/1 mask, so the compiled step sees
one input shape for the whole run and is traced once. Randomness comes from numpy generators keyed by
the run's secret key and the epoch (`run_key.RunKey.generator`), so nobody without the key can tell which
examples a step used, while a run holding its key resumes mid-way exactly.

Poisson: each example joins each step independently with probability q = batch_size / n, where n is the
`dataset_size` the accounting counts. The examples actually present (`population`) may be fewer: with
canaries, n counts all m canaries while only the included ones are present, so q never depends on the
secret inclusion coins.
The batch size varies (Binomial(n, q), mean batch_size); capacity = batch_size + ⌈2·√(batch_size·(1−q))⌉
rounded up to a multiple of 8. A batch larger than the capacity is split into several chunks of the same
step (their clipped gradients are summed before the noise), so no sampled example is ever dropped and
the Poisson analysis holds exactly. Epoch e ends after step ⌈e·n/batch_size⌉ (the convention of
`dpsgd epsilon --epochs`), so an epoch touches n examples in expectation.

Shuffle: a fresh permutation per epoch cut into ⌊n/batch_size⌋ full batches (the remainder is dropped);
capacity = batch_size and the mask is all ones. The ε reported for shuffling still uses the Poisson
analysis, which is then an optimistic assumption (Chua et al., 2024).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dpsgd_cli.config import SAMPLINGS
from dpsgd_cli.privacy.run_key import STREAM_SAMPLING, RunKey


@dataclass(frozen=True)
class Batch:
    """One step's examples: `chunks` of (indices [capacity] int64, mask [capacity] float32).

    Usually one chunk; an oversized Poisson batch has more. `size` is the number of real examples."""

    step: int
    chunks: tuple[tuple[np.ndarray, np.ndarray], ...]
    size: int


def poisson_capacity(batch_size: int, dataset_size: int) -> int:
    """Slots of the compiled step under Poisson sampling (see the module docstring)."""
    q = batch_size / dataset_size
    spread = math.ceil(2.0 * math.sqrt(batch_size * (1.0 - q)))
    return min(dataset_size, 8 * math.ceil((batch_size + spread) / 8))


def steps_in_epoch(epoch: int, batch_size: int, dataset_size: int, sampling: str) -> int:
    """Number of steps of epoch `epoch` (1-based)."""
    if sampling == "shuffle":
        return dataset_size // batch_size
    return steps_after_epochs(epoch, batch_size, dataset_size, sampling) - steps_after_epochs(
        epoch - 1, batch_size, dataset_size, sampling)


def steps_after_epochs(epochs: float, batch_size: int, dataset_size: int, sampling: str) -> int:
    """Total steps taken after `epochs` epochs: ⌈E·n/B⌉ for Poisson, E·⌊n/B⌋ for shuffling."""
    if sampling == "shuffle":
        return int(epochs) * (dataset_size // batch_size)
    return math.ceil(round(epochs * dataset_size / batch_size, 9))


class Sampler:
    """Yields the batches of one epoch at a time; `capacity` is the compiled step's batch dimension.

    `dataset_size` is n of the accounting (q = batch_size / n, epoch lengths); `population` (default n)
    is how many examples are present to sample from (≤ n; fewer only with canaries, Poisson only)."""

    def __init__(self, *, sampling: str, batch_size: int, dataset_size: int, key: RunKey,
                 population: int | None = None, max_capacity: int | None = None):
        population = dataset_size if population is None else population
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 1 <= batch_size <= dataset_size:
            raise ValueError(f"batch_size must be in [1, {dataset_size}], got {batch_size}")
        if not 1 <= population <= dataset_size or (sampling == "shuffle" and population != dataset_size):
            raise ValueError(f"population must be in [1, {dataset_size}] (equal to it for shuffling), "
                             f"got {population}")
        self.sampling = sampling
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.population = population
        self.key = key
        self.sampling_rate = batch_size / dataset_size
        self.capacity = batch_size if sampling == "shuffle" else poisson_capacity(batch_size, dataset_size)
        if max_capacity:  # a physical batch: the logical batch is split into chunks summed before the noise
            self.capacity = min(self.capacity, max_capacity)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of epoch `epoch` (1-based); the same (key, epoch) always gives the same batches."""
        rng = self.key.generator(STREAM_SAMPLING, epoch)
        first = steps_after_epochs(epoch - 1, self.batch_size, self.dataset_size, self.sampling)
        count = steps_in_epoch(epoch, self.batch_size, self.dataset_size, self.sampling)
        if self.sampling == "shuffle":
            order = rng.permutation(self.dataset_size)
            for i in range(count):
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield Batch(first + i, self.pad(idx), self.batch_size)
            return
        for i in range(count):
            chosen = np.flatnonzero(rng.random(self.population) < self.sampling_rate)
            yield Batch(first + i, self.pad(chosen), len(chosen))

    def pad(self, chosen: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Split `chosen` indices into chunks of `capacity` slots; padded slots get index 0 and mask 0."""
        chunks = []
        for start in range(0, max(len(chosen), 1), self.capacity):
            part = chosen[start:start + self.capacity]
            idx = np.zeros(self.capacity, np.int64)
            mask = np.zeros(self.capacity, np.float32)
            idx[:len(part)] = part
            mask[:len(part)] = 1.0
            chunks.append((idx, mask))
        return tuple(chunks)
