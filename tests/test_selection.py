"""Selection rules (coverage, purity, tau) and fusion on synthetic masks with known answers."""
from __future__ import annotations

import numpy as np
import pydantic
import pytest

from seglab.stages.base import ClassTable, Context
from seglab.stages.coverage import choose_by_coverage, coverage_scores, grid_evidence
from seglab.stages.fusion import class_distribution, fill_nearest, fuse_masks, value_of_label
from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import POSITIVE, PromptBatch
from seglab.stages.select import Select, SelectConfig

IGNORE = 255
S = 32
FRAME = ImageFrame((64, 64), input_size=64, grid_size=S)  # one grid cell = 2x2 pixels


def one_prompt_per(classes, components, boxes=None) -> PromptBatch:
    p = len(classes)
    return PromptBatch(
        coords=np.ones((p, 1, 2), np.float32), labels=np.full((p, 1), POSITIVE, np.int32),
        boxes=np.full((p, 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32),
        classes=np.asarray(classes, np.int32), components=np.asarray(components, np.int32),
    )


def grid_mask(y0, y1, x0, x1) -> np.ndarray:
    """Logits on the grid: +5 inside [y0:y1, x0:x1], -5 elsewhere."""
    logits = np.full((S, S), -5.0, np.float32)
    logits[y0:y1, x0:x1] = 5.0
    return logits


def two_strokes() -> np.ndarray:
    weak = np.full((64, 64), IGNORE, np.uint8)
    weak[10, 4:40] = 1  # a 1-pixel scribble of class 1 (grid row 5, cols 2..19)
    weak[50, 4:40] = 2  # class 2 (grid row 25)
    return weak


def test_thin_scribbles_survive_on_the_grid():
    evidence = grid_evidence(two_strokes(), IGNORE, FRAME)
    assert set(evidence.components) == {1, 2}
    assert np.array_equal(np.flatnonzero(evidence.components[1].any(axis=1)), [5])
    assert (evidence.components[1] == 1).sum() == 18
    assert (evidence.classes == 2).sum() == 18 and (evidence.classes == -1).sum() == S * S - 36


def test_coverage_and_purity_of_known_candidates():
    evidence = grid_evidence(two_strokes(), IGNORE, FRAME)
    candidates = np.stack([
        grid_mask(0, 12, 0, 32),   # all of the class-1 stroke, nothing else
        grid_mask(0, 32, 0, 32),   # both strokes: purity 1/2
        grid_mask(0, 12, 0, 5),    # 3 of the 18 stroke cells
    ])[None]
    coverage, purity = coverage_scores(candidates, one_prompt_per([1], [0]), evidence, FRAME)
    np.testing.assert_allclose(coverage[0], [1.0, 1.0, 3 / 18])
    np.testing.assert_allclose(purity[0], [1.0, 0.5, 1.0])


def test_tau_rule_prefers_full_coverage_then_quality_and_rejects_the_rest():
    coverage = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [0.2, 0.9, 0.8]])
    purity = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.6]])
    quality = np.array([[0.1, 0.9, 0.99], [0.5, 0.9, 0.99], [0.9, 0.5, 0.4]])
    chosen = choose_by_coverage(coverage, purity, quality, (0.3, 0.7))
    # row 0: candidate 2 is inadmissible (coverage 0.1) whatever its quality; candidate 0
    # (coverage >= tau2) beats the better-scored candidate 1; row 2: nothing admissible
    assert chosen.tolist() == [0, 0, -1]
    assert choose_by_coverage(coverage, purity, quality, (0.0, 0.0)).tolist() == [2, 2, 0]


def test_box_prompt_coverage_is_extent_iou_and_purity_the_share_inside():
    evidence = grid_evidence(np.full((64, 64), IGNORE, np.uint8), IGNORE, FRAME)
    box = [[8, 8, 40, 40]]  # image pixels -> grid cells 4..20
    candidates = np.stack([grid_mask(4, 20, 4, 20), grid_mask(4, 20, 12, 28)])[None]
    coverage, purity = coverage_scores(candidates, one_prompt_per([1], [0], box), evidence, FRAME)
    np.testing.assert_allclose(coverage[0], [1.0, (16 * 8) / (16 * 16 * 2 - 16 * 8)])
    np.testing.assert_allclose(purity[0], [1.0, 0.5])


def test_smaller_mask_wins_an_overlap_unless_probability_decides():
    big = np.full((S, S), 0.9, np.float32)
    small = np.zeros((S, S), np.float32)
    small[8:16, 8:16] = 0.7
    common = dict(class_ids=(0, 1), ignore_id=IGNORE, label_dtype=np.dtype(np.uint8), min_probability=0.5)
    fused = fuse_masks(np.stack([big, small]), np.array([0, 1]), FRAME, overlap="smaller", **common)
    assert fused.labels[20:28, 20:28].tolist() == np.ones((8, 8)).tolist()
    assert fused.labels[0, 0] == 0 and fused.labels[40, 40] == 0
    assert fused.probabilities.shape == (2, 64, 64) and abs(fused.probabilities[1, 24, 24] - 0.7) < 1e-5
    by_probability = fuse_masks(np.stack([big, small]), np.array([0, 1]), FRAME, overlap="probability", **common)
    assert np.all(by_probability.labels == 0)
    nothing = fuse_masks(np.zeros((0, S, S), np.float32), np.zeros(0, int), FRAME, overlap="smaller", **common)
    assert np.all(nothing.labels == IGNORE) and not nothing.probabilities.any()


