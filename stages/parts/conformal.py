"""Conformal thresholds on the per-class probabilities written by ``select`` (pure numpy).

The score of a pixel x whose gold class is y is s = 1 - p_y(x) (ConformalSAM). A threshold
lambda_c per class gives the prediction set C(x) = {c : 1 - p_c(x) <= lambda_c}: the larger
lambda, the larger the sets; lambda = 1 puts every class in every set.

  risk-control: conformal risk control (Angelopoulos et al. 2022) with the IMAGE as the
                exchangeable unit. L_i(lambda), the share of image i's valid gold pixels
                whose score exceeds lambda, is non-increasing and bounded by B = 1; lambda
                is the smallest value with n/(n+1) * mean_i L_i(lambda) + 1/(n+1) <= alpha
                over the n calibration images. For an exchangeable test image,
                E[L(lambda)] <= alpha.
  mondrian:     the same rule once per gold class k, on the losses restricted to class-k
                pixels, over the n_k images that contain class k. For a test image that
                contains k, E[share of its class-k pixels outside their sets] <= alpha.
  pixel-split:  ConformalSAM's split conformal rule on all N calibration pixels pooled: the
                ceil((N+1)(1-alpha))-th smallest score. Its guarantee needs exchangeable
                pixels, which pixels of one image are not: it carries NO image-level
                guarantee, and is kept to compare against.

At lambda = 1 every loss is 0, so the risk-control inequality can only hold when
(n+1) * alpha >= 1; with fewer images the threshold is 1 (trivial sets) and the result says
it is infeasible and how many images are needed.

Exactness: L_i is a right-continuous step that drops only at score values (a pixel whose
score equals lambda is covered, so tied pixels fall together), hence the infimum is one of
the distinct calibration scores, and each of them is evaluated exactly, through one sorted
array of all distinct scores and np.searchsorted. Scores are 1 - p in float64, the same
expression when calibrating and when applying, so a threshold covers exactly the pixels it
covered in calibration; from float16 probabilities the subtraction is exact. Inequalities
allow a slack of ``TOL`` so that float sums and decimal alphas (0.1 is not a binary
fraction) do not break exact equalities; this loosens a guarantee by at most TOL/(n+1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOL = 1e-9


def _score(probability: np.ndarray) -> np.ndarray:
    return 1.0 - np.asarray(probability, np.float64)


def _check_gold(gold: np.ndarray, n_classes: int) -> None:
    if gold.size and (gold.min() < 0 or gold.max() >= n_classes):
        raise ValueError(f"gold class indices must lie in [0, {n_classes}), got {gold.min()}..{gold.max()}")


def _gold_scores(probabilities: np.ndarray, gold_index: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (gold class index int64 [m], score float64 [m]) of the m valid pixels."""
    rows, cols = np.nonzero(valid)
    gold = np.asarray(gold_index)[rows, cols].astype(np.int64)
    _check_gold(gold, len(probabilities))
    return gold, _score(probabilities[gold, rows, cols])


