"""The typed results ``seglab bench quality`` prints: one ``BaselineResult`` per classical
baseline and one ``QualityRow`` per manifest, with their JSON form. Free of the engine, so
the command line renders them without loading Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from seglab.pipeline.core.metrics import Scores, json_number
from seglab.pipeline.evaluation.evaluate import NEAREST, WEAK, Evaluation

SELECT, REFINE = "select", "refine"


@dataclass(frozen=True)
class BaselineResult:
    """One classical baseline over the evaluation images ingest finished.

    scores: over the images it labelled (None when it labelled none); seconds: its mean wall
    time per image (NaN when none); unavailable: why it could not run (a missing extra), or None.
    """

    name: str
    evaluated: int
    scores: Scores | None
    seconds: float
    unavailable: str | None = None

    @property
    def miou(self) -> float:
        return self.scores.miou if self.scores is not None else float("nan")


def _pct(value: float) -> float | None:
    """A fraction -> % rounded to 0.1 (None for NaN)."""
    return None if math.isnan(value) else round(100 * value, 1)


def _rounded(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _seconds(value: float) -> float | None:
    """Seconds to 3 significant digits (None for NaN)."""
    return None if math.isnan(value) else float(f"{value:.3g}")


@dataclass(frozen=True)
class QualityRow:
    """One manifest's outcome. seconds: simulate, run, evaluate, baselines and total wall time.
    baselines: per baseline name (baselines.BASELINES order); stage_seconds: per-image
    seconds of select (embed + prompts + select) and refine, from the ledger (TIMED_STAGES)."""

    manifest: str
    dataset: str
    kind: str
    limit: int | None
    failed: int
    seconds: dict[str, float]
    evaluation: Evaluation
    baselines: Mapping[str, BaselineResult] = field(default_factory=dict)
    stage_seconds: Mapping[str, float] = field(default_factory=dict)

    def source(self, name: str):
        return next((r for r in self.evaluation.sources if r.source == name), None)

    def miou(self, name: str) -> float:
        """A baseline's mIoU (by its name in baselines.BASELINES) or an evaluated source's (NaN when missing)."""
        if name in self.baselines:
            return self.baselines[name].miou
        found = self.source(name)
        return found.scores.miou if found else float("nan")

    def seconds_per_image(self, name: str) -> float:
        """A baseline's mean seconds per image, or select's / refine's from the ledger (NaN when unknown)."""
        if name in self.baselines:
            return self.baselines[name].seconds
        return self.stage_seconds.get(name, float("nan"))

    @property
    def best_baseline(self) -> str | None:
        """The baseline with the highest mIoU (None when none was measured)."""
        measured = [(r.miou, name) for name, r in self.baselines.items() if not math.isnan(r.miou)]
        return max(measured, key=lambda m: m[0])[1] if measured else None

    @property
    def gain_points(self) -> float:
        """select − the nearest baseline (the nearest-label source when baselines were not
        measured), in mIoU points (NaN when either is missing)."""
        return 100 * (self.miou(SELECT) - self.miou("nearest" if "nearest" in self.baselines else NEAREST))

    @property
    def refine_points(self) -> float:
        """refine − select, in mIoU points (NaN when either is missing)."""
        return 100 * (self.miou(REFINE) - self.miou(SELECT))

    @property
    def refine_minus_best_baseline(self) -> float:
        """refine − the best baseline, in mIoU points (NaN when either is missing)."""
        best = self.best_baseline
        return 100 * (self.miou(REFINE) - self.miou(best)) if best else float("nan")

    @property
    def pipeline_seconds(self) -> float:
        """select's and refine's seconds per image together."""
        return self.seconds_per_image(SELECT) + self.seconds_per_image(REFINE)

    @property
    def speed_ratio(self) -> float:
        """(select + refine) seconds per image / the best baseline's (NaN when either is unknown)."""
        best = self.best_baseline
        base = self.seconds_per_image(best) if best else float("nan")
        return self.pipeline_seconds / base if base > 0 else float("nan")

    @property
    def uncertainty_auroc(self) -> float:
        """How well refine's uncertainty ranks its wrong labels (mean AUROC over images; NaN without refine)."""
        found = self.source(REFINE)
        return found.measures.get("uncertainty_auroc", float("nan")) if found else float("nan")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON; mIoU in % rounded to 0.1 (null: not measured). ``gain_points`` and
        ``refine_points`` stay unrounded, ``evaluation`` holds every source's fractions."""
        select = self.source(SELECT)
        names = list(self.baselines)
        return {
            "manifest": self.manifest,
            "dataset": self.dataset,
            "kind": self.kind,
            "limit": self.limit,
            "images": select.evaluated if select else 0,
            "failed": self.failed,
            "miou": {
                WEAK: _pct(self.miou(WEAK)),
                **{n: _pct(self.miou(n)) for n in names},
                SELECT: _pct(self.miou(SELECT)),
                REFINE: _pct(self.miou(REFINE)),
            },
            "best_baseline": self.best_baseline,
            "seconds_per_image": {n: _seconds(self.seconds_per_image(n)) for n in (*names, SELECT, REFINE)},
            "refine_minus_best_baseline": _rounded(self.refine_minus_best_baseline),
            "speed_ratio": _rounded(self.speed_ratio, 2),
            "baselines": {
                n: {
                    "evaluated": r.evaluated,
                    "unavailable": r.unavailable,
                    "pixel_accuracy": json_number(r.scores.pixel_accuracy) if r.scores else None,
                }
                for n, r in self.baselines.items()
            },
            "gain_points": json_number(self.gain_points),
            "refine_points": json_number(self.refine_points),
            "uncertainty_auroc": json_number(self.uncertainty_auroc),
            "seconds": self.seconds,
            "evaluation": self.evaluation.to_json(),
        }
