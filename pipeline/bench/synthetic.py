"""Synthetic scenes with known truth, for tests and for ``seglab bench scale``:
a textured background with a red disc and a blue rectangle, and scribbles drawn on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def shapes_image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with a red disc (class 1) and a blue rectangle (class 2).

    -> (HxWx3 uint8 image, HxW uint8 ground truth: 0 background, 1 disc, 2 rectangle).
    """
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (90, 140, 80)
    image += rng.normal(0, 8, image.shape)
    truth = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    cy, cx, r = height * 0.35, width * 0.3, min(height, width) * 0.2
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    rect = (yy > height * 0.55) & (yy < height * 0.9) & (xx > width * 0.55) & (xx < width * 0.9)
    image[disc] = (200, 40, 40) + rng.normal(0, 8, (disc.sum(), 3))
    image[rect] = (40, 60, 200) + rng.normal(0, 8, (rect.sum(), 3))
    truth[disc], truth[rect] = 1, 2
    return np.clip(image, 0, 255).astype(np.uint8), truth


def scribbles_from_truth(truth: np.ndarray, unlabelled: int = 255) -> np.ndarray:
    """A short horizontal stroke through the middle of each class region (HxW uint8)."""
    weak = np.full(truth.shape, unlabelled, np.uint8)
    for cls in np.unique(truth):
        ys, xs = np.nonzero(truth == cls)
        y = int(np.median(ys))
        row = xs[ys == y]
        lo, hi = np.percentile(row, [30, 70]).astype(int)
        weak[y, lo : hi + 1] = cls
    return weak


def write_dataset(root: Path, sizes: Sequence[tuple[int, int]]) -> None:
    """``root``/images/imgNN.png and ``root``/scribbles/imgNN.png (255 = unlabelled), one per
    (height, width) in ``sizes``, image i drawn with seed i."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "scribbles").mkdir(exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        image, truth = shapes_image(h, w, seed=i)
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(scribbles_from_truth(truth)).save(root / "scribbles" / f"img{i:02d}.png")
