"""Score a trained segmenter checkpoint against gold masks, in Ray tasks (for benchmarks).

The prediction path is the ``retrain`` stage's own (``Retrain.process`` with the checkpoint's
mean teacher), so a checkpoint scored here is judged exactly as the pipeline would use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from seglab.pipeline.core.gold import read_mask
from seglab.pipeline.core.metrics import confusion
from seglab.pipeline.core.store import Store
from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.retrain import Retrain, RetrainConfig
from seglab.workers.segmenter import TeacherPredictor


def score_checkpoint(
    store_path: str,
    checkpoint: str,
    architecture: str,
    input_size: tuple[int, int],
    items: Sequence[tuple[str, str]],
    classes: ClassTable,
    gold_ignore: Sequence[int],
    batch: int = 8,
) -> np.ndarray:
    """items: (unit id, gold mask file) -> the summed confusion matrix int64 [C, C + 1]
    (pipeline/core/metrics.py) of the teacher's labels over those images; ``checkpoint``:
    its key in the store."""
    task = ray.remote(num_cpus=1)(_score_batch)
    height, width = input_size
    refs = [
        task.remote(
            store_path,
            checkpoint,
            architecture,
            (height, width),
            list(items[i : i + batch]),
            classes,
            tuple(gold_ignore),
        )
        for i in range(0, len(items), batch)
    ]
    size = len(classes.ids)
    return sum(ray.get(refs), np.zeros((size, size + 1), np.int64))


def _score_batch(
    store_path: str,
    checkpoint: str,
    architecture: str,
    input_size: tuple[int, int],
    items: list[tuple[str, str]],
    classes: ClassTable,
    gold_ignore: tuple[int, ...],
) -> np.ndarray:
    store = Store(store_path)
    data = store.objects.get(checkpoint)
    if data is None:
        raise FileNotFoundError(f"{store.path}/{checkpoint}")
    predictor = TeacherPredictor(f"{store.path}/{checkpoint}", architecture, len(classes.ids), input_size, data=data)
    ctx = Context(classes=classes, weak_kind="", seed=0, segmenter=predictor)
    stage = Retrain(RetrainConfig())
    size = len(classes.ids)
    total = np.zeros((size, size + 1), np.int64)
    for unit, mask in items:
        inputs = store.read_unit(["ingest/image"], unit)
        labels = stage.process(Unit(unit, ""), inputs, ctx)["labels"]
        total += confusion(read_mask(mask), labels, classes.ids, gold_ignore)
    return total
