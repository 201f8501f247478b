"""``seglab bench quality``: pseudo-label quality on real images with gold masks.

Per manifest (default: every ``manifests/bench/*.yaml`` of the source checkout; they are
not installed with the package): simulate the weak labels from ``data.evaluation.masks``
when their folder does not exist yet, run the pipeline (finished work is kept), evaluate,
and time each step. Bench manifests are named ``<dataset>-<kind>`` (run.name).

``limit`` restricts a manifest to its first N images without touching the manifest file:
an in-memory copy of the manifest reads them from a list file written beside the store
(see ``first_images``). The store is the full run's, so a later full run only adds the rest.
"""
from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglab.pipeline.errors import SeglabError
from seglab.pipeline.evaluate import NEAREST, WEAK, Evaluation, evaluate
from seglab.pipeline.manifest import ImageSource, Manifest, load_manifest
from seglab.pipeline.metrics import json_number
from seglab.pipeline.simulate import simulate_weak
from seglab.pipeline.units import TABLE_KINDS, list_images

BENCH_DIR = Path(__file__).resolve().parents[1] / "manifests" / "bench"
SELECT, REFINE = "select", "refine"


def default_manifests() -> list[Path]:
    paths = sorted(BENCH_DIR.glob("*.yaml"))
    if not paths:
        raise SeglabError(f"{BENCH_DIR}: no benchmark manifests (they live in the source checkout, "
                          "not in an installed package); pass manifest paths instead")
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
        raise SeglabError(f"{manifest.path}: the manifest names no evaluation gold set (data.evaluation) "
                          "to simulate weak labels from")
    glob = data.images.glob
    image_folder = Path(glob).parent if glob else None
    if image_folder is None or any(ch in str(image_folder) for ch in "*?["):
        raise SeglabError(f"{manifest.path}: data.images must be a glob over one folder (e.g. 'val/*.png') "
                          "to simulate weak labels")
    simulate_weak(masks=Path(gold.masks), kind=weak.kind, out=folder, seed=manifest.run.seed,
                  ignore=gold.ignore, images=Path(data.root) / image_folder, unlabelled=weak.unlabelled)


def first_images(manifest: Manifest, limit: int) -> Manifest:
    """An in-memory copy of ``manifest`` over its first ``limit`` images, and over the
    evaluation images (and, for table kinds, the weak-label rows) among them. The lists and
    the table are written to ``<store folder>/<run name>.first<limit>/``."""
    data, root = manifest.data, Path(manifest.data.root)
    chosen = list_images(data.images, root, manifest.path)[:limit]
    folder = manifest.store_path.parent / f"{manifest.run.name}.first{limit}"
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
        with open(data.weak.path, newline="", encoding="utf-8") as src, \
                open(table, "w", newline="", encoding="utf-8") as dst:
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


@dataclass(frozen=True)
class QualityRow:
    """One manifest's outcome. seconds: simulate, run, evaluate and total wall time."""

    manifest: str
    dataset: str
    kind: str
    limit: int | None
    failed: int
    seconds: dict[str, float]
    evaluation: Evaluation

    def source(self, name: str):
        return next((r for r in self.evaluation.sources if r.source == name), None)

    def miou(self, name: str) -> float:
        found = self.source(name)
        return found.scores.miou if found else float("nan")

    @property
    def gain_points(self) -> float:
        """select − nearest-label baseline, in mIoU points (NaN when either is missing)."""
        return 100 * (self.miou(SELECT) - self.miou(NEAREST))

    @property
    def refine_points(self) -> float:
        """refine − select, in mIoU points (NaN when either is missing)."""
        return 100 * (self.miou(REFINE) - self.miou(SELECT))

    @property
    def uncertainty_auroc(self) -> float:
        """How well refine's uncertainty ranks its wrong labels (mean AUROC over images; NaN without refine)."""
        found = self.source(REFINE)
        return found.measures.get("uncertainty_auroc", float("nan")) if found else float("nan")

    def to_json(self) -> dict[str, Any]:
        select = self.source(SELECT)
        return {
            "manifest": self.manifest, "dataset": self.dataset, "kind": self.kind, "limit": self.limit,
            "images": select.evaluated if select else 0, "failed": self.failed,
            "miou": {s: json_number(self.miou(s)) for s in (WEAK, NEAREST, SELECT, REFINE)},
            "gain_points": json_number(self.gain_points),
            "refine_points": json_number(self.refine_points),
            "uncertainty_auroc": json_number(self.uncertainty_auroc),
            "seconds": self.seconds,
            "evaluation": self.evaluation.to_json(),
        }


def bench_quality(paths: Sequence[Path], *, limit: int | None = None, force: Sequence[str] = (),
                  progress: Any = None) -> list[QualityRow]:
    """Simulate (if needed), run and evaluate every manifest in ``paths``, in order.
    ``force``: stages to recompute with everything downstream, as ``seglab run --force``."""
    from seglab.pipeline.runner import Runner, RunOptions

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
        ended = time.perf_counter()
        kind = manifest.data.weak.kind
        rows.append(QualityRow(
            manifest=str(path), dataset=manifest.run.name.removesuffix(f"-{kind}"), kind=kind, limit=limit,
            failed=sum(len(s.failures) for s in report.stages),
            seconds={"simulate": round(simulated - started, 2), "run": round(ran - simulated, 2),
                     "evaluate": round(ended - ran, 2), "total": round(ended - started, 2)},
            evaluation=evaluation,
        ))
    return rows
