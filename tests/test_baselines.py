"""The classical baselines of `seglab bench quality` (pipeline/bench/baselines.py) on small
synthetic scenes whose gold is known, and the harness's row (QualityRow) without a run."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from seglab.pipeline.bench import baselines as bb
from seglab.pipeline.bench.quality import BaselineResult, QualityRow
from seglab.pipeline.core.metrics import confusion, scores
from seglab.pipeline.evaluation.evaluate import Evaluation, SourceResult

IGNORE = 255
COLOURS = {0: (40, 60, 160), 1: (200, 190, 60), 2: (180, 40, 40)}


def scene(h: int = 48, w: int = 64, edge: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 left of column ``edge``, class 1 right of it, a class-2 disc inside class 0;
    flat colours plus Gaussian noise (sigma 8)."""
    yy, xx = np.mgrid[:h, :w]
    gold = np.where(xx < edge, 0, 1).astype(np.uint8)
    gold[(yy - 24) ** 2 + (xx - 16) ** 2 <= 8**2] = 2
    image = np.zeros((h, w, 3), np.float64)
    for k, colour in COLOURS.items():
        image[gold == k] = colour
    image += np.random.default_rng(seed).normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), gold


def far_scribbles(gold: np.ndarray) -> np.ndarray:
    """Class 0 at the far left, class 1 just right of the edge at 40, a dot-stroke in the disc:
    the nearest seed's boundary (column ~24) is far from the colour edge, so nearest fill is wrong
    on a quarter of the image and only a method that follows the colour edge recovers it."""
    weak = np.full(gold.shape, IGNORE, np.uint8)
    weak[6:42, 2:4] = 0
    weak[6:42, 45:47] = 1
    weak[22:27, 15:18] = 2
    assert (weak[weak != IGNORE] == gold[weak != IGNORE]).all()
    return weak


def miou(gold: np.ndarray, labels: np.ndarray) -> float:
    return scores(confusion(gold, labels, (0, 1, 2))).miou


NO_BOXES = np.zeros((0, 5), np.float32)
WALKERS = ("random_walker", "superpixel_walker")


def test_nearest_is_nearest_label_and_wrong_on_the_scene():
    image, gold = scene()
    weak = far_scribbles(gold)
    from seglab.stages.parts.nearest_label import nearest_label

    labels = bb.nearest(image, weak, NO_BOXES, (0, 1, 2), IGNORE)
    assert labels.dtype == weak.dtype and np.array_equal(labels, nearest_label(weak, IGNORE))
    assert miou(gold, labels) < 0.75  # the scene is built so that ignoring the image fails


@pytest.mark.parametrize("name", WALKERS)
def test_walkers_follow_the_colour_edge_not_the_nearest_seed(name):
    image, gold = scene()
    weak = far_scribbles(gold)
    labels = bb.BASELINES[name](image, weak, NO_BOXES, (0, 1, 2), IGNORE)
    assert labels.dtype == weak.dtype and labels.shape == gold.shape
    assert set(np.unique(labels)) <= {0, 1, 2}  # every pixel a class
    assert miou(gold, labels) > 0.9, miou(gold, labels)
    known = weak != IGNORE
    assert (labels[known] == weak[known]).all()  # weak pixels keep their class


def test_dense_crf_moves_the_nearest_fill_towards_the_colour_edge():
    pytest.importorskip("pydensecrf")
    image, gold = scene()
    weak = far_scribbles(gold)
    labels = bb.dense_crf(image, weak, NO_BOXES, (0, 1, 2), IGNORE)
    assert labels.dtype == weak.dtype and set(np.unique(labels)) <= {0, 1, 2}
    near = miou(gold, bb.nearest(image, weak, NO_BOXES, (0, 1, 2), IGNORE))
    assert miou(gold, labels) > max(0.85, near + 0.15), (miou(gold, labels), near)


def test_random_walker_keeps_a_one_pixel_scribble_when_it_downscales():
    image, gold = scene()
    weak = np.full(gold.shape, IGNORE, np.uint8)
    weak[10:40, 3] = 0  # one pixel wide: every cell it crosses keeps it
    weak[10:40, 50] = 1
    weak[24, 16] = 2  # a single point
    labels = bb.random_walker(image, weak, NO_BOXES, (0, 1, 2), IGNORE, factor=4)
    assert miou(gold, labels) > 0.85
    assert (labels == 2).sum() > 50  # the disc, from one point


def test_class_ids_that_are_not_indices_and_uint16_labels():
    image, gold = scene()
    ids = np.array([7, 300, 1000], np.uint16)
    weak = np.where(far_scribbles(gold) == IGNORE, 65535, ids[np.minimum(far_scribbles(gold), 2)]).astype(np.uint16)
    for name in ("nearest", *WALKERS):
        labels = bb.BASELINES[name](image, weak, NO_BOXES, (7, 300, 1000), 65535)
        assert labels.dtype == np.uint16 and set(np.unique(labels)) <= {7, 300, 1000}


