"""``seglab bench encoder``: the embed stage against a bare encoder forward.

Both paths run in this process on the same images, batch size and autocast dtype: the
stage path is ``Embed.process_batch`` through the backend (SAM preprocessing, encoder,
fp16 cast) plus the store write; the bare path is ``image_encoder`` on an already
preprocessed batch. FLOPs per image are counted by torch's FlopCounterMode on one
forward, and the machine's matmul rate is measured in the same dtype.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from seglab.pipeline.core.store import Store
from seglab.stages.base import ClassTable, Context
from seglab.stages.embed import Embed, EmbedConfig
from seglab.workers.bench.sam import embed_into_store, random_weight_sam
from seglab.workers.devices import autocast


def matmul_gflops(dtype: torch.dtype | None, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype or torch.float32)
    b = torch.randn(size, size, dtype=dtype or torch.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def bench_encoder(*, model: str, images: int, batch_size: int, precision: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pictures = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(images)]
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as tmp:
        _, backend = random_weight_sam(Path(tmp), seed, model=model, precision=precision)
        sam = backend.inner
        ctx = Context(
            classes=ClassTable((0,), ("x",), 255),
            weak_kind="points",
            seed=seed,
            backend=backend,
            feature_names=backend.feature_names(),
        )
        stage = Embed(EmbedConfig(batch_size=batch_size))
        store = Store(Path(tmp) / "bench.zarr", create=True)
        sam.encode(pictures[:1])  # load the model and warm up, outside both timings
        stage_seconds = embed_into_store(stage, ctx, store, pictures)
        stored_bytes = sum(f.stat().st_size for f in (Path(tmp) / "bench.zarr" / "embed").rglob("*") if f.is_file())

        inputs = torch.stack([sam.preprocess(p) for p in pictures])
        start = time.perf_counter()
        with torch.inference_mode(), autocast(sam.device, sam.dtype):
            for i in range(0, images, batch_size):
                sam.model.image_encoder(inputs[i : i + batch_size])
        bare_seconds = time.perf_counter() - start

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:  # FLOPs do not depend on dtype
            sam.model.image_encoder(inputs[:1].float())
        flops = counter.get_total_flops()
    stage_rate, bare_rate = images / stage_seconds, images / bare_seconds
    return {
        "backend": "sam",
        "model": model,
        "images": images,
        "batch_size": batch_size,
        "device": str(sam.device),
        "autocast": str(sam.dtype).replace("torch.", "") if sam.dtype else "fp32",
        "stage_images_per_s": round(stage_rate, 4),
        "bare_images_per_s": round(bare_rate, 4),
        "stage_over_bare": round(stage_rate / bare_rate, 4),
        "gflop_per_image": round(flops / 1e9, 1),
        "achieved_gflops": round(flops / 1e9 * bare_rate, 1),
        "matmul_gflops": round(matmul_gflops(sam.dtype), 1),
        "stored_bytes_per_image": int(stored_bytes / images),
    }
