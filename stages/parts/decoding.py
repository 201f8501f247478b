"""Decode one view's prompts from cached features, keep a mask per prompt, weigh its evidence.

Shared by ``select`` (prompts from the weak label) and ``refine`` (prompts from the
confident part of select's labels): decode -> coverage/purity against the label the prompts
came from (stages/parts/coverage.py) -> SeSAM's (tau1, tau2) choice -> the kept masks' per-class
evidence (stages/parts/fusion.py), each mask weighted by its trust
``purity x min(1, coverage / tau2)``: a mask that covers its component well and holds no
other class's weak pixels is believed fully. A box prompt none of whose candidates is
admissible (a small object the backend cannot resolve) keeps the box's own interior
evidence: the ellipse inscribed in the box, at probability ``BOX_INTERIOR``, with trust
``BOX_TRUST``. Everything is in the pixels of the view the features were computed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from seglab.stages.base import ClassTable, StageConfig
from seglab.stages.parts.coverage import choose_by_coverage, coverage_scores, grid_evidence
from seglab.stages.parts.fusion import mask_evidence, sigmoid
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.label_field import FieldConfig
from seglab.stages.parts.promptset import POSITIVE, PromptBatch

#: probability of the inscribed ellipse of a box whose candidates were all rejected
BOX_INTERIOR = 0.75
#: trust of that box-interior evidence
BOX_TRUST = 0.5


class DecodeConfig(StageConfig):
    """The mask choice and fusion settings of a stage that decodes prompts."""

    tau: tuple[float, float] = Field(
        (0.3, 0.7),
        description="(tau1, tau2): least coverage of the weak label to keep a mask, and the purity it "
        "needs and the coverage that ranks it first (SeSAM: 0.3, 0.7).",
    )
    field: FieldConfig = Field(
        FieldConfig(), description="The joint label field the masks' evidence feeds (stages/parts/label_field.py)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> DecodeConfig:
        if not 0.0 <= self.tau[0] <= self.tau[1] <= 1.0:
            raise ValueError(f"tau needs 0 <= tau1 <= tau2 <= 1, got {list(self.tau)}")
        return self


@dataclass(frozen=True)
class Decoded:
    """One view's outcome.

    evidence: float32 [C, H, W] in [0, 1], per class the kept masks' trust-weighted evidence.
    chosen:   int32 [P], the candidate kept per prompt: 0..M-1, ``M`` for a box prompt that
              kept its box's interior, -1 when nothing was kept.
    coverage, purity: float32 [P, M], the scores behind the choice.
    spread:   float32 HxW in [0, 1], the disagreement between a kept prompt's M candidates
              (max - min of their probabilities), the largest over kept prompts; None
              unless ``decode_view`` was asked for it.
    """

    evidence: np.ndarray
    chosen: np.ndarray
    coverage: np.ndarray
    purity: np.ndarray
    spread: np.ndarray | None


def box_interior(box_xyxy: np.ndarray, frame: ImageFrame) -> np.ndarray:
    """A box in original pixels (x0, y0, x1, y1) -> float32 [S, S] probability on the grid:
    ``BOX_INTERIOR`` on the ellipse inscribed in the box (at least the cell the box's centre
    falls in), 0 elsewhere."""
    s = frame.grid_size
    (x0, y0), (x1, y1) = frame.scale_to_grid(np.asarray(box_xyxy, np.float64).reshape(2, 2))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    rows, cols = np.mgrid[:s, :s] + 0.5
    inside = ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1.0
    inside[min(s - 1, max(0, int(cy))), min(s - 1, max(0, int(cx)))] = True
    return np.where(inside, BOX_INTERIOR, 0.0).astype(np.float32)


def decode_view(
    backend,
    features: Mapping[str, np.ndarray],
    prompts: PromptBatch,
    weak: np.ndarray,
    classes: ClassTable,
    cfg: DecodeConfig,
    *,
    with_spread: bool = False,
) -> Decoded:
    """features: one view's cached arrays (``frame`` included); weak: HxW class ids of the
    label the prompts came from (``ignore_id`` elsewhere); ``backend`` a PromptableBackend;
    ``with_spread``: also measure the candidates' spread (it costs two more sigmoids per pixel
    and kept prompt, as the logistic is monotone: max - min of the probabilities is the
    logistic of the largest logit minus that of the smallest)."""
    frame = ImageFrame.from_array(features["frame"])
    m = backend.num_candidates
    coverage = purity = np.zeros((len(prompts), m), np.float32)
    chosen = np.zeros((0,), np.int32)
    kept = np.zeros((0,), np.intp)
    masks = np.zeros((0, frame.grid_size, frame.grid_size), np.float32)
    trust = np.zeros(0)
    spread_grid = np.zeros((frame.grid_size, frame.grid_size), np.float32) if with_spread else None
    if len(prompts):
        logits, quality = backend.decode(features, prompts)
        coverage, purity = coverage_scores(logits, prompts, grid_evidence(weak, classes.ignore_id, frame), frame)
        chosen = choose_by_coverage(coverage, purity, quality, cfg.tau)
        interior = (chosen < 0) & prompts.has_box & ~(prompts.labels == POSITIVE).any(axis=1)
        kept = np.flatnonzero(chosen >= 0)
        if with_spread and len(kept):
            spread_grid = (sigmoid(logits[kept].max(axis=1)) - sigmoid(logits[kept].min(axis=1))).max(axis=0)
        trust = purity[kept, chosen[kept]] * np.minimum(1.0, coverage[kept, chosen[kept]] / max(cfg.tau[1], 1e-6))
        masks = sigmoid(logits[kept, chosen[kept]]).astype(np.float32, copy=False)
        boxed = np.flatnonzero(interior)
        if len(boxed):
            masks = np.concatenate([masks, np.stack([box_interior(prompts.boxes[p], frame) for p in boxed])])
            trust = np.r_[trust, np.full(len(boxed), BOX_TRUST)]
            kept = np.r_[kept, boxed]
            chosen = np.where(interior, m, chosen).astype(np.int32)
    evidence = mask_evidence(masks, prompts.classes[kept], trust, frame, class_ids=classes.ids)
    spread = None if spread_grid is None else np.clip(frame.grid_to_image(spread_grid), 0.0, 1.0).astype(np.float32)
    return Decoded(
        evidence, chosen.astype(np.int32), np.asarray(coverage, np.float32), np.asarray(purity, np.float32), spread
    )