def test_nothing_known_gives_the_ignore_id_and_one_class_fills_everything():
    image, gold = scene()
    empty = np.full(gold.shape, IGNORE, np.uint8)
    one = empty.copy()
    one[5, 5] = 1
    for name in ("nearest", *WALKERS):
        assert (bb.BASELINES[name](image, empty, NO_BOXES, (0, 1, 2), IGNORE) == IGNORE).all()
        assert (bb.BASELINES[name](image, one, NO_BOXES, (0, 1, 2), IGNORE) == 1).all()


# -- boxes ---------------------------------------------------------------------------------------


def object_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background 0; a class-1 disc (centre 24,20, radius 10) and a class-2 disc (centre 30,48,
    radius 8); tight boxes of both objects (x1, y1 exclusive)."""
    h, w = 56, 72
    yy, xx = np.mgrid[:h, :w]
    gold = np.zeros((h, w), np.uint8)
    gold[(yy - 24) ** 2 + (xx - 20) ** 2 <= 10**2] = 1
    gold[(yy - 30) ** 2 + (xx - 48) ** 2 <= 8**2] = 2
    image = np.zeros((h, w, 3), np.float64)
    for k, colour in COLOURS.items():
        image[gold == k] = colour
    image += np.random.default_rng(1).normal(0, 8, image.shape)
    boxes = np.array([[10, 14, 31, 35, 1], [40, 22, 57, 39, 2]], np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), gold, boxes


def inside(boxes: np.ndarray, shape: tuple[int, int], cls: int | None = None) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1, k in boxes.astype(int):
        if cls is None or k == cls:
            mask[y0:y1, x0:x1] = True
    return mask


BOX_BASELINES = ("nearest", "random_walker", "superpixel_walker", "dense_crf", "grabcut")


def _run(name: str, *args, **kwargs) -> np.ndarray:
    if name == "dense_crf":
        pytest.importorskip("pydensecrf")
    if name == "grabcut":
        pytest.importorskip("cv2")
    return bb.BASELINES[name](*args, **kwargs)


@pytest.mark.parametrize("name", BOX_BASELINES)
def test_with_a_background_outside_every_box_is_background_and_classes_stay_in_their_boxes(name):
    image, gold, boxes = object_scene()
    weak = np.full(gold.shape, IGNORE, np.uint8)  # what ingest stores for boxes
    labels = _run(name, image, weak, boxes, (0, 1, 2), IGNORE, background=0)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    assert (labels[~inside(boxes, gold.shape)] == 0).all()
    for k in (1, 2):
        assert not (labels[~inside(boxes, gold.shape, k)] == k).any()
    if name != "nearest":  # the image decides within the box; nearest fills a box core's square
        assert miou(gold, labels) > 0.8, miou(gold, labels)


@pytest.mark.parametrize("name", BOX_BASELINES)
def test_without_a_background_no_class_appears_outside_its_boxes(name):
    image, gold = scene()
    gold[gold == 2] = 0
    image[gold == 0] = scene(seed=1)[0][0, 0]  # two flat regions, the disc painted over
    boxes = np.array([[0, 0, 44, 48, 0], [36, 0, 64, 48, 1]], np.float32)  # they overlap on columns 36-43
    weak = np.full(gold.shape, IGNORE, np.uint8)
    labels = _run(name, image, weak, boxes, (0, 1, 2), IGNORE)
    for k in (0, 1):
        assert not (labels[~inside(boxes, gold.shape, k)] == k).any(), k
    assert (labels != IGNORE).all()  # every pixel is in some box
    if name != "nearest":
        assert miou(gold, labels) > 0.8, miou(gold, labels)


def test_outside_every_box_without_a_background_takes_no_class():
    image, gold = scene()
    boxes = np.array([[0, 0, 30, 20, 0], [40, 0, 64, 20, 1]], np.float32)
    weak = np.full(gold.shape, IGNORE, np.uint8)
    for name in ("nearest", *WALKERS):
        labels = bb.BASELINES[name](image, weak, boxes, (0, 1, 2), IGNORE)
        assert (labels[~inside(boxes, gold.shape)] == IGNORE).all()
        assert (labels[inside(boxes, gold.shape)] != IGNORE).all()


def test_nested_boxes_keep_the_smaller_ones_core_and_single_class_pixels_are_seeds():
    weak = np.full((40, 40), IGNORE, np.uint8)
    boxes = np.array([[0, 0, 40, 40, 1], [15, 15, 21, 24, 2]], np.float32)  # class 2 nested in class 1's box
    s = bb.seeds_of(weak, boxes, (0, 1, 2), IGNORE, background=None)
    assert s.seeds[19, 17] == 1 + 1 and (s.seeds[18:21, 17:19] == 2).all()  # the small box's core
    assert s.seeds[2, 2] == 1 and s.certain[2, 2]  # only class 1 allowed there: a certain seed
    assert not s.certain[19, 17]  # a core is a guess, not a certainty
    s = bb.seeds_of(weak, boxes, (0, 1, 2), IGNORE, background=0)
    assert s.seeds[2, 2] == -1 and s.allowed[0].all()  # background allowed anywhere: nothing certain inside


def test_a_missing_extra_names_the_bench_extra(monkeypatch):
    image, gold, boxes = object_scene()
    weak = np.full(gold.shape, IGNORE, np.uint8)
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    for name in ("grabcut", "dense_crf"):
        with pytest.raises(bb.MissingExtra, match=r"pip install -e '\.\[bench\]'"):
            bb.BASELINES[name](image, weak, boxes, (0, 1, 2), IGNORE, background=0)
    assert bb.baselines_for("points") == ("nearest", "random_walker", "superpixel_walker", "dense_crf")
    assert bb.baselines_for("boxes")[-1] == "grabcut"


# -- the harness's row, without a run -------------------------------------------------------------


def _scores(miou_value: float):
    """Scores whose mIoU is ``miou_value``: two classes, each with that share of its pixels right and
    the rest unlabelled."""
    tp = round(1000 * miou_value)
    return scores(np.array([[tp, 0, 1000 - tp], [0, tp, 1000 - tp]]))


def test_quality_row_json_has_every_baseline_the_best_and_the_speed_ratio(capsys, monkeypatch):
    def source(name, value, **measures):
        return SourceResult(name, 3, (), False, _scores(value), measures)

    evaluation = Evaluation(
        "m.yaml",
        "s.zarr",
        (0, 1),
        ("background", "object"),
        3,
        (
            source("weak", 0.5),
            source("nearest-label", 0.6),
            source("select", 0.8),
            source("refine", 0.85, uncertainty_auroc=0.75),
        ),
    )
    baselines = {
        "nearest": BaselineResult("nearest", 3, _scores(0.6), 0.002),
        "random_walker": BaselineResult("random_walker", 3, _scores(0.7), 0.5),
        "superpixel_walker": BaselineResult("superpixel_walker", 3, _scores(0.65), 0.2),
        "dense_crf": BaselineResult("dense_crf", 0, None, math.nan, "the dense_crf baseline needs the bench extra"),
    }
    row = QualityRow(
        "m.yaml", "grabcut", "points", None, 0, {"total": 1.0}, evaluation, baselines, {"select": 1.5, "refine": 2.5}
    )
    data = json.loads(json.dumps(row.to_json()))
    assert data["miou"] == {
        "weak": 50.0,
        "nearest": 60.0,
        "random_walker": 70.0,
        "superpixel_walker": 65.0,
        "dense_crf": None,
        "select": 80.0,
        "refine": 85.0,
    }
    assert data["best_baseline"] == "random_walker" and data["refine_minus_best_baseline"] == 15.0
    assert data["seconds_per_image"] == {
        "nearest": 0.002,
        "random_walker": 0.5,
        "superpixel_walker": 0.2,
        "dense_crf": None,
        "select": 1.5,
        "refine": 2.5,
    }
    assert data["speed_ratio"] == 8.0  # (1.5 + 2.5) / 0.5
    assert data["baselines"]["dense_crf"]["unavailable"].endswith("bench extra")
    assert data["gain_points"] == pytest.approx(20.0) and data["uncertainty_auroc"] == 0.75
    assert data["images"] == 3 and data["evaluation"]["sources"][0]["source"] == "weak"

    from rich.console import Console

    from seglab.cli import render

    monkeypatch.setattr(render, "console", Console(width=300, highlight=False, soft_wrap=True))
    render.quality_table([row], as_json=False)
    out = capsys.readouterr().out
    assert "random walker" in out and "GrabCut" in out and "—" in out  # no GrabCut for points
    assert "dense CRF not measured" in out and "+15.0" in out and "0.5 (random walker)" in out


def test_overlapping_boxes_with_a_background_keep_each_class_inside_its_box():
    image, gold = scene()
    weak = np.full(gold.shape, IGNORE, np.uint8)
    boxes = np.array([[20, 10, 30, 30, 0], [18, 8, 32, 32, 1]], np.float32)  # 0's box inside 1's
    s = bb.seeds_of(weak, boxes, (0, 1, 2), IGNORE, background=2)
    assert (s.seeds[17:23, 24:26] == 0).all() and (s.seeds[16:24, 22] == 1).all()  # both cores seeded
    for name in ("nearest", *WALKERS):
        labels = bb.BASELINES[name](image, weak, boxes, (0, 1, 2), IGNORE, background=2)
        assert not (labels[~inside(boxes, gold.shape, 1)] == 1).any()
        assert (labels[~inside(boxes, gold.shape)] == 2).all()
