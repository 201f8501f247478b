"""Where a stored label source came from, for exports and reports (read from the store alone).

``provenance(store, stage)`` -> a JSON-able dict:
  seglab_version, manifest_hash, manifest: of the last ``seglab run`` (store root attrs);
  stage, round: the exported stage and its refine -> retrain round (0 for stages outside rounds);
  backend: {model, checkpoint (sha256, or 'none' for the weight-free backend)}, from the
      signature of the stage that ran the encoder (embed);
  calibration: {method, alpha, n} of the calibrate stage's fit, or None without one;
  segmenter: {stage, architecture, sha256, epochs} of the segmenter whose teacher the stage
      used or is (retrain of its round, or of the previous round for refine.r), or None.
"""
from __future__ import annotations

from typing import Any

from seglab.pipeline.store import Store
from seglab.stages.base import ROUND_SEPARATOR, round_name


def stage_round(stage: str) -> int:
    """'refine.2' -> 2; a stage outside rounds ('select') -> 0."""
    _, _, r = stage.partition(ROUND_SEPARATOR)
    return int(r) if r.isdigit() else 0


def provenance(store: Store, stage: str) -> dict[str, Any]:
    attrs = store.attrs
    stages = set(store.stages())
    model = store.stage_attrs("embed").get("signature", {}).get("model", {}) if "embed" in stages else {}
    fit = store.stage_attrs("calibrate").get("fitted") if "calibrate" in stages else None
    r = stage_round(stage)
    base = stage.partition(ROUND_SEPARATOR)[0]
    teacher = round_name("retrain", r if base == "retrain" else r - 1) if (base == "retrain" or r > 0) else None
    trained = store.stage_attrs(teacher).get("fitted") if teacher in stages else None
    return {
        "seglab_version": attrs.get("seglab_version"),
        "manifest_hash": attrs.get("manifest_hash"),
        "manifest": attrs.get("manifest_path"),
        "stage": stage,
        "round": r,
        "backend": {"model": model.get("model"), "checkpoint": model.get("checkpoint")},
        "calibration": None if not fit else {k: fit.get(k) for k in ("method", "alpha", "n")},
        "segmenter": None if not trained else {"stage": teacher, "architecture": trained.get("architecture"),
                                               "sha256": trained.get("sha256"), "epochs": trained.get("epochs")},
    }
