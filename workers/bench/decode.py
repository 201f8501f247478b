"""``seglab bench decode``: prompts decoded by the pipeline against the naive SamPredictor loop.

Both paths run in this process on the same randomly initialised SAM (saved as a
checkpoint and loaded through the backend, as an operator's checkpoint is), the same
synthetic images and the same prompts, sampled once by the ``prompts`` stage from
scribbles that seglab's weak-label simulator draws on the images' region maps.

pipeline: the ``embed`` stage encodes every image once and writes its features to a
          store (``encode_seconds``); then, per image, the cached features are read back
          and all its prompts decoded by ``backend.decode``, the call ``select`` makes:
          batches of ``prompt_batch`` prompts, low-resolution logits [P, 3, 256, 256]
          (``decode_seconds``, the read included). ``select_seconds`` is the whole of
          select's per-view work on the same cache (decode, coverage scores and choice
          on the grid, fusion of the kept masks at full resolution), for information.
naive:    ``SamPredictor.set_image`` once per image, then ``predict`` once per prompt
          with its points and box, ``multimask_output=True``:
          full-resolution boolean masks [3, H, W].

Both are warmed up by one untimed call first. After the encoding, each image goes
through the pipeline's decode, the naive loop and select's work in turn, so that load
from other processes sharing the CPU falls on all of them; ``load_average_1m`` is the
machine's load at the start and the end (this process adds up to its torch threads), and
``other_processes_cpu_share`` the share of the machine's CPU time that other processes
used while this ran (0: the figures are clean).
Ratios: ``decode_over_naive`` (the headline: the naive user has no cache),
``end_to_end_over_naive`` (the pipeline's encode included) and ``decode_over_predict``
(the decoder calls alone on both sides). The sanity check decodes the first
image's first prompts both ways: the thresholded masks of the pipeline's run (its
encoder precision and cached feature dtype, logits upsampled by ``ImageFrame``) against
the predictor's masks (IoU), and the backend's decoder fed the predictor's own features
against the predictor's low-resolution logits (largest absolute difference: the prompts
went in identically).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor

from seglab.pipeline.core.store import Store
from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.embed import Embed, EmbedConfig
from seglab.stages.parts.decoding import decode_view
from seglab.stages.parts.promptset import PromptBatch
from seglab.stages.parts.weak_simulation import simulate_scribbles
from seglab.stages.prompts import Prompts, PromptsConfig
from seglab.stages.select import SelectConfig
from seglab.workers.bench.sam import embed_into_store, image_units, random_weight_sam
from seglab.workers.model_configs import VitShape

CLASSES = 6  # class 0 is the background, 1..5 the regions
IGNORE = 255
TARGET = 5.0  # the aim: decoding from the cache >= 5x the naive loop end to end


def synthetic_scene(height: int, width: int, regions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A textured background (class 0) with up to ``regions`` disjoint discs of classes
    1..CLASSES-1, a colour per class, noise everywhere. -> (HxWx3 uint8, HxW uint8 classes)."""
    truth = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    typical = np.sqrt(height * width / max(regions, 1) / np.pi)
    placed: list[tuple[float, float, float]] = []
    for _ in range(200 * regions):
        if len(placed) == regions:
            break
        r = rng.uniform(0.3, 0.5) * typical
        cy, cx = rng.uniform(r + 1, height - r - 1), rng.uniform(r + 1, width - r - 1)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 3) ** 2 for y, x, q in placed):  # 3 px apart: never merge
            placed.append((cy, cx, r))
            truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = rng.integers(1, CLASSES)
    palette = rng.uniform(30, 225, (CLASSES, 3))
    image = palette[truth] + rng.normal(0, 12, (height, width, 3))
    image += 20 * np.sin(xx / rng.uniform(3, 9))[..., None] * (truth == 0)[..., None]  # background texture
    return np.clip(image, 0, 255).astype(np.uint8), truth


def sample_prompts(
    truth: np.ndarray, count: int, ctx: Context, rng: np.random.Generator
) -> tuple[PromptBatch, np.ndarray]:
    """Scribbles simulated on ``truth``, compiled by the ``prompts`` stage (its defaults
    but at most ``count`` prompts, largest components first). -> (prompts, weak label)."""
    weak = simulate_scribbles(truth, (), rng, unlabelled=IGNORE)
    inputs = {"ingest/weak": weak, "ingest/boxes": np.zeros((0, 5), np.float32)}
    arrays = Prompts(PromptsConfig(max_prompts=count)).process(Unit(id="scene", image=""), inputs, ctx)
    return PromptBatch.from_arrays(arrays), weak


