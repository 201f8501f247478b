"""retrain: train a segmenter on the refined labels, then predict every image with its mean teacher.

The stage is fitted by training (``FitByTraining``): on the run's training units (every image
that is neither a calibration nor an evaluation image), workers/trainer.py trains
``architecture`` on Ray Train with SUM's uncertainty-aware losses (focal loss weighted by
1 - u, Dice on pixels with 1 - u > 1/2) and image weights from the labels' uncertainty
(workers/losses.py), keeping an EMA copy of the weights (SCALER's mean teacher, decay
``ema_decay``). The fitted attribute names the final checkpoint (sha256, epochs, per-epoch
metrics). Then per image the teacher predicts class probabilities.

Runs only when the manifest asks for ``rounds`` >= 1; round r's instance ``retrain.r`` ('retrain'
in round 0) learns from that round's refined labels. Reads ``ingest/image``,
``<refine of the round>/labels`` and ``/uncertainty`` (the last two are the training targets).
Writes
  labels:        HxW class ids, the teacher's most probable class (upsampled bilinearly);
  probabilities: float16 [C, h, w], the teacher's softmax at the training size ``input_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

import numpy as np
from pydantic import Field
from skimage.transform import resize

from seglab.stages.base import Context, FitByTraining, MapStage, Resources, StageConfig, Unit, round_name


class RetrainConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=1024, description="Images per worker call when predicting.")
    architecture: Literal[
        "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50"
    ] = Field(
        "lraspp_mobilenet_v3_large", description="torchvision segmentation model, built without pretrained weights."
    )
    epochs: int = Field(30, ge=1, le=10000)
    train_batch: int = Field(8, ge=1, le=1024, description="Images per optimisation step and worker.")
    input_size: tuple[int, int] = Field((240, 320), description="(H, W) every image is resized to for training.")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW, decayed polynomially (power 0.9).")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    dice_weight: float = Field(1.0, ge=0.0, le=10.0)
    ema_decay: float = Field(
        0.996, ge=0.0, lt=1.0, description="Mean teacher: teacher = d * teacher + (1 - d) * student per step."
    )
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (data parallel).")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="auto: GPUs when the Ray cluster has any.")


class Retrain(MapStage):
    name = "retrain"
    Config = RetrainConfig
    config: RetrainConfig
    fitting = FitByTraining("refine/labels", "refine/uncertainty")
    reads = ("ingest/image", "refine/labels", "refine/uncertainty")
    resources = Resources(cpus=1)
    writes_class_map = True

    @classmethod
    @cache
    def in_round(cls, r: int) -> type[Retrain]:
        if r == 0:
            return cls
        refined = round_name("refine", r)
        fitting = FitByTraining(f"{refined}/labels", f"{refined}/uncertainty")
        return type(
            f"RetrainRound{r}",
            (cls,),
            {
                "name": round_name(cls.name, r),
                "fitting": fitting,
                "reads": ("ingest/image", fitting.labels, fitting.uncertainty),
            },
        )

    def describe_fit(self, fitted: dict[str, Any]) -> str:
        last = fitted["history"][-1] if fitted["history"] else {}
        return (
            f"{fitted['architecture']}, {fitted['epochs']} epochs on {fitted['units']} images, final loss "
            f"{last.get('loss', float('nan')):.4f}, checkpoint {fitted['checkpoint']}"
        )

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("labels", "probabilities")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        image = inputs["ingest/image"]
        assert ctx.segmenter is not None  # the trained teacher, set for every stage that trains
        probabilities = np.asarray(ctx.segmenter(image), np.float32)
        full = resize(
            probabilities,
            (len(probabilities), *image.shape[:2]),
            order=1,
            mode="edge",
            anti_aliasing=False,
            preserve_range=True,
        )
        labels = np.asarray(ctx.classes.ids, ctx.classes.label_dtype)[full.argmax(axis=0)]
        return {"labels": labels, "probabilities": probabilities.astype(np.float16)}