def test_fill_nearest_falls_back_on_the_nearest_weak_label():
    labels = np.full((4, 6), IGNORE, np.uint8)
    labels[:, 0] = 7                       # claimed by a mask
    weak = np.full((4, 6), IGNORE, np.uint8)
    weak[:, 1], weak[:, 5] = 7, 3
    assert fill_nearest(labels, weak, IGNORE)[0].tolist() == [7, 7, 7, 7, 3, 3]
    no_weak = np.full((4, 6), IGNORE, np.uint8)  # box labels: nothing to fall back on
    assert np.array_equal(fill_nearest(labels, no_weak, IGNORE), labels)


def test_value_of_label_picks_each_pixels_class_with_unsorted_ids():
    probabilities = np.stack([np.full((2, 2), 0.25), np.full((2, 2), 0.75)]).astype(np.float32)  # ids (7, 3)
    labels = np.array([[7, 3], [IGNORE, 3]], np.uint8)
    np.testing.assert_allclose(value_of_label(labels, probabilities, (7, 3), IGNORE), [[0.25, 0.75], [0, 0.75]])


def test_class_distribution_mixes_mask_evidence_with_the_weak_distance_prior():
    weak = np.full((1, 101), IGNORE, np.uint8)
    weak[0, 0], weak[0, 100] = 0, 1
    evidence = np.zeros((2, 1, 101), np.float32)
    p = class_distribution(evidence, weak, (0, 1), IGNORE, mask_weight=0.5, prior_scale=0.05)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-6)
    assert p[0, 0, 0] == 1.0 and p[1, 0, 100] == 1.0           # weak pixels are one-hot
    assert p[0, 0, 20] > 0.9 and abs(p[0, 0, 50] - 0.5) < 1e-3  # no mask: the nearer class, even halfway
    evidence[1, 0, 10:30] = 1.0                                  # a class-1 mask near class 0's point
    q = class_distribution(evidence, weak, (0, 1), IGNORE, mask_weight=0.5, prior_scale=0.05)
    assert q[1, 0, 20] > p[1, 0, 20] and q[1, 0, 20] > 0.5


class FixedBackend:
    """Returns the same three candidates for every prompt (quality favours the worst)."""

    num_candidates = 3

    def decode(self, features, prompts):
        candidates = np.stack([grid_mask(0, 12, 0, 32), grid_mask(0, 32, 0, 32), grid_mask(0, 12, 0, 5)])
        logits = np.repeat(candidates[None], len(prompts), axis=0)
        return logits, np.tile(np.array([0.1, 0.9, 0.95], np.float32), (len(prompts), 1))


def test_select_stage_keeps_admissible_masks_and_the_weak_pixels():
    weak = two_strokes()
    prompts = one_prompt_per([1, 2], [0, 0])
    ctx = Context(classes=ClassTable((0, 1, 2), ("bg", "one", "two"), IGNORE), weak_kind="scribbles", seed=0,
                  backend=FixedBackend())
    inputs = {"ingest/weak": weak, "embed/frame": FRAME.to_array(),
              **{f"prompts/{k}": v for k, v in prompts.to_arrays().items()}}
    out = Select(SelectConfig(labels="masks", fill="none")).process(None, inputs, ctx)
    # class 1: candidate 0 covers its stroke purely. class 2: every candidate misses or mixes -> none.
    assert out["chosen"].tolist() == [0, -1]
    assert np.all(out["labels"][:24] == 1) and out["labels"][50, 10] == 2 and out["labels"][40, 10] == IGNORE
    assert out["probabilities"].shape == (3, 64, 64)
    assert out["probabilities"][2, 50, 10] == 1.0 and out["probabilities"][1, 50, 10] == 0.0
    assert out["confidence"][50, 10] == 1.0
    dense = Select(SelectConfig(labels="masks")).process(None, inputs, ctx)["labels"]
    assert dense[40, 10] == 2 and not np.any(dense == IGNORE)
    by_distribution = Select(SelectConfig()).process(None, inputs, ctx)  # the default rule
    expected = np.array([0, 1, 2])[by_distribution["probabilities"].argmax(axis=0)]
    assert np.array_equal(by_distribution["labels"], expected)
    assert by_distribution["labels"][20, 10] == 1 and by_distribution["labels"][44, 10] == 2


def test_select_measures_how_well_its_confidence_ranks_its_errors():
    ctx = Context(classes=ClassTable((0, 5), ("a", "b"), IGNORE), weak_kind="scribbles", seed=0)
    labels = np.array([[0, 0, 5, IGNORE]], np.uint8)
    confidence = np.array([[0.9, 0.2, 0.6, 0.0]], np.float16)
    gold_index = np.array([[0, 1, 0, 0]])   # positions: class 0, class 5, class 0, class 0
    valid = np.ones((1, 4), bool)
    measured = Select(SelectConfig()).gold_measures(
        {"select/labels": labels, "select/confidence": confidence}, gold_index, valid, ctx)
    # labelled pixels: right (u=0.1), wrong (u=0.8), wrong (u=0.4): both errors above the right one
    assert measured == {"uncertainty_auroc": 1.0}
    confidence[0, 0] = 0.5  # now u=0.5 sits between the errors' 0.8 and 0.4
    assert Select(SelectConfig()).gold_measures(
        {"select/labels": labels, "select/confidence": confidence}, gold_index, valid, ctx)["uncertainty_auroc"] == 0.5


def test_tau_out_of_order_is_refused_with_its_values():
    with pytest.raises(pydantic.ValidationError, match=r"tau needs 0 <= tau1 <= tau2 <= 1, got \[0.8, 0.3\]"):
        SelectConfig(tau=(0.8, 0.3))
