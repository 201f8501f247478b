"""Tests of the weight-free promptable backend (superpixel random walker)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data
from skimage.draw import ellipse

from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import PromptBatch
from seglab.workers.weightfree import WeightFreeBackend, WeightFreeConfig

S = 256


def scene(height: int = 120, width: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured background with a red disc (A, left) and a blue rectangle (B, right).

    -> (image uint8 [H, W, 3], mask of A bool [H, W], mask of B bool [H, W]).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.empty((height, width, 3), np.float64)
    img[:] = (105, 125, 95)
    img += 14 * np.sin(xx / 3.0)[..., None] * np.array([1.0, 0.8, 0.6])
    img += rng.normal(0, 10, img.shape)
    a = (yy - 0.5 * height) ** 2 + (xx - 0.25 * width) ** 2 < (0.25 * height) ** 2
    b = (np.abs(yy - 0.5 * height) < 0.28 * height) & (np.abs(xx - 0.75 * width) < 0.14 * width)
    img[a] = (200, 45, 40) + rng.normal(0, 10, (a.sum(), 3))
    img[b] = (40, 60, 200) + rng.normal(0, 10, (b.sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8), a, b


def prompts(points: list[list[tuple[float, float, int]]], boxes: list | None = None) -> PromptBatch:
    """P prompts from lists of (x, y, label) points (padded with label -1) and optional boxes."""
    p, k = len(points), max(1, max(len(q) for q in points))
    coords = np.zeros((p, k, 2), np.float32)
    labels = np.full((p, k), -1, np.int32)
    for i, q in enumerate(points):
        for j, (x, y, lab) in enumerate(q):
            coords[i, j], labels[i, j] = (x, y), lab
    box = np.full((p, 4), np.nan, np.float32) if boxes is None else np.array(boxes, np.float32)
    return PromptBatch(coords, labels, box, np.zeros(p, np.int32), np.arange(p, dtype=np.int32))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def best_mask(backend, feats, logits, quality, i: int = 0) -> np.ndarray:
    """Mask on the original image of prompt i's highest-quality candidate."""
    return backend.frame(feats).grid_to_image(logits[i, int(np.argmax(quality[i]))]) > 0


@pytest.fixture(scope="module")
def backend() -> WeightFreeBackend:
    return WeightFreeBackend(WeightFreeConfig())


@pytest.fixture(scope="module")
def synthetic(backend):
    img, a, b = scene()
    return img, a, b, backend.encode([img])[0]


def test_config_is_validated_and_signed():
    with pytest.raises(ValidationError):
        WeightFreeConfig(input_size=32)
    with pytest.raises(ValidationError):
        WeightFreeConfig(unknown_knob=1)
    with pytest.raises(ValidationError):
        WeightFreeConfig(thresholds=(0.8, 0.7, 1.5))
    sig = WeightFreeBackend(WeightFreeConfig()).signature()
    assert sig["model"] == "weightfree"
    assert json.loads(sig["preprocessing"]) == WeightFreeConfig().model_dump(mode="json")
    assert WeightFreeBackend(WeightFreeConfig(input_size=128)).signature()["preprocessing"] != sig["preprocessing"]


def test_point_prompt_segments_the_clicked_shape(backend, synthetic):
    img, a, b, feats = synthetic
    logits, quality = backend.decode(feats, prompts([[(50, 60, 1), (150, 60, 0)], [(150, 60, 1), (50, 60, 0)]]))
    assert logits.shape == (2, 3, S, S) and logits.dtype == np.float32
    assert quality.shape == (2, 3) and quality.dtype == np.float32
    assert iou(best_mask(backend, feats, logits, quality, 0), a) >= 0.85  # measured 0.97
    assert iou(best_mask(backend, feats, logits, quality, 1), b) >= 0.85  # measured 0.97


