"""select: decode every prompt into candidate masks, keep one per prompt, fuse a class map.

Per prompt, among the backend's M candidates the kept one contains the prompt's
positive points and avoids its negatives (counted on the low-resolution grid), ties
broken by the backend's predicted quality. Per class, the probability on the grid is
the maximum sigmoid of that class's kept masks; only classes that kept a mask are
upsampled to the image. A pixel takes the most probable class when that probability
reaches ``min_probability``, else ``ignore_id``; weak-label pixels keep their class.

Reads ``embed`` (all feature arrays), ``prompts`` and ``ingest/weak``. Writes
  labels:     HxW class ids (uint8/uint16), ``ignore_id`` where no class is trusted;
  confidence: HxW float16 in [0, 1], the winning class's probability (1 on weak pixels);
  chosen:     int32 [P], the candidate index kept per prompt.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import Field

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import NEGATIVE, POSITIVE, PromptBatch


class SelectConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=1024)
    min_probability: float = Field(0.5, gt=0.0, lt=1.0, description="Below this a pixel is left as ignore_id.")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def choose_candidates(logits: np.ndarray, quality: np.ndarray, prompts: PromptBatch, frame: ImageFrame) -> np.ndarray:
    """logits [P, M, S, S], quality [P, M] -> int [P]: per prompt the candidate with most
    prompt points on the right side of its boundary, then the highest quality."""
    s = logits.shape[-1]
    grid_xy = np.clip(np.floor(frame.scale_to_grid(prompts.coords)).astype(int), 0, s - 1)  # [P, K, 2]
    p_idx = np.arange(len(prompts))[:, None]
    inside = logits[p_idx[:, :, None], np.arange(logits.shape[1])[None, None, :],
                    grid_xy[..., 1][:, :, None], grid_xy[..., 0][:, :, None]] > 0  # [P, K, M]
    agree = ((inside & (prompts.labels == POSITIVE)[..., None]) |
             (~inside & (prompts.labels == NEGATIVE)[..., None])).sum(axis=1)  # [P, M]
    return np.lexsort((quality.T, agree.T), axis=0)[-1].astype(np.int32)


class Select(MapStage):
    name = "select"
    Config = SelectConfig
    reads = ("embed", "prompts", "ingest/weak")
    resources = Resources(cpus=1, needs_backend=True)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("labels", "confidence", "chosen")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        weak = inputs["ingest/weak"]
        features = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith("embed/")}
        prompts = PromptBatch.from_arrays(inputs, prefix="prompts/")
        ignore = ctx.classes.ignore_id
        labels = np.full(weak.shape, ignore, dtype=ctx.classes.label_dtype)
        confidence = np.zeros(weak.shape, np.float32)
        chosen = np.zeros(len(prompts), np.int32)
        if len(prompts):
            logits, quality = ctx.backend.decode(features, prompts)
            frame = ImageFrame.from_array(features["frame"])
            chosen = choose_candidates(logits, quality, prompts, frame)
            kept = logits[np.arange(len(prompts)), chosen]  # [P, S, S]
            classes = np.unique(prompts.classes)
            grid_prob = np.stack([_sigmoid(kept[prompts.classes == c]).max(axis=0) for c in classes])
            prob = frame.grid_to_image(grid_prob.astype(np.float32))  # [C, H, W], only kept classes
            best = prob.argmax(axis=0)
            confidence = np.take_along_axis(prob, best[None], axis=0)[0]
            trusted = confidence >= self.config.min_probability
            labels[trusted] = classes[best[trusted]]
        weak_pixels = weak != ignore
        labels[weak_pixels] = weak[weak_pixels]
        confidence[weak_pixels] = 1.0
        return {"labels": labels, "confidence": confidence.astype(np.float16), "chosen": chosen}

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict:
        return {"prompts": int(len(outputs["chosen"]))}
