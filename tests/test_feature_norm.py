"""Private feature normalisation (`model.feature_norm: private_stats`): the release is a Gaussian mechanism
with the stated bound and noise, and ε composes it with the steps exactly as dp-accounting does."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpsgd_cli.config import feature_releases, load_config, release_bounds
from dpsgd_cli.errors import AccountingInputError, ConfigError
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.calibration import calibrate_noise_multiplier
from dpsgd_cli.privacy.run_key import new_run_key
from dpsgd_cli.training import feature_norm
from dpsgd_cli.training.data import Dataset

SIGMA = ["privacy.noise_multiplier=1.0"]


def _features(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 7, 7, 81)) * rng.random(81)).astype(np.float32)


def test_without_noise_or_clipping_the_release_is_the_exact_statistics():
    x = _features()
    mean, var = feature_norm.private_statistics(x, 1e9, 1e9, (0.0, 0.0), np.random.default_rng(0),
                                                dataset_size=len(x))
    flat = x.reshape(len(x), -1, 81).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=(0, 1)), rtol=1e-10)
    np.testing.assert_allclose(var, flat.var(axis=(0, 1)), rtol=1e-6, atol=1e-12)
    normalised = feature_norm.normalize(x, mean, var)
    np.testing.assert_allclose(normalised.reshape(-1, 81).mean(axis=0), 0.0, atol=1e-5)


def test_one_example_moves_each_sum_by_at_most_its_bound():
    x = _features()
    outlier = x[:1] * 1000.0  # far beyond the bounds
    for index, bound in ((0, 0.3), (1, 0.15)):
        rows = feature_norm.channel_moments(x)[index]
        grown = np.concatenate([rows, feature_norm.channel_moments(outlier)[index]])
        moved = feature_norm.clipped_sum(grown, bound) - feature_norm.clipped_sum(rows, bound)
        assert np.linalg.norm(moved) == pytest.approx(bound, rel=1e-9)


def test_release_noise_has_the_stated_scale_and_comes_from_the_key():
    x = _features(n=50)
    sigma, bound = 8.0, 0.3
    exact, _ = feature_norm.private_statistics(x, bound, 0.15, (0.0, 0.0), np.random.default_rng(0),
                                              dataset_size=len(x))
    draws = np.stack([feature_norm.private_statistics(x, bound, 0.15, (sigma, sigma),
                                                      np.random.default_rng(i), dataset_size=len(x))[0]
                      for i in range(400)])
    errors = (draws - exact).ravel()  # 400 × 81 draws of N(0, (σ·C/n)²)
    assert np.std(errors) == pytest.approx(sigma * bound / len(x), rel=0.03)
    assert abs(np.mean(errors)) < 4 * sigma * bound / len(x) / np.sqrt(errors.size)
    data = Dataset("mnist", x, np.zeros(50, np.int32), x[:5], np.zeros(5, np.int32))
    key = new_run_key(reproducible=False, seed=0)
    first, stats = feature_norm.apply(data, (bound, 0.15), (sigma, sigma), key, dataset_size=50)
    # a resumed run: the same
    again, same = feature_norm.apply(data, (bound, 0.15), (sigma, sigma), key, dataset_size=50)
    other_key = new_run_key(reproducible=False, seed=0)
    other = feature_norm.apply(data, (bound, 0.15), (sigma, sigma), other_key, dataset_size=50)[1]
    assert stats == same and stats["mean"] != other["mean"]
    np.testing.assert_array_equal(first.x_test, again.x_test)


def test_the_release_divides_by_the_public_dataset_size_not_the_realised_one():
    """n of the release is the public n of q = B/n (real examples + all m canaries), never len(x_train),
    which counts the included canaries: their number is secret. An included canary whose features are 0
    adds nothing to the clipped sums, so with the same public n the release must not change; and without
    noise the released mean is Σ clipped per-channel means / public n exactly."""
    x = _features(n=120, seed=3)
    public_n = 121  # 120 real examples + one canary, included or not
    key = new_run_key(reproducible=True, seed=1)
    without = Dataset("mnist", x, np.zeros(120, np.int32), x[:5], np.zeros(5, np.int32))
    grown = np.concatenate([x, np.zeros_like(x[:1])])
    with_canary = Dataset("mnist", grown, np.zeros(121, np.int32), x[:5], np.zeros(5, np.int32))
    bounds, sigmas = (0.3, 0.15), (8.0, 8.0)
    _, excluded = feature_norm.apply(without, bounds, sigmas, key, dataset_size=public_n)
    _, included = feature_norm.apply(with_canary, bounds, sigmas, key, dataset_size=public_n)
    np.testing.assert_allclose(included["mean"], excluded["mean"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(included["variance"], excluded["variance"], rtol=1e-6, atol=1e-9)
    _, exact = feature_norm.apply(without, bounds, (), key, dataset_size=public_n)
    means, _ = feature_norm.channel_moments(x)
    np.testing.assert_allclose(exact["mean"], feature_norm.clipped_sum(means, 0.3) / public_n, rtol=1e-6)


def _uneven_channels(n=20000, seed=0):
    """Features whose 81 channels' variances span 8e-7 … 8e-4 (like scattering features: many channels
    as quiet as the noise on their mean square), on 2×2 positions to keep the test small."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 2, 2, 81)) * np.logspace(-2.5, -1.0, 81)).astype(np.float32)
    return Dataset("mnist", x, np.zeros(n, np.int32), x[:5], np.zeros(5, np.int32))


