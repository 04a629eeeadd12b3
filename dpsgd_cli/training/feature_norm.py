"""Feature normalisation by privately released per-channel statistics (Tramèr & Boneh 2021's MNIST recipes).

`model.feature_norm: private_stats` replaces a ScatterNet model's GroupNorm by a fixed normalisation
(x − μ) / √(v + ε) per channel, where μ and v are the training set's per-channel mean and variance released
once, before training, by two Gaussian mechanisms on the whole training set (no sampling):

* each example's per-channel mean of its features (an 81-vector: the mean over the 7×7 positions) is
  clipped to L2 norm ≤ `privacy.feature_norm_clip_mean`, the clipped vectors summed, N(0, (σ_n·C_m)²) added
  to every coordinate, and the sum divided by the public n (see below);
* the same for the per-channel mean of the squared features, with bound `feature_norm_clip_square`;
* v = max(mean square − μ², 0).

Optional refinement (`privacy.feature_norm_refine_noise_multiplier`): the noise is the same for every
channel, but the channels' scales differ by orders of magnitude (half of MNIST's 81 scattering channels
have a variance under 1.5e-5, comparable to the noise on their mean square), so the quiet channels' scales
come out 50 % off. A second pair of releases, of the same statistics of the features standardised by the
first pair, z = (x − μ₁)/√(v₁ + ε), has every channel near unit scale: with bounds in those units
(`feature_norm_refine_clip_mean` 9 = √81, `…_square` 18) the noise is small against every channel and
the final normalisation, (x − μ)/√(v + ε) with μ = μ₁ + √(v₁ + ε)·μ₂ and v = (v₁ + ε)·v₂, is within
about 1 % of the exact one. Adaptive composition: the second pair is a Gaussian mechanism (noise
multiplier `feature_norm_refine_noise_multiplier`) whatever the first released, and ε composes all four.

Under add/remove-one adjacency each sum moves by at most its bound, so each release is a Gaussian mechanism
with noise multiplier σ_n = `privacy.feature_norm_noise_multiplier`; the run's ε composes both with the
DP-SGD steps (`privacy.plan.PrivacyPlan.releases`). n is the public dataset size of q = B/n
(`PrivacyPlan.dataset_size`: the real examples plus all m canaries), never the number of rows the release
sums: that counts the included canaries, whose number is secret (so the DP-SGD step, too, divides by the
expected batch size, not the realised one). The bounds are fixed numbers, not quantiles of the data
(Tramèr & Boneh's code clips at the median norm, a data-dependent choice). The noise comes from the run
key (stream STREAM_FEATURE_STATS), so it is secret by default and the same when a run resumes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpsgd_cli.privacy.run_key import STREAM_FEATURE_STATS, RunKey
from dpsgd_cli.training.data import Dataset

RELEASES = 2  # Gaussian mechanisms: per-channel mean, per-channel mean square
EPSILON = 1e-5  # added to the variance before the square root (BatchNorm's default)


def channel_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example, the per-channel mean of the features and of their squares over all other axes:
    two [N, C] float64 arrays (channels last)."""
    flat = features.reshape(len(features), -1, features.shape[-1]).astype(np.float64)
    return flat.mean(axis=1), (flat ** 2).mean(axis=1)


def clipped_sum(rows: np.ndarray, bound: float) -> np.ndarray:
    """Σ_i rows_i · min(1, bound / ‖rows_i‖₂): one example moves it by at most `bound` (L2)."""
    norms = np.linalg.norm(rows, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return (rows * scale[:, None]).sum(axis=0)


def private_statistics(features: np.ndarray, clip_mean: float, clip_square: float,
                       noise_multipliers: tuple[float, float], rng: np.random.Generator, *,
                       dataset_size: int):
    """(μ, v) per channel, released by the two Gaussian mechanisms of the module docstring with noise
    multipliers `noise_multipliers` (mean, mean square; (0, 0): no noise); the noisy sums are divided by
    the public `dataset_size`, not by len(features)."""
    n = dataset_size
    means, squares = channel_moments(features)
    sigma_mean, sigma_square = noise_multipliers
    mu = (clipped_sum(means, clip_mean) + rng.normal(0.0, sigma_mean * clip_mean, means.shape[1])) / n
    noise = rng.normal(0.0, sigma_square * clip_square, squares.shape[1])
    sq = (clipped_sum(squares, clip_square) + noise) / n
    return mu, np.maximum(sq - mu ** 2, 0.0)


def normalize(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(x − mean) / √(var + EPSILON), float32."""
    return ((x - mean) / np.sqrt(var + EPSILON)).astype(np.float32)


def apply(dataset: Dataset, bounds: tuple[float, ...], releases: tuple[float, ...],
          key: RunKey, *, dataset_size: int) -> tuple[Dataset, dict[str, list[float]]]:
    """The dataset with every split normalised by statistics released from its training split (all of
    x_train: the real examples and the included canaries; the sums are divided by the public
    `dataset_size`, `PrivacyPlan.dataset_size`), and the released normalisation (published in run.yaml:
    it is covered by the run's ε). `bounds`: the L2 bounds (mean, mean square) of each stage, the first
    in feature units, a refinement's in units of the features standardised by the stages before
    (`config.release_bounds`); `releases`: their noise multipliers as the run's ε accounts them
    (`PrivacyPlan.releases`), or () for a non-private run (no noise). The published `mean` and
    `variance` are the estimates of all stages together, in feature units: the model sees
    `normalize(x, mean, variance)`."""
    if len(bounds) % RELEASES or not bounds or (releases and len(releases) != len(bounds)):
        raise ValueError(f"feature statistics take {RELEASES} bounds per stage and one noise multiplier "
                         f"per bound, got bounds {bounds} and releases {releases}")
    rng = key.generator(STREAM_FEATURE_STATS)
    sigmas = tuple(releases) if releases else (0.0,) * len(bounds)
    mean, var = 0.0, None
    for stage in range(0, len(bounds), RELEASES):
        if stage == 0:  # the features themselves
            inputs, scale = dataset.x_train, 1.0
        else:  # standardised by the stages before
            inputs, scale = normalize(dataset.x_train, mean, var), np.sqrt(var + EPSILON)
        mu, v = private_statistics(inputs, bounds[stage], bounds[stage + 1], sigmas[stage:stage + RELEASES],
                                   rng, dataset_size=dataset_size)
        mean, var = mean + scale * mu, scale ** 2 * v  # in feature units: ε is added once, at the end
    mean, var = mean.astype(np.float32), var.astype(np.float32)
    views = None if dataset.train_views is None else normalize(dataset.train_views, mean, var)
    out = dataclasses.replace(dataset, x_train=normalize(dataset.x_train, mean, var),
                              x_test=normalize(dataset.x_test, mean, var), train_views=views)
    return out, {"mean": [float(v) for v in mean], "variance": [float(v) for v in var]}
