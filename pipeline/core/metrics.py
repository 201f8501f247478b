"""Label quality against gold masks: a confusion matrix and the scores read from it.

The matrix is int64 [C, C + 1]: rows are gold classes, columns predicted classes, both in
the order of the class list given; the last column counts gold pixels that received no
class ("unlabelled": the ignore id or any other value that is not a class id). Gold
pixels whose value is listed as ignored are left out entirely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def class_index(values: np.ndarray, class_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values: any-shape integer array; -> (intp index into ``class_ids``, bool is-a-class),
    both shaped like ``values``. The index is meaningless where is-a-class is False."""
    ids = np.asarray(class_ids, np.int64)
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], values), len(ids) - 1)
    return order[pos], ids[order][pos] == values


def confusion(
    gold: np.ndarray, pred: np.ndarray, class_ids: Sequence[int], gold_ignore: Sequence[int] = ()
) -> np.ndarray:
    """gold, pred: HxW integer arrays of the same shape -> int64 [C, C + 1] (see module doc).

    ValueError listing the offending values when a gold value is neither a class id nor
    in ``gold_ignore``.
    """
    if gold.shape != pred.shape:
        raise ValueError(f"gold is {gold.shape} but the prediction is {pred.shape}")
    gold_idx, gold_is_class = class_index(gold, class_ids)
    unknown = ~gold_is_class & ~np.isin(gold, np.asarray(gold_ignore, np.int64))
    if unknown.any():
        raise ValueError(
            f"gold values {np.unique(gold[unknown]).tolist()} are neither class ids "
            f"{list(class_ids)} nor ignored {list(gold_ignore)}"
        )
    pred_idx, pred_is_class = class_index(pred, class_ids)
    c = len(class_ids)
    cols = np.where(pred_is_class, pred_idx, c)[gold_is_class]
    flat = gold_idx[gold_is_class] * (c + 1) + cols
    return np.bincount(flat, minlength=c * (c + 1)).reshape(c, c + 1).astype(np.int64)


@dataclass(frozen=True)
class Scores:
    """What one confusion matrix says. NaN where a score has no pixels to speak of.

    iou: float [C]; NaN for classes absent from both gold and prediction.
    miou: mean of the non-NaN ``iou``.
    pixel_accuracy: correct / gold pixels (an unlabelled pixel is wrong).
    labelled_fraction: gold pixels that received a class / gold pixels.
    labelled_accuracy: correct / gold pixels that received a class.
    pixels: gold pixels counted (ignored gold values excluded).
    """

    iou: tuple[float, ...]
    miou: float
    pixel_accuracy: float
    labelled_fraction: float
    labelled_accuracy: float
    pixels: int


def json_number(value: float) -> float | None:
    """A score for JSON: NaN (nothing to measure) becomes null."""
    return None if math.isnan(value) else value


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def scores(matrix: np.ndarray) -> Scores:
    """matrix: int [C, C + 1] from ``confusion`` (summed over images) -> Scores."""
    c = matrix.shape[0]
    labelled = matrix[:, :c]
    tp = np.diag(labelled).astype(np.float64)
    union = matrix.sum(axis=1) + labelled.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = ~np.isnan(iou)
    total, n_labelled = int(matrix.sum()), int(labelled.sum())
    return Scores(
        iou=tuple(float(v) for v in iou),
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=_ratio(tp.sum(), total),
        labelled_fraction=_ratio(n_labelled, total),
        labelled_accuracy=_ratio(tp.sum(), n_labelled),
        pixels=total,
    )