@dataclass(frozen=True)
class ScoreTable:
    """Calibration pixels as weighted rows: row r stands for ``count[r]`` valid pixels of
    image ``image[r]`` whose gold class has index ``gold[r]`` (its position in class order,
    below ``n_classes``) and whose score is ``score[r]``. ``score`` is float64 [R], the
    others int64 [R]. Identical (image, gold, score) rows are merged, so an image whose
    probabilities are float16 takes at most C x 15361 rows whatever its size. Images exist
    only through their rows: an image without valid pixels is not a calibration image."""

    image: np.ndarray
    gold: np.ndarray
    score: np.ndarray
    count: np.ndarray
    n_classes: int

    @classmethod
    def of_pixels(cls, image: np.ndarray, gold: np.ndarray, score: np.ndarray, n_classes: int) -> ScoreTable:
        """image, gold: int [N]; score: float [N] in [0, 1]; one entry per valid pixel."""
        image = np.asarray(image, np.int64).ravel()
        gold = np.asarray(gold, np.int64).ravel()
        score = np.asarray(score, np.float64).ravel()
        _check_gold(gold, n_classes)
        if not np.all((score >= 0) & (score <= 1)):  # also refuses NaN
            raise ValueError("scores must lie in [0, 1]: probabilities outside [0, 1] or NaN")
        order = np.lexsort((score, gold, image))
        image, gold, score = image[order], gold[order], score[order]
        new = np.ones(len(score), bool)
        new[1:] = (np.diff(image) != 0) | (np.diff(gold) != 0) | (np.diff(score) != 0)
        start = np.flatnonzero(new)
        return cls(image[start], gold[start], score[start], np.diff(np.append(start, len(score))), n_classes)

    @classmethod
    def of_image(cls, probabilities: np.ndarray, gold_index: np.ndarray, valid: np.ndarray) -> ScoreTable:
        """One image. probabilities: float [C, H, W] in [0, 1], in class order; gold_index:
        int [H, W], the position of each pixel's gold class in class order (any value where
        not valid); valid: bool [H, W], False where the gold mask is ignored."""
        gold, score = _gold_scores(probabilities, gold_index, valid)
        return cls.of_pixels(np.zeros_like(gold), gold, score, len(probabilities))

    @staticmethod
    def concatenate(tables: Sequence[ScoreTable]) -> ScoreTable:
        """One table holding the images of every table (renumbered to stay distinct)."""
        n_classes = {t.n_classes for t in tables}
        if len(n_classes) != 1:
            raise ValueError(f"tables disagree on the number of classes: {sorted(n_classes)}")
        ends = np.cumsum([t.image.max() + 1 if len(t.image) else 0 for t in tables])
        offsets = np.append(0, ends[:-1])
        return ScoreTable(
            np.concatenate([t.image + o for t, o in zip(tables, offsets)]),
            np.concatenate([t.gold for t in tables]),
            np.concatenate([t.score for t in tables]),
            np.concatenate([t.count for t in tables]),
            n_classes.pop(),
        )


@dataclass(frozen=True)
class Calibration:
    """The thresholds one rule chose, and whether it could keep its promise.

    method:        "risk-control", "mondrian" or "pixel-split".
    alpha:         the target miscoverage.
    thresholds:    lambda per class, in class order (one value repeated but for mondrian).
    n:             calibration images (for mondrian, per class: the images containing it).
    feasible:      whether n reached ``images_needed`` (per class for mondrian); where it
                   did not, the threshold is 1. For pixel-split: whether
                   ceil((N+1)(1-alpha)) <= N over the N pooled pixels.
    images_needed: the fewest images (containing the class, for mondrian) with which the
                   rule can hold at this alpha: the smallest n with (n+1) * alpha >= 1.
                   None for pixel-split, whose unit is the pixel.
    """

    method: str
    alpha: float
    thresholds: tuple[float, ...]
    n: int | tuple[int, ...]
    feasible: bool | tuple[bool, ...]
    images_needed: int | None

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "thresholds": list(self.thresholds),
            "n": _plain(self.n),
            "feasible": _plain(self.feasible),
            "images_needed": self.images_needed,
        }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return float(alpha)


def _images_needed(alpha: float) -> int:
    return max(1, math.ceil((1 - TOL) / alpha) - 1)


def _per_image_weights(image: np.ndarray, count: np.ndarray) -> tuple[int, np.ndarray]:
    """-> (number of images, weight per row = its share of its image's pixels)."""
    images, which = np.unique(image, return_inverse=True)
    pixels = np.bincount(which, weights=count, minlength=len(images))
    return len(images), count / pixels[which]


def _risk_control_threshold(score: np.ndarray, weight: np.ndarray, n: int, alpha: float) -> float:
    """The smallest score lambda with sum_i L_i(lambda) <= alpha (n+1) - 1, where
    sum_i L_i(lambda) = sum of ``weight`` over rows with score > lambda; 1 when too few images."""
    if n < _images_needed(alpha):
        return 1.0
    values, which = np.unique(score, return_inverse=True)
    mass = np.bincount(which, weights=weight, minlength=len(values))
    loss = np.append(np.cumsum(mass[::-1])[::-1][1:], 0.0)  # sum_i L_i(values[k]), non-increasing
    first = int(np.searchsorted(-loss, -(alpha * (n + 1) - 1 + TOL), side="left"))
    return float(values[min(first, len(values) - 1)])  # min: float rounding of (n+1) * alpha


