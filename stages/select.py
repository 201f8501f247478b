"""select: decode every prompt into candidate masks, keep one per prompt, fuse a class map.

Per prompt the backend's M candidates are scored on the low-resolution grid by their
coverage of the weak label and their purity (stages/coverage.py, SeSAM's (tau1, tau2)
rule together with the predicted quality); the kept masks alone are upsampled and fused
into per-class evidence, mixed with a weak-label distance prior into a class distribution per
pixel whose most probable class is the label (``labels: distribution``; ``masks`` paints
the kept masks instead, by the overlap rule, and fills the rest; stages/fusion.py). When ``embed`` cached
augmented views, every view is decoded the same way with the prompts and the weak label
moved into it, mapped back and averaged (SCALER's ensemble; under ``labels: masks`` the
views vote; stages/fusion.py).
Weak-label pixels keep their class with probability 1.

Reads ``embed`` (all feature arrays), ``prompts`` and ``ingest/weak``. Writes
  labels:        HxW class ids (uint8/uint16), ``ignore_id`` where no class is trusted;
  confidence:    HxW float16 in [0, 1], the probability of the pixel's label (1 on weak
                 pixels, 0 where ignored);
  probabilities: float16 [C, H, W] in manifest class order, a distribution per pixel:
                 the masks' evidence (mean over views) mixed with a weak-label distance
                 prior (``mask_weight``, ``prior_scale``; fusion.class_distribution);
  variance:      HxW float16, the variance across views of the label's mask evidence
                 (0 without views and on weak pixels);
  chosen:        int32 [P], the candidate kept per prompt, -1 when none was admissible;
  coverage:      float32 [P, M] and purity: float32 [P, M], the scores behind the choice
                 (the original view's).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.coverage import choose_by_coverage, coverage_scores, grid_evidence
from seglab.stages.embed import view_prefix
from seglab.stages.fusion import (
    Fused,
    ViewEnsemble,
    class_distribution,
    fill_nearest,
    fuse_masks,
    sigmoid,
    value_of_label,
)
from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import PromptBatch
from seglab.stages.ranking import auroc
from seglab.stages.views import View


class SelectConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=1024)
    tau: tuple[float, float] = Field(
        (0.3, 0.7), description="(tau1, tau2): least coverage of the weak label to keep a mask, and the purity it "
        "needs and the coverage that ranks it first (SeSAM: 0.3, 0.7)."
    )
    overlap: Literal["smaller", "probability"] = Field(
        "smaller", description="Between overlapping masks of different classes: the smaller mask wins, or the more probable class."
    )
    labels: Literal["distribution", "masks"] = Field(
        "distribution", description="A pixel's label: the most probable class of its distribution (masks' evidence "
        "and weak-label prior), or the kept masks painted by the overlap rule. Without weak pixels (box labels) "
        "it is always the masks."
    )
    min_probability: float = Field(0.5, gt=0.0, lt=1.0, description="Below this a pixel is left as ignore_id.")
    mask_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the masks' evidence (against the weak-label "
                               "distance prior) in the per-pixel class distribution.")
    prior_scale: float = Field(0.05, gt=0.0, le=1.0, description="Decay length of the weak-label distance prior, as "
                               "a share of the image diagonal.")
    fill: Literal["none", "nearest"] = Field(
        "nearest", description="Pixels no kept mask claims: left as ignore_id, or given the class of the nearest "
        "weak-label pixel (their confidence stays their class probability, usually low)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "SelectConfig":
        if not 0.0 <= self.tau[0] <= self.tau[1] <= 1.0:
            raise ValueError(f"tau needs 0 <= tau1 <= tau2 <= 1, got {list(self.tau)}")
        return self


@dataclass(frozen=True)
class _Decoded:
    """One view's outcome: the fused maps and, per prompt, the choice and its scores."""

    fused: Fused
    chosen: np.ndarray
    coverage: np.ndarray
    purity: np.ndarray


def split_views(features: Mapping[str, np.ndarray]) -> list[tuple[View | None, dict[str, np.ndarray]]]:
    """Stored ``embed`` features -> [(None, the original's), (view 1, its features), ...]."""
    views = []
    k = 1
    while f"{view_prefix(k)}spec" in features:
        prefix = view_prefix(k)
        own = {name[len(prefix):]: a for name, a in features.items() if name.startswith(prefix) and name != f"{prefix}spec"}
        views.append((View.from_array(features[f"{prefix}spec"]), own))
        k += 1
    original = {name: a for name, a in features.items() if not name.startswith("view")}
    return [(None, original), *views]


