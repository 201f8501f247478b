"""The report's data: typed records of plain values, one per section, and ``ReportData``
holding them all (``to_json`` gives JSON types). Built by pipeline/report/build.py and
pipeline/report/gold_sections.py; drawn by pipeline/report/figures.py and pipeline/report/html.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_FAILURES = 20
"""Failures listed by name; the rest are counted."""
UNCERTAIN = 0.5
"""A pixel whose uncertainty reaches this is 'uncertain' (the review queue's tie-break)."""
ALPHAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
"""Nominal miscoverage levels of the calibration curve (the manifest's and the stored fit's alpha join them)."""


# -- the data ---------------------------------------------------------------------------
@dataclass
class StageRow:
    """One stage of the store. done: units done with the stored signature; failed: units whose
    last ledger line failed; total: units ingest's ledger knows; seconds / computed: the
    stage's ``summary`` of the last run that computed units (None when the store has none);
    train_seconds: training time of a trained stage's fit; throughput: computed / seconds
    in images/s (None when nothing was computed); fit: one line on the stage's fit."""

    stage: str
    done: int
    failed: int
    total: int
    seconds: float | None
    train_seconds: float | None
    computed: int | None
    throughput: float | None
    fit: str | None

    @property
    def time(self) -> float | None:
        parts = [v for v in (self.seconds, self.train_seconds) if v is not None]
        return sum(parts) if parts else None


@dataclass
class Failure:
    stage: str
    unit: str
    message: str


@dataclass
class StagesSection:
    rows: list[StageRow]
    failures: list[Failure]
    """The first ``MAX_FAILURES`` failures in run order."""
    failures_total: int
    reason: str | None = None
    throughput_reason: str | None = None


@dataclass
class QueueRow:
    """A unit of the review queue: its mean uncertainty and the share of its pixels whose
    uncertainty is at least ``UNCERTAIN``."""

    rank: int
    unit: str
    image: str | None
    mean_uncertainty: float
    uncertain_fraction: float


@dataclass
class OverlaySection:
    """stage: the default label source; uncertainty_from: what the uncertainty maps are
    ('<stage>/uncertainty', or '1 - select/confidence' when the stage writes none);
    sample: units chosen evenly over the sorted units; queue: the most uncertain units."""

    stage: str | None
    uncertainty_from: str | None
    units: int
    sample: list[str]
    queue: list[QueueRow]
    images: dict[str, str | None] = field(default_factory=dict)
    reason: str | None = None
    note: str | None = None
    damaged: dict[str, str] = field(default_factory=dict)
    """Units left out of the shares, the queue or the overlays: unit -> the store's account
    of the array at fault (missing, or differing from its record); the note names them."""


@dataclass
class ClassShare:
    """One label source over all its done units: ``shares[k]`` is the share of all pixels
    labelled with class k (``classes`` order), ``abstention`` the share of ``ignore_id``
    pixels, ``other`` the share of any other value (0 in a sound store); they sum to 1."""

    source: str
    units: int
    pixels: int
    shares: list[float]
    abstention: float
    other: float


@dataclass
class SharesSection:
    sources: list[ClassShare]
    reason: str | None = None


@dataclass
class CalibrationRow:
    """Thresholds fitted at nominal ``alpha`` on the calibration images, measured on the
    evaluation images: miscoverage (image_miscoverage averaged over images), kept (share of
    valid gold pixels whose set is a single class), kept_accuracy, mean threshold, feasible."""

    alpha: float
    miscoverage: float | None
    kept: float | None
    kept_accuracy: float | None
    threshold: float
    feasible: bool


@dataclass
class CalibrationSection:
    method: str | None = None
    fitted_alpha: float | None = None
    manifest_alpha: float | None = None
    calibration_images: int = 0
    evaluation_images: int = 0
    rows: list[CalibrationRow] = field(default_factory=list)
    stored: CalibrationRow | None = None
    """The store's own thresholds measured the same way."""
    reason: str | None = None


@dataclass
class QualityRow:
    source: str
    evaluated: int
    missing: int
    stale: bool
    miou: float | None
    pixel_accuracy: float | None
    labelled_fraction: float | None
    labelled_accuracy: float | None


@dataclass
class QualitySection:
    images: int = 0
    rows: list[QualityRow] = field(default_factory=list)
    rounds: dict[str, list[tuple[int, float | None]]] = field(default_factory=dict)
    """'refine' / 'retrain' -> [(round, mIoU)] ascending; empty without rounds."""
    reason: str | None = None
    rounds_reason: str | None = None


@dataclass
class ReportData:
    header: dict[str, Any]
    classes: list[tuple[int, str]]
    ignore_id: int
    stages: StagesSection
    overlays: OverlaySection
    shares: SharesSection
    calibration: CalibrationSection
    quality: QualitySection

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; NaN becomes null."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
