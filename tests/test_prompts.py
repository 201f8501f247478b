"""The prompts stage's samplers on synthetic weak labels with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from seglab.stages.parts.promptset import NEGATIVE, PADDING, POSITIVE
from seglab.stages.prompts import (
    Prompts,
    PromptsConfig,
    certainty_weighted_points,
    farthest_points,
    grown_box,
    skeleton_pixels,
)

IGNORE = 255
NO_BOXES = np.zeros((0, 5), np.float32)


def compile_(weak, boxes=NO_BOXES, **config):
    with_boxes = config.pop("with_boxes", False)
    certainty = config.pop("certainty", None)
    return Prompts(PromptsConfig(**config)).compile(
        weak, boxes, IGNORE, with_boxes=with_boxes, certainty=certainty, rng=np.random.default_rng(0)
    )


def test_farthest_points_spread_along_a_line_and_reach_both_ends():
    line = np.stack([np.zeros(101, int), np.arange(101)], axis=1)  # (y, x)
    picked = farthest_points(line, 5)
    assert sorted(picked[:, 1].tolist()) == [0, 25, 50, 75, 100]
    assert np.array_equal(farthest_points(line, 5), picked)  # deterministic
    assert len(farthest_points(line[:3], 5)) == 3


def test_skeleton_of_a_bar_is_its_middle_row():
    mask = np.zeros((21, 60), bool)
    mask[5:16, 5:55] = True
    rows = skeleton_pixels(mask)[:, 0]
    assert np.all(np.abs(rows - 10) <= 1)


def test_one_prompt_per_component_with_positives_on_its_skeleton():
    weak = np.full((40, 80), IGNORE, np.uint8)
    weak[5, 5:30] = 1  # class 1, component 0 (first in scan order)
    weak[30, 50:75] = 1  # class 1, component 1
    weak[20, 40:45] = 2  # class 2, short
    batch = compile_(weak, points_per_component=4, negatives_per_prompt=0)
    assert sorted(zip(batch.classes.tolist(), batch.components.tolist())) == [(1, 0), (1, 1), (2, 0)]
    for p in range(len(batch)):
        xy = batch.coords[p][batch.labels[p] == POSITIVE]
        assert len(xy) == 4
        cols, rows = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
        assert np.all(weak[rows, cols] == batch.classes[p])
    assert np.isnan(batch.boxes).all()  # scribbles carry no box


def test_negatives_come_one_from_each_of_the_nearest_other_components():
    weak = np.full((100, 100), IGNORE, np.uint8)
    weak[50, 50] = 1
    weak[50, 58] = 2  # near: two components of class 2, 1 px apart
    weak[50, 60] = 2
    weak[50, 70] = 3  # middle
    weak[50, 95] = 4  # far
    batch = compile_(weak, points_per_component=1, negatives_per_prompt=2)
    p = int(np.flatnonzero(batch.classes == 1)[0])
    neg = batch.coords[p][batch.labels[p] == NEGATIVE]
    assert sorted(np.floor(neg[:, 0]).astype(int).tolist()) == [58, 60]
    batch = compile_(weak, points_per_component=1, negatives_per_prompt=3)
    neg = batch.coords[p][batch.labels[p] == NEGATIVE]
    assert sorted(np.floor(neg[:, 0]).astype(int).tolist()) == [58, 60, 70]


def test_coarse_components_get_grown_boxes_clipped_to_the_image():
    weak = np.full((50, 100), IGNORE, np.uint8)
    weak[10:20, 20:60] = 3
    weak[40:50, 0:10] = 4
    batch = compile_(weak, with_boxes=True, box_margin=0.1)
    box = batch.boxes[batch.classes == 3][0]
    np.testing.assert_allclose(box, [16, 9, 64, 21])
    np.testing.assert_allclose(batch.boxes[batch.classes == 4][0], [0, 39, 11, 50])
    np.testing.assert_allclose(grown_box(weak == 3, 0.0), [20, 10, 60, 20])


def test_boxes_become_box_only_prompts_largest_first():
    boxes = np.array([[0, 0, 10, 10, 1], [5, 5, 45, 25, 2]], np.float32)
    batch = compile_(np.full((30, 50), IGNORE, np.uint8), boxes)
    assert batch.classes.tolist() == [2, 1] and batch.components.tolist() == [1, 0]
    np.testing.assert_allclose(batch.boxes, boxes[[1, 0], :4])
    assert np.all(batch.labels == PADDING)


def test_max_prompts_keeps_the_largest_components():
    weak = np.full((30, 60), IGNORE, np.uint8)
    weak[5, 0:30] = 1
    weak[15, 0:5] = 2
    weak[25, 0:15] = 3
    batch = compile_(weak, max_prompts=2)
    assert batch.classes.tolist() == [1, 3]


def test_empty_weak_label_gives_zero_prompts():
    assert len(compile_(np.full((8, 8), IGNORE, np.uint8))) == 0


def test_certainty_weighted_sampling_follows_the_certainty():
    yx = np.stack([np.zeros(4, int), np.arange(4)], axis=1)
    certainty = np.array([0.0, 1.0, 3.0, 0.0])
    rng = np.random.default_rng(1)
    draws = np.array([certainty_weighted_points(yx, certainty, 1, rng)[0, 1] for _ in range(4000)])
    assert set(np.unique(draws)) == {1, 2}
    assert abs((draws == 2).mean() - 0.75) < 0.03
    both = certainty_weighted_points(yx, certainty, 2, rng)
    assert sorted(both[:, 1].tolist()) == [1, 2]
    # too few certain pixels: the uncertain ones fill in; none certain: uniform
    assert len(certainty_weighted_points(yx, certainty, 3, rng)) == 3
    assert len(certainty_weighted_points(yx, np.zeros(4), 2, rng)) == 2


def test_compile_with_certainty_samples_only_certain_skeleton_pixels():
    weak = np.full((10, 100), IGNORE, np.uint8)
    weak[5, :] = 1
    certainty = np.zeros((10, 100))
    certainty[:, 60:] = 1.0
    batch = compile_(weak, certainty=certainty, points_per_component=5)
    xs = batch.coords[0][batch.labels[0] == POSITIVE][:, 0]
    assert len(xs) == 5 and np.all(xs >= 60)


@pytest.mark.parametrize("kind, expected", [("coarse", True), ("scribbles", False), ("points", False)])
def test_component_boxes_auto_means_coarse_only(kind, expected):
    assert Prompts(PromptsConfig())._component_boxes(kind) is expected
    assert Prompts(PromptsConfig(component_boxes="always"))._component_boxes(kind) is True
