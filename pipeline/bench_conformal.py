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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.errors import SeglabError
from seglab.pipeline.evaluate import class_map_stages, evaluation_set
from seglab.pipeline.gold import read_gold
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.store import Store
from seglab.stages.conformal import METHODS, ScoreTable, image_miscoverage, prediction_sets


def _load(manifest: Manifest, store: Store, done: set[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """-> per finished evaluation image: (probabilities float16 [C, H, W], gold index, valid)."""
    class_ids = tuple(c.id for c in manifest.data.classes)
    images = []
    for image, unit in evaluation_set(manifest):
        if unit in done:
            probabilities = store.read_unit(["select/probabilities"], unit)["select/probabilities"]
            index, valid = read_gold(manifest.data.evaluation, Path(image), class_ids, probabilities.shape[1:])
            images.append((probabilities, index, valid))
    return images


def _test(images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], thresholds: np.ndarray) -> dict[str, float]:
    """Miscoverage (mean over images), kept share and kept accuracy (over pixels) of the test images."""
    miscoverage, kept, correct, pixels = [], 0, 0, 0
    for probabilities, index, valid in images:
        miscoverage.append(image_miscoverage(probabilities, index, valid, thresholds))
        sets = prediction_sets(probabilities, thresholds)
        single = (sets.sum(axis=0) == 1) & valid
        kept += int(single.sum())
        correct += int((sets.argmax(axis=0) == index)[single].sum())
        pixels += int(valid.sum())
    return {"miscoverage": float(np.nanmean(miscoverage)), "kept": kept / max(pixels, 1),
            "kept_accuracy": correct / kept if kept else float("nan")}


def bench_conformal(manifest: Manifest, *, alphas: Sequence[float], splits: int, calibration: int,
                    method: str = "risk-control", seed: int = 0) -> dict[str, Any]:
    """-> per alpha: every split's test figures and their mean and standard deviation."""
    started = time.perf_counter()
    store = Store(manifest.store_path)
    _, _, current = class_map_stages(manifest)
    done = store.ledger("select").done(current["select"])
    images = _load(manifest, store, done)
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
            fitted = METHODS[method](ScoreTable.concatenate([tables[i] for i in cal]), alpha)
            rows.append({**_test([images[i] for i in test], np.asarray(fitted.thresholds)),
                         "threshold": float(np.mean(fitted.thresholds)), "feasible": fitted.feasible})
        summary = {k: {"mean": float(np.nanmean([r[k] for r in rows])), "std": float(np.nanstd([r[k] for r in rows]))}
                   for k in ("miscoverage", "kept", "kept_accuracy", "threshold")}
        results["alphas"][str(alpha)] = {"summary": summary, "splits": rows}
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results
