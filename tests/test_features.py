"""The feature cache: computed once, reused while the images and the transform are the same, recomputed
when either changes or the file is damaged."""

from __future__ import annotations

import numpy as np

from dpsgd_cli.training import features, scattering
from dpsgd_cli.training.data import Dataset


def _counting(calls):
    def compute(x):
        calls.append(len(x))
        return np.repeat(x.reshape(len(x), -1)[:, :3], 2, axis=1) * 2.0
    return compute


def test_cache_is_reused_and_invalidated_by_data_and_transform(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((4, 28, 28, 1)).astype(np.float32)
    calls: list[int] = []
    compute = _counting(calls)
    first = features.cached(x, "t v1", compute, (6,), tmp_path)
    again = features.cached(x.copy(), "t v1", compute, (6,), tmp_path)
    assert calls == [4] and np.array_equal(first, again)
    changed = x.copy()
    changed[2, 0, 1, 0] += 0.25  # one pixel of one image
    other = features.cached(changed, "t v1", compute, (6,), tmp_path)
    assert calls == [4, 4] and not np.array_equal(other, first)
    features.cached(x, "t v2", compute, (6,), tmp_path)  # new transform parameters or code version
    assert calls == [4, 4, 4]
    for path in tmp_path.glob("t-*.npy"):  # a damaged file is recomputed, not trusted
        path.write_bytes(b"not numpy")
    np.testing.assert_array_equal(features.cached(x, "t v1", compute, (6,), tmp_path), first)
    assert calls == [4, 4, 4, 4]
    assert not list(tmp_path.glob(".tmp.*"))


def test_prepare_scattering_features_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = Dataset("fashion_mnist", rng.random((6, 28, 28, 1)).astype(np.float32), np.arange(6) % 10,
                   rng.random((3, 28, 28, 1)).astype(np.float32), np.arange(3))
    assert features.prepare(data, "tfp_cnn", tmp_path) is data
    out = features.prepare(data, "scatter_linear", tmp_path)
    assert out.x_train.shape == (6, 7, 7, 81) and out.x_test.shape == (3, 7, 7, 81)
    np.testing.assert_allclose(out.x_test, scattering.scattering(data.x_test), rtol=1e-6)
    assert np.array_equal(out.y_train, data.y_train)

    def fail(*_args, **_kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(scattering, "scattering", fail)
    again = features.prepare(data, "scatter_cnn_16_32", tmp_path)  # same transform: the same cache entries
    assert np.array_equal(again.x_train, out.x_train)


def test_canary_rows_are_transformed_apart_and_not_cached(tmp_path):
    """A run's canaries (the last rows of its training split, different in every run) must not change
    the cache entry of the real images: their features are computed apart and never written."""
    rng = np.random.default_rng(2)
    real = Dataset("fashion_mnist", rng.random((6, 28, 28, 1)).astype(np.float32), np.arange(6) % 10,
                   rng.random((3, 28, 28, 1)).astype(np.float32), np.arange(3))
    canaries = rng.random((2, 28, 28, 1)).astype(np.float32)
    grown = Dataset("fashion_mnist", np.concatenate([real.x_train, canaries]), np.arange(8) % 10,
                    real.x_test, real.y_test)
    out = features.prepare(grown, "scatter_linear", tmp_path, uncached_tail=2)
    assert out.x_train.shape == (8, 7, 7, 81)
    np.testing.assert_allclose(out.x_train[6:], scattering.scattering(canaries), rtol=1e-6)
    np.testing.assert_allclose(out.x_train[:6], scattering.scattering(real.x_train), rtol=1e-6)
    entries = sorted(tmp_path.glob("*.npy"))
    assert len(entries) == 2  # the real training images and the test images, nothing with canaries
    again = features.prepare(real, "scatter_linear", tmp_path)  # the plain run finds the same entries
    assert sorted(tmp_path.glob("*.npy")) == entries and np.array_equal(again.x_train, out.x_train[:6])
    assert features.transform_images(canaries, "tfp_cnn") is canaries
