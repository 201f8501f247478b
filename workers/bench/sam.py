"""What the SAM benchmarks share: a random-weight SAM saved and loaded back through the
pipeline's own loader, and the ``embed`` stage run over in-memory images into a store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglab.pipeline.core.store import Store
from seglab.stages.base import Context, Unit
from seglab.stages.embed import Embed
from seglab.workers.backend import build_backend
from seglab.workers.model_configs import SamConfig
from seglab.workers.sam import build_sam_architecture


def random_weight_sam(folder: Path, seed: int, **options: Any) -> tuple[SamConfig, Any]:
    """Builds SAM (``options``: SamConfig fields, ``model`` among them) with weights drawn
    from ``seed``, saves them under ``folder`` and returns (config, the backend the
    pipeline builds from it). Nothing is downloaded."""
    checkpoint = Path(folder) / f"sam_{options.get('model', 'vit_b')}_random.pth"
    config = SamConfig(checkpoint=str(checkpoint), **options)
    torch.manual_seed(seed)
    torch.save(build_sam_architecture(config).state_dict(), checkpoint)
    return config, build_backend(config)


def image_units(count: int) -> list[Unit]:
    """Units 'img0'..'img{count-1}'; the number in the id indexes the in-memory images."""
    return [Unit(id=f"img{i}", image="") for i in range(count)]


def embed_into_store(stage: Embed, ctx: Context, store: Store, pictures: list[np.ndarray]) -> float:
    """Encodes ``pictures`` (H×W×3 uint8 each) through ``stage`` in its batches and writes
    each batch to ``store`` -> seconds taken."""
    units, size = image_units(len(pictures)), stage.config.batch_size
    start = time.perf_counter()
    for i in range(0, len(units), size):
        batch = units[i : i + size]
        results = stage.process_batch(batch, [{"ingest/image": pictures[int(u.id[3:])]} for u in batch], ctx)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        store.put_units("embed", [u.id for u in batch], [r for r in results if not isinstance(r, BaseException)])
    return time.perf_counter() - start
