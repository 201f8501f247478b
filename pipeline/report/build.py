"""``seglab report``: what a run's store says about whether its labels can be trusted, as data.

``build_report`` reads the store (and the manifest, for the gold sets) and returns a
``ReportData`` of plain values (``to_json`` gives JSON types); pipeline/report/figures.py
draws it and pipeline/report/html.py writes the self-contained HTML page. Every section is
always present: a section without the data it needs carries a one-sentence ``reason``
instead. Image arrays are not part of the data: ``UnitReader`` reads one unit's when
the page draws its overlay row, so at most one unit's arrays are in memory at a time.

Label sources are read as pipeline/exports/labelsource.py says: a unit counts for a stage when its
ledger line says done with the signature the stage's arrays carry, and every array read is
checked against the shape, dtype and sha256 recorded when it was written. A unit whose
arrays are missing or damaged is left out of the shares, the queue and the overlays and
named on the page (``OverlaySection.damaged``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.registry import STAGES, round_stages, stage_class
from seglab.pipeline.core.store import Store, StoreError
from seglab.pipeline.exports.labelsource import (
    LabelSource,
    StageOutputs,
    default_stage,
    open_source,
    provenance,
    stage_outcomes,
    stage_outputs,
    stage_round,
    stored_classes,
)
from seglab.pipeline.report.data import (
    MAX_FAILURES,
    UNCERTAIN,
    ClassShare,
    Failure,
    OverlaySection,
    QueueRow,
    ReportData,
    SharesSection,
    StageRow,
    StagesSection,
)
from seglab.pipeline.report.gold_sections import calibration_section, quality_section, resolve_manifest


# -- stages ---------------------------------------------------------------------------
def run_order(stages: Iterable[str]) -> list[str]:
    """The store's stages in run order: ingest, embed, prompts, select, calibrate, refine,
    retrain, refine.1, retrain.1, ... (names the registry does not know go last, sorted)."""
    stages = set(stages)
    rounds = max((stage_round(s) for s in stages), default=0) + 1
    order = list(dict.fromkeys([*STAGES, *round_stages(rounds)]))
    return [s for s in order if s in stages] + sorted(stages - set(order))


def describe_fit(stage: str, fitted: dict[str, Any] | None) -> str | None:
    """The stage's own one line on its stored fit (``MapStage.describe_fit``), None without one."""
    if not fitted:
        return None
    try:
        cls = stage_class(stage)
    except KeyError:
        return None
    return cls(cls.Config()).describe_fit(fitted)


def stage_rows(store: Store) -> StagesSection:
    """Per stage of the store, in run order: done, failed, total, time, throughput, fit."""
    stages = run_order(store.stages())
    if not stages:
        return StagesSection([], [], 0, reason="The store holds no stage yet (nothing has run).")
    total = len(store.entries("ingest"))
    rows, failures = [], []
    for stage in stages:
        done_list, failed_messages = stage_outcomes(store, stage)
        done, failed = len(done_list), sorted(failed_messages.items())
        failures += [Failure(stage, u, m) for u, m in failed]
        attrs = store.stage_attrs(stage)
        summary = attrs.get("summary") or {}
        seconds, computed = summary.get("seconds"), summary.get("computed")
        fitted = attrs.get("fitted")
        train = fitted.get("seconds") if isinstance(fitted, dict) and "architecture" in fitted else None
        throughput = computed / seconds if computed and seconds else None
        rows.append(
            StageRow(stage, done, len(failed), total, seconds, train, computed, throughput, describe_fit(stage, fitted))
        )
    reason = None
    if not any(r.throughput for r in rows):
        reason = (
            "No stage records units computed with their time (stage summaries without 'computed', "
            "written by an older seglab, or nothing computed), so there is no throughput to plot."
        )
    return StagesSection(rows, failures[:MAX_FAILURES], len(failures), throughput_reason=reason)


# -- label sources: shares and the review queue ----------------------------------------
@dataclass
class UnitArrays:
    """One unit's full-resolution arrays for its overlay row (None where the store lacks one).

    image: HxWx3 uint8 RGB; weak: HxW class ids (``ignore_id`` unlabelled); boxes: float32
    [B, 5] (x0, y0, x1, y1, class) of box weak labels; select, labels: HxW class ids of
    select and of the default source; uncertainty: HxW float32 in [0, 1], 0 = certain.
    """

    image: np.ndarray | None
    weak: np.ndarray | None
    boxes: np.ndarray | None
    select: np.ndarray | None
    labels: np.ndarray | None
    uncertainty: np.ndarray | None