def test_box_prompt_alone_segments_the_shape(backend, synthetic):
    img, a, b, feats = synthetic
    ys, xs = np.nonzero(a)
    box = [xs.min() - 6, ys.min() - 6, xs.max() + 6, ys.max() + 6]
    logits, quality = backend.decode(feats, prompts([[]], boxes=[box]))
    mask = best_mask(backend, feats, logits, quality)
    assert iou(mask, a) >= 0.85  # measured 0.97
    # outside the box is never inside the mask, for any candidate
    full = backend.frame(feats).grid_to_image(logits[0]) > 0
    assert not full[:, :, : int(box[0]) - 1].any() and not full[:, :, int(box[2]) + 2 :].any()


@pytest.mark.parametrize("fine", [(1200, 900), (60,)])
def test_box_cutting_through_a_region_bounds_every_candidate(fine):
    backend = WeightFreeBackend(WeightFreeConfig(fine_segments=fine, snap_segments=(20, 8)))
    img, a, b = scene()
    feats = backend.encode([img])[0]
    box = [20, 25, 40, 95]  # the left third of disc A only
    logits, _ = backend.decode(feats, prompts([[(30, 60, 1)], [(38, 60, 1)]], boxes=[box, box]))
    full = backend.frame(feats).grid_to_image(logits) > 0  # [2, 3, H, W]
    inside = np.zeros(a.shape, bool)
    inside[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    # the rest of the disc lies outside the box with the same colour, in the same (large)
    # superpixels: only the box constraint keeps the candidates inside
    assert full.any(axis=(2, 3)).all() and not (full & ~inside).any()


def test_same_colour_elsewhere_is_not_taken(backend):
    """A second red disc, not connected to the clicked one, stays out of every candidate."""
    img, a, _ = scene(120, 200, seed=2)
    twin = np.roll(a, 100, axis=1)  # where the blue rectangle was
    img[twin] = img[a]
    feats = backend.encode([img])[0]
    logits, quality = backend.decode(feats, prompts([[(50, 60, 1), (100, 20, 0)]]))
    full = backend.frame(feats).grid_to_image(logits[0]) > 0
    assert (full & twin).sum() < 0.05 * twin.sum()
    assert iou(best_mask(backend, feats, logits, quality), a) >= 0.85


def test_positive_points_only_stay_on_the_shape(backend, synthetic):
    img, a, b, feats = synthetic
    logits, quality = backend.decode(feats, prompts([[(50, 60, 1), (40, 50, 1)]]))
    assert iou(best_mask(backend, feats, logits, quality), a) >= 0.7  # measured 0.97


def test_mixed_sizes_cache_only_their_resized_pixels_and_get_right_frames(backend):
    sizes = [(120, 200), (300, 90), (64, 64), (33, 250)]
    feats = backend.encode([scene(h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)])
    assert set(feats[0]) == set(backend.feature_names()) and "frame" in feats[0]
    for f in feats:  # no canvas padding is cached: a 120 x 200 image's features are 154 x 256
        rh, rw = backend.frame(f).resized_hw
        assert f["superpixels"].shape == (4, rh, rw) and f["lab"].shape == (3, rh, rw) and f["edges"].shape == (rh, rw)
        assert f["superpixels"].dtype == np.int16 and f["superpixels"].min() == 0
    assert feats[0]["lab"].shape == (3, 154, S)
    # as an earlier seglab cached them: padded to the canvas (-1 / 0 outside the image), int32 superpixels
    rh, rw = backend.frame(feats[0]).resized_hw
    canvas = {
        name: np.full((*feats[0][name].shape[:-2], S, S), -1 if name == "superpixels" else 0, feats[0][name].dtype)
        for name in ("lab", "edges", "superpixels")
    }
    for name, padded in canvas.items():
        padded[..., :rh, :rw] = feats[0][name]
    earlier = {**feats[0], **canvas, "superpixels": canvas["superpixels"].astype(np.int32)}
    point = prompts([[(50, 60, 1)]])
    for a, b in zip(backend.decode(feats[0], point), backend.decode(earlier, point)):
        np.testing.assert_array_equal(a, b)
    for (h, w), f in zip(sizes, feats):
        frame = backend.frame(f)
        assert frame == ImageFrame((h, w), 256, 256)
        logits, _ = backend.decode(f, prompts([[(w / 4, h / 2, 1)]]))
        assert frame.grid_to_image(logits[0]).shape == (3, h, w)


@pytest.mark.parametrize("shape", [(120, 200), (200, 90)])
def test_points_and_padding_respected_by_every_candidate(backend, shape):
    h, w = shape
    img, a, b = scene(h, w, seed=3)
    feats = backend.encode([img])[0]
    frame = backend.frame(feats)
    rng = np.random.default_rng(1)
    batch = [
        [(x, y, int(lab)) for x, y, lab in zip(rng.uniform(0, w - 1, 4), rng.uniform(0, h - 1, 4), [1, 1, 0, 0])]
        for _ in range(6)
    ]
    logits, _ = backend.decode(feats, prompts(batch))
    gh, gw = frame.grid_hw
    assert (gh, gw) != (S, S)
    assert (logits[:, :, gh:, :] < 0).all() and (logits[:, :, :, gw:] < 0).all()
    for i, pts in enumerate(batch):
        full = frame.grid_to_image(logits[i])
        for x, y, lab in pts:
            values = full[:, int(y), int(x)]
            assert ((values > 0) if lab == 1 else (values < 0)).all(), (i, x, y, lab, values)


def test_quality_is_computed_not_constant(backend, synthetic):
    img, a, b, feats = synthetic
    batch = [[(50, 60, 1), (150, 60, 0)], [(10, 10, 1)], [(100, 100, 1), (50, 60, 0)], [(150, 60, 1)]]
    _, quality = backend.decode(feats, prompts(batch))
    assert ((quality >= 0) & (quality <= 1)).all()
    assert np.ptp(quality) > 0.05
    assert (np.ptp(quality, axis=1) > 1e-4).any()


def test_deterministic_and_empty(backend):
    img = scene(90, 140, seed=5)[0]
    f1, f2 = backend.encode([img])[0], backend.encode([img])[0]
    for name in backend.feature_names():
        np.testing.assert_array_equal(f1[name], f2[name])
    batch = prompts([[(30, 45, 1), (100, 45, 0)], [(100, 40, 1)]], boxes=[[np.nan] * 4, [80, 10, 130, 80]])
    l1, q1 = backend.decode(f1, batch)
    l2, q2 = backend.decode(f2, batch)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(q1, q2)
    logits, quality = backend.decode(f1, PromptBatch.empty())
    assert logits.shape == (0, 3, S, S) and quality.shape == (0, 3)
    assert logits.dtype == np.float32 and quality.dtype == np.float32


def test_other_input_size_maps_onto_the_grid():
    backend = WeightFreeBackend(WeightFreeConfig(input_size=128))
    img, a, b = scene()
    feats = backend.encode([img])[0]
    assert feats["superpixels"].shape[1:] == backend.frame(feats).resized_hw and max(feats["superpixels"].shape) == 128
    logits, quality = backend.decode(feats, prompts([[(50, 60, 1), (150, 60, 0)]]))
    assert logits.shape == (1, 3, S, S)
    assert iou(best_mask(backend, feats, logits, quality), a) >= 0.8  # measured 0.93


def test_real_photo_coffee_cup(backend):
    """skimage's coffee photo: points on the cup and saucer, negatives on the wooden table."""
    img = data.coffee()  # 400 x 600
    feats = backend.encode([img])[0]
    points = [
        (290, 60, 1),
        (220, 250, 1),
        (150, 250, 1),
        (430, 290, 1),
        (50, 50, 0),
        (520, 80, 0),
        (550, 300, 0),
        (60, 350, 0),
        (300, 390, 0),
    ]
    logits, quality = backend.decode(feats, prompts([points]))
    mask = best_mask(backend, feats, logits, quality)
    # hand-drawn rough outline of the tableware: the saucer's ellipse plus the cup's rim
    tableware = np.zeros(img.shape[:2], bool)
    tableware[ellipse(235, 278, 165, 202, shape=tableware.shape)] = True
    tableware[ellipse(112, 292, 97, 120, shape=tableware.shape)] = True
    assert iou(mask, tableware) >= 0.8  # measured 0.92 (the larger-region candidate wins)
    assert not mask[:60, :100].any() and not mask[330:, 520:].any()  # table corners
