"""``seglab bench quality``: pseudo-label quality on real images with gold masks.

Per manifest (default: every ``manifests/bench/*.yaml`` of the source checkout; they are
not installed with the package): simulate the weak labels from ``data.evaluation.masks``
when their folder does not exist yet, run the pipeline (finished work is kept), evaluate,
and time each step. Bench manifests are named ``<dataset>-<kind>`` (run.name).

``limit`` restricts a manifest to its first N images without touching the manifest file:
an in-memory copy of the manifest reads them from a list file written beside the store
(see ``first_images``). The store is the full run's, so a later full run only adds the rest.

Beside the pipeline, every classical baseline of pipeline/bench/baselines.py (GrabCut for
boxes only) labels each evaluation image from exactly what ingest stored (``ingest/image``,
``weak``, ``boxes``, read against their recorded hashes) and is scored like the stages, with
its mean seconds per image. A stage's seconds per image come from its ledger lines (each
unit's share of its batch's time): ``select``'s are those of embed, prompts and select
summed, what it costs to get select's labels from the decoded image; ``refine``'s its own.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.base.errors import InputError, SeglabError
from seglab.pipeline.bench.baselines import BASELINES, MissingExtra, baselines_for
from seglab.pipeline.bench.results import REFINE, SELECT, BaselineResult, QualityRow
from seglab.pipeline.core.gold import gold_mask_path, read_mask
from seglab.pipeline.core.ledger import Receipt, done_units
from seglab.pipeline.core.metrics import confusion, scores
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import class_map_stages, evaluate, gold_set_images
from seglab.pipeline.evaluation.simulate import simulate_weak
from seglab.pipeline.manifest import ImageSource, Manifest, load_manifest
from seglab.pipeline.runner import Runner, RunOptions
from seglab.pipeline.units import TABLE_KINDS, list_images

BENCH_DIR = Path(__file__).resolve().parents[2] / "manifests" / "bench"
TIMED_STAGES = {SELECT: ("embed", "prompts", "select"), REFINE: ("refine",)}
"""The stages whose per-unit ledger seconds add up to a source's seconds per image."""


def default_manifests() -> list[Path]:
    paths = sorted(BENCH_DIR.glob("*.yaml"))
    if not paths:
        raise SeglabError(
            f"{BENCH_DIR}: no benchmark manifests (they live in the source checkout, "
            "not in an installed package); pass manifest paths instead"
        )
    return paths


def ensure_weak_labels(manifest: Manifest) -> None:
    """Simulate the manifest's weak labels from its evaluation masks unless their folder
    exists. Table kinds must name ``<folder>/<kind>.csv`` (what simulate-weak writes)."""
    data, weak = manifest.data, manifest.data.weak
    folder = Path(weak.path).parent if weak.kind in TABLE_KINDS else Path(weak.path)
    if weak.kind in TABLE_KINDS and Path(weak.path).name != f"{weak.kind}.csv":
        raise SeglabError(f"{manifest.path}: data.weak.path must name the simulated table <folder>/{weak.kind}.csv")
    if folder.exists():
        return
    gold = data.evaluation
    if gold is None:
        raise SeglabError(
            f"{manifest.path}: the manifest names no evaluation gold set (data.evaluation) to simulate weak labels from"
        )
    glob = data.images.glob
    image_folder = Path(glob).parent if glob else None
    if image_folder is None or any(ch in str(image_folder) for ch in "*?["):
        raise SeglabError(
            f"{manifest.path}: data.images must be a glob over one folder (e.g. 'val/*.png') to simulate weak labels"
        )
    simulate_weak(
        masks=Path(gold.masks),
        kind=weak.kind,
        out=folder,
        seed=manifest.run.seed,
        ignore=gold.ignore,
        images=Path(data.root) / image_folder,
        unlabelled=weak.unlabelled,
        background=weak.background,
    )


def first_images(manifest: Manifest, limit: int) -> Manifest:
    """An in-memory copy of ``manifest`` over its first ``limit`` images, and over the
    evaluation images (and, for table kinds, the weak-label rows) among them. The lists and
    the table are written to ``<store folder>/<run name>.first<limit>/``."""
    data, root = manifest.data, Path(manifest.data.root)
    chosen = list_images(data.images, root, manifest.path)[:limit]
    folder = Path(manifest.store_location).parent / f"{manifest.run.name}.first{limit}"
    folder.mkdir(parents=True, exist_ok=True)

    def listed(name: str, paths: Sequence[Path]) -> ImageSource:
        (folder / name).write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
        return ImageSource(list=str(folder / name))  # absolute and built here: nothing to confine

    update: dict[str, Any] = {"images": listed("images.txt", chosen)}
    if data.evaluation is not None:
        kept = {p.resolve() for p in chosen}
        gold = [p for p in list_images(data.evaluation.images, root, manifest.path) if p.resolve() in kept]
        update["evaluation"] = data.evaluation.model_copy(update={"images": listed("evaluation.txt", gold)})
    if data.weak.kind in TABLE_KINDS:
        # every table row must name a listed image, so keep only the chosen images' rows
        # (simulate-weak names them by file name)
        names = {p.name for p in chosen}
        table = folder / Path(data.weak.path).name
        with (
            open(data.weak.path, newline="", encoding="utf-8") as src,
            open(table, "w", newline="", encoding="utf-8") as dst,
        ):
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
            writer.writeheader()
            writer.writerows(row for row in reader if Path(row["image"]).name in names)
        update["weak"] = data.weak.model_copy(update={"path": str(table)})
    return manifest.model_copy(update={"data": data.model_copy(update=update)})