def unit_uncertainty(source: LabelSource, select: StageOutputs, unit: str) -> np.ndarray | None:
    """HxW float32 in [0, 1]: the source's uncertainty, or 1 - select/confidence when the
    source writes none; None when neither is recorded for ``unit``. StoreError when the
    array is missing or differs from its record."""
    if source.has_uncertainty and source.outputs.has("uncertainty", unit):
        return source.uncertainty(unit)
    if not select.has("confidence", unit):
        return None
    return 1.0 - select.read("confidence", unit).astype(np.float32)


class UnitReader:
    """Reads the overlay rows' arrays of one label source: a stage's array only when the unit
    is done there (the done units' records are read once), each checked against its record.
    An array that is missing or damaged reads as None and its unit goes to ``damaged``
    (unit -> the store's account)."""

    def __init__(self, store: Store, source: LabelSource):
        self.store, self.source = store, source
        self.ingest = stage_outputs(store, "ingest")
        self.select = stage_outputs(store, "select")
        self.damaged: dict[str, str] = {}

    def _checked(self, unit: str, read: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        try:
            return read()
        except StoreError as exc:  # CorruptOutput included
            self.damaged.setdefault(unit, str(exc))
            return None

    def _recorded(self, outputs: StageOutputs, name: str, unit: str) -> np.ndarray | None:
        return self._checked(unit, lambda: outputs.read(name, unit) if outputs.has(name, unit) else None)

    def read(self, unit: str) -> UnitArrays:
        labelled = unit in self.source.outputs.records
        return UnitArrays(
            image=self._recorded(self.ingest, "image", unit),
            weak=self._recorded(self.ingest, "weak", unit),
            boxes=self._recorded(self.ingest, "boxes", unit),
            select=self._recorded(self.select, "labels", unit),
            labels=self._checked(unit, lambda: self.source.labels(unit)) if labelled else None,
            uncertainty=self._checked(unit, lambda: unit_uncertainty(self.source, self.select, unit))
            if labelled
            else None,
        )


class _Counts:
    """Pixel counts of one label source, accumulated unit by unit."""

    def __init__(self, source: str, class_ids: Sequence[int], ignore_id: int):
        self.source, self.class_ids, self.ignore_id = source, list(class_ids), ignore_id
        self.units, self.counts = 0, np.zeros(max([*self.class_ids, ignore_id]) + 1, np.int64)

    def add(self, labels: np.ndarray) -> None:
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(self.counts))
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts
        self.units += 1

    def share(self) -> ClassShare:
        pixels = int(self.counts.sum())
        of = (lambda n: float(n) / pixels) if pixels else (lambda n: float("nan"))
        classes = [int(self.counts[i]) for i in self.class_ids]
        ignored = int(self.counts[self.ignore_id])
        return ClassShare(
            self.source, self.units, pixels, [of(n) for n in classes], of(ignored), of(pixels - sum(classes) - ignored)
        )


def _sample(units: Sequence[str], count: int) -> list[str]:
    """``count`` units evenly spread over the sorted ``units`` (first and last included)."""
    units = sorted(units)
    if count <= 0 or not units:
        return []
    if count >= len(units):
        return units
    picks = np.unique(np.round(np.linspace(0, len(units) - 1, count)).astype(int))
    return [units[i] for i in picks]


