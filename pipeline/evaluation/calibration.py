"""Conformal calibration measured on gold images: select's distributions of a gold set's
images beside their gold masks, thresholds fitted on some of them and the miscoverage, kept
share and kept accuracy on others. Shared by ``seglab report`` (its calibration curve) and
``seglab bench conformal`` (random calibration / test splits).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence

import numpy as np

from seglab.pipeline.core.gold import read_gold
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import gold_set_images
from seglab.pipeline.manifest import Manifest
from seglab.stages.parts.conformal import METHODS, Calibration, ScoreTable, image_miscoverage, prediction_sets

GoldImage = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(select probabilities float16 [C, H, W] in class order, gold class index int64 HxW, valid bool HxW)."""


def gold_images(
    manifest: Manifest, store: Store, done: Collection[str], gold_set: str = "evaluation"
) -> Iterator[tuple[str, GoldImage]]:
    """Lazily, in listing order, per image of data.<gold_set> whose unit is in ``done``:
    (unit id, its select probabilities with its gold mask as ``GoldImage``)."""
    class_ids = tuple(c.id for c in manifest.data.classes)
    gold = getattr(manifest.data, gold_set)
    for image, unit in gold_set_images(manifest, gold_set):
        if unit is not None and unit in done:
            probabilities = store.read_array("select/probabilities", unit)
            index, valid = read_gold(gold, image, class_ids, probabilities.shape[1:])
            yield unit, (probabilities, index, valid)


def fit_thresholds(tables: Sequence[ScoreTable], method: str, alpha: float) -> Calibration:
    """Fit ``method`` at ``alpha`` on the calibration images' score tables (``ScoreTable.of_image``)."""
    return METHODS[method](ScoreTable.concatenate(list(tables)), alpha)


def image_figures(
    probabilities: np.ndarray, index: np.ndarray, valid: np.ndarray, thresholds: np.ndarray
) -> dict[str, float]:
    """One test image (a ``GoldImage``) under per-class ``thresholds``: its miscoverage
    (``image_miscoverage``; NaN without valid pixels), and pixel counts: valid ``pixels``,
    ``kept`` (valid pixels whose set is a single class) and ``correct`` (kept and right)."""
    sets = prediction_sets(probabilities, thresholds)
    single = (sets.sum(axis=0) == 1) & valid
    return {
        "miscoverage": image_miscoverage(probabilities, index, valid, thresholds),
        "kept": int(single.sum()),
        "correct": int((sets.argmax(axis=0) == index)[single].sum()),
        "pixels": int(valid.sum()),
    }


def summarize(figures: Iterable[dict[str, float]]) -> dict[str, float]:
    """``image_figures`` of several test images -> miscoverage (mean over images, NaN when
    none has valid pixels), kept share and kept accuracy (over pixels)."""
    figures = list(figures)
    miscoverage = [f["miscoverage"] for f in figures]
    kept, correct, pixels = (sum(f[k] for f in figures) for k in ("kept", "correct", "pixels"))
    return {
        "miscoverage": float(np.nanmean(miscoverage)) if np.isfinite(miscoverage).any() else float("nan"),
        "kept": kept / max(pixels, 1),
        "kept_accuracy": correct / kept if kept else float("nan"),
    }
