"""dpsgd_cli.privacy.statement: the guarantee names every assumption it rests on."""

from __future__ import annotations

import pytest

from dpsgd_cli.privacy.statement import PrivacyFacts, privacy_statement


def _facts(**changes) -> PrivacyFacts:
    base = dict(noise_multiplier=1.1, accounting_noise_multiplier=1.1, l2_norm_clip=1.0, sampling_rate=0.004,
                steps=1000, delta=1e-5, sampling="poisson", microbatch_size=1, epsilon_rdp=2.6,
                epsilon_pld=2.4)
    return PrivacyFacts(**{**base, **changes})


def test_statement_names_every_assumption():
    text = privacy_statement(_facts())
    for words in ("(2.4, 1e-05)-DP", "PLD accountant", "RDP accountant: ε = 2.6", "add/remove-one",
                  "Poisson sampling at rate q = 0.004", "σ = 1.1", "C = 1", "1000 steps", "exactly so"):
        assert words in text, words
    assert "Chua" not in text


@pytest.mark.parametrize("source", ["run", "config", "options"])
def test_statement_flags_shuffling_as_optimistic(source):
    text = privacy_statement(_facts(sampling="shuffle", source=source))
    assert "shuffled fixed-size batches" in text and "optimistic" in text and "Chua et al., 2024" in text


def test_statement_for_one_accountant_microbatches_and_options():
    text = privacy_statement(_facts(epsilon_pld=None, l2_norm_clip=None, microbatch_size=4,
                                    accounting_noise_multiplier=0.55, source="options"))
    assert text.startswith("(2.6, 1e-05)-DP by the RDP accountant") and "PLD" not in text
    assert "clipped" not in text and "σ/2 = 0.55" in text
    assert "optimistic" in text  # warns that shuffling would break the Poisson assumption
    full = privacy_statement(_facts(sampling_rate=1.0, epsilon_rdp=None))
    assert "q = 1" in full and "Poisson" not in full


def test_statement_names_the_feature_statistics_releases():
    one = privacy_statement(_facts(releases=(8.0, 8.0), release_bounds=(0.3, 0.15)))
    assert "2 Gaussian mechanisms with noise multiplier 8 each" in one and "≤ 0.3 and 0.15" in one
    assert "standardised" not in one
    refined = privacy_statement(_facts(releases=(16.0, 16.0, 8.0, 8.0),
                                       release_bounds=(0.3, 0.15, 9.0, 18.0)))
    assert "4 Gaussian mechanisms with noise multipliers 16, 16, 8 and 8" in refined
    assert ("≤ 0.3 and 0.15), then the same of the features standardised by them (clipped to 9 and 18"
            in refined)


def test_a_supplied_secret_key_is_named_with_what_the_guarantee_then_needs():
    """A secret key the caller supplied was not necessarily drawn here nor kept only here: the statement
    says so, and that the ε needs it to key no other training."""
    default = privacy_statement(_facts(randomness="secret"))
    assert "drawn from the operating system's entropy" in default
    supplied = privacy_statement(_facts(randomness="secret", key_origin="the run_key passed to DPModel"))
    assert "operating system's entropy" not in supplied
    assert "the run_key passed to DPModel" in supplied and "no other training" in supplied
