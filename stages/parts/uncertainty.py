"""Per-pixel uncertainty in [0, 1], composed from what the pipeline knows about a label.

Each signal is an HxW map in [0, 1], 0 = nothing speaks against the pixel's label:
  probability: 1 - p(label) of the pixel's class distribution, rescaled by 1 - 1/C so a
               uniform distribution (no information) gives 1;
  calibration: 1 where the calibrated prediction set does not single out the label (the
               set is empty, ambiguous, or another class), 0 where it does;
  variance:    the variance of the label's mask evidence across augmented views, times 4
               (a share in [0, 1] varies by at most 1/4);
  spread:      the disagreement between the candidate masks of the prompts near the pixel
               (max - min candidate probability);
  teacher:     the disagreement between the label's class distribution and the mean
               teacher's of the previous round (from round 1 on): their total variation
               distance, which for two classes is SUM's |sigma(label logits) - sigma(teacher logits)|.
They are combined as a weighted noisy-or, u = 1 - prod_k (1 - w_k s_k): any one signal can
raise the uncertainty, none lowers it, and weights in [0, 1] say how far each is trusted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SIGNALS = ("probability", "calibration", "variance", "spread", "teacher")


def probability_signal(label_probability: np.ndarray, n_classes: int) -> np.ndarray:
    """label_probability: HxW float in [0, 1] -> HxW float32 (1 - p) / (1 - 1/C), clipped."""
    span = 1.0 - 1.0 / n_classes if n_classes > 1 else 1.0
    return np.clip((1.0 - np.asarray(label_probability, np.float32)) / span, 0.0, 1.0)


def calibration_signal(calibrated_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """calibrated_labels: HxW class ids (``ignore_id`` where the set is not one class) ->
    HxW float32, 1 where it differs from ``labels``."""
    return (np.asarray(calibrated_labels) != np.asarray(labels)).astype(np.float32)


def variance_signal(variance: np.ndarray) -> np.ndarray:
    """variance: HxW float, across views of evidence in [0, 1] -> HxW float32 in [0, 1]."""
    return np.clip(4.0 * np.asarray(variance, np.float32), 0.0, 1.0)


def teacher_signal(distribution: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """distribution, teacher: float [C, H, W] class distributions (each sums to 1 over C) ->
    HxW float32 total variation distance 1/2 sum_c |p_c - q_c| in [0, 1]."""
    gap = np.abs(np.asarray(distribution, np.float32) - np.asarray(teacher, np.float32)).sum(axis=0)
    return np.clip(0.5 * gap, 0.0, 1.0)


def compose(signals: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """signals: name -> HxW in [0, 1] (names from SIGNALS); weights: name -> [0, 1], a
    missing weight counting as 0 -> HxW float32 uncertainty 1 - prod(1 - w s)."""
    unknown = set(signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown uncertainty signals {sorted(unknown)}; known: {list(SIGNALS)}")
    certainty = None
    for name, signal in signals.items():
        term = 1.0 - float(weights.get(name, 0.0)) * np.clip(np.asarray(signal, np.float32), 0.0, 1.0)
        certainty = term if certainty is None else certainty * term
    if certainty is None:
        raise ValueError("compose needs at least one signal")
    return (1.0 - certainty).astype(np.float32)
