"""A stored label source, read from the store alone: a stage's class maps, their per-pixel
uncertainty when the stage writes one, the images they label and where they came from.

Used by ``seglab export`` and ``seglab report``. A unit counts when its ledger line says
done with the signature the stage's arrays were last written with (the stage group's
``signature_digest``); anything else the ledger holds is stale or failed and is not read.
Every array is read through ``StageOutputs``, which checks it against the shape, dtype and
sha256 that its done ledger line recorded, so a damaged or swapped array is never returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.ledger import ArrayRecord, Failure, LedgerEntry, Receipt, done_receipts
from seglab.pipeline.core.registry import stage_class
from seglab.pipeline.core.store import Store, StoreError
from seglab.pipeline.dag import Dag
from seglab.stages.base import ROUND_SEPARATOR, round_name

SPLITS = ("training", "calibration", "evaluation")
"""'calibration' and 'evaluation': the run's units in those gold sets (store attr ``splits``);
'training': the others, the units a trained stage learns from."""


def stage_round(stage: str) -> int:
    """'refine.2' -> 2; a stage outside rounds ('select') -> 0."""
    _, _, r = stage.partition(ROUND_SEPARATOR)
    return int(r) if r.isdigit() else 0


def _ledger_outcomes(store: Store, stage: str) -> tuple[dict[str, Receipt], dict[str, str]]:
    """From one read of ``stage``'s ledger: ({unit done with the signature its stored arrays
    carry: its receipt}, {unit whose last line failed: its error message})."""
    entries = store.entries(stage)
    digest = store.stage_attrs(stage).get("signature_digest")
    done = done_receipts(entries, digest) if digest else {}
    failed = {u: e.message for u, e in entries.items() if isinstance(e, Failure)}
    return done, failed


def stage_outcomes(store: Store, stage: str) -> tuple[list[str], dict[str, str]]:
    """From one read of ``stage``'s ledger: (units done with the signature its stored arrays
    carry, sorted; {unit whose last line failed: its error message})."""
    done, failed = _ledger_outcomes(store, stage)
    return sorted(done), failed


@dataclass(frozen=True)
class StageOutputs:
    """The arrays of a stage's done units as their ledger lines recorded them when written:
    records: unit -> output name -> its record."""

    store: Store
    stage: str
    records: Mapping[str, Mapping[str, ArrayRecord]]

    def has(self, output: str, unit: str) -> bool:
        """Whether ``unit`` is done and its line records ``output``."""
        return output in self.records.get(unit, {})

    def read(self, output: str, unit: str) -> np.ndarray:
        """The unit's array, checked against its record before (shape, dtype) and after
        (sha256) reading; StoreError when it is missing, CorruptOutput when it differs."""
        record = self.records[unit].get(output)
        if record is None:
            raise StoreError(f"{self.store.path}: '{self.stage}/{output}/{unit}' is not in its done ledger line")
        return self.store.read_recorded(f"{self.stage}/{output}", unit, record)


def stage_outputs(store: Store, stage: str) -> StageOutputs:
    """The recorded outputs of ``stage``'s done units."""
    done, _ = _ledger_outcomes(store, stage)
    return StageOutputs(store, stage, {u: e.outputs for u, e in done.items()})


@dataclass(frozen=True)
class Unfinished:
    """A unit of the run that a label source lacks. stage: the first stage, in run order, of
    those the source depends on (and the source itself) that failed the unit or has not
    finished it; error: that stage's failure message, None when it did not fail (it never
    reached the unit, or holds it done with an older signature); image: the source image
    as ingest read it, None when ingest did not."""

    unit: str
    image: str | None
    stage: str
    error: str | None


def run_units(store: Store, ingest: Mapping[str, LedgerEntry]) -> set[str]:
    """The units the store knows of: every unit ingest's ledger has a line for (ingest
    attempts every unit of the run) and every unit the run put in a gold set (root attr
    ``splits``), should ingest never have reached it."""
    recorded = store.attrs.get("splits") or {}
    return set(ingest) | {u for ids in recorded.values() for u in ids}


