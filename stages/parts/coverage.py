"""Mask selection by coverage of the weak label (SeSAM), on the low-resolution grid.

Each prompt came from one weak-label component (or one box). For every candidate mask
(``logit > 0`` on the grid) two numbers are measured against the weak label:
  coverage: the share of the prompt's own component inside the mask (for a box-only
            prompt: IoU of the mask's extent with the box; for a prompt with neither, 1);
  purity:   the share of the weak-labelled cells inside the mask that carry the prompt's
            class (for a box-only prompt: the share of the mask inside the box); 1 when
            the mask holds no labelled cell.
A candidate is admissible when coverage >= tau1 and purity >= tau2. Among admissible
candidates, those with coverage >= tau2 come first, then the backend's predicted
quality decides. A prompt without an admissible candidate keeps none (index -1): its
component stays weak-only rather than taking a mask that contradicts the weak label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as connected_components

from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import PromptBatch

NONE = -1


@dataclass(frozen=True)
class GridEvidence:
    """The weak label scattered onto the S x S logit grid (every labelled pixel marks the
    cell it falls in, so thin scribbles survive the downsampling).

    components: class id -> int32 [S, S], 1 + the component index (as the ``prompts``
                stage numbers them) of the weak pixels in the cell, 0 for none.
    classes:    int64 [S, S], the class of the weak pixels in the cell, -1 for none.
    """

    components: dict[int, np.ndarray]
    classes: np.ndarray


def grid_evidence(weak: np.ndarray, ignore_id: int, frame: ImageFrame) -> GridEvidence:
    """weak: HxW class ids (``ignore_id`` = unlabelled) -> its evidence on ``frame``'s grid."""
    s = frame.grid_size
    classes = np.full((s, s), NONE, np.int64)
    components: dict[int, np.ndarray] = {}
    for cls in np.unique(weak):
        if cls == ignore_id:
            continue
        labelled = connected_components(weak == cls, connectivity=2)
        ys, xs = np.nonzero(labelled)
        cells = np.clip(np.floor(frame.scale_to_grid(np.stack([xs + 0.5, ys + 0.5], axis=1))).astype(np.intp), 0, s - 1)
        grid = np.zeros((s, s), np.int32)
        grid[cells[:, 1], cells[:, 0]] = labelled[ys, xs]
        classes[cells[:, 1], cells[:, 0]] = int(cls)
        components[int(cls)] = grid
    return GridEvidence(components, classes)


def _box_scores(masks: np.ndarray, box_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """masks: bool [M, S, S]; box on the grid (x0, y0, x1, y1) -> (coverage, purity) [M]."""
    s = masks.shape[-1]
    x0, y0 = np.floor(box_xyxy[:2]).astype(int).clip(0, s)
    x1, y1 = np.ceil(box_xyxy[2:]).astype(int).clip(0, s)
    inside = np.zeros((s, s), bool)
    inside[y0:y1, x0:x1] = True
    coverage, purity = np.zeros(len(masks)), np.zeros(len(masks))
    box_area = max(1, (x1 - x0) * (y1 - y0))
    for m, mask in enumerate(masks):
        area = mask.sum()
        if area == 0:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        ex0, ex1, ey0, ey1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        overlap = max(0, min(x1, ex1) - max(x0, ex0)) * max(0, min(y1, ey1) - max(y0, ey0))
        coverage[m] = overlap / (box_area + (ex1 - ex0) * (ey1 - ey0) - overlap)
        purity[m] = (mask & inside).sum() / area
    return coverage, purity


def coverage_scores(
    logits: np.ndarray, prompts: PromptBatch, evidence: GridEvidence, frame: ImageFrame
) -> tuple[np.ndarray, np.ndarray]:
    """logits float [P, M, S, S] -> (coverage, purity), float64 [P, M] each, in [0, 1]."""
    masks = logits > 0
    coverage = np.ones(masks.shape[:2])
    purity = np.ones(masks.shape[:2])
    labelled = evidence.classes >= 0
    boxes = frame.scale_to_grid(prompts.boxes.reshape(-1, 2, 2)).reshape(-1, 4)
    for p, (cls, comp) in enumerate(zip(prompts.classes.tolist(), prompts.components.tolist())):
        own_grid = evidence.components.get(cls)
        own = own_grid == comp + 1 if own_grid is not None else None
        if own is not None and own.any():
            coverage[p] = (masks[p] & own).sum(axis=(1, 2)) / own.sum()
            inside_labelled = (masks[p] & labelled).sum(axis=(1, 2))
            same = (masks[p] & (evidence.classes == cls)).sum(axis=(1, 2))
            purity[p] = np.where(inside_labelled > 0, same / np.maximum(inside_labelled, 1), 1.0)
        elif prompts.has_box[p]:
            coverage[p], purity[p] = _box_scores(masks[p], boxes[p])
    return coverage, purity


def choose_by_coverage(
    coverage: np.ndarray, purity: np.ndarray, quality: np.ndarray, tau: tuple[float, float]
) -> np.ndarray:
    """coverage, purity, quality [P, M] -> int32 [P]: the kept candidate per prompt, or -1.

    Admissible: coverage >= tau1 and purity >= tau2. Ranked by (coverage >= tau2, quality).
    """
    tau1, tau2 = tau
    admissible = (coverage >= tau1) & (purity >= tau2)
    best = np.lexsort((quality.T, (coverage >= tau2).T, admissible.T), axis=0)[-1]
    return np.where(admissible.any(axis=1), best, NONE).astype(np.int32)
