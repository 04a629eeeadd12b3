"""An image folder in Keras's `image_dataset_from_directory` layout (`data.dataset: image_folder`):

    <data.path>/train/<class>/<image>    <data.path>/test/<class>/<image>

Classes are the training folder's sub-folders in sorted order (label k = the k-th name, as Keras does);
the test folder may lack a class but not add one. Images (.png, .jpg, .jpeg, .bmp, .gif) are decoded with
Pillow: grayscale ones as [H, W, 1], any other mode as RGB [H, W, 3], pixels scaled to [0, 1]; every image
of both splits must have the same size and channel count. Records are taken in the order of their file
names across classes (ties by class), so numbered files keep the order they were written in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpsgd_cli.errors import DataError
from dpsgd_cli.training.sources.base import SourceData, as_inputs, check_splits

EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
GRAYSCALE = ("L", "1")


def load(root: Path) -> SourceData:
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (data.path of an image_folder source: a folder holding "
                        "train/<class>/… and test/<class>/…)")
    classes = _classes(root / "train")
    test_classes = _classes(root / "test")
    unknown = [c for c in test_classes if c not in classes]
    if unknown:
        raise DataError(f"{root / 'test'}: the test split has classes the training split lacks: "
                        f"{', '.join(unknown[:5])}")
    shape: dict[str, tuple[tuple[int, ...], Path]] = {}
    splits = []
    for split in ("train", "test"):
        files = _files(root / split, classes)
        images = np.stack([_decode(path, shape) for path, _ in files]) if files else np.zeros((0, 1, 1, 1))
        labels = np.array([label for _, label in files], dtype=np.int32)
        splits += [as_inputs(images, str(root / split)), labels]
    x_train, y_train, x_test, y_test = splits
    names = check_splits(x_train, y_train, x_test, y_test, str(root), class_names=tuple(classes))
    return SourceData(x_train, y_train, x_test, y_test, names,
                      record="one image file under train/ with its class (the folder it is in)",
                      origin=str(root))


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; an image folder holds train/<class>/… and "
                        "test/<class>/…")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: holds no class folders; put each class's images in train/<class>/")
    return classes


def _files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image file, label) of every image in `folder`'s class folders, ordered by file name, then class."""
    found = []
    for label, name in enumerate(classes):
        sub = folder / name
        if sub.is_dir():
            found += [(p, label) for p in sub.iterdir()
                      if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")]
    return sorted(found, key=lambda item: (item[0].name, item[1]))


def _decode(path: Path, shape: dict[str, tuple[tuple[int, ...], Path]]) -> np.ndarray:
    """uint8 [H, W, C] of one image; DataError if unreadable or its size differs from the first image's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in GRAYSCALE:
                pixels = np.asarray(image.convert("L"))[..., None]
            elif image.mode in ("I;16", "I", "F") or image.mode.startswith("I;"):
                raise DataError(f"{path}: {image.mode} images (16-bit or float) are not supported; save "
                                "8-bit grayscale or RGB images")
            else:
                pixels = np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    first = shape.setdefault("first", (pixels.shape, path))
    if pixels.shape != first[0]:
        h, w, c = pixels.shape
        fh, fw, fc = first[0]
        raise DataError(f"{path}: is {h}×{w}×{c} but {first[1]} is {fh}×{fw}×{fc}; images of mixed sizes "
                        "(resize them to one size first)")
    return pixels