def _scale_errors(data, bounds, releases, runs=5):
    """Largest relative error, over channels, of the released normaliser √(v + ε) against the exact one,
    for `runs` secret keys."""
    exact = np.sqrt(data.x_train.reshape(len(data.x_train), -1, 81).astype(np.float64).var(axis=(0, 1))
                    + feature_norm.EPSILON)
    errors = []
    for _ in range(runs):
        _, stats = feature_norm.apply(data, bounds, releases, new_run_key(reproducible=False, seed=0),
                                      dataset_size=len(data.y_train))
        released = np.sqrt(np.float64(stats["variance"]) + feature_norm.EPSILON)
        errors.append(np.max(np.abs(released / exact - 1)))
    return np.array(errors)


def test_refinement_recovers_the_quiet_channels_scale():
    data = _uneven_channels()
    means, squares = feature_norm.channel_moments(data.x_train)
    bounds = tuple(np.quantile(np.linalg.norm(rows, axis=1), 0.99) for rows in (means, squares))
    one_stage = _scale_errors(data, bounds, (8.0, 8.0))
    refined = _scale_errors(data, (*bounds, 9.0, 18.0), (16.0, 16.0, 8.0, 8.0))
    assert one_stage.min() > 0.15  # the noise on the quiet channels' mean squares: scales far off
    assert refined.max() < 0.03  # the second release, in standardised units, gets every channel right


def test_refinement_without_noise_is_exact_and_publishes_what_the_model_sees():
    data = _uneven_channels(n=500)
    flat = data.x_train.reshape(500, -1, 81).astype(np.float64)
    key = new_run_key(reproducible=False, seed=0)
    out, stats = feature_norm.apply(data, (1e9, 1e9, 1e9, 1e9), (), key, dataset_size=500)
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(stats["variance"], flat.var(axis=(0, 1)), rtol=1e-4)
    noisy, released = feature_norm.apply(data, (0.3, 0.15, 9.0, 18.0), (16.0, 16.0, 8.0, 8.0), key,
                                          dataset_size=500)
    np.testing.assert_allclose(noisy.x_train, feature_norm.normalize(
        data.x_train, np.float32(released["mean"]), np.float32(released["variance"])), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 bounds per stage"):
        feature_norm.apply(data, (0.3, 0.15, 9.0), (), key, dataset_size=500)
    with pytest.raises(ValueError, match="one noise multiplier per bound"):
        feature_norm.apply(data, (0.3, 0.15, 9.0, 18.0), (8.0, 8.0), key, dataset_size=500)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("releases", [(8.0, 8.0), (16.0, 16.0, 8.0, 8.0)])
def test_epsilon_composes_the_releases_like_dp_accounting(accountant, releases):
    q, steps, delta = 0.02, 300, 1e-5
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3))
    gaussians = [dp_accounting.GaussianDpEvent(r) for r in releases]
    event = dp_accounting.ComposedDpEvent([*gaussians, dp_accounting.SelfComposedDpEvent(step, steps)])
    alone = dp_accounting.ComposedDpEvent(gaussians)
    accountants = {"rdp": rdp_privacy_accountant.RdpAccountant, "pld": pld_privacy_accountant.PLDAccountant}
    make = accountants[accountant]
    assert accounting.epsilon(1.3, q, steps, delta, accountant, releases) == pytest.approx(
        make().compose(event).get_epsilon(delta), rel=1e-9)
    assert accounting.epsilon(1.3, q, 0, delta, accountant, releases) == pytest.approx(
        make().compose(alone).get_epsilon(delta), rel=1e-9)
    ledger = accounting.PrivacyLedger(1.3, q, delta, releases=releases)
    ledger.advance(steps)
    assert ledger.epsilon(accountant) == accounting.epsilon(1.3, q, steps, delta, accountant, releases)
    assert ledger.epsilon(accountant) > accounting.epsilon(1.3, q, steps, delta, accountant)


