"""prompts: compile weak labels into prompt sets, one per weak-label component (SeSAM).

For each class present in the weak map, the labelled pixels are split into connected
components (8-connectivity). Each component becomes one prompt:
  positives: ``points_per_component`` points spread uniformly over the component's
             skeleton by farthest-point sampling (a single pixel stays one point);
  negatives: the ``negatives_per_prompt`` nearest sampled points of other classes.
Reads ``ingest/weak`` (HxW class ids, ignore elsewhere); writes the ``PromptBatch``
arrays (coords, labels, boxes, classes, components). An image without weak labels
yields zero prompts: "done, nothing found", not a failure.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import Field
from scipy.spatial import cKDTree
from skimage.measure import label as connected_components
from skimage.morphology import skeletonize

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.promptset import NEGATIVE, PADDING, POSITIVE, PromptBatch


class PromptsConfig(StageConfig):
    batch_size: int = Field(16, ge=1, le=4096)
    points_per_component: int = Field(5, ge=1, le=64, description="Positive points per component (SeSAM: 5).")
    negatives_per_prompt: int = Field(4, ge=0, le=64, description="Nearest other-class points added as negatives.")
    max_prompts: int = Field(256, ge=1, le=4096, description="Largest components first beyond this many.")


def farthest_points(yx: np.ndarray, count: int) -> np.ndarray:
    """Deterministic farthest-point sampling: ``count`` rows of ``yx`` [N, 2] spread
    evenly (the first is the point nearest the centroid). -> [min(count, N), 2]."""
    if len(yx) <= count:
        return yx
    chosen = [int(np.argmin(((yx - yx.mean(0)) ** 2).sum(1)))]
    dist = ((yx - yx[chosen[0]]) ** 2).sum(1)
    while len(chosen) < count:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((yx - yx[nxt]) ** 2).sum(1))
    return yx[chosen]


def component_points(mask: np.ndarray, count: int) -> np.ndarray:
    """Points (y, x) int [n, 2] along the skeleton of one component (bool HxW)."""
    skeleton = skeletonize(mask) if mask.sum() > 2 else mask
    yx = np.argwhere(skeleton if skeleton.any() else mask)
    return farthest_points(yx, count)


class Prompts(MapStage):
    name = "prompts"
    Config = PromptsConfig
    reads = ("ingest/weak",)
    resources = Resources(cpus=1)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("coords", "labels", "boxes", "classes", "components")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        return self.compile(inputs["ingest/weak"], ctx.classes.ignore_id).to_arrays()

    def compile(self, weak: np.ndarray, ignore_id: int) -> PromptBatch:
        """weak: HxW class ids (``ignore_id`` = no label) -> one prompt per component."""
        cfg = self.config
        found: list[tuple[int, int, int, np.ndarray]] = []  # (size, class, component, points yx)
        for cls in np.unique(weak):
            if cls == ignore_id:
                continue
            labelled, count = connected_components(weak == cls, connectivity=2, return_num=True)
            for comp in range(1, count + 1):
                mask = labelled == comp
                found.append((int(mask.sum()), int(cls), comp - 1, component_points(mask, cfg.points_per_component)))
        if not found:
            return PromptBatch.empty()
        found.sort(key=lambda f: (-f[0], f[1], f[2]))
        found = found[: cfg.max_prompts]
        all_points = np.concatenate([f[3] for f in found])
        owner = np.concatenate([np.full(len(f[3]), f[1]) for f in found])
        width = cfg.points_per_component + cfg.negatives_per_prompt
        coords = np.zeros((len(found), width, 2), np.float32)
        labels = np.full((len(found), width), PADDING, np.int32)
        for i, (_, cls, _, pos) in enumerate(found):
            coords[i, : len(pos)] = pos[:, ::-1] + 0.5  # (y, x) pixel -> (x, y) pixel centre
            labels[i, : len(pos)] = POSITIVE
            others = all_points[owner != cls]
            if len(others) and cfg.negatives_per_prompt:
                k = min(cfg.negatives_per_prompt, len(others))
                _, idx = cKDTree(others).query(pos, k=k)
                nearest = np.unique(np.asarray(idx).reshape(-1))
                dist = np.min(np.linalg.norm(others[nearest][:, None] - pos[None], axis=2), axis=1)
                neg = others[nearest[np.argsort(dist, kind="stable")[:k]]]
                coords[i, len(pos) : len(pos) + k] = neg[:, ::-1] + 0.5
                labels[i, len(pos) : len(pos) + k] = NEGATIVE
        return PromptBatch(
            coords=coords,
            labels=labels,
            boxes=np.full((len(found), 4), np.nan, np.float32),
            classes=np.array([f[1] for f in found], np.int32),
            components=np.array([f[2] for f in found], np.int32),
        )
