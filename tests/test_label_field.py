"""The joint label field: seeds, edges, mask evidence and box constraints, on scenes with known answers."""

from __future__ import annotations

import numpy as np

from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.parts.decoding import BOX_INTERIOR
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.label_field import (
    NO_SEED_EVIDENCE_WEIGHT,
    FieldConfig,
    FieldInputs,
    box_allowed,
    box_cores,
    seed_index,
    solve_field,
)
from seglab.stages.prompts import Prompts, PromptsConfig
from seglab.stages.refine import Refine, RefineConfig
from seglab.stages.select import Select, SelectConfig

IGNORE = 255
S = 32
FRAME = ImageFrame((64, 64), input_size=64, grid_size=S)  # one grid cell = 2x2 pixels
OBJECT = (slice(20, 44), slice(16, 40))  # rows, cols of the object in the scene


def scene() -> tuple[np.ndarray, np.ndarray]:
    """64x64 RGB: a bright square object on a dark, noisy background; its gold (1 = object)."""
    rng = np.random.default_rng(1)
    gold = np.zeros((64, 64), np.uint8)
    gold[OBJECT] = 1
    image = np.clip(np.where(gold[..., None] == 1, 210, 50) + rng.normal(0, 4, (64, 64, 3)), 0, 255)
    return image.astype(np.uint8), gold


def iou(labels: np.ndarray, gold: np.ndarray, cls: int) -> float:
    return float(((labels == cls) & (gold == cls)).sum() / ((labels == cls) | (gold == cls)).sum())


def test_seeds_propagate_along_the_image_not_by_distance():
    image, gold = scene()
    weak = np.full((64, 64), IGNORE, np.uint8)
    weak[30, 22:34] = 1  # a stroke inside the object
    weak[4, 4:60] = 0  # and one far above it, in the background
    p = solve_field(FieldInputs(image, seed_index(weak, (0, 1))), 2, FieldConfig())
    labels = p.argmax(axis=0)
    assert iou(labels, gold, 1) > 0.95  # nearest-label fill would give the object rows 17.. and more
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-5)
    assert p[1, 30, 25] == 1.0 and p[0, 4, 10] == 1.0  # seeds stay one-hot


def test_a_leaked_mask_must_beat_the_other_class_seeds():
    image, gold = scene()
    weak = np.full((64, 64), IGNORE, np.uint8)
    weak[30, 22:34] = 1
    weak[4, 4:60] = 0
    leaked = np.zeros((2, 64, 64), np.float32)
    leaked[1] = 0.9  # an object mask that spread over the whole image
    labels = solve_field(FieldInputs(image, seed_index(weak, (0, 1)), evidence=leaked), 2, FieldConfig()).argmax(axis=0)
    assert iou(labels, gold, 1) > 0.9  # fusing by the largest evidence would give the object everything


def test_a_class_with_boxes_never_appears_outside_them():
    boxes = np.array([[16, 20, 40, 44, 1], [0, 0, 64, 30, 2]], np.float32)
    allowed = box_allowed(boxes, (0, 1, 2), (64, 64), background=0)
    assert allowed[0].all() and allowed[1][OBJECT].all() and allowed[1].sum() == 24 * 24
    assert allowed[2][:30].all() and not allowed[2][30:].any()
    image, _ = scene()
    evidence = np.full((3, 64, 64), 0.5, np.float32)  # everyone claims everything
    p = solve_field(FieldInputs(image, np.full((64, 64), -1), evidence=evidence, allowed=allowed), 3, FieldConfig())
    labels = p.argmax(axis=0)
    assert not (labels == 1)[~allowed[1]].any() and not (labels == 2)[~allowed[2]].any()
    without_background = box_allowed(boxes[:1], (0, 1, 2), (64, 64), background=None)
    assert without_background[1][OBJECT].all() and not without_background[0].any()
    alone = solve_field(
        FieldInputs(image, np.full((64, 64), -1), evidence=evidence, allowed=without_background), 3, FieldConfig()
    )
    assert not alone[:, 0, 0].any() and alone[1][OBJECT].min() > 0.99  # no class may be where no box is