def test_calibration_leaves_the_releases_their_share():
    q, steps, delta, target = 0.02, 300, 1e-5, 3.0
    plain = calibrate_noise_multiplier(target, delta, q, steps, "pld")
    sigma = calibrate_noise_multiplier(target, delta, q, steps, "pld", releases=(8.0, 8.0))
    assert sigma > plain
    assert accounting.epsilon(sigma, q, steps, delta, "pld", (8.0, 8.0)) <= target
    assert accounting.epsilon(sigma * (1 - 1e-3), q, steps, delta, "pld", (8.0, 8.0)) > target
    with pytest.raises(AccountingInputError, match="spent before training"):
        calibrate_noise_multiplier(0.1, delta, q, steps, "pld", releases=(8.0, 8.0))


def test_config_keys_and_errors():
    stats = ["model.architecture=scatter_cnn_16_32", "model.feature_norm=private_stats"]
    cfg = load_config(None, [*SIGMA, *stats])
    assert feature_releases(cfg) == (8.0, 8.0) and release_bounds(cfg) == (0.3, 0.15)
    refined = load_config(None, [*SIGMA, *stats, "privacy.feature_norm_noise_multiplier=16",
                                 "privacy.feature_norm_refine_noise_multiplier=8"])
    assert feature_releases(refined) == (16.0, 16.0, 8.0, 8.0)
    assert release_bounds(refined) == (0.3, 0.15, 9.0, 18.0)
    off = load_config(None, [*SIGMA, *stats, "privacy.enabled=false", "privacy.noise_multiplier=null"])
    assert feature_releases(off) == () and feature_releases(load_config(None, SIGMA)) == ()
    for extra, message in (
            (["model.feature_norm=private_stats"], "model.feature_norm: private_stats is only for"),
            (["model.feature_norm=batch"], "model.feature_norm: 'batch' is not allowed"),
            (["privacy.feature_norm_noise_multiplier=0"], "feature_norm_noise_multiplier: must be > 0"),
            (["privacy.feature_norm_clip_square=-1"], "privacy.feature_norm_clip_square: must be > 0"),
            (["privacy.feature_norm_refine_noise_multiplier=0"],
             "privacy.feature_norm_refine_noise_multiplier: must be > 0 or null"),
            (["privacy.feature_norm_refine_clip_mean=0"],
             "privacy.feature_norm_refine_clip_mean: must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*SIGMA, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("refine", [None, 8.0])
def test_a_run_with_private_statistics_accounts_them(data_dir, tmp_path, monkeypatch, refine):
    from dpsgd_cli.audit import membership
    from dpsgd_cli.experiment import run as runner
    from dpsgd_cli.runs.run_dir import RunDir

    monkeypatch.setenv("DPSGD_CACHE_DIR", str(tmp_path / "cache"))
    refinement = "null" if refine is None else str(refine)
    cfg = load_config(None, [f"data.data_dir={data_dir}", "data.dataset=mnist", "data.train_size=512",
                             "data.test_size=100", "data.batch_size=128", "training.epochs=1",
                             "model.architecture=scatter_linear", "model.feature_norm=private_stats",
                             "privacy.target_epsilon=3.0", f"output_dir={tmp_path}", "name=stats",
                             f"privacy.feature_norm_refine_noise_multiplier={refinement}"])
    releases = [8.0, 8.0] if refine is None else [8.0, 8.0, refine, refine]
    result = runner.run(cfg)
    (record,) = result.records
    sigma = result.noise_multiplier
    step = dp_accounting.PoissonSampledDpEvent(128 / 512, dp_accounting.GaussianDpEvent(sigma))
    event = dp_accounting.ComposedDpEvent([*(dp_accounting.GaussianDpEvent(r) for r in releases),
                                           dp_accounting.SelfComposedDpEvent(step, record["step"])])
    assert record["epsilon_pld"] == pytest.approx(
        pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(1e-5), rel=1e-9)
    assert record["epsilon_pld"] <= 3.0
    assert f"{len(releases)} Gaussian mechanisms with noise multiplier 8 each" in result.statement
    assert ("standardised by them (clipped to 9 and 18" in result.statement) == (refine is not None)
    doc = RunDir(result.run_dir).document()
    released = doc["resolved"]["feature_norm"]
    assert released["releases"] == releases and len(released["mean"]) == len(released["variance"]) == 81
    run = membership.load_run(result.run_dir)
    assert "group_norm" not in [layer.name for layer in membership.load_model(run).layers]
    x = _features(n=3)
    np.testing.assert_allclose(membership.model_inputs(run, x), feature_norm.normalize(
        x, np.float32(released["mean"]), np.float32(released["variance"])))
