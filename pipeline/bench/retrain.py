"""``seglab bench retrain``: how good is a segmenter trained on seglab's labels, against one
trained on the ground truth with the same budget?

Runs the manifest (``rounds: R`` >= 1: refine -> retrain R times, then the last refine),
evaluates it, then trains the same architecture with the same settings (epochs, input
size, batch, seed) on the same training images with their gold masks (``gold_masks``: a
folder of <image stem>.png) instead of refine's labels and uncertainty, and scores it on the
evaluation gold set as evaluate scores the pipeline's segmenters. Reports per round r in
0..R the label mIoU (that round's refine on the evaluation images) and the mIoU of the
segmenter trained on those labels (none for round R), the ground-truth segmenter's mIoU,
and per round the ratio segmenter / ground truth. The ground-truth training keeps its
checkpoints under ``_checkpoints/bench-retrain-gold/`` and resumes like retrain does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.fingerprint import digest
from seglab.pipeline.core.gold import gold_mask_path, mask_in_folder
from seglab.pipeline.core.metrics import json_number, scores
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import evaluate, gold_set_images
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.planning import build_context
from seglab.pipeline.runner import Runner
from seglab.pipeline.units import enumerate_units, file_stat
from seglab.stages.base import round_name
from seglab.workers.bench.scoring import score_checkpoint
from seglab.workers.raysession import wants_gpu
from seglab.workers.trainer import TrainingJob, train

GOLD_RUN = "bench-retrain-gold"


def bench_retrain(manifest: Manifest, *, gold_masks: Path, gold_ignore: Sequence[int], progress: Any = None) -> dict:
    if manifest.rounds < 1 or manifest.data.evaluation is None:
        raise SeglabError(f"{manifest.path}: bench retrain needs rounds >= 1 and a data.evaluation gold set")
    started = time.perf_counter()
    report = Runner(manifest, progress=progress).run()
    if not report.ok:
        raise SeglabError(f"{manifest.path}: the run has failed units; `seglab status` lists them")
    evaluation = evaluate(manifest)
    found = {r.source: r for r in evaluation.sources}
    store = Store(manifest.store_location)
    fitted = {r: store.stage_attrs(round_name("retrain", r))["fitted"] for r in range(manifest.rounds)}
    by_id = {u.id: u for u in enumerate_units(manifest)}
    units = tuple(fitted[0]["trained_on"])  # the same in every round
    # absolute: Ray Train workers do not run in the driver's working directory
    label_files = tuple(str(mask_in_folder(Path(gold_masks), Path(by_id[u].image)).resolve()) for u in units)
    config = manifest.retrain
    settings = config.model_dump(mode="json")
    key = digest([settings, units, [file_stat(f) for f in label_files], list(gold_ignore), manifest.run.seed])
    classes = build_context(manifest).classes
    job = TrainingJob(
        store_path=store.path,
        units=units,
        class_ids=classes.ids,
        labels="",
        uncertainty=None,
        checkpoints=store.checkpoint_location(GOLD_RUN, key[:16]),
        settings=settings,
        seed=manifest.run.seed,
        label_files=label_files,
        label_ignore=tuple(gold_ignore),
    )
    trained = time.perf_counter()
    name, state = train(
        job, num_workers=config.workers, use_gpu=wants_gpu(config.use_gpu), max_failures=manifest.ray.max_retries
    )
    gold = manifest.data.evaluation
    items = [
        (unit, str(gold_mask_path(gold, Path(image))))
        for image, unit in gold_set_images(manifest, "evaluation")
        if unit
    ]
    matrix = score_checkpoint(
        str(store.path),
        store.checkpoint_key(GOLD_RUN, key[:16], name),
        config.architecture,
        config.input_size,
        items,
        classes,
        gold.ignore,
    )
    truth = scores(matrix).miou
    rounds = []
    for r in range(manifest.rounds + 1):
        segmenter = found[round_name("retrain", r)].scores.miou if r in fitted else None
        rounds.append(
            {
                "round": r,
                "label_miou": json_number(found[round_name("refine", r)].scores.miou),
                "segmenter_miou": None if segmenter is None else json_number(segmenter),
                "ratio": None if segmenter is None else json_number(segmenter / truth if truth else float("nan")),
                "train_seconds": round(sum(h["seconds"] for h in fitted[r]["history"]), 1) if r in fitted else None,
            }
        )
    return {
        "manifest": manifest.path,
        "architecture": config.architecture,
        "epochs": config.epochs,
        "training_images": len(units),
        "evaluation_images": len(items),
        "rounds": rounds,
        "ground_truth": {
            "segmenter_miou": json_number(truth),
            "train_seconds": round(sum(h["seconds"] for h in state["history"]), 1),
        },
        "seconds": {"pipeline": round(trained - started, 1), "ground_truth": round(time.perf_counter() - trained, 1)},
    }