def dependencies(store: Store, stage: str) -> tuple[str, ...]:
    """The store's stages ``stage`` depends on, directly or not, in run order."""
    known = {}
    for name in store.stages():
        try:
            known[name] = stage_class(name)
        except KeyError:  # a group no stage of this seglab writes
            continue
    return Dag(known).upstream(stage)


def done_units(store: Store, stage: str) -> list[str]:
    """Units of ``stage`` done with the signature its stored arrays carry, sorted."""
    return stage_outcomes(store, stage)[0]


def refine_rounds(store: Store) -> list[int]:
    """Rounds whose refine stage the store holds, ascending ([0] for a run without rounds)."""
    return sorted(stage_round(s) for s in store.stages() if s.partition(ROUND_SEPARATOR)[0] == "refine")


def provenance(store: Store, stage: str) -> dict[str, Any]:
    """Where ``stage``'s labels came from, as JSON-able facts.

    seglab_version, manifest_hash, manifest: of the last ``seglab run`` (store root attrs);
    stage, round: the stage and its refine -> retrain round (0 for stages outside rounds);
    backend: {model, checkpoint}: the encoder's name and checkpoint sha256 ('none' for the
    weight-free backend), from the signature of the stage that ran it (embed);
    calibration: {method, alpha, n} of calibrate's fit, or None without a calibration set;
    segmenter: {stage, architecture, sha256, epochs} of the segmenter the labels come from
    (retrain.r) or whose mean teacher refined them (refine.r, r >= 1), else None.
    """
    attrs = store.attrs
    stages = set(store.stages())
    model = store.stage_attrs("embed").get("signature", {}).get("model") or {}
    fit = store.stage_attrs("calibrate").get("fitted") if "calibrate" in stages else None
    r = stage_round(stage)
    base = stage.partition(ROUND_SEPARATOR)[0]
    teacher = round_name("retrain", r if base == "retrain" else r - 1) if (base == "retrain" or r > 0) else None
    trained = store.stage_attrs(teacher).get("fitted") if teacher in stages else None
    return {
        "seglab_version": attrs.get("seglab_version"),
        "manifest_hash": attrs.get("manifest_hash"),
        "manifest": attrs.get("manifest_path"),
        "stage": stage,
        "round": r,
        "backend": {"model": model.get("model"), "checkpoint": model.get("checkpoint")},
        "calibration": None if not fit else {k: fit.get(k) for k in ("method", "alpha", "n")},
        "segmenter": None
        if not trained
        else {
            "stage": teacher,
            "architecture": trained.get("architecture"),
            "sha256": trained.get("sha256"),
            "epochs": trained.get("epochs"),
        },
    }


