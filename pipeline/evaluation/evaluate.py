"""``seglab evaluate``: the quality of every label source in a store, against gold masks.

Sources, in this order: the weak labels themselves (``ingest/weak``), the nearest-label
baseline computed from them on the fly, then every stage that writes a ``labels`` class
map (``Stage.writes_class_map``) and that the store holds, in DAG order. The images
evaluated are those of ``data.evaluation``, matched to the run's units by resolved path.
An image counts for a source only when the stage that made it is done with the current
signature (as ``seglab status`` counts); every other image is reported as missing.
Gold masks are found as pipeline/core/gold.py says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import InputError, SeglabError
from seglab.pipeline.base.fingerprint import digest
from seglab.pipeline.core.gold import gold_indices, gold_mask_path, read_mask
from seglab.pipeline.core.ledger import done_units
from seglab.pipeline.core.metrics import Scores, confusion, json_number, scores
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.planning import Planner
from seglab.pipeline.units import enumerate_units, list_sources, source_identity
from seglab.stages.parts.nearest_label import nearest_label

WEAK, NEAREST = "weak", "nearest-label"


@dataclass(frozen=True)
class SourceResult:
    """One label source's scores over the evaluation images it has labels for.

    missing: image paths of evaluation images without this source's labels (not done,
    failed, made with other settings, or not among data.images).
    stale: the store holds this source's stage made with settings other than the
    manifest's (those outputs count as missing; ``seglab status`` names the change).
    """

    source: str
    evaluated: int
    missing: tuple[str, ...]
    stale: bool
    scores: Scores
    measures: dict[str, float] = field(default_factory=dict)
    """The stage's own per-image measures (``Stage.gold_measures``), averaged over images."""