def naive_prompt(prompts: PromptBatch, i: int) -> dict:
    """predict()'s arguments for prompt ``i``: its points and its box. The padding points
    (label -1) go in too: SAM's decoder attends to them, so without them it would be
    another prompt (they cost a few tokens beside the 4096 of the image)."""
    has_points, has_box = bool((prompts.labels[i] >= 0).any()), bool(prompts.has_box[i])
    return {
        "point_coords": prompts.coords[i] if has_points else None,
        "point_labels": prompts.labels[i] if has_points else None,
        "box": prompts.boxes[i] if has_box else None,
    }


def machine_busy_seconds() -> float | None:
    """CPU-seconds all processes have been busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bench_decode(
    *,
    model: str = "vit_b",
    images: int = 4,
    prompts_per_image: int = 32,
    batch: int | None = None,
    precision: str = "auto",
    height: int = 480,
    width: int = 640,
    sanity_prompts: int = 4,
    encoder: VitShape | None = None,
    seed: int = 0,
) -> dict:
    """Measure both paths; ``batch``: prompts per decoder call (None: the backend's
    default ``prompt_batch``); ``encoder``: the ViT shape when ``model`` is 'custom'."""
    rng = np.random.default_rng(seed)
    classes = ClassTable(tuple(range(CLASSES)), tuple(f"class{c}" for c in range(CLASSES)), IGNORE)
    ctx = Context(classes=classes, weak_kind="scribbles", seed=seed)
    scenes = [synthetic_scene(height, width, prompts_per_image, rng) for _ in range(images)]
    pictures = [image for image, _ in scenes]
    sampled = [sample_prompts(truth, prompts_per_image, ctx, rng) for _, truth in scenes]
    prompt_sets = [p for p, _ in sampled]
    weaks = [w for _, w in sampled]
    total = sum(len(p) for p in prompt_sets)
    if total == 0:
        raise ValueError("the synthetic scribbles gave no prompts")
    load = os.getloadavg()[0]
    busy_start, own_start, wall_start = machine_busy_seconds(), time.process_time(), time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as tmp:
        options = {} if batch is None else {"prompt_batch": batch}
        # as the pipeline builds it (tiling wrapper, off for small images)
        config, backend = random_weight_sam(
            Path(tmp), seed, model=model, precision=precision, encoder=encoder, **options
        )
        sam = backend.inner
        ctx.backend, ctx.feature_names = backend, backend.feature_names()
        embed = Embed(EmbedConfig())
        store = Store(Path(tmp) / "bench.zarr", create=True)
        cached = [f"embed/{name}" for name in embed.outputs(ctx)]
        units = image_units(images)

        # pipeline: warm up (model load, first encoder and decoder calls), untimed
        warm = backend.encode(pictures[:1])[0]
        backend.decode(warm, prompt_sets[0])
        encode_seconds = embed_into_store(embed, ctx, store, pictures)

        # naive: SamPredictor on the same loaded model, warmed up the same way, untimed

        predictor = SamPredictor(sam.model)
        predictor.set_image(pictures[0])
        predictor.predict(**naive_prompt(prompt_sets[0], 0), multimask_output=True)

        # image by image, the pipeline's decode, the naive loop, select's work: a burst of
        # load from other processes then falls on all three rather than on one of them
        read_seconds = decode_seconds = select_seconds = set_image_seconds = predict_seconds = 0.0
        decoded = predicted = 0
        select_config = SelectConfig()
        first_logits: np.ndarray | None = None
        first_features: dict[str, np.ndarray] | None = None
        reference_embed: np.ndarray | None = None
        reference = []  # the first image's first prompts: (full-resolution masks, low-resolution logits)
        for i, (unit, image, prompts, weak) in enumerate(zip(units, pictures, prompt_sets, weaks)):
            start = time.perf_counter()
            features = {k.split("/", 1)[1]: v for k, v in store.read_unit(cached, unit.id).items()}
            read = time.perf_counter()
            logits, _ = backend.decode(features, prompts)
            decode_seconds += time.perf_counter() - start
            read_seconds += read - start
            decoded += len(logits)

            start = time.perf_counter()
            predictor.set_image(image)
            set_image_seconds += time.perf_counter() - start
            if i == 0:
                first_logits, first_features = logits, features
                reference_embed = predictor.features[0].cpu().numpy().copy()
            del logits
            for j in range(len(prompts)):
                start = time.perf_counter()
                masks, _, low_res = predictor.predict(**naive_prompt(prompts, j), multimask_output=True)
                predict_seconds += time.perf_counter() - start
                predicted += 1
                if i == 0 and j < max(1, sanity_prompts):
                    reference.append((masks, low_res))

            start = time.perf_counter()
            features = {k.split("/", 1)[1]: v for k, v in store.read_unit(cached, unit.id).items()}
            decode_view(backend, features, prompts, weak, classes, select_config)
            select_seconds += time.perf_counter() - start

        # sanity: the same prompts decoded both ways on the first image
        assert first_logits is not None and first_features is not None and reference_embed is not None  # images >= 1
        frame = backend.frame(first_features)
        ious = [
            mask_iou(frame.grid_to_image(first_logits[j, m]) > 0, masks[m])
            for j, (masks, _) in enumerate(reference)
            for m in range(len(masks))
        ]
        head = PromptBatch(
            *(
                a[: len(reference)]
                for a in (
                    prompt_sets[0].coords,
                    prompt_sets[0].labels,
                    prompt_sets[0].boxes,
                    prompt_sets[0].classes,
                    prompt_sets[0].components,
                )
            )
        )
        same_features = {**first_features, "image_embed": reference_embed}
        exact, _ = backend.decode(same_features, head)
        logit_diff = max(float(np.abs(exact[j] - low_res).max()) for j, (_, low_res) in enumerate(reference))
        positive = float(np.mean([masks.mean() for masks, _ in reference]))

    load_end = os.getloadavg()[0]
    busy_end, own, wall = machine_busy_seconds(), time.process_time() - own_start, time.perf_counter() - wall_start
    others = None if busy_start is None or busy_end is None else max(0.0, busy_end - busy_start - own)
    naive_seconds = set_image_seconds + predict_seconds
    cache_rate = total / decode_seconds
    end_to_end_rate = total / (encode_seconds + decode_seconds)
    naive_rate, predict_rate = total / naive_seconds, total / predict_seconds
    return {
        "backend": "sam",
        "model": model,
        "device": str(sam.device),
        "autocast": str(sam.dtype).replace("torch.", "") if sam.dtype else "fp32",
        "feature_dtype": config.feature_dtype,
        "prompt_batch": sam.prompt_batch,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": [round(load, 2), round(load_end, 2)],
        "other_processes_cpu_share": None if others is None else round(others / (wall * (os.cpu_count() or 1)), 3),
        "image_hw": [height, width],
        "images": images,
        "prompts": total,
        "points_per_prompt": int(prompt_sets[0].coords.shape[1]),
        "box_prompts": int(sum(p.has_box.sum() for p in prompt_sets)),
        "pipeline_prompts_decoded": decoded,
        "naive_prompts_decoded": predicted,
        "encode_seconds": round(encode_seconds, 4),
        "decode_seconds": round(decode_seconds, 4),
        "cache_read_seconds": round(read_seconds, 4),
        "select_seconds": round(select_seconds, 4),
        "naive_seconds": round(naive_seconds, 4),
        "naive_set_image_seconds": round(set_image_seconds, 4),
        "naive_predict_seconds": round(predict_seconds, 4),
        "pipeline_decode_prompts_per_s": round(cache_rate, 4),
        "pipeline_end_to_end_prompts_per_s": round(end_to_end_rate, 4),
        "pipeline_select_prompts_per_s": round(total / select_seconds, 4),
        "naive_prompts_per_s": round(naive_rate, 4),
        "naive_predict_prompts_per_s": round(predict_rate, 4),
        "decode_over_naive": round(cache_rate / naive_rate, 4),
        "end_to_end_over_naive": round(end_to_end_rate / naive_rate, 4),
        "decode_over_predict": round(cache_rate / predict_rate, 4),
        "target": TARGET,
        "target_met": bool(cache_rate / naive_rate >= TARGET),
        "sanity_prompts": len(reference),
        "sanity_mask_iou_min": round(min(ious), 4),
        "sanity_mask_iou_mean": round(float(np.mean(ious)), 4),
        "sanity_mask_positive_fraction": round(positive, 4),
        "sanity_logit_max_abs_diff": float(f"{logit_diff:.3g}"),
    }
