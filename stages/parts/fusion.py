"""Per-class evidence from the kept masks of one image, and the ensemble over views.

Per class, the evidence is the largest of ``trust x probability`` over that class's kept
masks (trust in [0, 1]: how far the mask's choice is believed, see stages/parts/decoding.py),
taken on the grid and then upsampled to the image once per class (bilinear), not once per
mask. The evidence is not a label: the joint label field
(stages/parts/label_field.py) weighs it against the weak label's seeds and the image's edges.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from seglab.stages.parts.geometry import ImageFrame


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, elementwise, in the dtype of ``x`` (float32 logits stay float32)."""
    return expit(x)


def mask_evidence(
    kept_probability: np.ndarray,
    kept_classes: np.ndarray,
    trust: np.ndarray,
    frame: ImageFrame,
    *,
    class_ids: tuple[int, ...],
) -> np.ndarray:
    """kept_probability: float32 [K, S, S] in [0, 1] on the grid; kept_classes: int [K];
    trust: float [K] in [0, 1] -> float32 [C, H, W] in ``class_ids`` order (module docstring)."""
    height, width = frame.original_hw
    slot = {c: i for i, c in enumerate(class_ids)}
    evidence = np.zeros((len(class_ids), height, width), np.float32)
    for cls in np.unique(np.asarray(kept_classes, np.int64)):
        mine = np.flatnonzero(kept_classes == cls)
        weighted = kept_probability[mine].astype(np.float32) * np.asarray(trust, np.float32)[mine, None, None]
        evidence[slot[int(cls)]] = frame.grid_to_image(weighted.max(axis=0))
    return evidence


def value_of_label(labels: np.ndarray, per_class: np.ndarray, class_ids: tuple[int, ...], ignore_id: int) -> np.ndarray:
    """HxW float32: per pixel the value of ``per_class`` (float [C, H, W] in ``class_ids``
    order, e.g. probabilities) at the pixel's label; 0 where the label is ``ignore_id``."""
    order = np.argsort(class_ids)  # class_ids need not be sorted
    ids = np.asarray(class_ids)[order]
    slot = order[np.clip(np.searchsorted(ids, labels), 0, len(class_ids) - 1)]
    picked = np.take_along_axis(per_class, slot[None].astype(np.intp), axis=0)[0]
    return np.where(labels == ignore_id, 0.0, picked).astype(np.float32)


class ViewEnsemble:
    """SCALER's ensemble over V views, accumulated one view at a time (on original pixels).

    ``add`` takes a view's evidence (float32 [C, H, W]); ``result`` gives its mean over
    the views and its variance across them (with one view a read-only 0), both [C, H, W].
    """

    def __init__(self, classes: int, hw: tuple[int, int]):
        self.shape = (classes, *hw)
        self.views = 0
        self.first: np.ndarray | None = None

    def add(self, evidence: np.ndarray) -> None:
        """One view is kept as it is (the common case needs no float64 sums); from the second
        view on, the sums over views are accumulated."""
        self.views += 1
        if self.views == 1:
            self.first = evidence
            return
        if self.views == 2:
            self.total = np.zeros(self.shape, np.float64)
            self.squares = np.zeros_like(self.total)
            assert self.first is not None  # kept by the first view
            self._accumulate(self.first)
            self.first = None
        self._accumulate(evidence)

    def _accumulate(self, evidence: np.ndarray) -> None:
        self.total += evidence
        self.squares += np.square(evidence, dtype=np.float64)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.views == 1:
            assert self.first is not None  # kept by the only view
            return self.first.astype(np.float32, copy=False), np.broadcast_to(np.float32(0), self.first.shape)
        mean = self.total / self.views
        variance = np.maximum(self.squares / self.views - mean**2, 0.0)
        return mean.astype(np.float32), variance.astype(np.float32)