@dataclass(frozen=True)
class LabelSource:
    """One stage's class maps in a store.

    units: the done units, sorted; images: unit -> absolute path of its source image (as
    ingest read it; None when ingest's ledger records none); classes: ((id, name), ...) in
    manifest order; ignore_id: the value of unlabelled pixels in the store; has_uncertainty:
    whether the stage writes 'uncertainty'; outputs: the recorded arrays of the done units.
    ``labels`` and ``uncertainty`` raise StoreError for a missing array, CorruptOutput for
    one that differs from its record.
    """

    store: Store
    stage: str
    units: tuple[str, ...]
    images: dict[str, str | None]
    classes: tuple[tuple[int, str], ...]
    ignore_id: int
    has_uncertainty: bool
    outputs: StageOutputs

    @property
    def round(self) -> int:
        return stage_round(self.stage)

    def labels(self, unit: str) -> np.ndarray:
        """HxW class ids (uint8, or uint16 for ids above 255), ``ignore_id`` where unlabelled."""
        return self.outputs.read("labels", unit)

    def uncertainty(self, unit: str) -> np.ndarray | None:
        """HxW float32 in [0, 1] (0 = certain), or None when the stage writes none."""
        if not self.has_uncertainty:
            return None
        return self.outputs.read("uncertainty", unit).astype(np.float32)

    def unfinished(self) -> list[Unfinished]:
        """The units of the run (``run_units``) this stage has not finished, sorted, each with
        the stage that failed it or never finished it and that stage's error message."""
        ingest = self.store.entries("ingest")
        chain = [
            (name, *_ledger_outcomes(self.store, name)) for name in (*dependencies(self.store, self.stage), self.stage)
        ]
        out = []
        for unit in sorted(run_units(self.store, ingest) - set(self.units)):
            stage, _, failed = next((link for link in chain if unit not in link[1]), (self.stage, {}, {}))
            image = entry.source if (entry := ingest.get(unit)) else None
            out.append(Unfinished(unit, image, stage, failed.get(unit)))
        return out

    def in_split(self, split: str) -> tuple[str, ...]:
        """The done units of one of ``SPLITS``, as the run recorded its gold sets."""
        if split not in SPLITS:
            raise SeglabError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
        recorded = self.store.attrs.get("splits") or {}
        if split != "training" and split not in recorded:
            raise SeglabError(f"{self.store.path}: the run has no {split} set (data.{split} in the manifest)")
        if split == "training":
            held = {u for ids in recorded.values() for u in ids}
            return tuple(u for u in self.units if u not in held)
        chosen = set(recorded[split])
        return tuple(u for u in self.units if u in chosen)


def stored_classes(store: Store) -> tuple[tuple[tuple[int, str], ...], int]:
    """The run's class table as its last ``seglab run`` recorded it in the store's root
    attributes: (((id, name), ...) in manifest order, the ignore id of unlabelled pixels)."""
    attrs = store.attrs
    return (tuple((int(c["id"]), str(c["name"])) for c in attrs.get("classes", [])), int(attrs.get("ignore_id", 255)))


def default_stage(store: Store) -> str:
    """The labels a user wants by default: the last round's refinement, else select."""
    rounds = refine_rounds(store)
    return round_name("refine", rounds[-1]) if rounds else "select"


def open_source(store: Store, *, stage: str | None = None, round: int | None = None) -> LabelSource:
    """The class maps of ``stage``, or of round ``round``'s refine, or of ``default_stage``.

    SeglabError when both are given, the stage is not in the store, writes no class map,
    or has no finished unit."""
    if stage is not None and round is not None:
        raise SeglabError("give --stage or --round, not both")
    if round is not None:
        if round not in refine_rounds(store):
            raise SeglabError(
                f"{store.path}: no refine stage of round {round}; the store has rounds "
                f"{', '.join(map(str, refine_rounds(store))) or 'none'}"
            )
        stage = round_name("refine", round)
    stage = stage or default_stage(store)
    try:
        cls = stage_class(stage)
    except KeyError as exc:
        raise SeglabError(str(exc.args[0])) from None
    if not cls.writes_class_map:
        raise SeglabError(f"stage '{stage}' writes no class map; stages that do: select, calibrate, refine, retrain")
    if stage not in store.stages():
        raise SeglabError(f"{store.path}: stage '{stage}' has not run (stages here: {', '.join(store.stages())})")
    outputs = stage_outputs(store, stage)
    units = sorted(outputs.records)
    if not units:
        raise SeglabError(f"{store.path}: stage '{stage}' has no finished units")
    images = {u: e.source for u, e in store.entries("ingest").items()}
    classes, ignore_id = stored_classes(store)
    return LabelSource(
        store=store,
        stage=stage,
        units=tuple(units),
        images={u: images.get(u) for u in units},
        classes=classes,
        ignore_id=ignore_id,
        has_uncertainty=outputs.has("uncertainty", units[0]),
        outputs=outputs,
    )
