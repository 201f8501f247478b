"""Fuse the kept masks of one image into per-class probabilities and a class map.

Only kept masks are upsampled from the grid to the image (bilinear, on probabilities).
Per class, the probability of a pixel is the largest sigmoid among that class's kept
masks. Where masks of different classes overlap:
  ``smaller``:     masks are painted largest first, so a smaller mask inside a larger
                   one wins (a car on the road, a person before a wall): SAM masks nest;
  ``probability``: the class with the largest probability wins.
Either way a pixel gets a class only where that class's probability reaches
``min_probability``; elsewhere it keeps ``ignore_id``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from seglab.stages.geometry import ImageFrame
from seglab.stages.nearest_label import nearest_label


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


@dataclass(frozen=True)
class Fused:
    """labels: HxW class ids (``ignore_id`` where untrusted); probabilities: float32
    [C, H, W] per class in ``class_ids`` order, the largest kept-mask probability."""

    labels: np.ndarray
    probabilities: np.ndarray


def fuse_masks(kept_probability: np.ndarray, kept_classes: np.ndarray, frame: ImageFrame, *,
               class_ids: tuple[int, ...], ignore_id: int, label_dtype: np.dtype,
               min_probability: float, overlap: str) -> Fused:
    """kept_probability: float32 [K, S, S] in [0, 1] on the grid; kept_classes: int [K]."""
    height, width = frame.original_hw
    slot = {c: i for i, c in enumerate(class_ids)}
    probabilities = np.zeros((len(class_ids), height, width), np.float32)
    labels = np.full((height, width), ignore_id, label_dtype)
    areas = (kept_probability > 0.5).sum(axis=(1, 2))
    for k in np.argsort(-areas, kind="stable"):
        prob = frame.grid_to_image(kept_probability[k].astype(np.float32))
        c = slot[int(kept_classes[k])]
        np.maximum(probabilities[c], prob, out=probabilities[c])
        if overlap == "smaller":
            paint = prob >= min_probability
            labels[paint] = kept_classes[k]
    if overlap == "probability" and len(kept_classes):
        best = probabilities.argmax(axis=0)
        top = np.take_along_axis(probabilities, best[None], axis=0)[0]
        trusted = top >= min_probability
        labels[trusted] = np.asarray(class_ids)[best[trusted]]
    return Fused(labels, probabilities)


def fill_nearest(labels: np.ndarray, weak: np.ndarray, ignore_id: int) -> np.ndarray:
    """Give every ``ignore_id`` pixel of labels (HxW) the class of the nearest weak-label
    pixel (the nearest-label baseline: where no mask speaks, fall back on it). Without
    weak pixels (box labels) nothing is filled."""
    empty = labels == ignore_id
    if not empty.any() or (weak == ignore_id).all():
        return labels
    return np.where(empty, nearest_label(weak, ignore_id), labels).astype(labels.dtype)


def value_of_label(labels: np.ndarray, per_class: np.ndarray, class_ids: tuple[int, ...],
                   ignore_id: int) -> np.ndarray:
    """HxW float32: per pixel the value of ``per_class`` (float [C, H, W] in ``class_ids``
    order, e.g. probabilities) at the pixel's label; 0 where the label is ``ignore_id``."""
    order = np.argsort(class_ids)  # class_ids need not be sorted
    ids = np.asarray(class_ids)[order]
    slot = order[np.clip(np.searchsorted(ids, labels), 0, len(class_ids) - 1)]
    picked = np.take_along_axis(per_class, slot[None].astype(np.intp), axis=0)[0]
    return np.where(labels == ignore_id, 0.0, picked).astype(np.float32)


def class_distribution(evidence: np.ndarray, weak: np.ndarray, class_ids: tuple[int, ...], ignore_id: int, *,
                       mask_weight: float, prior_scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel class distribution (float32 [C, H, W], sums to 1 over C) from the masks'
    evidence (float [C, H, W] in [0, 1]: per class the largest kept-mask probability) and a
    prior from the weak label: exp(-d_c / (prior_scale * image diagonal)), d_c the
    distance to the nearest weak pixel of class c (0 for classes without one). The two
    are mixed ``mask_weight : 1 - mask_weight`` and normalised; weak pixels are one-hot.
    Where no mask speaks, the prior still says which classes are near, so a conformal
    score 1 - p has meaning everywhere. ``out`` (float32 [C, H, W], may be ``evidence``
    itself, which saves a C x H x W array) receives the result."""
    height, width = weak.shape
    scale = prior_scale * float(np.hypot(height, width))
    distribution = np.empty(evidence.shape, np.float32) if out is None else out
    for slot, cls in enumerate(class_ids):  # one class at a time: no C x H x W temporaries
        prior = np.zeros((height, width), np.float32)
        if (weak == cls).any():
            prior[:] = np.exp(-ndimage.distance_transform_edt(weak != cls) / scale)
        distribution[slot] = mask_weight * evidence[slot].astype(np.float32) + (1.0 - mask_weight) * prior + 1e-6
    distribution /= distribution.sum(axis=0, keepdims=True)
    labelled = weak != ignore_id
    for slot, cls in enumerate(class_ids):
        distribution[slot][labelled] = weak[labelled] == cls
    return distribution


class ViewEnsemble:
    """SCALER's ensemble over V views, accumulated one view at a time (on original pixels).

    ``add`` takes a view's class map (HxW) and probabilities (float32 [C, H, W]).
    ``result`` gives per pixel the class most views voted for when a strict majority did
    (ties go to the larger mean probability), else ``ignore_id``; the mean probabilities
    [C, H, W]; and their variance across views [C, H, W] (with one view a read-only 0).
    """

    def __init__(self, class_ids: tuple[int, ...], hw: tuple[int, int]):
        self.class_ids = np.asarray(class_ids)
        self.hw = hw
        self.views = 0
        self.first: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        """One view is kept as it is (the common case needs no float64 sums); from the second
        view on, the sums over views are accumulated."""
        self.views += 1
        if self.views == 1:
            self.first = (labels, probabilities)
            return
        if self.views == 2:
            self.total = np.zeros((len(self.class_ids), *self.hw), np.float64)
            self.squares = np.zeros_like(self.total)
            self.votes = np.zeros((len(self.class_ids), *self.hw), np.int32)
            self._accumulate(*self.first)
            self.first = None
        self._accumulate(labels, probabilities)

    def _accumulate(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        self.total += probabilities
        self.squares += np.square(probabilities, dtype=np.float64)
        for slot, cls in enumerate(self.class_ids):
            self.votes[slot] += labels == cls

    def result(self, ignore_id: int, label_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.views == 1:  # one view: its own labels and probabilities, no variance
            labels, probabilities = self.first
            labels = np.where(np.isin(labels, self.class_ids), labels, ignore_id).astype(label_dtype)
            return labels, probabilities.astype(np.float32, copy=False), np.broadcast_to(np.float32(0), probabilities.shape)
        mean = self.total / self.views
        variance = np.maximum(self.squares / self.views - mean**2, 0.0)
        best = (self.votes + 0.5 * mean).argmax(axis=0)  # mean < 1 only breaks ties between votes
        majority = 2 * np.take_along_axis(self.votes, best[None], axis=0)[0] > self.views
        labels = np.where(majority, self.class_ids[best], ignore_id).astype(label_dtype)
        return labels, mean.astype(np.float32), variance.astype(np.float32)