def risk_control(table: ScoreTable, alpha: float) -> Calibration:
    """Conformal risk control over images: one threshold for every class."""
    alpha = _check_alpha(alpha)
    n, weight = _per_image_weights(table.image, table.count)
    threshold = _risk_control_threshold(table.score, weight, n, alpha)
    needed = _images_needed(alpha)
    return Calibration("risk-control", alpha, (threshold,) * table.n_classes, n, n >= needed, needed)


def mondrian(table: ScoreTable, alpha: float) -> Calibration:
    """Conformal risk control per gold class (Mondrian): threshold k is calibrated on the
    class-k pixels of the images that contain class k."""
    alpha = _check_alpha(alpha)
    thresholds, counts = [], []
    for k in range(table.n_classes):
        rows = table.gold == k
        n, weight = _per_image_weights(table.image[rows], table.count[rows])
        thresholds.append(_risk_control_threshold(table.score[rows], weight, n, alpha))
        counts.append(n)
    needed = _images_needed(alpha)
    return Calibration("mondrian", alpha, tuple(thresholds), tuple(counts), tuple(n >= needed for n in counts), needed)


def pixel_split(table: ScoreTable, alpha: float) -> Calibration:
    """ConformalSAM's split conformal rule on all pixels pooled: the
    ceil((N+1)(1-alpha))-th smallest of the N scores, 1 when that rank exceeds N. It treats
    pixels as exchangeable; pixels of one image are not (they share the image's
    difficulty), so this gives no guarantee per image, nor on average over images."""
    alpha = _check_alpha(alpha)
    total = int(table.count.sum())
    rank = max(1, math.ceil((total + 1) * (1 - alpha) - TOL))
    threshold = 1.0
    if rank <= total:
        order = np.argsort(table.score, kind="stable")
        threshold = float(table.score[order][np.searchsorted(np.cumsum(table.count[order]), rank)])
    n = len(np.unique(table.image))
    return Calibration("pixel-split", alpha, (threshold,) * table.n_classes, n, rank <= total, None)


METHODS = {"risk-control": risk_control, "mondrian": mondrian, "pixel-split": pixel_split}


def prediction_sets(probabilities: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """probabilities: float [C, H, W] in class order; thresholds: [C] -> bool [C, H, W],
    True where class c is in the pixel's set (1 - p_c <= lambda_c)."""
    lambdas = np.asarray(thresholds, np.float64)
    if len(lambdas) != len(probabilities):
        raise ValueError(f"{len(lambdas)} thresholds for {len(probabilities)} classes")
    sets = np.empty(np.shape(probabilities), bool)
    for c, threshold in enumerate(lambdas):  # one class at a time: float64 scores are large
        sets[c] = _score(probabilities[c]) <= threshold
    return sets


def calibrated_labels(
    sets: np.ndarray, class_ids: Sequence[int], ignore_id: int, label_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """sets: bool [C, H, W] in ``class_ids`` order -> (labels HxW in ``label_dtype``: the
    class where the set holds exactly one, ``ignore_id`` where it is empty or ambiguous;
    set sizes HxW, uint8, or uint16 beyond 255 classes)."""
    size = sets.sum(axis=0, dtype=np.uint8 if len(sets) <= 255 else np.uint16)
    labels = np.where(size == 1, np.asarray(class_ids)[sets.argmax(axis=0)], ignore_id)
    return labels.astype(label_dtype), size


def image_miscoverage(
    probabilities: np.ndarray, gold_index: np.ndarray, valid: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> float:
    """The share of an image's valid gold pixels whose gold class is outside their set;
    NaN without valid pixels. Arguments as in ``ScoreTable.of_image``."""
    gold, score = _gold_scores(probabilities, gold_index, valid)
    if not len(score):
        return math.nan
    return float(np.mean(score > np.asarray(thresholds, np.float64)[gold]))
