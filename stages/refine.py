"""refine: a per-pixel uncertainty map, and uncertain regions re-prompted from confident ones.

Per image (SUM's refinement with SeSAM's pseudo-label prompting):
1. First-pass uncertainty u0 of select's labels: the weighted noisy-or of the probability,
   calibration (when ``calibrate`` ran), view-variance and, from round 1 on, teacher
   signals (stages/parts/uncertainty.py).
2. Pixels with u0 < ``certain_below`` (and every weak-label pixel) are confident; their
   labels form a pseudo weak label. From round 1 on, pixels where the previous round's mean
   teacher is confident (max probability >= ``teacher.confident_above``) join it with the
   teacher's class (SeSAM's segmenter evidence; weak pixels keep theirs). It is compiled
   into prompts as the ``prompts`` stage does (one per component, ``reprompt``), with the
   positive points drawn with probability proportional to the certainty 1 - u0, so prompts
   sit away from uncertain pixels (SUM).
3. The prompts are decoded from the cached features (original view), a mask is kept per
   prompt by coverage of the pseudo label (SeSAM's tau rule) and the kept masks' evidence
   feeds the joint label field as in ``select``, now seeded by the whole pseudo label: only
   the uncertain pixels are free, so the field is solved there at (or near) full image
   resolution, between confident neighbours. On the uncertain pixels its distribution is
   mixed with select's (``reprompt_weight``), and from round 1 on with the teacher's
   (``teacher.mix``); confident pixels keep select's label and distribution.
4. The final uncertainty composes the probability (of the refined distribution),
   calibration, variance, candidate-spread and teacher signals. Pixels whose uncertainty
   reaches ``ignore_above`` become ``ignore_id`` (at 1.0: only pixels about which nothing is known).

Round r >= 1 runs as ``refine.r`` (``in_round``) and also reads the previous round's teacher,
``retrain/probabilities`` (round 1) or ``retrain.<r-1>/probabilities``.
Reads ``select/labels``, ``select/probabilities`` (float16 [C, H, W]), ``select/variance``,
``embed`` (features), ``ingest`` (image, weak, boxes) and, when the manifest calibrates, ``calibrate/labels``.
Writes
  labels:      HxW class ids, ``ignore_id`` where the uncertainty reaches ``ignore_above``;
  uncertainty: HxW float16 in [0, 1], 0 = certain;
  signals:     float16 [S, H, W], the signals of ``signals`` (uncertainty.SIGNALS without
               ``teacher`` in round 0, all of them later), NaN for a signal the run
               lacks (no calibration set).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from skimage.transform import resize

from seglab.stages.base import Context, MapStage, Resources, Unit, round_name
from seglab.stages.parts.decoding import DecodeConfig, decode_view
from seglab.stages.parts.fusion import value_of_label
from seglab.stages.parts.label_field import FieldInputs, box_allowed, field_labels, seed_index
from seglab.stages.parts.ranking import auroc
from seglab.stages.parts.uncertainty import (
    SIGNALS,
    calibration_signal,
    compose,
    probability_signal,
    teacher_signal,
    variance_signal,
)
from seglab.stages.prompts import Prompts, PromptsConfig

CALIBRATED = "calibrate/labels"


class SignalWeights(BaseModel):
    """How far each uncertainty signal is trusted (noisy-or weights, 0 = ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probability: float = Field(1.0, ge=0.0, le=1.0)
    calibration: float = Field(0.5, ge=0.0, le=1.0)
    variance: float = Field(1.0, ge=0.0, le=1.0)
    spread: float = Field(0.25, ge=0.0, le=1.0)


class TeacherUse(BaseModel):
    """How the refinement of round r >= 1 uses round r - 1's mean teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, ge=0.0, le=1.0, description="Noisy-or weight of the teacher-label disagreement.")
    confident_above: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Teacher probability from which its class "
        "joins the evidence the uncertain regions are re-prompted from.",
    )
    mix: float = Field(0.25, ge=0.0, le=1.0, description="Share of the teacher's distribution on uncertain pixels.")


class RefineConfig(DecodeConfig):
    batch_size: int = Field(4, ge=1, le=1024)
    weights: SignalWeights = Field(SignalWeights(), description="Noisy-or weight of each uncertainty signal.")
    certain_below: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="First-pass uncertainty below which a pixel's label is evidence for re-prompting.",
    )
    reprompt_weight: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of the re-prompted distribution on uncertain pixels (against select's).",
    )
    ignore_above: float = Field(
        1.0, gt=0.0, le=1.0, description="Pixels whose uncertainty reaches this become ignore_id."
    )
    reprompt: PromptsConfig = Field(
        PromptsConfig(),
        description="How the confident pseudo label becomes prompts (as the prompts stage; batch_size unused).",
    )
    teacher: TeacherUse = Field(TeacherUse(), description="Rounds >= 1: how the previous round's segmenter is used.")


def _mix_into(probabilities: np.ndarray, other: np.ndarray, where: np.ndarray, weight: float) -> None:
    """probabilities[:, where] = (1 - weight) * probabilities + weight * other, in place and one
    class at a time (float32 [C, H, W] each; where bool HxW), so no C x H x W temporary."""
    for own, theirs in zip(probabilities, other):
        own[where] = (1.0 - weight) * own[where] + weight * theirs[where]


class Refine(MapStage):
    name = "refine"
    version = 2  # 2: mask evidence upsampled once per class
    Config = RefineConfig
    config: RefineConfig
    reads = (
        "select/labels",
        "select/probabilities",
        "select/variance",
        "embed",
        "ingest/weak",
        "ingest/image",
        "ingest/boxes",
    )
    optional_reads = (CALIBRATED,)
    resources = Resources(cpus=1, needs_backend=True)
    writes_class_map = True
    gold_reads = ("refine/labels", "refine/uncertainty", "refine/signals")
    signals: ClassVar[tuple[str, ...]] = SIGNALS[:-1]
    """The uncertainty signals this round's instance writes, in ``signals`` row order."""
    teacher_read: ClassVar[str | None] = None
    """Store path of the previous round's teacher probabilities (float16 [C, h, w]); rounds >= 1."""

    @classmethod
    @cache
    def in_round(cls, r: int) -> type[Refine]:
        if r == 0:
            return cls
        name = round_name(cls.name, r)
        teacher = f"{round_name('retrain', r - 1)}/probabilities"
        return type(
            f"RefineRound{r}",
            (cls,),
            {
                "name": name,
                "reads": (*cls.reads, teacher),
                "teacher_read": teacher,
                "signals": SIGNALS,
                "gold_reads": (f"{name}/labels", f"{name}/uncertainty", f"{name}/signals"),
            },
        )

    def signature_config(self) -> dict[str, Any]:
        exclude = {"batch_size"} if self.teacher_read else {"batch_size", "teacher"}  # round 0 has no teacher
        return self.config.model_dump(mode="json", exclude=exclude)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("labels", "uncertainty", "signals")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        cfg, classes = self.config, ctx.classes
        weak = inputs["ingest/weak"]
        selected = inputs["select/labels"]
        probabilities = inputs["select/probabilities"].astype(np.float32)
        weights = {**cfg.weights.model_dump(), "teacher": cfg.teacher.weight}
        signals = {"variance": variance_signal(inputs["select/variance"])}
        calibrated = inputs.get(CALIBRATED)
        teacher = self._teacher(inputs, weak.shape)

        def label_signals(labels: np.ndarray, distribution: np.ndarray) -> dict[str, np.ndarray]:
            own = {
                "probability": probability_signal(
                    value_of_label(labels, distribution, classes.ids, classes.ignore_id), len(classes.ids)
                )
            }
            if calibrated is not None:
                own["calibration"] = calibration_signal(calibrated, labels)
            if teacher is not None:
                own["teacher"] = teacher_signal(distribution, teacher)
            return own

        first = compose({**signals, **label_signals(selected, probabilities)}, weights)
        certain = (first < cfg.certain_below) | (weak != classes.ignore_id)
        uncertain = ~certain
        pseudo = np.where(certain, selected, classes.ignore_id).astype(selected.dtype)
        if teacher is not None:
            confident = (teacher.max(axis=0) >= cfg.teacher.confident_above) & (weak == classes.ignore_id)
            pseudo[confident] = np.asarray(classes.ids, selected.dtype)[teacher[:, confident].argmax(axis=0)]
        labels = selected.copy()
        signals["spread"] = np.zeros(weak.shape, np.float32)
        mixed = False
        if uncertain.any() and (pseudo != classes.ignore_id).any():
            features = {
                k.split("/", 1)[1]: v
                for k, v in inputs.items()
                if k.startswith("embed/") and not k.startswith("embed/view")
            }
            rng = np.random.default_rng([ctx.seed, zlib.crc32(unit.id.encode())])
            prompts = Prompts(cfg.reprompt).compile(
                pseudo,
                np.zeros((0, 5), np.float32),
                classes.ignore_id,
                with_boxes=cfg.reprompt.component_boxes == "always",
                certainty=1.0 - first,
                rng=rng,
            )
            decoded = decode_view(ctx.backend, features, prompts, pseudo, classes, cfg, with_spread=True)
            allowed = box_allowed(inputs["ingest/boxes"], classes.ids, weak.shape, ctx.background)
            _, reprompted = field_labels(
                FieldInputs(
                    inputs["ingest/image"], seed_index(pseudo, classes.ids), evidence=decoded.evidence, allowed=allowed
                ),
                classes,
                cfg.field,
            )
            assert decoded.spread is not None  # decoded with_spread
            signals["spread"] = decoded.spread
            _mix_into(probabilities, reprompted, uncertain, cfg.reprompt_weight)
            del reprompted
            mixed = True
        if teacher is not None and uncertain.any():
            _mix_into(probabilities, teacher, uncertain, cfg.teacher.mix)
            mixed = True
        if mixed:
            labels[uncertain] = np.asarray(classes.ids, selected.dtype)[probabilities.argmax(axis=0)[uncertain]]
        signals.update(label_signals(labels, probabilities))
        uncertainty = compose(signals, weights)
        labels[uncertainty >= cfg.ignore_above] = classes.ignore_id
        stacked = np.stack([signals.get(name, np.full(weak.shape, np.nan, np.float32)) for name in self.signals])
        return {"labels": labels, "uncertainty": uncertainty.astype(np.float16), "signals": stacked.astype(np.float16)}

    def _teacher(self, inputs: Mapping[str, np.ndarray], hw: tuple[int, ...]) -> np.ndarray | None:
        """The previous round's teacher probabilities upsampled to the image, float32 [C, H, W]
        (bilinear, so each pixel still sums to 1); None in round 0."""
        if self.teacher_read is None:
            return None
        small = inputs[self.teacher_read].astype(np.float32)
        return resize(small, (len(small), *hw), order=1, mode="edge", anti_aliasing=False, preserve_range=True).astype(
            np.float32
        )

    def gold_measures(
        self, inputs: Mapping[str, np.ndarray], gold_index: np.ndarray, valid: np.ndarray, ctx: Context
    ) -> dict[str, float]:
        """uncertainty_auroc: how well the uncertainty ranks the image's wrong labels above
        its right ones (over labelled valid pixels); ``auroc_<signal>`` the same for each
        signal the run has (NaN when either kind of pixel is absent)."""
        labels = inputs[f"{self.name}/labels"]
        labelled = valid & (labels != ctx.classes.ignore_id)
        wrong = (labels != np.asarray(ctx.classes.ids)[gold_index])[labelled]
        measures = {"uncertainty_auroc": auroc(inputs[f"{self.name}/uncertainty"][labelled], wrong)}
        for name, signal in zip(self.signals, inputs[f"{self.name}/signals"]):
            if not np.isnan(signal).all():
                measures[f"auroc_{name}"] = auroc(signal[labelled], wrong)
        return measures

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict:
        uncertainty = outputs["uncertainty"].astype(np.float32)
        return {
            "mean_uncertainty": round(float(uncertainty.mean()), 4),
            "uncertain": round(float((uncertainty >= 0.5).mean()), 4),
        }
