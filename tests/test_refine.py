"""refine: uncertainty composition, and re-prompting of uncertain regions from confident ones."""

from __future__ import annotations

import numpy as np
import pytest

from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import POSITIVE, PromptBatch
from seglab.stages.parts.uncertainty import (
    SIGNALS,
    calibration_signal,
    compose,
    probability_signal,
    teacher_signal,
    variance_signal,
)
from seglab.stages.refine import Refine, RefineConfig

IGNORE = 255
S = 32
FRAME = ImageFrame((64, 64), input_size=64, grid_size=S)  # one grid cell = 2x2 pixels
CLASSES = ClassTable((0, 1, 2), ("other", "top", "bottom"), IGNORE)
TRUTH = np.where(np.arange(64)[:, None] < 32, 1, 2).repeat(64, axis=1).astype(np.uint8)


def test_noisy_or_combines_weighted_signals():
    a, b = np.array([[0.5, 0.0]]), np.array([[0.5, 1.0]])
    np.testing.assert_allclose(
        compose({"probability": a, "spread": b}, {"probability": 1.0, "spread": 1.0}), [[1 - 0.5 * 0.5, 1.0]]
    )
    np.testing.assert_allclose(
        compose({"probability": a, "spread": b}, {"probability": 1.0, "spread": 0.5}), [[1 - 0.5 * 0.75, 0.5]]
    )
    np.testing.assert_allclose(compose({"probability": a}, {}), [[0.0, 0.0]])  # unweighted: ignored
    with pytest.raises(ValueError, match="unknown uncertainty signals"):
        compose({"entropy": a}, {})


