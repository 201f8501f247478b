"""Confusion-matrix metrics and the nearest-label baseline, on arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seglab.pipeline.core.metrics import confusion, scores
from seglab.stages.parts.nearest_label import nearest_label
from seglab.stages.parts.ranking import auroc


def test_known_case_with_ignored_gold_unlabelled_prediction_and_an_absent_class():
    gold = np.array([[0, 0, 1, 1, 11]])
    pred = np.array([[0, 1, 1, 255, 0]], np.uint8)  # 255: the ignore id, i.e. no class given
    m = confusion(gold, pred, (0, 1, 2), gold_ignore=(11,))
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]  # last column: unlabelled
    s = scores(m)
    assert s.iou[0] == pytest.approx(1 / 2) and s.iou[1] == pytest.approx(1 / 3)
    assert math.isnan(s.iou[2])  # class 2 absent from gold and prediction: not in the mean
    assert s.miou == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert s.pixel_accuracy == pytest.approx(2 / 4)  # the unlabelled pixel counts as wrong
    assert s.labelled_fraction == pytest.approx(3 / 4)
    assert s.labelled_accuracy == pytest.approx(2 / 3)
    assert s.pixels == 4


def test_a_class_predicted_but_absent_from_gold_scores_zero_not_nan():
    gold = np.zeros((2, 2), np.int64)
    pred = np.array([[0, 0], [0, 2]], np.uint16)
    s = scores(confusion(gold, pred, (0, 1, 2)))
    assert s.iou[0] == pytest.approx(3 / 4) and math.isnan(s.iou[1]) and s.iou[2] == 0.0
    assert s.miou == pytest.approx(3 / 8)


def test_sparse_class_ids_and_non_class_predictions():
    """GrabCut-style: classes 0 and 255, 128 is neither (gold: ignored; prediction: unlabelled)."""
    gold = np.array([[0, 255, 255, 128]])
    pred = np.array([[0, 255, 128, 255]], np.uint8)
    m = confusion(gold, pred, (0, 255), gold_ignore=(128,))
    assert m.tolist() == [[1, 0, 0], [0, 1, 1]]
    s = scores(m)
    assert s.iou == pytest.approx((1.0, 0.5))
    assert s.labelled_accuracy == 1.0 and s.labelled_fraction == pytest.approx(2 / 3)


def test_matrices_add_up_over_images():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, (2, 8, 8))
    pred = rng.integers(0, 4, (2, 8, 8))  # 3 is not a class: unlabelled
    each = sum(confusion(g, p, (0, 1, 2)) for g, p in zip(gold, pred))
    assert np.array_equal(each, confusion(gold.reshape(16, 8), pred.reshape(16, 8), (0, 1, 2)))
    assert each.sum() == 128 and each[:, 3].sum() == (pred == 3).sum()


def test_unknown_gold_values_are_listed():
    with pytest.raises(ValueError, match=r"gold values \[7, 9\] are neither class ids"):
        confusion(np.array([[0, 7, 9, 11]]), np.zeros((1, 4), np.uint8), (0, 1), gold_ignore=(11,))
    with pytest.raises(ValueError, match="gold is"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), (0,))


def test_nothing_to_measure_is_nan():
    s = scores(np.zeros((2, 3), np.int64))
    assert all(math.isnan(v) for v in (s.miou, s.pixel_accuracy, s.labelled_fraction, s.labelled_accuracy))
    assert s.pixels == 0


def test_nearest_label_on_a_row():
    weak = np.array([[255, 1, 255, 255, 2]], np.uint8)
    out = nearest_label(weak, 255)
    assert out.tolist() == [[1, 1, 1, 2, 2]] and out.dtype == np.uint8


def test_nearest_label_takes_a_nearest_labelled_class_everywhere():
    rng = np.random.default_rng(1)
    weak = np.full((30, 40), 65535, np.uint16)
    ys, xs = rng.integers(0, 30, 12), rng.integers(0, 40, 12)
    weak[ys, xs] = rng.integers(0, 3, 12)
    out = nearest_label(weak, 65535)
    labelled = weak != 65535
    assert np.array_equal(out[labelled], weak[labelled])
    ly, lx = np.nonzero(labelled)
    yy, xx = np.mgrid[:30, :40]
    dist = (yy[..., None] - ly) ** 2 + (xx[..., None] - lx) ** 2  # [H, W, labelled]
    nearest = dist.min(axis=-1)
    # ties may go either way: the class given must belong to one of the nearest pixels
    own = np.where(weak[ly, lx] == out[..., None], dist, np.iinfo(np.int64).max).min(axis=-1)
    assert np.array_equal(own, nearest)


def test_nearest_label_without_any_weak_pixel_stays_ignore():
    weak = np.full((5, 6), 255, np.uint8)
    assert (nearest_label(weak, 255) == 255).all()


def test_auroc_known_cases():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([True, True, False, False])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([True, False, False])) == 0.5  # ties count half
    # 3 positives, 2 negatives: pairs (pos > neg): 0.7>0.4, 0.7>0.2, 0.3>0.2, 0.5>0.4, 0.5>0.2 -> 5 of 6
    assert abs(auroc(np.array([0.7, 0.3, 0.5, 0.4, 0.2]), np.array([1, 1, 1, 0, 0], bool)) - 5 / 6) < 1e-12
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([False, False])))
