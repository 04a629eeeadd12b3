"""What a private hyperparameter search costs for each distribution of the number of trials K, on the
trial of configs/fashion_mnist_scatter_pointwise_eps3.yaml (q = 8192/60000, 440 steps, δ = 1e-5;
dp-accounting's numbers).

For each distribution (mean 8 unless given): ε of the search at the single run's σ 4.106 (RDP; without
and with the score), the σ each trial needs for a whole search at ε = 3 and that trial's own ε (PLD,
without the score), P(K = 0) and the chance of more than twice the mean number of trials (what the
search's wall time depends on). Prints a Markdown table.

    python benchmarks/tune_costs.py [--mean 8] [--score-noise 10] [--target 3]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from dpsgd_cli.privacy import accounting, tuning
from dpsgd_cli.privacy.tuning import TrialCount, TrialPrivacy

Q, STEPS, DELTA, SIGMA = 8192 / 60000, 440, 1e-5, 4.106
NO_SCORE = 1e6  # a score that costs nothing measurable


def tail(count: TrialCount, k: int, draws: int = 200_000) -> float:
    """P(K > k), estimated from draws (K's own sampler)."""
    rng = np.random.default_rng(0)
    return float(np.mean([count.sample(rng) > k for _ in range(draws)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mean", type=float, default=8.0)
    parser.add_argument("--score-noise", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=3.0)
    args = parser.parse_args()
    trial = TrialPrivacy(SIGMA, Q, STEPS)
    mean = args.mean
    print(f"the trial of fashion_mnist_scatter_pointwise_eps3: q = {Q:.5f}, {STEPS} steps, δ = {DELTA:g}; "
          f"σ {SIGMA}: one trial "
          f"PLD ε {accounting.epsilon(SIGMA, Q, STEPS, DELTA, 'pld'):.2f}, RDP ε "
          f"{tuning.naive_epsilon([trial], NO_SCORE, DELTA):.2f}; {math.ceil(mean)} trials composed naively "
          f"RDP ε {tuning.naive_epsilon([trial] * math.ceil(mean), NO_SCORE, DELTA):.2f}")
    print(f"score noise std {args.score_noise:g}; whole search at ε = {args.target:g}\n")
    print(f"| K ~ (mean {mean:g}) | ε at σ {SIGMA} (no score) | ε at σ {SIGMA} with the score | σ per trial "
          f"for ε = {args.target:g} | that trial alone, PLD ε | P(K = 0) | P(K > {2 * mean:g}) |")
    print("|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for count in (TrialCount("poisson", mean), TrialCount("geometric", mean),
                  TrialCount("truncated_negative_binomial", mean, 0.5), TrialCount("logarithmic", mean)):
        bare = tuning.search_epsilon([trial], NO_SCORE, count, DELTA)
        scored = tuning.search_epsilon([trial], args.score_noise, count, DELTA)
        (sigma,) = tuning.calibrate_search([trial], args.score_noise, count, DELTA, args.target)
        alone = accounting.epsilon(sigma, Q, STEPS, DELTA, "pld")
        zero = math.exp(-mean) if count.distribution == "poisson" else 0.0
        name = count.distribution.replace("_", " ") + (f" (shape {count.shape:g})" if count.shape else "")
        print(f"| {name} | {bare:.2f} | {scored:.2f} | {sigma:.3f} | {alone:.2f} | {zero:.4f} | "
              f"{tail(count, int(2 * mean)):.3f} |")
    print(f"\n({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
