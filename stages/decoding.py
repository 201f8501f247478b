"""Decode one view's prompts from cached features, keep a mask per prompt, fuse them.

Shared by ``select`` (prompts from the weak label) and ``refine`` (prompts from the
confident part of select's labels): decode -> coverage/purity against the label the prompts
came from (stages/coverage.py) -> SeSAM's (tau1, tau2) choice -> fusion of the kept masks
into per-class evidence and a class map (stages/fusion.py). Everything is in the pixels of
the view the features were computed on.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from seglab.stages.base import ClassTable, StageConfig
from seglab.stages.coverage import choose_by_coverage, coverage_scores, grid_evidence
from seglab.stages.fusion import Fused, fuse_masks, sigmoid
from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import PromptBatch


class DecodeConfig(StageConfig):
    """The mask choice and fusion settings of a stage that decodes prompts."""

    tau: tuple[float, float] = Field(
        (0.3, 0.7), description="(tau1, tau2): least coverage of the weak label to keep a mask, and the purity it "
        "needs and the coverage that ranks it first (SeSAM: 0.3, 0.7)."
    )
    overlap: Literal["smaller", "probability"] = Field(
        "smaller", description="Between overlapping masks of different classes: the smaller mask wins, or the more probable class."
    )
    min_probability: float = Field(0.5, gt=0.0, lt=1.0, description="Below this a pixel is left as ignore_id.")
    mask_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the masks' evidence (against the weak-label "
                               "distance prior) in the per-pixel class distribution.")
    prior_scale: float = Field(0.05, gt=0.0, le=1.0, description="Decay length of the weak-label distance prior, as "
                               "a share of the image diagonal.")

    @model_validator(mode="after")
    def _ordered(self) -> "DecodeConfig":
        if not 0.0 <= self.tau[0] <= self.tau[1] <= 1.0:
            raise ValueError(f"tau needs 0 <= tau1 <= tau2 <= 1, got {list(self.tau)}")
        return self


@dataclass(frozen=True)
class Decoded:
    """One view's outcome.

    fused:    the kept masks fused (labels HxW, per-class evidence float32 [C, H, W]).
    chosen:   int32 [P], the candidate kept per prompt, -1 when none was admissible.
    coverage, purity: float32 [P, M], the scores behind the choice.
    spread:   float32 HxW in [0, 1], the disagreement between a kept prompt's M candidates
              (max - min of their probabilities), the largest over kept prompts.
    """

    fused: Fused
    chosen: np.ndarray
    coverage: np.ndarray
    purity: np.ndarray
    spread: np.ndarray


def decode_view(backend, features: Mapping[str, np.ndarray], prompts: PromptBatch, weak: np.ndarray,
                classes: ClassTable, cfg: DecodeConfig) -> Decoded:
    """features: one view's cached arrays (``frame`` included); weak: HxW class ids of the
    label the prompts came from (``ignore_id`` elsewhere); ``backend`` a PromptableBackend."""
    frame = ImageFrame.from_array(features["frame"])
    m = backend.num_candidates
    coverage = purity = np.zeros((len(prompts), m), np.float32)
    chosen = np.zeros((0,), np.int32)
    kept = np.zeros((0,), np.intp)
    candidates = np.zeros((0, m, frame.grid_size, frame.grid_size), np.float32)
    if len(prompts):
        logits, quality = backend.decode(features, prompts)
        coverage, purity = coverage_scores(logits, prompts, grid_evidence(weak, classes.ignore_id, frame), frame)
        chosen = choose_by_coverage(coverage, purity, quality, cfg.tau)
        kept = np.flatnonzero(chosen >= 0)
        candidates = sigmoid(logits[kept]).astype(np.float32)
    fused = fuse_masks(candidates[np.arange(len(kept)), chosen[kept]], prompts.classes[kept], frame,
                       class_ids=classes.ids, ignore_id=classes.ignore_id, label_dtype=classes.label_dtype,
                       min_probability=cfg.min_probability, overlap=cfg.overlap)
    spread_grid = (candidates.max(axis=1) - candidates.min(axis=1)).max(axis=0) if len(kept) else None
    spread = (np.clip(frame.grid_to_image(spread_grid), 0.0, 1.0) if spread_grid is not None
              else np.zeros(frame.original_hw, np.float32))
    return Decoded(fused, chosen.astype(np.int32), np.asarray(coverage, np.float32),
                   np.asarray(purity, np.float32), spread.astype(np.float32))
