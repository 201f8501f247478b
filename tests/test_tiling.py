"""Large images: encoded in overlapping tiles, decoded per tile, stitched back."""

from __future__ import annotations

import numpy as np
from conftest import shapes_image

from seglab.stages.embed import TilingConfig
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import PromptBatch
from seglab.workers.backend import build_backend
from seglab.workers.tiling import plan_tiles
from seglab.workers.weightfree import WeightFreeConfig


def test_tiles_cover_the_image_once_with_halo():
    tiles = plan_tiles(300, 700, tile=128, halo=32)
    assert len(tiles) == 3 * 6
    cover = np.zeros((300, 700), int)
    for y0, _x0, _y1, x1, cy0, cx0, cy1, cx1 in tiles:
        cover[cy0:cy1, cx0:cx1] += 1
        assert y0 == max(0, cy0 - 32) and x1 == min(700, cx1 + 32)
    assert (cover == 1).all()


def test_an_image_several_times_the_tile_size_is_segmented_across_tiles():
    image, truth = shapes_image(300, 700, seed=4)  # disc r=60 and a 105x245 rectangle: both cross cores
    backend = build_backend(WeightFreeConfig(), TilingConfig(above=256, tile=128, halo=32, grid_per_tile=128))
    features = backend.encode([image])[0]
    assert features["tiles"].shape == (18, 8) and features["lab"].shape[0] == 18
    frame = ImageFrame.from_array(features["frame"])
    assert frame.original_hw == (300, 700) and frame.grid_size == 128 * 6

    def points(cls, count):
        yx = np.argwhere(truth == cls)
        return yx[np.linspace(0, len(yx) - 1, count).astype(int)][:, ::-1] + 0.5

    coords = np.zeros((2, 24, 2), np.float32)
    labels = np.full((2, 24), -1, np.int32)
    for i, (cls, other) in enumerate(((1, 2), (2, 1))):
        coords[i, :12], labels[i, :12] = points(cls, 12), 1
        coords[i, 12:20], labels[i, 12:20] = points(0, 8), 0
        coords[i, 20:24], labels[i, 20:24] = points(other, 4), 0
    prompts = PromptBatch(
        coords, labels, np.full((2, 4), np.nan, np.float32), np.array([1, 2], np.int32), np.zeros(2, np.int32)
    )
    logits, quality = backend.decode(features, prompts)
    assert logits.shape == (2, 3, 768, 768) and quality.shape == (2, 3)
    for i, cls in enumerate((1, 2)):
        mask = frame.grid_to_image(logits[i, quality[i].argmax()]) > 0
        iou = (mask & (truth == cls)).sum() / (mask | (truth == cls)).sum()
        assert iou > 0.7, (cls, iou)
        touched = {tuple(t[4:]) for t in features["tiles"] if mask[t[4] : t[6], t[5] : t[7]].any()}
        assert len(touched) >= 2  # the object was stitched from several tiles


def test_small_images_are_not_tiled():
    backend = build_backend(WeightFreeConfig(), TilingConfig(above=256, tile=128, halo=32))
    features = backend.encode([shapes_image(100, 200, seed=0)[0]])[0]
    assert features["tiles"].shape == (0, 8) and features["lab"].shape == (3, 128, 256)  # the resized image, unpadded
