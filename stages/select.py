"""select: decode every prompt into candidate masks, keep one per prompt, solve the joint label field.

Per prompt the backend's M candidates are scored on the low-resolution grid by their
coverage of the weak label and their purity (stages/parts/coverage.py, SeSAM's (tau1, tau2)
rule together with the predicted quality); the kept masks alone are upsampled and become
per-class evidence, each weighted by its trust (stages/parts/decoding.py). The joint label field
(stages/parts/label_field.py) then solves all classes together on the image: weak pixels are hard
seeds, the masks' boundaries weaken the graph's edges (and, with box labels, their evidence
is the prior), and a class with boxes appears only inside them. The field's distribution is
``probabilities`` and its most probable class the label. When ``embed`` cached augmented
views, every view is decoded the same way with the prompts and the weak label moved into
it, mapped back and averaged before the field is solved (SCALER's ensemble).

Reads ``ingest`` (image, weak, boxes), ``embed`` (all feature arrays) and ``prompts``. Writes
  labels:        HxW class ids (uint8/uint16), ``ignore_id`` only where nothing is known
                 (no weak label and no kept mask);
  confidence:    HxW float16 in [0, 1], the probability of the pixel's label (1 on weak
                 pixels, 0 where ignored);
  probabilities: float16 [C, H, W] in manifest class order, the field's distribution per pixel;
  variance:      HxW float16, the variance across views of the label's mask evidence
                 (0 without views and on weak pixels);
  chosen:        int32 [P], the candidate kept per prompt (M: a box's own interior), -1 when
                 none was admissible;
  coverage:      float32 [P, M] and purity: float32 [P, M], the scores behind the choice
                 (the original view's).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import Field

from seglab.stages.base import Context, MapStage, Resources, Unit
from seglab.stages.embed import view_prefix
from seglab.stages.parts.decoding import DecodeConfig, decode_view
from seglab.stages.parts.fusion import ViewEnsemble, value_of_label
from seglab.stages.parts.label_field import FieldInputs, box_allowed, box_cores, field_labels, seed_index
from seglab.stages.parts.promptset import PromptBatch
from seglab.stages.parts.ranking import auroc
from seglab.stages.parts.views import View


class SelectConfig(DecodeConfig):
    batch_size: int = Field(4, ge=1, le=1024)


def split_views(features: Mapping[str, np.ndarray]) -> list[tuple[View | None, dict[str, np.ndarray]]]:
    """Stored ``embed`` features -> [(None, the original's), (view 1, its features), ...]."""
    views = []
    k = 1
    while f"{view_prefix(k)}spec" in features:
        prefix = view_prefix(k)
        own = {
            name[len(prefix) :]: a
            for name, a in features.items()
            if name.startswith(prefix) and name != f"{prefix}spec"
        }
        views.append((View.from_array(features[f"{prefix}spec"]), own))
        k += 1
    original = {name: a for name, a in features.items() if not name.startswith("view")}
    return [(None, original), *views]


class Select(MapStage):
    name = "select"
    version = 7  # 6: the joint label field; 7: evidence upsampled per class, no prior once seeded
    Config = SelectConfig
    config: SelectConfig
    reads = ("embed", "prompts", "ingest/weak", "ingest/image", "ingest/boxes")
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
        ensemble = ViewEnsemble(len(classes.ids), weak.shape)
        original = None
        for view, view_features in split_views(features):
            if view is None:
                original = decode_view(ctx.backend, view_features, prompts, weak, classes, self.config)
                ensemble.add(original.evidence)
            else:
                seen = decode_view(
                    ctx.backend, view_features, view.prompts(prompts), view.label_map(weak), classes, self.config
                )
                ensemble.add(view.back(seen.evidence))
        evidence, class_variance = ensemble.result()
        boxes = inputs["ingest/boxes"]
        labels, probabilities = field_labels(
            FieldInputs(
                inputs["ingest/image"],
                seed_index(weak, classes.ids),
                box_seeds=box_cores(boxes, classes.ids, weak.shape, self.config.field.box_core),
                evidence=evidence,
                allowed=box_allowed(boxes, classes.ids, weak.shape, ctx.background),
            ),
            classes,
            self.config.field,
        )
        assert original is not None  # split_views yields the original view first
        weak_pixels = weak != classes.ignore_id
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

    def gold_measures(
        self, inputs: Mapping[str, np.ndarray], gold_index: np.ndarray, valid: np.ndarray, ctx: Context
    ) -> dict[str, float]:
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
