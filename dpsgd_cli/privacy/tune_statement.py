"""The guarantee of a private hyperparameter search in plain words, with every assumption stated."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchFacts:
    """What the ε of a search assumes; rendered by `search_statement`. The winner's numbers (σ, C, q,
    steps, sampling, microbatch size, releases) are those of the published trial; `candidates` counts the
    distinct privacy parameters (q, steps, σ, releases) of the space, all bounded by the trial event."""

    epsilon: float
    delta: float
    count: str  # the distribution of K, e.g. "a logarithmic distribution of mean 8"
    space_size: str
    space_keys: tuple[str, ...]
    candidates: int
    noise_multiplier: float
    l2_norm_clip: float
    sampling_rate: float
    steps: int
    sampling: str
    microbatch_size: int
    releases: tuple[float, ...]
    score_noise_multiplier: float
    score_examples: int
    holdout: bool
    randomness: str  # "secret" or "reproducible"


COVERS = ("(ε, δ) covers the whole search: the random number of trials, every trial's training, the scores "
          "and the selection.")


def search_statement(f: SearchFacts) -> str:
    eps = "∞" if math.isinf(f.epsilon) else f"{f.epsilon:.3g}"
    scored = (f"its number of correct predictions on {f.score_examples} held-out training examples (the "
              "last ones of the training split the search used, on which no trial trained)" if f.holdout else
              f"its number of correct predictions on its {f.score_examples} training examples")
    parts = [
        f"({eps}, {f.delta:g})-DP by the RDP accountant under add/remove-one-example adjacency.", COVERS,
        f"The number of trials K was drawn from {f.count} (Papernot & Steinke 2022), independently of the "
        f"data; each trial drew its hyperparameters at random from a space of {f.space_size} "
        f"({', '.join(f.space_keys)}), independently of the data and of the other trials, trained with "
        f"DP-SGD and released a score: {scored} plus Gaussian noise of std {f.score_noise_multiplier:g} "
        "(sensitivity 1).",
        ("Every trial has the same privacy parameters" if f.candidates == 1 else
         f"Each trial is accounted by the largest RDP of the {f.candidates} different privacy parameters "
         "(q, steps, σ) the space allows")
        + f"; the published trial ran {f.steps} steps of the Gaussian mechanism with noise "
        f"multiplier σ = {f.noise_multiplier:g} on gradients clipped to L2 norm C = {f.l2_norm_clip:g}, "
        f"assuming Poisson sampling at rate q = {f.sampling_rate:.6g}.",
    ]
    if f.microbatch_size > 1:
        parts.append(f"Microbatches of {f.microbatch_size} examples double the sensitivity, so a trial is "
                     "accounted with σ/2.")
    if f.releases:
        parts.append(f"Before training, each trial released its features' statistics with "
                     f"{len(f.releases)} Gaussian mechanisms (noise multipliers "
                     f"{', '.join(f'{r:g}' for r in f.releases)}), accounted in the trial.")
    if f.sampling == "shuffle":
        parts.append("The trials used shuffled fixed-size batches, for which the Poisson analysis is an "
                     "optimistic assumption: the true ε of shuffling can be much larger (Chua et al., 2024).")
    parts.append("Only the trial with the best noisy score is published: its weights, its hyperparameters, "
                 "its noisy score, this statement and ε; neither the number of trials nor any other trial's "
                 "hyperparameters, score or weights.")
    if f.randomness == "reproducible":
        parts.append("Reproducible mode (privacy.reproducible: true): K, the hyperparameters, the noise, the "
                     "batches and the scores' noise were derived from the seed in the config and the "
                     "search's name, so this ε holds only while they stay secret; whoever knows them can "
                     "regenerate all of it, and then ε = ∞.")
    else:
        parts.append("K, the hyperparameters, the noise, the batches and the scores' noise came from a "
                     "secret 128-bit key drawn from the operating system's entropy and kept only in the "
                     "search's private folder (never share it).")
    parts.append("It covers the published weights and what is computed from them alone (test loss and "
                 "accuracy).")
    return " ".join(parts)
