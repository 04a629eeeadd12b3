"""Augmentation multiplicity (De et al. 2022): K fixed views of every training example in one clipped unit.

`data.augmentation: mirror` gives K = 2 views, the image and its left-right mirror. The step takes an
example's clipped unit gradient as the gradient of its views' *mean* loss, so one example still moves the
clipped sum by at most C: the sensitivity, σ and the accounting stay those of per-example DP-SGD (no σ/2
rule: the unit is one example, not a microbatch of several). The views are fixed functions of each
example alone (no randomness, nothing learned from the data); for ScatterNet models each view is
transformed to features (and cached) like the images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dpsgd_cli.training import features
from dpsgd_cli.training.data import Dataset


def mirror(images: np.ndarray) -> np.ndarray:
    """Left-right mirror of [N, H, W(, C)] images (the width axis reversed)."""
    return np.ascontiguousarray(images[:, :, ::-1])


VIEWS = {"none": (), "mirror": (mirror,)}  # the views beside the image itself


def with_views(dataset: Dataset, images: np.ndarray, augmentation: str, architecture: str,
               folder: Path | None = None, uncached_tail: int = 0) -> Dataset:
    """`dataset` (already the model's inputs, `features.prepare`) with `train_views` [N, K, *model input]
    set: view 0 is its x_train, the others the model inputs of `VIEWS[augmentation]` of the raw training
    `images`, in that order. Unchanged for 'none'. `uncached_tail` as in `features.prepare` (audit
    canaries: their features are not cached)."""
    extra = VIEWS[augmentation]
    if not extra:
        return dataset
    views = [dataset.x_train, *(features.model_inputs(view(images), architecture, folder, uncached_tail)
                                for view in extra)]
    return dataclasses.replace(dataset, train_views=np.stack(views, axis=1))
