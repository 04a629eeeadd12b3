"""The 2-D scattering transform (Mallat 2012; Bruna & Mallat 2013) in numpy: a fixed, weightless feature map.

ScatterNet models (Tramèr & Boneh 2021) train on |·| cascades of Morlet wavelet convolutions instead of
raw pixels. With J = 2 and L = 8 a 28×28 image gives 1 + J·L + L²·J(J−1)/2 = 81 channels at 7×7:
order 0 is the image averaged by a Gaussian φ at scale 2^J, order 1 is |x ⋆ ψ_{j,θ}| ⋆ φ, order 2 is
||x ⋆ ψ_{j1,θ1}| ⋆ ψ_{j2,θ2}| ⋆ φ (j2 > j1), each subsampled by 2^J.

This follows kymatio 0.3.0's `Scattering2D` (numpy frontend) step for step: the same Morlet filter bank
(σ = 0.8·2^j, ξ = 3π/(4·2^j), slant 4/L, θ = (L/2 − 1 − l)·π/L; φ a Gaussian of σ = 0.8·2^(J−1)),
built in the Fourier domain on the reflect-padded size (28 → 36 for J = 2), filters cropped to lower
resolutions, subsampling by periodizing the spectrum, the padding cropped off at the end. Why not
kymatio itself: its only release (0.3.0) imports `scipy.special.sph_harm` for its 3-D transform whenever
the package is imported, and SciPy 1.17 removed that function, so `import kymatio` fails with the SciPy
this project needs; pinning SciPy below 1.17 would hold back dp-accounting's dependency for one feature
map. This module is ~100 lines of numpy, has no dependency, and is tested against a direct spatial-domain
convolution reference (tests/test_scattering.py); on the images compared once, it matched kymatio 0.3.0
(run in a separate environment with SciPy 1.16) to float32 round-off (docs/recipes.md, "The scattering
transform").

Features are channels-last: `scattering(x)` maps [N, 28, 28] or [N, 28, 28, 1] to [N, 7, 7, 81] float32.
No parameter is learned, so the features are computed once per dataset (see `features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VERSION = "1"  # bump when the numbers this module computes change (it keys the feature cache)


@dataclass(frozen=True)
class ScatteringParams:
    """Scales `J`, orientations `L`, input height/width."""

    J: int = 2
    L: int = 8
    height: int = 28
    width: int = 28

    @property
    def padded(self) -> tuple[int, int]:
        """The Fourier grid: the input reflect-padded to a multiple of 2^J with ≥ 2^J to spare (kymatio)."""
        step = 2 ** self.J
        return tuple(((n + step) // step + 1) * step for n in (self.height, self.width))

    @property
    def channels(self) -> int:
        return 1 + self.J * self.L + self.L ** 2 * self.J * (self.J - 1) // 2

    @property
    def output_shape(self) -> tuple[int, int, int]:
        step = 2 ** self.J
        return -(-self.height // step), -(-self.width // step), self.channels

    def describe(self) -> str:
        return f"scattering2d v{VERSION} J={self.J} L={self.L} {self.height}x{self.width} morlet float32"


def gabor_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """A Gabor filter on an m×n grid, periodized over the 5×5 neighbouring periods (kymatio's formula)."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    rot_inv = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]], np.float32)
    curv = rot @ np.diag([1.0, slant * slant]) @ rot_inv / (2 * sigma * sigma)
    gab = np.zeros((m, n), np.complex128)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * m:m + ex * m, ey * n:n + ey * n]
            arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy) \
                + 1j * (xx * np.cos(theta) * xi + yy * np.sin(theta) * xi)
            gab += np.exp(arg)
    return (gab / (2 * 3.1415 * sigma * sigma / slant)).astype(np.complex64)


def morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor filter minus the Gaussian envelope that makes its mean zero (a Morlet wavelet)."""
    wave = gabor_2d(m, n, sigma, theta, xi, slant)
    envelope = gabor_2d(m, n, sigma, theta, 0.0, slant)
    return wave - np.sum(wave) / np.sum(envelope) * envelope


def crop_spectrum(filt: np.ndarray, res: int) -> np.ndarray:
    """The filter's spectrum at resolution 2^-res: frequencies beyond the new Nyquist band zeroed, then
    folded (summed) onto the smaller grid (kymatio's `periodize_filter_fft`)."""
    m, n = filt.shape
    f = 2 ** res
    mask = np.ones(filt.shape, np.float32)
    mask[int(m * 2 ** (-res - 1)):int(m * 2 ** (-res - 1)) + int(m * (1 - 2 ** -res)), :] = 0
    mask[:, int(n * 2 ** (-res - 1)):int(n * 2 ** (-res - 1)) + int(n * (1 - 2 ** -res))] = 0
    return (filt * mask).reshape(f, m // f, f, n // f).sum(axis=(0, 2))


@lru_cache(maxsize=4)
def filter_bank(params: ScatteringParams) -> dict:
    """{'psi': [(j, theta, [spectrum at resolution 0, 1, …])], 'phi': [spectrum at resolution 0..J-1]}.

    Spectra are real (the filters are symmetric up to a shift) and float32, on `params.padded` / 2^res."""
    m, n = params.padded
    J, L = params.J, params.L
    psi = []
    for j in range(J):
        for theta in range(L):
            wave = morlet_2d(m, n, 0.8 * 2 ** j, (int(L - L / 2 - 1) - theta) * np.pi / L,
                             3.0 / 4.0 * np.pi / 2 ** j, 4.0 / L)
            spectrum = np.real(np.fft.fft2(wave)).astype(np.float32)
            psi.append((j, theta, [crop_spectrum(spectrum, r) for r in range(min(j + 1, max(J - 1, 1)))]))
    phi = np.real(np.fft.fft2(gabor_2d(m, n, 0.8 * 2 ** (J - 1), 0.0, 0.0))).astype(np.float32)
    return {"psi": psi, "phi": [crop_spectrum(phi, r) for r in range(J)]}


def _subsample(spectrum: np.ndarray, k: int) -> np.ndarray:
    """Spectrum of the signal subsampled by k in space (x[::k, ::k]): the mean of its k×k aliases."""
    if k == 1:
        return spectrum
    *batch, m, n = spectrum.shape
    return spectrum.reshape(*batch, k, m // k, k, n // k).mean(axis=(-4, -2))


def _scatter_chunk(x: np.ndarray, params: ScatteringParams) -> np.ndarray:
    """[B, H, W] float → [B, channels, H/2^J, W/2^J] float32 (kymatio's channel order)."""
    bank, J = filter_bank(params), params.J
    (m, n), (h, w) = params.padded, (params.height, params.width)
    top, left = (m - h) // 2, (n - w) // 2
    padded = np.pad(x, [(0, 0), (top, m - h - top), (left, n - w - left)], mode="reflect")
    u0 = np.fft.fft2(padded.astype(np.complex64))

    def low_pass(spectrum, j):  # ⋆ φ, subsample to 2^J, back to space, crop the padding's border
        s = np.real(np.fft.ifft2(_subsample(spectrum * bank["phi"][j], 2 ** (J - j))))
        return s[..., 1:-1, 1:-1]

    out = [low_pass(u0, 0)]
    second = []
    for j1, _, levels1 in bank["psi"]:
        u1 = np.fft.fft2(np.abs(np.fft.ifft2(_subsample(u0 * levels1[0], 2 ** j1))))
        out.append(low_pass(u1, j1))
        for j2, _, levels2 in bank["psi"]:
            if j2 > j1:
                u2 = np.fft.fft2(np.abs(np.fft.ifft2(_subsample(u1 * levels2[j1], 2 ** (j2 - j1)))))
                second.append(low_pass(u2, j2))
    return np.stack(out + second, axis=1).astype(np.float32)


def scattering(images: np.ndarray, params: ScatteringParams = ScatteringParams(), chunk: int = 500,
               on_progress=None) -> np.ndarray:
    """Scattering features [N, H/2^J, W/2^J, channels] float32 of images [N, H, W] or [N, H, W, 1]."""
    x = np.asarray(images, np.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (params.height, params.width):
        raise ValueError(f"scattering expects [N, {params.height}, {params.width}(, 1)] images, "
                         f"got {x.shape}")
    parts = []
    for start in range(0, len(x), chunk):
        parts.append(np.transpose(_scatter_chunk(x[start:start + chunk], params), [0, 2, 3, 1]))
        if on_progress:
            on_progress(min(start + chunk, len(x)), len(x))
    if not parts:
        return np.zeros((0, *params.output_shape), np.float32)
    return np.concatenate(parts)