def label_sections(store: Store, *, sample: int, queue: int) -> tuple[OverlaySection, SharesSection]:
    """One pass over the units of select and the default source: per-class shares of both,
    and the review queue ranked by the default source's mean uncertainty."""
    stage = default_stage(store)
    classes, ignore_id = stored_classes(store)
    try:
        source = open_source(store, stage=stage)
    except SeglabError as exc:
        reason = f"No label source to show: {exc}."
        return OverlaySection(stage, None, 0, [], [], reason=reason), SharesSection([], reason=reason)
    select = stage_outputs(store, "select")
    counters = {"select": _Counts("select", [i for i, _ in classes], ignore_id)}
    if stage != "select":
        counters[stage] = _Counts(stage, [i for i, _ in classes], ignore_id)
    ranked, damaged = [], {}
    labelled = set(source.units)
    for unit in sorted(set(select.records) | labelled):
        try:
            selected = select.read("labels", unit) if unit in select.records else None
            labels = source.labels(unit) if unit in labelled and stage != "select" else None
            u = unit_uncertainty(source, select, unit) if unit in labelled else None
        except StoreError as exc:  # CorruptOutput included
            damaged[unit] = str(exc)
            continue
        if selected is not None:
            counters["select"].add(selected)
        if labels is not None:
            counters[stage].add(labels)
        if u is not None and u.size:
            ranked.append((float(u.mean()), float((u >= UNCERTAIN).mean()), unit))
    ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
    reader = UnitReader(store, source)
    chosen = _sound(reader, _sample([u for u in source.units if u not in damaged], sample), sample)
    queued = set(_sound(reader, [unit for _, _, unit in ranked], queue))
    damaged.update(reader.damaged)
    rows = [
        QueueRow(i + 1, unit, source.images.get(unit), mean, fraction)
        for i, (mean, fraction, unit) in enumerate(r for r in ranked if r[2] in queued)
    ]
    notes = []
    if source.has_uncertainty:
        uncertainty_from = f"{stage}/uncertainty"
    else:
        uncertainty_from = "1 − select/confidence"
        notes.append(
            f"The default label source '{stage}' writes no uncertainty, so images are ranked and shown by "
            f"1 − select/confidence instead."
        )
    if damaged:
        notes.append(damaged_note(damaged))
    images = {u: source.images.get(u) for u in {*chosen, *(r.unit for r in rows)}}
    overlays = OverlaySection(
        stage, uncertainty_from, len(source.units), chosen, rows, images, note=" ".join(notes) or None, damaged=damaged
    )
    return overlays, SharesSection([c.share() for c in counters.values() if c.units])


def _sound(reader: UnitReader, candidates: Iterable[str], count: int) -> list[str]:
    """The first ``count`` of ``candidates`` whose overlay arrays all read back as recorded
    (the others land in ``reader.damaged``)."""
    kept: list[str] = []
    for unit in candidates:
        if len(kept) == count:
            break
        reader.read(unit)
        if unit not in reader.damaged:
            kept.append(unit)
    return kept


def damaged_note(damaged: dict[str, str]) -> str:
    """One sentence naming the units left out as damaged (the first ``MAX_FAILURES``)."""
    names = sorted(damaged)
    more = f" and {len(names) - MAX_FAILURES} more" if len(names) > MAX_FAILURES else ""
    return (
        f"{len(names)} images are left out (of the class shares, the review queue or the overlays) because "
        f"their stored arrays are missing or differ from the checksum recorded when they were written "
        f"({', '.join(names[:MAX_FAILURES])}{more}; {names[0]}: {damaged[names[0]]}); "
        "`seglab run` redoes them."
    )


# -- everything ----------------------------------------------------------------------------
def build_report(
    store_path: Path | str, *, manifest: str | Path | None = None, sample: int = 6, queue: int = 12
) -> ReportData:
    """Collect every section's data from the store at ``store_path`` (and the manifest's gold
    sets). ``sample``: images shown evenly over the units; ``queue``: most uncertain images listed."""
    store = Store(store_path)
    attrs = store.attrs

    loaded, why_not = resolve_manifest(store, manifest)
    stage = default_stage(store)
    header = {
        "store": store.path,
        "manifest": loaded.path if loaded else attrs.get("manifest_path"),
        "recorded_manifest": attrs.get("manifest_path"),
        "seglab_version": attrs.get("seglab_version"),
        "manifest_hash": attrs.get("manifest_hash"),
        "default_stage": stage,
        "provenance": provenance(store, stage),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    overlays, shares = label_sections(store, sample=sample, queue=queue)
    classes, ignore_id = stored_classes(store)
    return ReportData(
        header=header,
        classes=list(classes),
        ignore_id=ignore_id,
        stages=stage_rows(store),
        overlays=overlays,
        shares=shares,
        calibration=calibration_section(store, loaded, why_not),
        quality=quality_section(store, loaded, why_not),
    )