class Select(MapStage):
    name = "select"
    version = 5  # 5: labels are the distribution's most probable class
    Config = SelectConfig
    reads = ("embed", "prompts", "ingest/weak")
    resources = Resources(cpus=1, needs_backend=True)
    writes_class_map = True
    gold_reads = ("select/labels", "select/confidence")

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("labels", "confidence", "probabilities", "variance", "chosen", "coverage", "purity")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        weak = inputs["ingest/weak"]
        features = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith("embed/")}
        prompts = PromptBatch.from_arrays(inputs, prefix="prompts/")
        classes = ctx.classes
        ensemble = ViewEnsemble(classes.ids, weak.shape)
        original = None
        for view, view_features in split_views(features):
            if view is None:
                original = self._decode(view_features, prompts, weak, ctx)
                ensemble.add(original.fused.labels, original.fused.probabilities)
            else:
                seen = self._decode(view_features, view.prompts(prompts), view.label_map(weak), ctx)
                ensemble.add(view.back(seen.fused.labels, order=0), view.back(seen.fused.probabilities))
        labels, evidence, class_variance = ensemble.result(classes.ignore_id, classes.label_dtype)
        probabilities = class_distribution(evidence, weak, classes.ids, classes.ignore_id,
                                           mask_weight=self.config.mask_weight, prior_scale=self.config.prior_scale)
        weak_pixels = weak != classes.ignore_id
        if self.config.labels == "distribution" and weak_pixels.any():
            labels = np.asarray(classes.ids, classes.label_dtype)[probabilities.argmax(axis=0)]
        else:
            labels[weak_pixels] = weak[weak_pixels]
            if self.config.fill == "nearest":
                labels = fill_nearest(labels, weak, classes.ignore_id)
        confidence = value_of_label(labels, probabilities, classes.ids, classes.ignore_id)
        variance = np.where(weak_pixels, 0.0, value_of_label(labels, class_variance, classes.ids, classes.ignore_id))
        return {
            "labels": labels,
            "confidence": confidence.astype(np.float16),
            "probabilities": probabilities.astype(np.float16),
            "variance": variance.astype(np.float16),
            "chosen": original.chosen,
            "coverage": original.coverage,
            "purity": original.purity,
        }

    def _decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch, weak: np.ndarray,
                ctx: Context) -> "_Decoded":
        """Decode, choose and fuse one view; everything in that view's pixels."""
        frame = ImageFrame.from_array(features["frame"])
        classes, cfg = ctx.classes, self.config
        m = ctx.backend.num_candidates
        coverage = purity = np.zeros((len(prompts), m), np.float32)
        chosen = np.zeros((0,), np.int32)
        kept = np.zeros((0,), np.intp)
        kept_probability = np.zeros((0, frame.grid_size, frame.grid_size), np.float32)
        if len(prompts):
            logits, quality = ctx.backend.decode(features, prompts)
            coverage, purity = coverage_scores(logits, prompts, grid_evidence(weak, classes.ignore_id, frame), frame)
            chosen = choose_by_coverage(coverage, purity, quality, cfg.tau)
            kept = np.flatnonzero(chosen >= 0)
            kept_probability = sigmoid(logits[kept, chosen[kept]]).astype(np.float32)
        fused = fuse_masks(kept_probability, prompts.classes[kept], frame, class_ids=classes.ids,
                           ignore_id=classes.ignore_id, label_dtype=classes.label_dtype,
                           min_probability=cfg.min_probability, overlap=cfg.overlap)
        return _Decoded(fused, chosen.astype(np.int32), np.asarray(coverage, np.float32),
                        np.asarray(purity, np.float32))

    def gold_measures(self, inputs: Mapping[str, np.ndarray], gold_index: np.ndarray, valid: np.ndarray,
                      ctx: Context) -> dict[str, float]:
        """uncertainty_auroc: how well 1 - confidence ranks the image's wrong labels above its
        right ones (AUROC over the labelled valid pixels; NaN when either kind is absent)."""
        labels = inputs["select/labels"]
        labelled = valid & (labels != ctx.classes.ignore_id)
        gold = np.asarray(ctx.classes.ids)[gold_index]
        wrong = (labels != gold)[labelled]
        return {"uncertainty_auroc": auroc(1.0 - inputs["select/confidence"].astype(np.float64)[labelled], wrong)}

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict:
        chosen = outputs["chosen"]
        return {"prompts": int(len(chosen)), "kept": int((chosen >= 0).sum())}
