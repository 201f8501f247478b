"""The weight-free backend: real masks from cached features, SAM's interface and frame."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import PromptBatch
from seglab.workers.weightfree import WeightFreeBackend, WeightFreeConfig

from conftest import shapes_image


def prompts(points_per_prompt: list[list[tuple[float, float, int]]], boxes=None) -> PromptBatch:
    p, k = len(points_per_prompt), max(len(pts) for pts in points_per_prompt)
    coords = np.zeros((p, k, 2), np.float32)
    labels = np.full((p, k), -1, np.int32)
    for i, pts in enumerate(points_per_prompt):
        for j, (x, y, lab) in enumerate(pts):
            coords[i, j], labels[i, j] = (x, y), lab
    box_arr = np.full((p, 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32)
    return PromptBatch(coords, labels, box_arr, np.zeros(p, np.int32), np.arange(p, dtype=np.int32))


def best_mask(backend, features, batch) -> np.ndarray:
    """bool [P, H, W]: the highest-quality candidate per prompt, on the original image."""
    logits, quality = backend.decode(features, batch)
    frame = ImageFrame.from_array(features["frame"])
    kept = logits[np.arange(len(batch)), quality.argmax(1)]
    return frame.grid_to_image(kept) > 0


def iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def backend():
    return WeightFreeBackend(WeightFreeConfig())


@pytest.fixture(scope="module")
def shapes(backend):
    image, truth = shapes_image(120, 200, seed=3)
    return image, truth, backend.encode([image])[0]


def test_points_and_boxes_find_the_object(backend, shapes):
    image, truth, features = shapes
    disc_y, disc_x = np.argwhere(truth == 1).mean(0)
    rect_y, rect_x = np.argwhere(truth == 2).mean(0)
    batch = prompts([[(disc_x, disc_y, 1), (rect_x, rect_y, 0)], [(rect_x, rect_y, 1), (disc_x, disc_y, 0)]])
    masks = best_mask(backend, features, batch)
    assert iou(masks[0], truth == 1) >= 0.8  # measured 0.84: superpixel-snapped border
    assert iou(masks[1], truth == 2) >= 0.8
    ys, xs = np.nonzero(truth == 1)
    boxed = prompts([[(0, 0, -1)]], boxes=[[xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3]])
    assert iou(best_mask(backend, features, boxed)[0], truth == 1) >= 0.8  # measured 0.84


def test_features_have_fixed_shapes_and_frames_map_back(backend):
    images = [shapes_image(h, w, seed=0)[0] for h, w in ((60, 200), (240, 90), (128, 128))]
    encoded = backend.encode(images)
    assert set(encoded[0]) == set(backend.feature_names())
    for image, feats in zip(images, encoded):
        assert {k: v.shape for k, v in feats.items()} == {k: v.shape for k, v in encoded[0].items()}
        frame = ImageFrame.from_array(feats["frame"])
        assert frame.original_hw == image.shape[:2]
        assert frame.grid_to_image(np.zeros((2, 256, 256), np.float32)).shape == (2, *image.shape[:2])


def test_candidates_respect_points_and_padding(backend):
    image, truth = shapes_image(60, 200, seed=1)  # wide: most of the grid is padding
    features = backend.encode([image])[0]
    frame = ImageFrame.from_array(features["frame"])
    disc = np.argwhere(truth == 1).mean(0)[::-1]
    batch = prompts([[(*disc, 1), (20, 55, 0)], [(150, 45, 1), (*disc, 0)]])
    logits, quality = backend.decode(features, batch)
    assert logits.shape == (2, 3, 256, 256) and quality.shape == (2, 3) and logits.dtype == np.float32
    gh, gw = frame.grid_hw
    assert (logits[:, :, gh:, :] < 0).all() and (logits[:, :, :, gw:] < 0).all()
    for i in range(2):
        for (x, y), lab in zip(batch.coords[i], batch.labels[i]):
            gx, gy = np.floor(frame.scale_to_grid(np.array([x, y]))).astype(int)
            assert ((logits[i, :, gy, gx] > 0) == (lab == 1)).all()
    assert ((quality >= 0) & (quality <= 1)).all()
    assert len(np.unique(np.round(quality, 4))) > 1


def test_deterministic_and_empty(backend, shapes):
    _, _, features = shapes
    batch = prompts([[(50, 40, 1)]])
    a, qa = backend.decode(features, batch)
    b, qb = backend.decode(features, batch)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(qa, qb)
    logits, quality = backend.decode(features, PromptBatch.empty())
    assert logits.shape == (0, 3, 256, 256) and quality.shape == (0, 3)


def test_a_real_photograph(backend):
    """Coffee cup: points on the cup and saucer vs. on the table."""
    image = skimage.data.coffee()  # 400 x 600
    features = backend.encode([image])[0]
    batch = prompts([[(290, 60, 1), (220, 250, 1), (150, 250, 1), (430, 290, 1),
                      (50, 50, 0), (520, 80, 0), (550, 300, 0), (60, 350, 0), (300, 390, 0)]])
    mask = best_mask(backend, features, batch)[0]
    yy, xx = np.mgrid[:400, :600]
    # hand-placed rough extent of cup + saucer: an ellipse centred (290, 215), radii 215 x 165;
    # the mask stays on the tableware (precision) and covers a good part of it (measured
    # 0.89 and 0.47: the dark cup body and the coffee carry no positive point)
    ellipse = ((xx - 290) / 215.0) ** 2 + ((yy - 215) / 165.0) ** 2 <= 1
    assert (mask & ellipse).sum() / mask.sum() >= 0.85
    assert (mask & ellipse).sum() / ellipse.sum() >= 0.35
    assert not mask[:60, :100].any() and not mask[330:, 520:].any()  # table corners
