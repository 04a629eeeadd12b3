"""Fixed feature maps computed once per dataset and cached on disk (the ScatterNet models).

A model whose architecture starts with a weightless, data-independent transform (`model.FEATURES`)
trains on the transform's output: `prepare(dataset, architecture)` replaces the images by their features
before the trainer sees them, so every epoch runs on features and the transform never enters the
gradient tape. Being a fixed function of each example alone, it changes no sensitivity: one example still
moves one row of the training set.

Cache: one `.npy` file per split in `cache_dir()` ($DPSGD_CACHE_DIR, else ~/.cache/dpsgd/features), named
by a SHA-256 fingerprint of the images (dtype, shape, bytes) and of the transform's parameters and code
version, so a change of either computes (and caches) anew. Files are written atomically; an unreadable
or mis-shaped cache file is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpsgd_cli.errors import OutputError
from dpsgd_cli.training.data import Dataset

# architecture → the transform its input comes from
FEATURES = {"scatter_linear": "scattering", "scatter_pointwise": "scattering",
            "scatter_cnn_16_32": "scattering", "scatter_cnn_32_64": "scattering",
            "scatter_cnn_64_128": "scattering"}


def cache_dir() -> Path:
    return Path(os.environ.get("DPSGD_CACHE_DIR") or Path.home() / ".cache" / "dpsgd" / "features")


def fingerprint(images: np.ndarray, transform: str) -> str:
    """SHA-256 over the transform's description and the images' dtype, shape and bytes."""
    digest = hashlib.sha256(transform.encode() + b"\0")
    digest.update(f"{images.dtype}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def cached(images: np.ndarray, transform: str, compute: Callable[[np.ndarray], np.ndarray],
           shape: tuple[int, ...], folder: Path | None = None) -> np.ndarray:
    """`compute(images)`, read from the cache when an entry with the same fingerprint exists."""
    folder = cache_dir() if folder is None else Path(folder)
    path = folder / f"{transform.split()[0]}-{fingerprint(images, transform)[:32]}.npy"
    expected = (len(images), *shape)
    if path.is_file():
        try:
            out = np.load(path, allow_pickle=False)
            if out.shape == expected and out.dtype == np.float32:
                return out
        except (OSError, ValueError):
            pass
    out = np.asarray(compute(images), np.float32)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp.", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, out, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write the feature cache ({exc.strerror or exc}); set "
                          "DPSGD_CACHE_DIR to a writable folder") from None
    return out


def needs_features(architecture: str) -> bool:
    return architecture in FEATURES


def prepare(dataset: Dataset, architecture: str, folder: Path | None = None,
            uncached_tail: int = 0) -> Dataset:
    """The dataset the model of `architecture` trains on: features for ScatterNet models, else as is.

    `uncached_tail`: the last rows of the training split that are not the dataset's own (a run's audit
    canaries, different in every run): their features are computed apart and not cached, so the cache
    entry of the real training images is found again."""
    if not needs_features(architecture):
        return dataset
    x_train = model_inputs(dataset.x_train, architecture, folder, uncached_tail)
    x_test = model_inputs(dataset.x_test, architecture, folder)
    return dataclasses.replace(dataset, x_train=x_train, x_test=x_test)


def model_inputs(images: np.ndarray, architecture: str, folder: Path | None = None,
                 uncached_tail: int = 0) -> np.ndarray:
    """What the model of `architecture` sees for `images`: their features (cached, but for the last
    `uncached_tail` rows), or the images themselves for a model without a feature transform."""
    if not needs_features(architecture):
        return images
    from dpsgd_cli.training import scattering

    params = scattering.ScatteringParams()
    n = len(images) - uncached_tail
    out = cached(images[:n], params.describe(), lambda x: scattering.scattering(x, params),
                 params.output_shape, folder)
    if uncached_tail:
        out = np.concatenate([out, transform_images(images[n:], architecture)])
    return out


def transform_images(images: np.ndarray, architecture: str) -> np.ndarray:
    """The model input for `images` (not cached: for a few images, e.g. canaries); images unchanged for a
    model without a feature transform."""
    if not needs_features(architecture):
        return images
    from dpsgd_cli.training import scattering

    return np.asarray(scattering.scattering(images, scattering.ScatteringParams()), np.float32)