def test_masks_are_a_prior_only_when_nothing_is_seeded():
    image, _ = scene()
    boxes = np.array([[16, 20, 40, 44, 1]], np.float32)
    evidence = np.random.default_rng(0).uniform(0, 1, (2, 64, 64)).astype(np.float32)
    unseeded = np.full((64, 64), -1)

    inside_boxes = box_allowed(boxes, (0, 1), (64, 64), background=0)

    def field(cores, weight, allowed=inside_boxes):
        inputs = FieldInputs(image, unseeded, box_seeds=cores, evidence=evidence, allowed=allowed)
        return solve_field(inputs, 2, FieldConfig(evidence_weight=weight))

    cores = box_cores(boxes, (0, 1), (64, 64), 1 / 3)
    assert (cores == 1).sum() == 64
    np.testing.assert_array_equal(field(cores, None), field(cores, 0.0))  # seeded by the box core
    assert not np.allclose(field(cores, None), field(cores, NO_SEED_EVIDENCE_WEIGHT), atol=1e-6)
    np.testing.assert_array_equal(field(None, None, None), field(None, NO_SEED_EVIDENCE_WEIGHT, None))  # nothing seeded
    assert not np.allclose(field(None, None, None), field(None, 0.0, None), atol=1e-6)


class BoxBackend:
    """Answers a box prompt with the scene's object when the box is the object's, with the
    whole image for any larger box, and with nothing at all for a box under 8 pixels."""

    num_candidates = 3

    def decode(self, features, prompts):
        logits = np.full((len(prompts), 3, S, S), -8.0, np.float32)
        for p, box in enumerate(prompts.boxes):
            x0, y0, x1, y1 = box
            if x1 - x0 < 8:
                continue
            if x1 - x0 > 30:
                logits[p] = 8.0
            else:
                logits[p][:, OBJECT[0].start // 2 : OBJECT[0].stop // 2, OBJECT[1].start // 2 : OBJECT[1].stop // 2] = (
                    8.0
                )
        return logits, np.ones((len(prompts), 3), np.float32)


def box_run(boxes: np.ndarray, background: int | None):
    image, gold = scene()
    classes = ClassTable((0, 1), ("background", "object"), IGNORE)
    ctx = Context(classes=classes, weak_kind="boxes", seed=0, backend=BoxBackend(), background=background)
    weak = np.full((64, 64), IGNORE, np.uint8)
    inputs = {"ingest/image": image, "ingest/weak": weak, "ingest/boxes": boxes, "embed/frame": FRAME.to_array()}
    prompts = Prompts(PromptsConfig()).process(None, inputs, ctx)
    inputs.update({f"prompts/{k}": v for k, v in prompts.items()})
    selected = Select(SelectConfig()).process(None, inputs, ctx)
    inputs.update({f"select/{k}": v for k, v in selected.items()})
    refined = Refine(RefineConfig()).process(Unit("u", "u.png"), inputs, ctx)
    return selected, refined, gold


def test_a_background_box_over_the_object_does_not_erase_it():
    object_box = [16, 20, 40, 44, 1]
    for boxes, background in (
        ([[0, 0, 64, 64, 0], object_box], None),  # the old simulator's whole-image box
        ([object_box], 0),
    ):  # background as what no box covers
        selected, refined, gold = box_run(np.array(boxes, np.float32), background)
        assert iou(selected["labels"], gold, 1) > 0.8, boxes  # the old max-fusion rule gave 0
        assert iou(refined["labels"], gold, 1) >= iou(selected["labels"], gold, 1) - 0.01, boxes
        assert iou(refined["labels"], gold, 0) > 0.9, boxes


def test_a_small_box_the_backend_cannot_resolve_keeps_its_own_interior():
    boxes = np.array([[50, 4, 56, 10, 1]], np.float32)  # 6x6 pixels: the backend returns nothing
    selected, refined, _ = box_run(boxes, 0)
    assert selected["chosen"].tolist() == [3]  # M: the box's interior, not 'none kept'
    inside = selected["labels"][4:10, 50:56] == 1
    assert inside[2:4, 2:4].all() and inside.sum() >= 4  # at least the box's core
    assert (selected["labels"] == 1).sum() == inside.sum()  # never outside its box
    assert refined["labels"][6, 53] == 1 and BOX_INTERIOR < 1.0
