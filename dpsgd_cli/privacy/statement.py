"""The privacy guarantee of a run, a config or a question, in plain words with every assumption stated."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyFacts:
    """What an ε number assumes; rendered by `privacy_statement`.

    `epsilon_rdp` / `epsilon_pld`: None when that accountant was not asked. `key_location`: where a secret key
    is kept (the CLI's run.key; the Python API's process memory); `key_origin`: set when the caller supplied
    the secret key (then it was not drawn here, and must key no other training); `reproducible_from`: what a
    reproducible key came from (default: the CLI's seed and sweep point); `coverage`: the sentence saying
    which outputs a run's guarantee covers (default `COVERAGE`, the CLI's outputs). `l2_norm_clip`: None when
    unknown (a question asked on the command line). `source`: what the numbers describe — "run" (a finished
    training run), "config" (an experiment file, before running it) or "options" (numbers typed on the command
    line).
    """

    noise_multiplier: float
    accounting_noise_multiplier: float
    l2_norm_clip: float | None
    sampling_rate: float
    steps: int
    delta: float
    sampling: str
    microbatch_size: int
    epsilon_rdp: float | None
    epsilon_pld: float | None
    source: str = "run"
    randomness: str | None = None
    key_location: str = "the run's run.key"
    reproducible_from: str | None = None  # where a reproducible key came from; None = the CLI's wording
    coverage: str | None = None  # which outputs the guarantee covers (a run's); None = COVERAGE
    key_origin: str | None = None  # a secret key the caller supplied (not drawn here): where it came from
    views: int = 1  # augmentation multiplicity K: an example's K views share its one clipped unit
    # model.feature_norm: private_stats — noise multipliers and L2 bounds of the feature-statistics releases
    releases: tuple[float, ...] = ()
    release_bounds: tuple[float, ...] = ()
    # what one example is for the data source used (the unit of privacy), e.g. "one row of train.csv"
    record: str | None = None


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.3g}"


def privacy_statement(f: PrivacyFacts) -> str:
    """The guarantee in plain words, with every assumption it rests on."""
    if f.epsilon_pld is not None:
        head = f"({_fmt(f.epsilon_pld)}, {f.delta:g})-DP by the PLD accountant"
        if f.epsilon_rdp is not None:
            head += f" (RDP accountant: ε = {_fmt(f.epsilon_rdp)})"
    elif f.epsilon_rdp is not None:
        head = f"({_fmt(f.epsilon_rdp)}, {f.delta:g})-DP by the RDP accountant"
    else:
        raise ValueError("PrivacyFacts needs epsilon_rdp or epsilon_pld")
    clip = f" on gradients clipped to L2 norm C = {f.l2_norm_clip:g}" if f.l2_norm_clip is not None else ""
    parts = [
        f"{head} under add/remove-one-example adjacency,",
        f"for {f.steps} steps of the Gaussian mechanism with noise multiplier σ = {f.noise_multiplier:g}"
        f"{clip},",
    ]
    if f.sampling_rate >= 1:
        parts.append("each step using the whole dataset (q = 1, no amplification by sampling).")
    else:
        parts.append(f"assuming Poisson sampling at rate q = {f.sampling_rate:.6g} (every example joins "
                     "every step independently with probability q).")
    if f.record:
        parts.append(f"One example, the unit of privacy, is {f.record}.")
    if f.microbatch_size > 1:
        parts.append(f"Microbatches of {f.microbatch_size} examples double the sensitivity, so it is "
                     f"accounted with σ/2 = {f.accounting_noise_multiplier:g}.")
    if f.releases:
        bounds = " and ".join(f"{b:g}" for b in f.release_bounds[:2])
        named = [f"{r:g}" for r in f.releases]
        sigmas = f"{named[0]} each" if len(set(named)) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
        refined = ""
        if len(f.release_bounds) > 2:
            refined = (", then the same of the features standardised by them (clipped to "
                       f"{' and '.join(f'{b:g}' for b in f.release_bounds[2:])} in standardised units)")
        plural = "" if len(set(named)) == 1 else "s"
        parts.append(f"Before the first step, {len(f.releases)} Gaussian mechanisms with noise multiplier"
                     f"{plural} {sigmas} on the whole training set released the "
                     f"features' per-channel mean and mean square for normalisation (each example's clipped "
                     f"to L2 norm ≤ {bounds}){refined}; ε composes them with the steps.")
    if f.views > 1:
        parts.append(f"Each example was trained as {f.views} augmented views whose mean-loss gradient is "
                     "clipped as one unit, so one example still moves the sum by at most C (σ unchanged).")
    if f.sampling == "shuffle":
        who = {"run": "The run used", "config": "The config uses"}.get(f.source, "You asked about")
        parts.append(f"{who} shuffled fixed-size batches, for which the Poisson analysis is an optimistic "
                     "assumption: the true ε of shuffling can be much larger (Chua et al., 2024).")
    elif f.sampling_rate >= 1:
        pass
    elif f.source == "run":
        parts.append("The run sampled its batches exactly so (Poisson, nothing dropped).")
    elif f.source == "config":
        parts.append("The config samples its batches exactly so (data.sampling: poisson, nothing dropped).")
    else:
        parts.append("With shuffled fixed-size batches instead, this Poisson analysis would be an "
                     "optimistic assumption (Chua et al., 2024).")
    parts += _randomness_sentences(f)
    return " ".join(parts)


COVERAGE = ("It covers the model weights after every epoch and at the end, and what is computed from them "
            "alone (test loss and accuracy); it does not cover what is computed from the private data "
            "without noise: train_loss, train_accuracy and train_nonfinite_units (metrics.csv, progress "
            "line), elapsed_s (it grows with the secret batch sizes) and the audit's statistics "
            "(audit.json). `dpsgd export` leaves them out.")


def _randomness_sentences(f: PrivacyFacts) -> list[str]:
    """Where the noise and batches came from, and which outputs the guarantee covers."""
    if f.randomness is None:
        return []
    run = f.source == "run"
    if f.randomness == "reproducible" and f.reproducible_from:
        said = (f"Reproducible mode: the noise and the batches were derived from {f.reproducible_from}, so "
                "this ε holds only while it stays secret; whoever knows it can regenerate the noise and the "
                "batches, and then ε = ∞.")
    elif f.randomness == "reproducible":
        said = ("Reproducible mode (privacy.reproducible: true): the noise and the batches "
                + ("were" if run else "will be")
                + " derived from the seed in the config (and a sweep point's name), "
                "so this ε holds only while the seed and the config stay secret; whoever knows them can "
                "regenerate the noise and the batches, and then ε = ∞.")
    elif f.key_origin:
        said = ("The noise and the batch selection " + ("came" if run else "will come") + " from a secret "
                f"128-bit key supplied as {f.key_origin}, so this ε holds only while that key stays secret "
                "and keys no other training: two trainings with one key share their noise and batches, and "
                "whoever knows it can subtract the noise.")
    else:
        said = ("The noise and the batch selection " + ("came" if run else "will come") + " from a secret "
                f"128-bit key drawn from the operating system's entropy and kept only in {f.key_location} "
                "(never share it: with it the noise can be subtracted).")
    return [said, f.coverage or COVERAGE] if run else [said]
