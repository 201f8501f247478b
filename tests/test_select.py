"""Selection rules (coverage, purity, tau) and fusion on synthetic masks with known answers."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from seglab.stages.base import ClassTable, Context
from seglab.stages.parts.coverage import choose_by_coverage, coverage_scores, grid_evidence
from seglab.stages.parts.fusion import mask_evidence, value_of_label
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import POSITIVE, PromptBatch
from seglab.stages.select import Select, SelectConfig

IGNORE = 255
S = 32
FRAME = ImageFrame((64, 64), input_size=64, grid_size=S)  # one grid cell = 2x2 pixels


def one_prompt_per(classes, components, boxes=None) -> PromptBatch:
    p = len(classes)
    return PromptBatch(
        coords=np.ones((p, 1, 2), np.float32),
        labels=np.full((p, 1), POSITIVE, np.int32),
        boxes=np.full((p, 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32),
        classes=np.asarray(classes, np.int32),
        components=np.asarray(components, np.int32),
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
    candidates = np.stack(
        [
            grid_mask(0, 12, 0, 32),  # all of the class-1 stroke, nothing else
            grid_mask(0, 32, 0, 32),  # both strokes: purity 1/2
            grid_mask(0, 12, 0, 5),  # 3 of the 18 stroke cells
        ]
    )[None]
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


def test_mask_evidence_is_the_trust_weighted_maximum_per_class():
    big = np.full((S, S), 0.9, np.float32)
    small = np.zeros((S, S), np.float32)
    small[8:16, 8:16] = 0.8
    evidence = mask_evidence(
        np.stack([big, small, big * 0.5]), np.array([0, 1, 0]), np.array([1.0, 0.5, 1.0]), FRAME, class_ids=(0, 1)
    )
    assert evidence.shape == (2, 64, 64)
    np.testing.assert_allclose(evidence[0, 40, 40], 0.9, atol=1e-5)  # the larger of the two class-0 masks
    np.testing.assert_allclose(evidence[1, 24, 24], 0.4, atol=1e-5)  # 0.8 x trust 0.5
    assert evidence[1, 50, 50] == 0.0
    assert not mask_evidence(
        np.zeros((0, S, S), np.float32), np.zeros(0, int), np.zeros(0), FRAME, class_ids=(0, 1)
    ).any()


def test_value_of_label_picks_each_pixels_class_with_unsorted_ids():
    probabilities = np.stack([np.full((2, 2), 0.25), np.full((2, 2), 0.75)]).astype(np.float32)  # ids (7, 3)
    labels = np.array([[7, 3], [IGNORE, 3]], np.uint8)
    np.testing.assert_allclose(value_of_label(labels, probabilities, (7, 3), IGNORE), [[0.25, 0.75], [0, 0.75]])


class FixedBackend:
    """Returns the same three candidates for every prompt (quality favours the worst)."""

    num_candidates = 3

    def decode(self, features, prompts):
        candidates = np.stack([grid_mask(0, 12, 0, 32), grid_mask(0, 32, 0, 32), grid_mask(0, 12, 0, 5)])
        logits = np.repeat(candidates[None], len(prompts), axis=0)
        return logits, np.tile(np.array([0.1, 0.9, 0.95], np.float32), (len(prompts), 1))


def two_colours(edge_row: int) -> np.ndarray:
    """64x64 RGB: dark above ``edge_row``, bright below, with a little noise."""
    rng = np.random.default_rng(0)
    image = np.where(np.arange(64)[:, None, None] < edge_row, 60, 200) + rng.normal(0, 3, (64, 64, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_select_stage_keeps_admissible_masks_and_its_labels_follow_the_image_edge():
    weak = two_strokes()  # strokes at rows 10 and 50: the nearest-label split would be row 30
    prompts = one_prompt_per([1, 2], [0, 0])
    ctx = Context(
        classes=ClassTable((0, 1, 2), ("bg", "one", "two"), IGNORE),
        weak_kind="scribbles",
        seed=0,
        backend=FixedBackend(),
    )
    inputs = {
        "ingest/weak": weak,
        "ingest/image": two_colours(40),
        "ingest/boxes": np.zeros((0, 5), np.float32),
        "embed/frame": FRAME.to_array(),
        **{f"prompts/{k}": v for k, v in prompts.to_arrays().items()},
    }
    out = Select(SelectConfig()).process(None, inputs, ctx)
    # class 1: candidate 0 covers its stroke purely. class 2: every candidate misses or mixes -> none.
    assert out["chosen"].tolist() == [0, -1]
    assert np.all(out["labels"][:38] == 1) and np.all(out["labels"][42:] == 2)  # the colour edge at row 40
    expected = np.array([0, 1, 2])[out["probabilities"].argmax(axis=0)]
    assert np.array_equal(out["labels"], expected)
    np.testing.assert_allclose(out["probabilities"].astype(np.float32).sum(axis=0), 1.0, atol=2e-3)
    assert out["probabilities"][2, 50, 10] == 1.0 and out["probabilities"][1, 50, 10] == 0.0
    assert out["confidence"][50, 10] == 1.0
    assert not np.any(out["labels"] == 0)  # a class no seed or mask speaks for never appears


def test_select_measures_how_well_its_confidence_ranks_its_errors():
    ctx = Context(classes=ClassTable((0, 5), ("a", "b"), IGNORE), weak_kind="scribbles", seed=0)
    labels = np.array([[0, 0, 5, IGNORE]], np.uint8)
    confidence = np.array([[0.9, 0.2, 0.6, 0.0]], np.float16)
    gold_index = np.array([[0, 1, 0, 0]])  # positions: class 0, class 5, class 0, class 0
    valid = np.ones((1, 4), bool)
    measured = Select(SelectConfig()).gold_measures(
        {"select/labels": labels, "select/confidence": confidence}, gold_index, valid, ctx
    )
    # labelled pixels: right (u=0.1), wrong (u=0.8), wrong (u=0.4): both errors above the right one
    assert measured == {"uncertainty_auroc": 1.0}
    confidence[0, 0] = 0.5  # now u=0.5 sits between the errors' 0.8 and 0.4
    assert (
        Select(SelectConfig()).gold_measures(
            {"select/labels": labels, "select/confidence": confidence}, gold_index, valid, ctx
        )["uncertainty_auroc"]
        == 0.5
    )


def test_tau_out_of_order_is_refused_with_its_values():
    with pytest.raises(pydantic.ValidationError, match=r"tau needs 0 <= tau1 <= tau2 <= 1, got \[0.8, 0.3\]"):
        SelectConfig(tau=(0.8, 0.3))
