"""``seglab bench conformal``: does calibration keep its promise on real images?

Over the manifest's evaluation images that ``select`` finished, each of ``splits`` random
splits (seeded) draws ``calibration`` images as the calibration set and tests on the rest:
thresholds are fitted with the chosen method for every alpha, and on the test images it
measures the miscoverage (mean over images of the share of gold pixels whose class is
outside the set), the share of pixels kept (singleton sets) and the accuracy of the kept
pixels. The split is at random over images, so calibration and test images are
exchangeable, which is what the guarantee assumes.
"""
from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.errors import SeglabError
from seglab.pipeline.evaluate import class_map_stages, gold_set_images
from seglab.pipeline.gold import read_gold
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.store import Store
from seglab.stages.conformal import METHODS, Calibration, ScoreTable, image_miscoverage, prediction_sets

GoldImage = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(select probabilities float16 [C, H, W] in class order, gold class index int64 HxW, valid bool HxW)."""


def gold_images(manifest: Manifest, store: Store, done: Collection[str],
                gold_set: str = "evaluation") -> Iterator[tuple[str, GoldImage]]:
    """Lazily, in listing order, per image of data.<gold_set> whose unit is in ``done``:
    (unit id, its select probabilities with its gold mask as ``GoldImage``)."""
    class_ids = tuple(c.id for c in manifest.data.classes)
    gold = getattr(manifest.data, gold_set)
    for image, unit in gold_set_images(manifest, gold_set):
        if unit in done:
            probabilities = store.read_array("select/probabilities", unit)
            index, valid = read_gold(gold, Path(image), class_ids, probabilities.shape[1:])
            yield unit, (probabilities, index, valid)


def fit_thresholds(tables: Sequence[ScoreTable], method: str, alpha: float) -> Calibration:
    """Fit ``method`` at ``alpha`` on the calibration images' score tables (``ScoreTable.of_image``)."""
    return METHODS[method](ScoreTable.concatenate(list(tables)), alpha)


def image_figures(probabilities: np.ndarray, index: np.ndarray, valid: np.ndarray,
                  thresholds: np.ndarray) -> dict[str, float]:
    """One test image (a ``GoldImage``) under per-class ``thresholds``: its miscoverage
    (``image_miscoverage``; NaN without valid pixels), and pixel counts: valid ``pixels``,
    ``kept`` (valid pixels whose set is a single class) and ``correct`` (kept and right)."""
    sets = prediction_sets(probabilities, thresholds)
    single = (sets.sum(axis=0) == 1) & valid
    return {"miscoverage": image_miscoverage(probabilities, index, valid, thresholds),
            "kept": int(single.sum()), "correct": int((sets.argmax(axis=0) == index)[single].sum()),
            "pixels": int(valid.sum())}


def summarize(figures: Iterable[dict[str, float]]) -> dict[str, float]:
    """``image_figures`` of several test images -> miscoverage (mean over images, NaN when
    none has valid pixels), kept share and kept accuracy (over pixels)."""
    figures = list(figures)
    miscoverage = [f["miscoverage"] for f in figures]
    kept, correct, pixels = (sum(f[k] for f in figures) for k in ("kept", "correct", "pixels"))
    return {"miscoverage": float(np.nanmean(miscoverage)) if np.isfinite(miscoverage).any() else float("nan"),
            "kept": kept / max(pixels, 1), "kept_accuracy": correct / kept if kept else float("nan")}


def bench_conformal(manifest: Manifest, *, alphas: Sequence[float], splits: int, calibration: int,
                    method: str = "risk-control", seed: int = 0) -> dict[str, Any]:
    """-> per alpha: every split's test figures and their mean and standard deviation."""
    started = time.perf_counter()
    store = Store(manifest.store_path)
    _, _, current = class_map_stages(manifest)
    done = store.ledger("select").done(current["select"])
    images = [image for _, image in gold_images(manifest, store, done)]
    if len(images) <= calibration:
        raise SeglabError(f"{manifest.path}: {len(images)} evaluation images have select output; "
                          f"a split of {calibration} calibration images needs more")
    tables = [ScoreTable.of_image(*image) for image in images]
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {"manifest": manifest.path, "method": method, "images": len(images),
                               "calibration": calibration, "test": len(images) - calibration, "splits": splits,
                               "seed": seed, "alphas": {}}
    orders = [rng.permutation(len(images)) for _ in range(splits)]
    for alpha in alphas:
        rows = []
        for order in orders:
            cal, test = order[:calibration], order[calibration:]
            fitted = fit_thresholds([tables[i] for i in cal], method, alpha)
            thresholds = np.asarray(fitted.thresholds)
            rows.append({**summarize(image_figures(*images[i], thresholds) for i in test),
                         "threshold": float(np.mean(fitted.thresholds)), "feasible": fitted.feasible})
        summary = {k: {"mean": float(np.nanmean([r[k] for r in rows])), "std": float(np.nanstd([r[k] for r in rows]))}
                   for k in ("miscoverage", "kept", "kept_accuracy", "threshold")}
        results["alphas"][str(alpha)] = {"summary": summary, "splits": rows}
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results
