"""calibrate: conformal prediction sets on select's class probabilities, with a stated guarantee.

Fitted once on the manifest's calibration gold set (``data.calibration``; its images must be
among the run's images and apart from the evaluation set): per-image conformal risk
control by default, so that for an image exchangeable with the calibration images the
expected share of its pixels whose true class falls outside the prediction set is at most
``alpha`` (stages/parts/conformal.py states each method's guarantee). Then per image: a pixel
whose set is one class keeps that class; an empty or ambiguous set becomes ``ignore_id``.

Reads ``select/probabilities`` (float16 [C, H, W], manifest class order). Writes
  labels:   HxW class ids, ``ignore_id`` where the set is not a single class;
  set_size: HxW uint8 (uint16 above 255 classes), the number of classes in the set.
The fitted method, alpha, thresholds and calibration size are the stage's ``fitted``
attribute (``seglab status`` shows them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from seglab.stages.base import Context, FitOnGoldSet, GoldSample, MapStage, Resources, StageConfig, Unit
from seglab.stages.parts.conformal import METHODS, ScoreTable, calibrated_labels, image_miscoverage, prediction_sets


class CalibrateConfig(StageConfig):
    batch_size: int = Field(8, ge=1, le=4096)
    method: Literal["risk-control", "mondrian", "pixel-split"] = Field(
        "risk-control",
        description="risk-control: per-image guarantee (image = exchangeable unit); mondrian: one "
        "threshold per class, per-class guarantee; pixel-split: ConformalSAM's pixel rule, no image-level guarantee.",
    )
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="Allowed expected share of pixels outside their set.")


class Calibrate(MapStage):
    name = "calibrate"
    Config = CalibrateConfig
    config: CalibrateConfig
    reads = ("select/probabilities",)
    resources = Resources(cpus=1)
    writes_class_map = True
    fitting = FitOnGoldSet("calibration")
    gold_reads = ("select/probabilities",)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("labels", "set_size")

    def fit(self, samples: Sequence[GoldSample], ctx: Context) -> dict[str, Any]:
        tables = [ScoreTable.of_image(s.inputs["select/probabilities"], s.gold_index, s.valid) for s in samples]
        return METHODS[self.config.method](ScoreTable.concatenate(tables), self.config.alpha).to_json()

    def fit_warning(self, fitted: dict[str, Any]) -> str | None:
        feasible = fitted["feasible"]
        if all(feasible) if isinstance(feasible, list) else feasible:
            return None
        needed = fitted.get("images_needed")
        more = f"; {needed} are needed for alpha={fitted['alpha']}" if needed else ""
        return (
            f"calibration set too small for the guarantee ({fitted['n']} images{more}): "
            "the affected thresholds are 1, so those pixels are left unlabelled"
        )

    def describe_fit(self, fitted: dict[str, Any]) -> str:
        thresholds = sorted(set(fitted["thresholds"]))
        shown = f"{thresholds[0]:.4f}" if len(thresholds) == 1 else f"{thresholds[0]:.4f}..{thresholds[-1]:.4f}"
        too_few = "" if self.fit_warning(fitted) is None else " (too few for alpha)"
        return (
            f"{fitted['method']}, alpha {fitted['alpha']}, threshold {shown}, "
            f"n = {fitted['n']} calibration images{too_few}"
        )

    def gold_measures(
        self, inputs: Mapping[str, np.ndarray], gold_index: np.ndarray, valid: np.ndarray, ctx: Context
    ) -> dict[str, float]:
        """miscoverage: the share of the image's gold pixels whose class is outside its set."""
        thresholds = self._thresholds()
        return {"miscoverage": image_miscoverage(inputs["select/probabilities"], gold_index, valid, thresholds)}

    def _thresholds(self) -> np.ndarray:
        if self.fitted is None:
            raise RuntimeError("calibrate runs only after it was fitted on the calibration set")
        return np.asarray(self.fitted["thresholds"], np.float64)

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        sets = prediction_sets(inputs["select/probabilities"], self._thresholds())
        labels, set_size = calibrated_labels(sets, ctx.classes.ids, ctx.classes.ignore_id, ctx.classes.label_dtype)
        return {"labels": labels, "set_size": set_size}

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict:
        return {"kept": round(float((outputs["set_size"] == 1).mean()), 4)}