class _Named:
    """Progress for one manifest of several: each stage's bar is labelled '<run> <stage>'."""

    def __init__(self, progress: Any, name: str):
        self.progress, self.name = progress, name

    def start(self, stage: str, total: int, done: int) -> None:
        self.progress.start(f"{self.name} {stage}", total, done)

    def advance(self, stage: str, count: int) -> None:
        self.progress.advance(f"{self.name} {stage}", count)

    def finish(self, stage: str, report: Any) -> None:
        self.progress.finish(f"{self.name} {stage}", report)

    def note(self, stage: str, text: str) -> None:
        self.progress.note(f"{self.name} {stage}", text)


def score_baselines(manifest: Manifest, progress: Any = None) -> dict[str, BaselineResult]:
    """Run every baseline for the manifest's weak-label kind on each evaluation image whose
    ingest unit is done (current signature), from what ingest stored; score each against the
    gold mask as ``evaluate`` does and time it. A baseline whose extra is missing is reported
    unavailable, not run."""
    weak = manifest.data.weak
    background = weak.background if weak.kind == "boxes" else None
    gold = manifest.data.evaluation
    names = baselines_for(weak.kind)
    items = gold_set_images(manifest, "evaluation")
    assert gold is not None  # gold_set_images raised otherwise
    store = Store(manifest.store_location)
    _, _, current = class_map_stages(manifest)
    entries = store.entries("ingest")
    done = done_units(entries, current["ingest"])
    units = [(image, unit) for image, unit in items if unit in done]
    class_ids = tuple(c.id for c in manifest.data.classes)
    matrices = {n: np.zeros((len(class_ids), len(class_ids) + 1), np.int64) for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    unavailable: dict[str, str] = {}
    if progress:
        progress.start("baselines", len(units), 0)
    for image, unit in units:
        entry = entries[unit]
        assert isinstance(entry, Receipt)  # among ``done``
        outputs = entry.outputs
        pixels, weak_map, boxes = (
            store.read_recorded(f"ingest/{name}", unit, outputs[name]) for name in ("image", "weak", "boxes")
        )
        mask_path = gold_mask_path(gold, image)
        mask = read_mask(mask_path)
        for name in names:
            if name in unavailable:
                continue
            started = time.perf_counter()
            try:
                labels = BASELINES[name](pixels, weak_map, boxes, class_ids, manifest.data.ignore_id, background)
            except MissingExtra as exc:
                unavailable[name] = str(exc)
                continue
            seconds[name].append(time.perf_counter() - started)
            try:
                matrices[name] += confusion(mask, labels, class_ids, gold.ignore)
            except ValueError as exc:
                raise InputError(mask_path, f"{exc} (image {image}, baseline {name})") from None
        if progress:
            progress.advance("baselines", 1)
    return {
        n: BaselineResult(
            n,
            len(seconds[n]),
            scores(matrices[n]) if seconds[n] else None,
            float(np.mean(seconds[n])) if seconds[n] else float("nan"),
            unavailable.get(n),
        )
        for n in names
    }


def stage_seconds(manifest: Manifest) -> dict[str, float]:
    """select's and refine's mean seconds per evaluation image, from the ledger lines of the units
    done with the current signature (``TIMED_STAGES``: a unit counts when every stage summed is
    done and timed); NaN when no evaluation image has them."""
    store = Store(manifest.store_location)
    _, _, current = class_map_stages(manifest)
    units = {unit for _, unit in gold_set_images(manifest, "evaluation") if unit}
    timed: dict[str, dict[str, float]] = {}
    for stage in {s for stages in TIMED_STAGES.values() for s in stages}:
        entries = store.entries(stage) if stage in current else {}
        done = done_units(entries, current[stage]) if stage in current else set()
        receipts = [entries[u] for u in done & units]
        timed[stage] = {r.unit: r.seconds for r in receipts if isinstance(r, Receipt) and r.seconds is not None}
    out = {}
    for source, stages in TIMED_STAGES.items():
        both = set.intersection(*(set(timed[s]) for s in stages))
        out[source] = float(np.mean([sum(timed[s][u] for s in stages) for u in both])) if both else float("nan")
    return out


def bench_quality(
    paths: Sequence[Path], *, limit: int | None = None, force: Sequence[str] = (), progress: Any = None
) -> list[QualityRow]:
    """Simulate (if needed), run and evaluate every manifest in ``paths``, in order, then run and
    score the classical baselines on the same images.
    ``force``: stages to recompute with everything downstream, as ``seglab run --force``."""
    rows = []
    for path in paths:
        manifest = load_manifest(path)
        started = time.perf_counter()
        ensure_weak_labels(manifest)
        simulated = time.perf_counter()
        if limit is not None:
            manifest = first_images(manifest, limit)
        named = _Named(progress, manifest.run.name) if progress else None
        report = Runner(manifest, RunOptions(force=tuple(force)), named).run()
        ran = time.perf_counter()
        evaluation = evaluate(manifest)
        evaluated = time.perf_counter()
        baselines = score_baselines(manifest, named)
        ended = time.perf_counter()
        kind = manifest.data.weak.kind
        rows.append(
            QualityRow(
                manifest=str(path),
                dataset=manifest.run.name.removesuffix(f"-{kind}"),
                kind=kind,
                limit=limit,
                failed=sum(len(s.failures) for s in report.stages),
                seconds={
                    "simulate": round(simulated - started, 2),
                    "run": round(ran - simulated, 2),
                    "evaluate": round(evaluated - ran, 2),
                    "baselines": round(ended - evaluated, 2),
                    "total": round(ended - started, 2),
                },
                evaluation=evaluation,
                baselines=baselines,
                stage_seconds=stage_seconds(manifest),
            )
        )
    return rows
