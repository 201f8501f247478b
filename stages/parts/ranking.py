"""How well a per-pixel score ranks errors: the area under the ROC curve."""

from __future__ import annotations

import numpy as np


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """score: float [N]; positive: bool [N] (e.g. the pixel's label is wrong) -> the
    probability that a random positive scores above a random negative, ties counting
    half (Mann-Whitney U / (n_pos * n_neg)); NaN when either class is empty."""
    score, positive = np.asarray(score, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # noqa: PLC0415 (scipy.stats takes about 0.9 s to import; a rerun with nothing to do never ranks)

    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