def test_signals_span_zero_to_one():
    np.testing.assert_allclose(probability_signal(np.array([1.0, 1 / 4, 0.0]), 4), [0.0, 1.0, 1.0])
    np.testing.assert_allclose(variance_signal(np.array([0.0, 0.125, 0.25])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(calibration_signal(np.array([1, IGNORE, 2]), np.array([1, 1, 1])), [0, 1, 1])


class TruthBackend:
    """Answers every prompt of class c with the truth's class-c region (three candidates:
    the region, the region, the region cut to its top half) and records the prompts."""

    num_candidates = 3

    def __init__(self):
        self.prompts: list[PromptBatch] = []

    def decode(self, features, prompts: PromptBatch):
        self.prompts.append(prompts)
        truth_grid = TRUTH[::2, ::2]
        logits = np.full((len(prompts), 3, S, S), -8.0, np.float32)
        for p, cls in enumerate(prompts.classes):
            region = truth_grid == cls
            if not region.any():  # a class the truth lacks: empty masks
                continue
            logits[p, :2][:, region] = 8.0
            half = region.copy()
            half[np.flatnonzero(region.any(axis=1))[len(np.flatnonzero(region.any(axis=1))) // 2] :] = False
            logits[p, 2][half] = 8.0
        return logits, np.ones((len(prompts), 3), np.float32)


def select_outputs():
    """Select's view: rows < 24 class 1 and rows >= 40 class 2, confidently; the band
    24..39 labelled 1 with a flat distribution (truth: 1 above row 32, 2 below)."""
    weak = np.full((64, 64), IGNORE, np.uint8)
    weak[10, 4:60], weak[50, 4:60] = 1, 2
    labels = np.where(np.arange(64)[:, None] < 40, 1, 2).repeat(64, axis=1).astype(np.uint8)
    probabilities = np.zeros((3, 64, 64), np.float32)
    probabilities[:, :24] = np.array([0.025, 0.95, 0.025])[:, None, None]
    probabilities[:, 24:40] = np.array([0.25, 0.4, 0.35])[:, None, None]
    probabilities[:, 40:] = np.array([0.025, 0.025, 0.95])[:, None, None]
    rng = np.random.default_rng(0)  # the image: dark above the truth's edge at row 32, bright below
    image = np.clip(np.where(TRUTH[..., None] == 1, 60, 200) + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    return {
        "ingest/weak": weak,
        "ingest/image": image,
        "ingest/boxes": np.zeros((0, 5), np.float32),
        "select/labels": labels,
        "select/probabilities": probabilities.astype(np.float16),
        "select/variance": np.zeros((64, 64), np.float16),
        "embed/frame": FRAME.to_array(),
    }


def run_refine(inputs=None, round=0, **config):
    backend = TruthBackend()
    ctx = Context(classes=CLASSES, weak_kind="scribbles", seed=0, backend=backend)
    out = Refine.in_round(round)(RefineConfig(**config)).process(Unit("u", "u.png"), inputs or select_outputs(), ctx)
    return out, backend


def test_uncertain_band_is_reprompted_from_confident_pixels_and_corrected():
    out, backend = run_refine()
    labels, uncertainty = out["labels"], out["uncertainty"].astype(np.float32)
    assert out["uncertainty"].dtype == np.float16 and 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0
    # SUM: every positive point of the re-prompts sits on a confident pixel (outside the band)
    prompts = backend.prompts[0]
    points = prompts.coords[prompts.labels == POSITIVE]
    rows = np.floor(points[:, 1]).astype(int)
    assert len(points) and not ((rows >= 24) & (rows < 40)).any()
    assert set(prompts.classes.tolist()) == {1, 2}
    # confident pixels keep select's label; the band takes the re-prompted masks' classes
    assert np.all(labels[:24] == 1) and np.all(labels[40:] == 2)
    assert np.all(labels[24:30] == 1) and np.all(labels[34:40] == 2)
    # the uncertainty ranks the band (where the first pass was wrong) above the confident rows
    assert uncertainty[34:40].min() > uncertainty[:20].max()


def test_without_reprompt_weight_the_labels_are_selects_and_signals_are_stored():
    out, _ = run_refine(reprompt_weight=0.0)
    np.testing.assert_array_equal(out["labels"], select_outputs()["select/labels"])
    signals = out["signals"].astype(np.float32)
    assert signals.shape == (len(Refine.signals), 64, 64) and "teacher" not in Refine.signals  # round 0
    assert np.isnan(signals[SIGNALS.index("calibration")]).all()  # no calibrate stage in this run
    spread = signals[SIGNALS.index("spread")]
    assert spread.max() > 0.9 and spread.min() == 0.0  # the third candidate disagrees on half of each region
    np.testing.assert_allclose(signals[SIGNALS.index("probability")][:24], (1 - 0.95) / (2 / 3), atol=2e-3)


def test_calibration_signal_and_ignore_rule():
    inputs = select_outputs()
    calibrated = inputs["select/labels"].copy()
    calibrated[24:40] = IGNORE  # the set is ambiguous in the band
    inputs["calibrate/labels"] = calibrated
    out, _ = run_refine(inputs, ignore_above=0.5)
    labels, uncertainty = out["labels"], out["uncertainty"].astype(np.float32)
    calibration = out["signals"][SIGNALS.index("calibration")].astype(np.float32)
    refined_unmasked, _ = run_refine(dict(inputs))
    np.testing.assert_array_equal(calibration, (calibrated != refined_unmasked["labels"]).astype(np.float32))
    # the ambiguous set raises the band's uncertainty past ignore_above; the rest is kept
    assert uncertainty[24:40].min() >= 0.5 and np.all(labels[24:40] == IGNORE)
    assert uncertainty[:24].max() < 0.5 and uncertainty[40:].max() < 0.5
    assert not (labels[:24] == IGNORE).any() and not (labels[40:] == IGNORE).any()


def teacher_probabilities():
    """A round-0 teacher at half resolution, float16 [3, 32, 32]: confidently the truth,
    except class 0 on the top rows 0..7 (where select is confident in class 1)."""
    teacher = np.full((3, 32, 32), 0.025, np.float32)
    rows = np.arange(32)
    teacher[1, (rows >= 4) & (rows < 16)] = 0.95
    teacher[2, rows >= 16] = 0.95
    teacher[0, rows < 4] = 0.95
    return teacher.astype(np.float16)


def test_teacher_signal_is_total_variation_and_sums_formula_for_two_classes():
    p = np.array([[[0.9]], [[0.1]]], np.float32)
    q = np.array([[[0.3]], [[0.7]]], np.float32)
    np.testing.assert_allclose(teacher_signal(p, q), [[0.6]], atol=1e-6)  # |0.9 - 0.3|
    np.testing.assert_allclose(teacher_signal(p, p), [[0.0]])


def test_later_rounds_read_their_teacher_take_its_confident_pixels_as_evidence_and_mix_it_in():
    round1 = Refine.in_round(1)
    assert round1.name == "refine.1" and "retrain/probabilities" in round1.reads
    assert Refine.in_round(2).teacher_read == "retrain.1/probabilities" and Refine.in_round(1) is round1
    inputs = {**select_outputs(), "retrain/probabilities": teacher_probabilities()}
    out, backend = run_refine(inputs, round=1, reprompt_weight=0.0, teacher={"mix": 0.5})
    # SeSAM: the teacher's confident class 0 on the top rows joins the evidence the prompts come from
    assert set(backend.prompts[0].classes.tolist()) == {0, 1, 2}
    without, plain = run_refine(select_outputs(), reprompt_weight=0.0)
    assert set(plain.prompts[0].classes.tolist()) == {1, 2}
    # on the uncertain band the teacher's distribution decides (select alone keeps class 1 down to row 40)
    labels = out["labels"]
    assert np.all(labels[26:30] == 1) and np.all(labels[34:40] == 2)
    assert np.all(without["labels"][34:40] == 1)
    signals = out["signals"].astype(np.float32)
    assert signals.shape == (len(SIGNALS), 64, 64)
    teacher = signals[SIGNALS.index("teacher")]
    assert teacher[:6].min() > 0.4 and teacher[12:20].max() < 0.05  # disagreement where they differ only
    assert out["uncertainty"][:6].astype(np.float32).min() > out["uncertainty"][12:20].astype(np.float32).max()
