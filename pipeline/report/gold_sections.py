"""The report's sections that need the manifest's gold sets: the calibration curve
(nominal vs empirical miscoverage) and the quality table (mIoU per label source and round).
Each returns its section of pipeline/report/build.py with a one-sentence ``reason`` when the
store or manifest lacks what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.calibration import fit_thresholds, gold_images, image_figures, summarize
from seglab.pipeline.evaluation.evaluate import evaluate
from seglab.pipeline.exports.labelsource import done_units, stage_round
from seglab.pipeline.manifest import Manifest, open_manifest
from seglab.pipeline.report.data import ALPHAS, CalibrationRow, CalibrationSection, QualityRow, QualitySection, number
from seglab.stages.base import ROUND_SEPARATOR
from seglab.stages.parts.conformal import ScoreTable


def resolve_manifest(store: Store, manifest: str | Path | None) -> tuple[Manifest | None, str | None]:
    """The manifest to read gold sets from, reading this store: ``manifest`` when given (its
    errors propagate), else the store's recorded ``manifest_path`` when that file exists.
    -> (manifest, None) or (None, the reason there is none)."""
    if manifest is not None:
        return open_manifest(manifest, store=store.path), None
    recorded = store.attrs.get("manifest_path")
    if not recorded:
        return None, "The store records no manifest path and none was given with --manifest."
    if not Path(recorded).is_file():
        return None, f"The store's manifest {recorded} does not exist; pass one with --manifest."
    try:
        return open_manifest(recorded, store=store.path), None
    except SeglabError as exc:
        return None, f"The store's manifest {recorded} cannot be read ({exc}); pass one with --manifest."


def calibration_section(store: Store, manifest: Manifest | None, why_not: str | None) -> CalibrationSection:
    """Fit the stored method at every nominal alpha on the calibration images and measure the
    empirical miscoverage on the evaluation images (streamed: one image's probabilities at a time)."""
    fitted = store.stage_attrs("calibrate").get("fitted") if "calibrate" in store.stages() else None
    if not fitted:
        return CalibrationSection(
            reason="The store has no fitted calibrate stage (it runs only when the manifest "
            "names a data.calibration gold set)."
        )
    method, fitted_alpha = fitted["method"], float(fitted["alpha"])
    section = CalibrationSection(method=method, fitted_alpha=fitted_alpha)
    if manifest is None:
        section.reason = why_not
        return section
    missing = [s for s in ("calibration", "evaluation") if getattr(manifest.data, s) is None]
    if missing:
        names = " and no ".join(f"data.{s}" for s in missing)
        section.reason = f"The manifest {manifest.path} names no {names} gold set."
        return section
    manifest_alpha = float(manifest.calibrate.alpha)
    section.manifest_alpha = manifest_alpha
    done = set(done_units(store, "select"))
    try:
        tables = [ScoreTable.of_image(*image) for _, image in gold_images(manifest, store, done, "calibration")]
        if not tables:
            section.reason = "No calibration image has finished select output to fit thresholds on."
            return section
        alphas = sorted({*ALPHAS, fitted_alpha, manifest_alpha})
        fits = {a: fit_thresholds(tables, method, a) for a in alphas}
        stored = np.asarray(fitted["thresholds"], np.float64)
        measured: dict[Any, list[dict[str, float]]] = {a: [] for a in (*alphas, "stored")}
        for _, image in gold_images(manifest, store, done, "evaluation"):
            for a in alphas:
                measured[a].append(image_figures(*image, np.asarray(fits[a].thresholds, np.float64)))
            measured["stored"].append(image_figures(*image, stored))
    except SeglabError as exc:
        section.reason = f"The gold masks cannot be read: {exc}."
        return section
    section.calibration_images, section.evaluation_images = len(tables), len(measured["stored"])
    if not measured["stored"]:
        section.reason = "No evaluation image has finished select output to measure miscoverage on."
        return section

    def row(alpha: float, thresholds: Sequence[float], feasible: Any, figures: list[dict]) -> CalibrationRow:
        s = summarize(figures)
        ok = all(feasible) if isinstance(feasible, (list, tuple)) else bool(feasible)
        return CalibrationRow(
            alpha,
            number(s["miscoverage"]),
            number(s["kept"]),
            number(s["kept_accuracy"]),
            float(np.mean(thresholds)),
            ok,
        )

    section.rows = [row(a, fits[a].thresholds, fits[a].feasible, measured[a]) for a in alphas]
    section.stored = row(fitted_alpha, fitted["thresholds"], fitted.get("feasible", True), measured["stored"])
    return section


def quality_section(store: Store, manifest: Manifest | None, why_not: str | None) -> QualitySection:
    """``evaluate``'s scores per label source, and mIoU per round of refine and retrain."""
    if manifest is None:
        return QualitySection(reason=why_not, rounds_reason=why_not)
    if manifest.data.evaluation is None:
        reason = f"The manifest {manifest.path} names no data.evaluation gold set to score labels against."
        return QualitySection(reason=reason, rounds_reason=reason)
    try:
        result = evaluate(manifest)
    except SeglabError as exc:
        return QualitySection(reason=f"Evaluation failed: {exc}.", rounds_reason="Evaluation failed.")
    rows = [
        QualityRow(
            r.source,
            r.evaluated,
            len(r.missing),
            r.stale,
            number(r.scores.miou),
            number(r.scores.pixel_accuracy),
            number(r.scores.labelled_fraction),
            number(r.scores.labelled_accuracy),
        )
        for r in result.sources
    ]
    section = QualitySection(images=result.images, rows=rows)
    if not any(r.source.partition(ROUND_SEPARATOR)[0] == "retrain" for r in rows):
        section.rounds_reason = "The run has no rounds (no retrain stage), so there is no mIoU per round to plot."
        return section
    for r in rows:
        base = r.source.partition(ROUND_SEPARATOR)[0]
        if base in ("refine", "retrain"):
            section.rounds.setdefault(base, []).append((stage_round(r.source), r.miou))
    for series in section.rounds.values():
        series.sort()
    return section
