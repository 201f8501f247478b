"""Conformal calibration: exact small cases by hand, an exact-rational reference, and the
guarantees on synthetic exchangeable images whose pixels share a per-image difficulty."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from seglab.stages.parts.conformal import (
    ScoreTable,
    calibrated_labels,
    image_miscoverage,
    mondrian,
    pixel_split,
    prediction_sets,
    risk_control,
)

# Four calibration images of four pixels: gold-class scores and gold class indices. Scores
# are 1 - p for float16-exact p, with ties inside and across images.
HAND_SCORES = [[0.0, 0.125, 0.25, 0.5], [0.125, 0.125, 0.25, 0.75], [0.0, 0.25, 0.5, 0.5], [0.0, 0.0, 0.125, 0.25]]
HAND_GOLD = [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
# sum_i L_i(lambda) over the candidates 0, 0.125, 0.25, 0.5, 0.75: 3, 2, 1, 1/4, 0.
# Per class, class 0 (4 images): 17/6, 5/4, 1/3, 0, 0; class 1 (3 images, at 0.25, 0.5,
# 0.75): 5/2, 1/2, 0.


def hand_table(n_classes: int = 2) -> ScoreTable:
    image = np.repeat(np.arange(4), 4)
    return ScoreTable.of_pixels(image, np.ravel(HAND_GOLD), np.ravel(HAND_SCORES), n_classes)


def test_risk_control_by_hand_needs_the_finite_sample_correction():
    # alpha 0.3: the plain mean risk at 0.25 is 1/4 <= 0.3, but the corrected
    # (4 * 1/4 + 1) / 5 = 0.4 > 0.3 rejects it; at 0.5: (4 * 1/16 + 1) / 5 = 0.25 passes.
    result = risk_control(hand_table(), 0.3)
    assert result.thresholds == (0.5, 0.5)
    assert (result.method, result.n, result.feasible, result.images_needed) == ("risk-control", 4, True, 3)
    # alpha 0.4: at 0.25 the corrected risk equals alpha exactly, and equality is admitted
    assert risk_control(hand_table(), 0.4).thresholds[0] == 0.25
    # alpha 0.2: n = 4 is just enough; only a zero risk passes, first reached at 0.75
    assert risk_control(hand_table(), 0.2).thresholds[0] == 0.75


@pytest.mark.parametrize(
    "alpha, needed", [(0.5, 1), (1 / 3, 2), (0.3, 3), (0.25, 3), (0.2, 4), (0.19, 5), (0.1, 9), (0.05, 19)]
)
def test_images_needed_is_the_smallest_n_with_n_plus_1_alpha_at_least_1(alpha, needed):
    result = risk_control(hand_table(), alpha)
    assert result.images_needed == needed
    assert result.feasible == (4 >= needed)
    if not result.feasible:
        assert result.thresholds == (1.0, 1.0)


def test_mondrian_by_hand_with_a_class_too_rare_and_one_absent():
    # alpha 0.4: class 0 (n 4) may lose 0.4 * 5 - 1 = 1: 1/3 at 0.25; class 1 (n 3) 0.6: 1/2 at 0.5
    result = mondrian(hand_table(), 0.4)
    assert result.thresholds == (0.25, 0.5) and result.n == (4, 3) and result.feasible == (True, True)
    # alpha 0.2 needs 4 images: class 1 has 3, and class 2 none
    result = mondrian(hand_table(3), 0.2)
    assert result.thresholds == (0.5, 1.0, 1.0)
    assert (result.n, result.feasible, result.images_needed) == ((4, 3, 0), (True, False, False), 4)
    assert json.loads(json.dumps(result.to_json())) == {
        "method": "mondrian",
        "alpha": 0.2,
        "thresholds": [0.5, 1.0, 1.0],
        "n": [4, 3, 0],
        "feasible": [True, False, False],
        "images_needed": 4,
    }


def test_pixel_split_by_hand():
    # 16 pooled pixels; sorted counts: 4 at 0, 4 at 0.125, 4 at 0.25, 3 at 0.5, 1 at 0.75
    assert pixel_split(hand_table(), 0.3).thresholds[0] == 0.25  # rank ceil(17 * 0.7) = 12
    assert pixel_split(hand_table(), 0.25).thresholds[0] == 0.5  # rank ceil(12.75) = 13
    assert pixel_split(hand_table(), 2 / 17).thresholds[0] == 0.5  # rank 15 exactly, despite rounding
    result = pixel_split(hand_table(), 0.05)  # rank ceil(16.15) = 17 > 16
    assert (result.thresholds, result.feasible, result.images_needed, result.n) == ((1.0, 1.0), False, None, 4)


def test_tables_from_probability_maps_match_the_pixel_table():
    # the hand images as 2x2 probability maps (C = 2), plus one ignored pixel per image
    tables = []
    for scores, gold in zip(HAND_SCORES, HAND_GOLD):
        probabilities = np.full((2, 2, 3), 0.5, np.float16)
        gold_index = np.full((2, 3), -1)  # column 2 is ignored
        for (y, x), s, g in zip(np.ndindex(2, 2), scores, gold):
            gold_index[y, x] = g
            probabilities[g, y, x] = 1 - s
        valid = gold_index >= 0
        tables.append(ScoreTable.of_image(probabilities, gold_index, valid))
    joined = ScoreTable.concatenate(tables)
    assert len(np.unique(joined.image)) == 4 and joined.count.sum() == 16
    for rule in (risk_control, mondrian, pixel_split):
        assert rule(joined, 0.3) == rule(hand_table(), 0.3)
    with pytest.raises(ValueError, match="gold class"):
        ScoreTable.of_image(probabilities, np.full((2, 3), 2), valid)


def reference_threshold(images: list[list[Fraction]], alpha: Fraction) -> Fraction:
    """The smallest lambda with sum_i L_i(lambda) <= alpha (n+1) - 1, in exact rationals."""
    n = len(images)
    for candidate in sorted({s for scores in images for s in scores}):
        loss = sum(Fraction(sum(s > candidate for s in scores), len(scores)) for scores in images)
        if loss <= alpha * (n + 1) - 1:
            return candidate
    return Fraction(1)


def by_image(image, score, n):
    return [[Fraction(s) for s in score[image == i]] for i in range(n)]


def test_thresholds_match_an_exact_rational_reference():
    rng = np.random.default_rng(3)
    levels = (1 - np.linspace(0, 1, 9).astype(np.float16)).astype(np.float64)  # few values: many ties
    for case in range(150):
        alpha = ["0.1", "0.15", "0.2", "0.25", "0.3", "1/3"][case % 6]
        n = int(rng.integers(3, 15))
        sizes = rng.choice([1, 2, 3, 5, 6, 10], n)  # tenths: in floats 0.1 + 0.2 > 0.3
        image = np.repeat(np.arange(n), sizes)
        gold = rng.integers(0, 2, len(image))
        score = levels[rng.integers(0, len(levels), len(image))]
        table = ScoreTable.of_pixels(image, gold, score, 2)
        expected = reference_threshold(by_image(image, score, n), Fraction(alpha))
        assert risk_control(table, float(Fraction(alpha))).thresholds[0] == expected
        for k in (0, 1):
            rows = gold == k
            expected = reference_threshold([s for s in by_image(image[rows], score[rows], n) if s], Fraction(alpha))
            assert mondrian(table, float(Fraction(alpha))).thresholds[k] == expected


def test_sets_and_labels_on_a_hand_made_map():
    # pixels: one class / none / two classes / all three (p exactly 1 - lambda is inside)
    probabilities = np.array([[[0.9, 0.1, 0.5, 0.6]], [[0.2, 0.4, 0.75, 0.5]], [[0.1, 0.3, 0.2, 0.8]]], np.float16)
    sets = prediction_sets(probabilities, [0.5, 0.25, 0.25])
    assert sets[:, 0].T.tolist() == [
        [True, False, False],
        [False, False, False],
        [True, True, False],
        [True, False, True],
    ]
    sets[:, 0, 3] = True
    labels, size = calibrated_labels(sets, (3, 7, 9), 255, np.uint8)
    assert labels.tolist() == [[3, 255, 255, 255]] and labels.dtype == np.uint8
    assert size.tolist() == [[1, 0, 2, 3]] and size.dtype == np.uint8
    gold_index = np.array([[0, 0, 2, 1]])
    valid = np.array([[True, True, True, False]])
    # gold 0 at 0.9 covered, gold 0 at 0.1 not, gold 2 at 0.2 not; the ignored pixel does not count
    assert image_miscoverage(probabilities, gold_index, valid, [0.5, 0.25, 0.25]) == pytest.approx(2 / 3)
    assert np.isnan(image_miscoverage(probabilities, gold_index, np.zeros_like(valid), [0.5, 0.25, 0.25]))
    assert calibrated_labels(np.zeros((300, 1, 1), bool), range(300), 999, np.uint16)[1].dtype == np.uint16


# Synthetic images: n_images of 16..64 pixels (or as given), each with its own difficulty
# a ~ N(0, 1) shared by all its pixels, so pixels of one image are NOT independent. The gold
# probability is sigmoid(base + spread * a + N(0, 1)), rounded to float16 as ``select`` stores it.


def synthetic(rng, n_images, base, spread, sizes=None):
    """-> (image int [N], score float64 [N], sizes [n_images])."""
    sizes = rng.integers(16, 65, n_images) if sizes is None else sizes
    image = np.repeat(np.arange(n_images), sizes)
    base = np.broadcast_to(base, (n_images,))  # a number, or one per image
    logit = (base + spread * rng.normal(size=n_images))[image] + rng.normal(size=len(image))
    probability = (1 / (1 + np.exp(-logit))).astype(np.float16)
    return image, 1 - probability.astype(np.float64), sizes


def per_image_miscoverage(image, score, sizes, threshold):
    """The vectorised ``image_miscoverage`` for gold scores: [n_images]."""
    return np.bincount(image, weights=score > threshold, minlength=len(sizes)) / sizes


def one_class(image, score):
    return ScoreTable.of_pixels(image, np.zeros_like(image), score, 1)


def test_risk_control_holds_on_average_over_images_with_the_predicted_spread():
    alpha, n, m, trials = 0.1, 500, 500, 200
    rng = np.random.default_rng(0)
    observed = np.empty(trials)
    for t in range(trials):
        threshold = risk_control(one_class(*synthetic(rng, n, 2.0, 1.5)[:2]), alpha).thresholds[0]
        observed[t] = per_image_miscoverage(*synthetic(rng, m, 2.0, 1.5), threshold).mean()
    # E <= alpha, and about alpha - (1 - alpha)/n = 0.098 (the rule aims R_hat there)
    assert 0.092 <= observed.mean() <= 0.106, observed.mean()
    # Spread: lambda_hat puts the calibration mean of L_i at a fixed target, so the true risk
    # at lambda_hat moves with the calibration sample, variance ~ sigma^2/n; the test mean
    # adds sigma^2/m, sigma^2 = Var_i L_i(lambda*) at the limiting lambda*. Estimated from
    # 40000 independent images (lambda* = their own rule at the same target). The sample std
    # over 200 trials has a relative standard error of 1/sqrt(2 * 199) = 5%: 20% is 4 of them.
    image, score, sizes = synthetic(np.random.default_rng(1), 40_000, 2.0, 1.5)
    limit = risk_control(one_class(image, score), alpha - (1 - alpha) / n).thresholds[0]
    sigma2 = per_image_miscoverage(image, score, sizes, limit).var()
    predicted = np.sqrt(sigma2 / n + sigma2 / m)
    assert abs(observed.std(ddof=1) / predicted - 1) < 0.2, (observed.std(ddof=1), predicted)


def two_class_images(rng, n_images):
    """Class 0 easy, class 1 hard; class 1 holds U(0.1, 0.5) of an image's pixels, and is
    absent from 20% of the images -> (image, gold, score)."""
    sizes = rng.integers(16, 65, n_images)
    image = np.repeat(np.arange(n_images), sizes)
    share = np.where(rng.random(n_images) < 0.2, 0.0, rng.uniform(0.1, 0.5, n_images))
    gold = (rng.random(len(image)) < share[image]).astype(np.int64)
    logit = np.where(gold == 1, 0.5, 3.0) + rng.normal(size=n_images)[image] + rng.normal(size=len(image))
    return image, gold, 1 - (1 / (1 + np.exp(-logit))).astype(np.float16).astype(np.float64)


def class_miscoverage(image, gold, score, thresholds, k):
    """Mean over the images containing class k of the share of their class-k pixels outside the set."""
    rows = gold == k
    pixels = np.bincount(image[rows])
    missed = np.bincount(image[rows], weights=score[rows] > thresholds[k], minlength=len(pixels))
    return (missed[pixels > 0] / pixels[pixels > 0]).mean()


def test_mondrian_covers_each_class_where_the_pooled_rule_fails_the_hard_one():
    alpha, n, trials = 0.1, 500, 200
    rng = np.random.default_rng(2)
    pooled, per_class = np.empty((trials, 2)), np.empty((trials, 2))
    for t in range(trials):
        table = ScoreTable.of_pixels(*two_class_images(rng, n), 2)
        test = two_class_images(rng, n)
        for result, out in ((risk_control(table, alpha), pooled), (mondrian(table, alpha), per_class)):
            out[t] = [class_miscoverage(*test, result.thresholds, k) for k in (0, 1)]
    assert pooled[:, 1].mean() > 2 * alpha and pooled[:, 0].mean() < alpha / 2
    # Per class, CRC gives alpha - 2/(n_k + 1) <= E <= alpha (the lower bound for nearly
    # continuous losses); n_k >= 376 for the hard class, so >= alpha - 0.0053. The mean of
    # 200 trials has a standard error below 0.001 (trial std <= 0.014): 4 of them is 0.004.
    means = per_class.mean(axis=0)
    assert np.all((alpha - 0.0053 - 0.004 <= means) & (means <= alpha + 0.004)), means


def test_pixel_split_fails_images_that_risk_control_covers():
    # Half the images are big (256 px) and easy, half small (16 px) and hard: pooled pixels
    # are 94% easy ones, so the pixel quantile leaves the small images mostly uncovered.
    alpha, n, trials = 0.1, 200, 100
    rng = np.random.default_rng(4)

    def mixed(rng):
        big = rng.random(n) < 0.5
        return synthetic(rng, n, np.where(big, 3.0, 0.5), 0.5, sizes=np.where(big, 256, 16))

    split, controlled = np.empty(trials), np.empty(trials)
    for t in range(trials):
        table = one_class(*mixed(rng)[:2])
        test = mixed(rng)
        split[t] = per_image_miscoverage(*test, pixel_split(table, alpha).thresholds[0]).mean()
        controlled[t] = per_image_miscoverage(*test, risk_control(table, alpha).thresholds[0]).mean()
    assert split.mean() > 1.5 * alpha, split.mean()
    # E <= alpha; the mean of 100 trials has a standard error of ~0.0015 (trial std ~0.015)
    assert controlled.mean() <= alpha + 0.005, controlled.mean()
