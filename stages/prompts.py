"""prompts: compile weak labels into prompt sets, one per weak-label component (SeSAM).

For each class present in the weak map, the labelled pixels are split into connected
components (8-connectivity). Each component becomes one prompt:
  positives: ``points_per_component`` points spread over the component's skeleton by
             farthest-point sampling, so a scribble becomes a chain of points along its
             stroke and a coarse mask points along its medial axis (a single pixel stays
             one point). With a certainty map (an earlier round's 1 - uncertainty), the
             points are drawn with probability proportional to certainty instead (SUM);
  negatives: of the ``negatives_per_prompt`` nearest other-class components, each
             one's sampled point nearest to the positives;
  box:       for coarse masks (``component_boxes``), the component's extent grown by
             ``box_margin`` of its size on each side, since a coarse mask misses the
             object's boundary. Coarse masks are never fed as raw mask prompts.
Box weak labels become one box-only prompt per box (component = the box's row).

Reads ``ingest/weak`` (HxW class ids, ignore elsewhere) and ``ingest/boxes`` (float32
[B, 5] x0, y0, x1, y1, class); writes the ``PromptBatch`` arrays (coords, labels, boxes,
classes, components). An image without weak labels yields zero prompts: "done, nothing
found", not a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from skimage.measure import label as connected_components
from skimage.morphology import skeletonize

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.parts.promptset import NEGATIVE, PADDING, POSITIVE, PromptBatch

NO_BOX = np.full(4, np.nan, np.float32)


class PromptsConfig(StageConfig):
    batch_size: int = Field(16, ge=1, le=4096)
    points_per_component: int = Field(5, ge=1, le=64, description="Positive points per component (SeSAM: 5).")
    negatives_per_prompt: int = Field(
        16, ge=0, le=64, description="Other-class components that each add a negative point."
    )
    max_prompts: int = Field(256, ge=1, le=4096, description="Largest components first beyond this many.")
    component_boxes: Literal["auto", "always", "never"] = Field(
        "auto", description="Add each component's grown extent as a box prompt; auto: for coarse masks only."
    )
    box_margin: float = Field(
        0.1, ge=0.0, le=1.0, description="Growth of a component box per side, as a share of its size."
    )


@dataclass(frozen=True)
class _Source:
    """One prompt before packing: its class, component, size and geometry."""

    cls: int
    component: int
    size: int
    positives: np.ndarray  # int [n, 2] (y, x)
    box: np.ndarray  # float32 [4] XYXY or NaN


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


def certainty_weighted_points(
    yx: np.ndarray, certainty: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """SUM sampling: ``count`` distinct rows of ``yx`` [N, 2] (y, x) drawn without
    replacement with probability proportional to ``certainty`` [N] (>= 0). Rows of zero
    certainty are drawn only when too few others remain; all-zero falls back to uniform."""
    if len(yx) <= count:
        return yx
    weight = np.clip(certainty.astype(np.float64), 0.0, None)
    positive = int((weight > 0).sum())
    if positive == 0:
        weight = np.ones_like(weight)
    elif positive < count:
        weight = weight + (weight == 0) * weight[weight > 0].min() * 1e-6
    picked = rng.choice(len(yx), size=count, replace=False, p=weight / weight.sum())
    return yx[np.sort(picked)]


def skeleton_pixels(mask: np.ndarray) -> np.ndarray:
    """(y, x) int [n, 2] of the skeleton of one component (bool HxW); the component
    itself when it is too small to thin."""
    skeleton = skeletonize(mask) if mask.sum() > 2 else mask
    return np.argwhere(skeleton if skeleton.any() else mask)


def grown_box(mask: np.ndarray, margin: float) -> np.ndarray:
    """XYXY float32 [4] of a component's pixel extent grown by ``margin`` of its width
    and height on each side, clipped to the image."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    height, width = mask.shape
    return np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)], np.float32)


