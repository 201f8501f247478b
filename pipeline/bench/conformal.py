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
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.ledger import done_units
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.calibration import fit_thresholds, gold_images, image_figures, summarize
from seglab.pipeline.evaluation.evaluate import class_map_stages
from seglab.pipeline.manifest import Manifest
from seglab.stages.parts.conformal import ScoreTable


def bench_conformal(
    manifest: Manifest,
    *,
    alphas: Sequence[float],
    splits: int,
    calibration: int,
    method: str = "risk-control",
    seed: int = 0,
) -> dict[str, Any]:
    """-> per alpha: every split's test figures and their mean and standard deviation."""
    started = time.perf_counter()
    store = Store(manifest.store_location)
    _, _, current = class_map_stages(manifest)
    done = done_units(store.entries("select"), current["select"])
    images = [image for _, image in gold_images(manifest, store, done)]
    if len(images) <= calibration:
        raise SeglabError(
            f"{manifest.path}: {len(images)} evaluation images have select output; "
            f"a split of {calibration} calibration images needs more"
        )
    tables = [ScoreTable.of_image(*image) for image in images]
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {
        "manifest": manifest.path,
        "method": method,
        "images": len(images),
        "calibration": calibration,
        "test": len(images) - calibration,
        "splits": splits,
        "seed": seed,
        "alphas": {},
    }
    orders = [rng.permutation(len(images)) for _ in range(splits)]
    for alpha in alphas:
        rows = []
        for order in orders:
            cal, test = order[:calibration], order[calibration:]
            fitted = fit_thresholds([tables[i] for i in cal], method, alpha)
            thresholds = np.asarray(fitted.thresholds)
            rows.append(
                {
                    **summarize(image_figures(*images[int(i)], thresholds) for i in test),
                    "threshold": float(np.mean(fitted.thresholds)),
                    "feasible": fitted.feasible,
                }
            )
        summary = {
            k: {"mean": float(np.nanmean([r[k] for r in rows])), "std": float(np.nanstd([r[k] for r in rows]))}
            for k in ("miscoverage", "kept", "kept_accuracy", "threshold")
        }
        results["alphas"][str(alpha)] = {"summary": summary, "splits": rows}
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results
