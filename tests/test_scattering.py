"""The numpy scattering transform against an independent spatial-domain reference.

The reference convolves circularly by explicit sums over the padded grid (a circulant matrix), takes the
modulus, and subsamples by keeping every 2^j-th pixel: none of the module's Fourier-domain products,
spectrum periodization or subsampling-by-aliasing. It shares only the filters (their spatial kernels are
the inverse DFTs of the filter bank's spectra), which are checked separately. (Compared once with
kymatio 0.3.0's numpy frontend under SciPy 1.16 on 8 Fashion-MNIST test images: max |difference|
2.4e-7, features up to 0.92; see docs/recipes.md, "The scattering transform".)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dpsgd_cli.training import scattering
from dpsgd_cli.training.scattering import ScatteringParams, filter_bank


def _images(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.random((n, 28, 28)).astype(np.float32) * 0.3
    x[0, 6:22, 10:14] = 1.0  # a bar and an edge: strongly oriented content
    x[1, 14:, :] += 0.7
    return x


@functools.cache
def _circulant_index(m: int, n: int) -> np.ndarray:
    """Flat kernel index of circulant entry (p·N + q, a·N + b): ((p − a) mod M)·N + (q − b) mod N."""
    p, q = np.divmod(np.arange(m * n), n)
    return ((p[:, None] - p[None, :]) % m) * n + (q[:, None] - q[None, :]) % n


def _circular_conv(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """out[p, q] = Σ_{a, b} image[a, b] · kernel[(p − a) mod M, (q − b) mod N], by a circulant matrix."""
    m, n = image.shape
    return (kernel.reshape(-1)[_circulant_index(m, n)] @ image.reshape(-1)).reshape(m, n)


def _reference(image: np.ndarray, params: ScatteringParams) -> np.ndarray:
    bank, J = filter_bank(params), params.J
    (m, n), (h, w) = params.padded, (params.height, params.width)
    x = np.pad(image.astype(np.float64), [((m - h) // 2, (m - h + 1) // 2), ((n - w) // 2, (n - w + 1) // 2)],
               mode="reflect")
    spatial = np.fft.ifft2  # a filter's spatial kernel on its grid

    def low_pass(u, j):
        s = np.real(_circular_conv(u, spatial(bank["phi"][j])))[::2 ** (J - j), ::2 ** (J - j)]
        return s[1:-1, 1:-1]

    out, second = [low_pass(x, 0)], []
    for j1, _, levels1 in bank["psi"]:
        u1 = np.abs(_circular_conv(x, spatial(levels1[0])))[::2 ** j1, ::2 ** j1]
        out.append(low_pass(u1, j1))
        for j2, _, levels2 in bank["psi"]:
            if j2 > j1:
                u2 = np.abs(_circular_conv(u1, spatial(levels2[j1])))[::2 ** (j2 - j1), ::2 ** (j2 - j1)]
                second.append(low_pass(u2, j2))
    return np.stack(out + second, axis=-1)


def test_matches_spatial_domain_reference():
    params = ScatteringParams()
    x = _images()
    ours = scattering.scattering(x[..., None], params)
    assert ours.shape == (3, 7, 7, 81) and ours.dtype == np.float32
    for image, features in zip(x, ours):
        ref = _reference(image, params)
        np.testing.assert_allclose(features, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    # the features carry the images' content: not constant, different per image, order-2 paths non-zero
    assert np.abs(ours[0] - ours[2]).max() > 1e-2 and ours[..., 17:].max() > 1e-3


def test_filter_bank_is_a_morlet_bank():
    params = ScatteringParams()
    bank = filter_bank(params)
    assert len(bank["psi"]) == params.J * params.L and params.channels == 81
    assert abs(bank["phi"][0][0, 0] - 1.0) < 1e-3  # φ averages: unit gain at frequency 0
    for j, theta, levels in bank["psi"]:
        assert abs(levels[0][0, 0]) < 1e-6  # ψ has zero mean (the Morlet correction)
        peak = np.unravel_index(np.argmax(levels[0]), levels[0].shape)
        radius = np.hypot(*[min(k, s - k) for k, s in zip(peak, levels[0].shape)])
        # the pass band sits at |ω| ≈ ξ = 3π/(4·2^j), i.e. ξ·36/(2π) grid steps
        assert abs(radius - 3 / 8 * 36 / 2 ** j) <= 1.5, (j, theta, peak)
    # the L orientations of one scale are rotations: same energy
    energies = [np.sum(levels[0] ** 2) for j, _, levels in bank["psi"] if j == 0]
    np.testing.assert_allclose(energies, energies[0], rtol=0.05)


def test_chunking_and_bad_shapes():
    x = _images(5)
    np.testing.assert_allclose(scattering.scattering(x, chunk=2), scattering.scattering(x, chunk=500),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="28, 28"):
        scattering.scattering(np.zeros((2, 32, 32)))