class Prompts(MapStage):
    name = "prompts"
    version = 2  # 2: box prompts (boxes, coarse extents), certainty-weighted sampling
    Config = PromptsConfig
    config: PromptsConfig
    reads = ("ingest/weak", "ingest/boxes")
    resources = Resources(cpus=1)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("coords", "labels", "boxes", "classes", "components")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        return self.compile(
            inputs["ingest/weak"],
            inputs["ingest/boxes"],
            ctx.classes.ignore_id,
            with_boxes=self._component_boxes(ctx.weak_kind),
        ).to_arrays()

    def _component_boxes(self, weak_kind: str) -> bool:
        setting = self.config.component_boxes
        return setting == "always" or (setting == "auto" and weak_kind == "coarse")

    def compile(
        self,
        weak: np.ndarray,
        boxes: np.ndarray,
        ignore_id: int,
        *,
        with_boxes: bool = False,
        certainty: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> PromptBatch:
        """weak: HxW class ids (``ignore_id`` = no label); boxes: float32 [B, 5]
        (x0, y0, x1, y1, class); certainty: optional HxW float in [0, 1] (SUM sampling,
        drawn from ``rng``) -> one prompt per weak component and per box."""
        sources = self._component_sources(weak, ignore_id, with_boxes, certainty, rng or np.random.default_rng(0))
        sources += [
            _Source(
                int(b[4]), i, int((b[2] - b[0]) * (b[3] - b[1])), np.zeros((0, 2), np.int64), b[:4].astype(np.float32)
            )
            for i, b in enumerate(np.asarray(boxes, np.float32).reshape(-1, 5))
        ]
        if not sources:
            return PromptBatch.empty()
        sources.sort(key=lambda s: (-s.size, s.cls, s.component))
        return self._pack(sources[: self.config.max_prompts])

    def _component_sources(
        self, weak: np.ndarray, ignore_id: int, with_boxes: bool, certainty: np.ndarray | None, rng: np.random.Generator
    ) -> list[_Source]:
        cfg = self.config
        sources = []
        for cls in np.unique(weak):
            if cls == ignore_id:
                continue
            labelled, count = connected_components(weak == cls, connectivity=2, return_num=True)
            for comp in range(1, count + 1):
                mask = labelled == comp
                yx = skeleton_pixels(mask)
                if certainty is None:
                    positives = farthest_points(yx, cfg.points_per_component)
                else:
                    positives = certainty_weighted_points(
                        yx, certainty[yx[:, 0], yx[:, 1]], cfg.points_per_component, rng
                    )
                box = grown_box(mask, cfg.box_margin) if with_boxes else NO_BOX
                sources.append(_Source(int(cls), comp - 1, int(mask.sum()), positives, box))
        return sources

    def _negatives(
        self, source: _Source, pos: np.ndarray, owner: np.ndarray, owner_class: np.ndarray, all_points: np.ndarray
    ) -> np.ndarray:
        """(y, x) int [k, 2]: of each other-class component, its sampled point nearest to
        ``pos``; the ``negatives_per_prompt`` nearest such points. One per component, so
        the negatives surround the prompt instead of piling onto one neighbour."""
        other = owner_class != source.cls
        if not other.any():
            return np.zeros((0, 2), np.int64)
        candidates = np.flatnonzero(other)
        dist = np.linalg.norm(all_points[candidates, None] - pos[None], axis=2).min(axis=1)
        order = candidates[np.argsort(dist, kind="stable")]
        _, first = np.unique(owner[order], return_index=True)  # nearest point of each component
        nearest = order[np.sort(first)][: self.config.negatives_per_prompt]
        return all_points[nearest]

    def _pack(self, sources: list[_Source]) -> PromptBatch:
        """Positives first, then the nearest other-class points as negatives, padded."""
        cfg = self.config
        width = max(1, max(len(s.positives) for s in sources) + cfg.negatives_per_prompt)
        coords = np.zeros((len(sources), width, 2), np.float32)
        labels = np.full((len(sources), width), PADDING, np.int32)
        owner = np.concatenate([np.full(len(s.positives), i) for i, s in enumerate(sources)])
        owner_class = np.array([s.cls for s in sources])[owner]
        all_points = np.concatenate([s.positives for s in sources]).reshape(-1, 2)
        for i, source in enumerate(sources):
            pos = source.positives
            coords[i, : len(pos)] = pos[:, ::-1] + 0.5  # (y, x) pixel -> (x, y) pixel centre
            labels[i, : len(pos)] = POSITIVE
            if len(pos) and cfg.negatives_per_prompt:
                neg = self._negatives(source, pos, owner, owner_class, all_points)
                coords[i, len(pos) : len(pos) + len(neg)] = neg[:, ::-1] + 0.5
                labels[i, len(pos) : len(pos) + len(neg)] = NEGATIVE
        return PromptBatch(
            coords=coords,
            labels=labels,
            boxes=np.stack([s.box for s in sources]).astype(np.float32),
            classes=np.array([s.cls for s in sources], np.int32),
            components=np.array([s.component for s in sources], np.int32),
        )