@dataclass(frozen=True)
class Evaluation:
    manifest: str
    store: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    images: int
    sources: tuple[SourceResult, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; NaN (a score with nothing to measure) becomes null."""
        return {
            "manifest": self.manifest,
            "store": self.store,
            "classes": [{"id": i, "name": n} for i, n in zip(self.class_ids, self.class_names)],
            "images": self.images,
            "sources": [
                {
                    "source": r.source,
                    "evaluated": r.evaluated,
                    "missing": len(r.missing),
                    "missing_images": list(r.missing),
                    "stale": r.stale,
                    "miou": json_number(r.scores.miou),
                    "pixel_accuracy": json_number(r.scores.pixel_accuracy),
                    "labelled_fraction": json_number(r.scores.labelled_fraction),
                    "labelled_accuracy": json_number(r.scores.labelled_accuracy),
                    "pixels": r.scores.pixels,
                    "iou": {n: json_number(v) for n, v in zip(self.class_names, r.scores.iou)},
                    **{k: json_number(v) for k, v in r.measures.items()},
                }
                for r in self.sources
            ],
        }


def gold_set_images(manifest: Manifest, gold_set: str) -> list[tuple[str, str | None]]:
    """-> (image of data.<gold_set> ('calibration' or 'evaluation'): a path or an object URL,
    its unit id or None when it is not among data.images), in listing order; SeglabError
    when the manifest names no such set."""
    gold = getattr(manifest.data, gold_set)
    if gold is None:
        raise SeglabError(f"{manifest.path}: the manifest names no {gold_set} gold set (data.{gold_set})")
    unit_of = {source_identity(u.image): u.id for u in enumerate_units(manifest)}
    images = list_sources(gold.images, manifest.data.root, manifest.path)
    # matched by resolved path, but returned as listed: the gold mask is named after the listed
    # file (a symlink's own name), as the runner finds it when it fits calibrate
    return [(p, unit_of.get(source_identity(p))) for p in images]


def class_map_stages(manifest: Manifest) -> tuple[Planner, list[str], dict[str, str]]:
    """-> (the manifest's Planner, the stages writing a class map in DAG order, every stage's
    current signature digest)."""
    planner = Planner(manifest)
    stages = [s for s in planner.dag.order if planner.stages[s].writes_class_map]
    return planner, stages, {s: digest(sig) for s, sig in planner.signatures.items()}


def _done(store: Store, stage: str, current: str) -> tuple[set[str], bool]:
    """-> (units done with the ``current`` signature digest, whether the stored stage is stale)."""
    done = done_units(store.entries(stage), current)
    stored = store.stage_attrs(stage).get("signature")
    return done, stored is not None and digest(stored) != current


def _predictions(
    store: Store, stages: list[str], done: dict[str, set[str]], unit: str, ignore_id: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(source, HxW labels) for every source that has this unit."""
    if unit in done["ingest"]:
        weak = store.read_array("ingest/weak", unit)
        yield WEAK, weak
        yield NEAREST, nearest_label(weak, ignore_id)
    for stage in stages:
        if unit in done[stage]:
            yield stage, store.read_array(f"{stage}/labels", unit)


def _measures(
    planner: Planner, store: Store, stage: str, unit: str, gold: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, float]:
    """The stage's own measures of one image against its gold (index, valid) (none for most
    stages); ``gold`` None only when no stage measures anything."""
    instance = planner.stages[stage]
    reads = instance.gold_reads
    if not reads:
        return {}
    assert gold is not None  # read for every image when a stage has gold_reads
    return instance.gold_measures(store.read_unit(reads, unit), *gold, planner.context)


def evaluate(manifest: Manifest) -> Evaluation:
    """Score every label source of ``manifest``'s store on its evaluation images."""
    items = gold_set_images(manifest, "evaluation")
    gold = manifest.data.evaluation
    assert gold is not None  # gold_set_images raised otherwise
    store = Store(manifest.store_location)
    planner, stages, current = class_map_stages(manifest)
    stages = [s for s in stages if s in store.stages()]
    for stage in stages:
        instance = planner.stages[stage]
        if instance.fits:
            instance.fitted = store.stage_attrs(stage).get("fitted")
    done, stale = {}, {}
    for stage in ("ingest", *stages):
        done[stage], stale[stage] = _done(store, stage, current[stage])
    class_ids = tuple(c.id for c in manifest.data.classes)
    sources = (WEAK, NEAREST, *stages)
    matrices = {s: np.zeros((len(class_ids), len(class_ids) + 1), np.int64) for s in sources}
    evaluated = dict.fromkeys(sources, 0)
    measured: dict[str, list[dict[str, float]]] = {s: [] for s in stages}
    measuring = any(planner.stages[s].gold_reads for s in stages)  # gold as class indices, read once per image
    for image, unit in items:
        if not unit:
            continue
        predictions = list(_predictions(store, stages, done, unit, manifest.data.ignore_id))
        if not predictions:
            continue
        mask_path = gold_mask_path(gold, image)
        mask = read_mask(mask_path)
        indexed = gold_indices(mask, mask_path, gold.ignore, class_ids) if measuring else None
        for source, labels in predictions:
            try:
                matrices[source] += confusion(mask, labels, class_ids, gold.ignore)
            except ValueError as exc:
                raise InputError(mask_path, f"{exc} (image {image}, source {source})") from None
            evaluated[source] += 1
            if source in measured:
                measured[source].append(_measures(planner, store, source, unit, indexed))
    results = []
    for source in sources:
        stage = "ingest" if source in (WEAK, NEAREST) else source
        missing = tuple(str(image) for image, unit in items if unit not in done[stage])
        per_image = measured.get(source, [])
        means = {k: float(np.nanmean([m[k] for m in per_image])) for k in (per_image[0] if per_image else {})}
        results.append(SourceResult(source, evaluated[source], missing, stale[stage], scores(matrices[source]), means))
    return Evaluation(
        manifest=manifest.path,
        store=str(store.path),
        class_ids=class_ids,
        class_names=tuple(c.name for c in manifest.data.classes),
        images=len(items),
        sources=tuple(results),
    )
