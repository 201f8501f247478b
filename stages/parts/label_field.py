"""One joint label field per image: every class solved together, weak labels as hard seeds,
mask boundaries as cuts in the graph, box constraints as forbidden classes.

Algorithm: Grady's multi-label random walker with prior models ("Multilabel random walker
image segmentation using prior models", CVPR 2005) on the 4-connected pixel graph of the
image at a working resolution:

    (L_UU + G) X_U = G Lambda_U - L_US X_S

L is the graph Laplacian with edge weights exp(-beta * |dLab|^2 / mean |dLab|^2) (CIE-Lab
colour differences of neighbouring cells, so edges follow colour boundaries), each times
exp(-cut_weight * the masks' evidence variation across the edge), X the per-class
probabilities (nodes x C), S the seeded nodes (weak-label pixels and box cores: one-hot), U
the free ones, Lambda the prior distribution from the masks' evidence and G = diag(gamma *
strength), strength the largest evidence of any class at the node. One sparse LU
factorisation serves all C right-hand sides. A mask therefore does not win a region by its
maximum: its boundary makes the graph easier to cut there, but which side takes which class
is carried from the seeds, so a mask that leaked over another class's seeds has to beat
them. gamma is 0 whenever anything is seeded; only a field without any seed falls back on
the masks' evidence as its prior (NO_SEED_EVIDENCE_WEIGHT).

Boxes constrain the field: a class that has boxes may not appear outside them (its
probability is zeroed there and the distribution renormalised); a pixel where only one
class may appear becomes a seed of that class (e.g. outside every object box, the
background).

The working resolution is the finest integer reduction of the image whose free (unseeded)
nodes number at most ``max_free``, so densely labelled images (coarse masks) are solved at
full resolution and sparse ones at a reduction whose cost is bounded; the probabilities
are brought back to the image bilinearly and weak pixels stay one-hot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu
from skimage.color import rgb2lab
from skimage.transform import resize

from seglab.stages.base import ClassTable

#: numerical floor on every node's prior weight, so a region without seeds or evidence
#: (cut off by a zero-weight border) still has a solution: the uniform distribution
FLOOR = 1e-9
#: prior weight of the masks' evidence when no pixel is seeded, neither by the weak label nor
#: by a box core (the field has nothing else to go on); with seeds the masks enter through the
#: edges alone: on 46 CamVid train images with boxes a prior weight of 1e-4 / 1e-3 cost 1.6 /
#: 2.3 mIoU against none (cut_weight 10)
NO_SEED_EVIDENCE_WEIGHT = 0.001


class FieldConfig(BaseModel):
    """Settings of the joint label field (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(
        25.0,
        gt=0.0,
        le=1000.0,
        description="Edge sharpness: weight exp(-beta * dLab^2 / mean dLab^2) between neighbouring cells.",
    )
    smoothing: float = Field(
        0.5,
        ge=0.0,
        le=5.0,
        description="Gaussian sigma, in working-grid cells, applied to the "
        "image before its colour differences (texture is not an edge).",
    )
    cut_weight: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Masks' boundaries as edges: edge weights times "
        "exp(-cut_weight * total variation of the evidence across the edge).",
    )
    evidence_weight: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="gamma: weight of the masks' evidence "
        "as a prior, against the graph, at a node whose evidence is 1. Unset: "
        "NO_SEED_EVIDENCE_WEIGHT when nothing seeds a pixel (no weak pixel, no box "
        "core), 0 otherwise (seeds decide; masks enter through the edges).",
    )
    box_core: float = Field(
        1 / 3,
        ge=0.0,
        le=1.0,
        description="Share of a box's width and height, about its "
        "centre, whose pixels seed the box's class (box_cores).",
    )
    max_free: int = Field(
        65536,
        ge=1024,
        le=4_194_304,
        description="Most unseeded nodes the field is solved "
        "on; the image is reduced by the smallest integer factor that meets it.",
    )


@dataclass(frozen=True)
class FieldInputs:
    """What the field is solved from, all on the original image.

    image:    HxWx3 uint8 RGB.
    seeds:    HxW int64 index into the class list (-1 = free): hard labels (the weak label's).
    box_seeds: HxW int64 like ``seeds`` or None: seeds derived from boxes (``box_cores``);
              the weak label's seeds win where both speak.
    evidence: float32 [C, H, W] in [0, 1] or None: per class how strongly the masks say so.
    allowed:  bool [C, H, W] or None: where each class may appear (box constraints).
    """

    image: np.ndarray
    seeds: np.ndarray
    box_seeds: np.ndarray | None = None
    evidence: np.ndarray | None = None
    allowed: np.ndarray | None = None


def seed_index(labels: np.ndarray, class_ids: tuple[int, ...]) -> np.ndarray:
    """labels: HxW class ids (anything not in ``class_ids`` = unlabelled) -> HxW int64 index
    into ``class_ids``, -1 where unlabelled."""
    index = np.full(labels.shape, -1, np.int64)
    for slot, cls in enumerate(class_ids):
        index[labels == cls] = slot
    return index


def box_rect(box: np.ndarray, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box's (x0, y0, x1, y1) pixel edges -> (r0, r1, c0, c1), the rows and columns it
    covers inside an image of ``hw`` (at least one of each where the box starts inside)."""
    x0, y0, x1, y1 = box[:4]
    h, w = hw
    return (
        max(0, math.floor(y0)),
        min(h, max(math.ceil(y1), math.floor(y0) + 1)),
        max(0, math.floor(x0)),
        min(w, max(math.ceil(x1), math.floor(x0) + 1)),
    )


def box_allowed(
    boxes: np.ndarray, class_ids: tuple[int, ...], hw: tuple[int, int], background: int | None
) -> np.ndarray | None:
    """boxes float [B, 5] (x0, y0, x1, y1, class; pixel edges, x1/y1 exclusive) -> bool
    [C, H, W]: a class with boxes only inside them; the ``background`` class (given no boxes)
    everywhere; another class without boxes nowhere. None without boxes. A pixel no box
    covers, without a background class, allows no class: the field leaves it unlabelled."""
    if len(boxes) == 0:
        return None
    h, w = hw
    allowed = np.zeros((len(class_ids), h, w), bool)
    slot = {c: i for i, c in enumerate(class_ids)}
    for box in np.asarray(boxes, np.float64):
        if int(box[4]) not in slot:
            continue
        r0, r1, c0, c1 = box_rect(box, hw)
        allowed[slot[int(box[4])], r0:r1, c0:c1] = True
    if background is not None and background in slot:
        allowed[slot[background]] = True
    return allowed


def box_cores(boxes: np.ndarray, class_ids: tuple[int, ...], hw: tuple[int, int], core: float) -> np.ndarray | None:
    """boxes float [B, 5] (as ``box_allowed``) -> HxW int64 seed index (-1 free), None
    without boxes: each box's core (the central ``core`` share of its width and height, at
    least its centre pixel) seeds the box's class, except where a smaller box of another
    class lies: boxes nest like their objects (a car's box inside the road's), so the larger
    box's core says nothing there."""
    if len(boxes) == 0:
        return None
    h, w = hw
    seeds = np.full((h, w), -1, np.int64)
    slot = {c: i for i, c in enumerate(class_ids)}
    boxes = np.asarray(boxes, np.float64)
    rects = [box_rect(box, hw) for box in boxes]
    areas = np.array([(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rects])
    for b in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1, cls = boxes[b]
        if int(cls) not in slot:
            continue
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, core * (x1 - x0) / 2, core * (y1 - y0) / 2
        r0 = int(np.clip(math.floor(cy - half_h), 0, h - 1))
        c0 = int(np.clip(math.floor(cx - half_w), 0, w - 1))
        r1, c1 = max(r0 + 1, min(h, math.ceil(cy + half_h))), max(c0 + 1, min(w, math.ceil(cx + half_w)))
        own = np.zeros((h, w), bool)
        own[r0:r1, c0:c1] = True
        for other in np.flatnonzero((areas < areas[b]) & (boxes[:, 4] != cls)):
            q0, q1, p0, p1 = rects[other]
            own[q0:q1, p0:p1] = False
        seeds[own] = slot[int(cls)]
    return seeds


def _factor(seeds: np.ndarray, max_free: int) -> int:
    """Smallest integer reduction f whose free cells, about free pixels / f^2, fit ``max_free``."""
    free = int((seeds < 0).sum())
    return max(1, math.ceil(math.sqrt(free / max_free)))


def _reduce_mean(array: np.ndarray, f: int) -> np.ndarray:
    """[..., H, W] float -> [..., ceil(H/f), ceil(W/f)] block means (edges padded by replication)."""
    if f == 1:
        return np.asarray(array, np.float32)
    h, w = array.shape[-2:]
    ph, pw = -h % f, -w % f
    pad = [(0, 0)] * (array.ndim - 2) + [(0, ph), (0, pw)]
    padded = np.pad(np.asarray(array, np.float32), pad, mode="edge")
    shape = (*array.shape[:-2], (h + ph) // f, f, (w + pw) // f, f)
    return padded.reshape(shape).mean(axis=(-3, -1))


def _reduce_seeds(seeds: np.ndarray, classes: int, f: int) -> np.ndarray:
    """HxW int64 seed index -> reduced grid: a cell is a seed of the one class whose seeds it
    holds; cells with seeds of several classes, or none, are free (-1)."""
    if f == 1:
        return seeds
    counts = np.stack([_reduce_mean((seeds == c).astype(np.float32), f) for c in range(classes)])
    present = counts > 0
    single = present.sum(axis=0) == 1
    return np.where(single, counts.argmax(axis=0), -1).astype(np.int64)


def _laplacian(lab: np.ndarray, beta: float, evidence: np.ndarray | None = None, cut: float = 0.0) -> sparse.csr_matrix:
    """lab float32 [h, w, 3] -> the 4-connected graph Laplacian (h*w x h*w) with weights
    exp(-beta * d^2 / mean d^2)."""
    h, w = lab.shape[:2]
    index = np.arange(h * w).reshape(h, w)
    d_right = ((lab[:, 1:] - lab[:, :-1]) ** 2).sum(-1).ravel()
    d_down = ((lab[1:] - lab[:-1]) ** 2).sum(-1).ravel()
    d2 = np.r_[d_right, d_down].astype(np.float64)  # float32 would lose FLOOR against the degrees
    weight = np.exp(-beta * d2 / ((d2.mean() if d2.size else 0.0) + 1e-9)) + 1e-6
    if evidence is not None and cut > 0:
        tv_right = np.abs(evidence[:, :, 1:] - evidence[:, :, :-1]).sum(0).ravel()
        tv_down = np.abs(evidence[:, 1:] - evidence[:, :-1]).sum(0).ravel()
        weight *= np.exp(-cut * 0.5 * np.r_[tv_right, tv_down])
    a = np.r_[index[:, :-1].ravel(), index[:-1].ravel()]
    b = np.r_[index[:, 1:].ravel(), index[1:].ravel()]
    adjacency = sparse.coo_matrix((np.r_[weight, weight], (np.r_[a, b], np.r_[b, a])), shape=(h * w, h * w)).tocsr()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    return (sparse.diags(degree) - adjacency).tocsr()


def solve_field(inputs: FieldInputs, n_classes: int, cfg: FieldConfig) -> np.ndarray:
    """-> float32 [C, H, W]: per pixel a distribution over the classes (module docstring).
    Seeded pixels are one-hot; a class no seed and no evidence speaks for gets 0."""
    image, seeds = inputs.image, inputs.seeds
    height, width = seeds.shape
    seeds = seeds.copy() if inputs.box_seeds is None else np.where(seeds >= 0, seeds, inputs.box_seeds)
    if inputs.allowed is not None:
        single = inputs.allowed.sum(axis=0) == 1
        seeds[single & (seeds < 0)] = inputs.allowed.argmax(axis=0)[single & (seeds < 0)]
    f = _factor(seeds, cfg.max_free)
    small_seeds = _reduce_seeds(seeds, n_classes, f)
    h, w = small_seeds.shape
    reduced = _reduce_mean(np.moveaxis(image.astype(np.float32) / 255.0, -1, 0), f)
    if cfg.smoothing > 0:
        reduced = ndimage.gaussian_filter(reduced, (0, cfg.smoothing, cfg.smoothing))
    lab = rgb2lab(np.moveaxis(reduced, 0, -1))
    small_evidence = _reduce_mean(inputs.evidence, f) if inputs.evidence is not None else None
    laplacian = _laplacian(lab.astype(np.float32), cfg.beta, small_evidence, cfg.cut_weight)
    flat_seeds = small_seeds.ravel()
    free = np.flatnonzero(flat_seeds < 0)
    seeded = np.flatnonzero(flat_seeds >= 0)
    x = np.zeros((h * w, n_classes), np.float64)
    x[seeded, flat_seeds[seeded]] = 1.0
    if free.size:
        if small_evidence is not None:
            evidence = small_evidence.reshape(n_classes, -1).T[free]  # [U, C]
            strength = evidence.max(axis=1)
            prior = evidence / np.maximum(evidence.sum(axis=1, keepdims=True), 1e-9)
        else:
            strength = np.zeros(free.size)
            prior = np.zeros((free.size, n_classes))
        weight = cfg.evidence_weight
        if weight is None:
            weight = 0.0 if seeded.size else NO_SEED_EVIDENCE_WEIGHT
        gamma = weight * strength + FLOOR
        rhs = gamma[:, None] * np.where(strength[:, None] > 0, prior, 1.0 / n_classes)
        if seeded.size:
            rhs -= laplacian[free][:, seeded] @ x[seeded]
        system = (laplacian[free][:, free] + sparse.diags(gamma)).tocsc()
        x[free] = splu(system, permc_spec="COLAMD").solve(np.ascontiguousarray(rhs))
    x = np.clip(x, 0.0, None)
    small = x.T.reshape(n_classes, h, w).astype(np.float32)
    if f > 1:
        full = resize(small, (n_classes, h * f, w * f), order=1, mode="edge", anti_aliasing=False, preserve_range=True)[
            :, :height, :width
        ].astype(np.float32)
    else:
        full = small
    if inputs.allowed is not None:
        full *= inputs.allowed
    total = full.sum(axis=0, keepdims=True)
    full /= np.where(total > 0, total, 1.0)
    labelled = inputs.seeds >= 0
    if labelled.any():
        full[:, labelled] = 0.0
        full[
            inputs.seeds[labelled], np.flatnonzero(labelled.ravel()) // width, np.flatnonzero(labelled.ravel()) % width
        ] = 1.0
    return full


def field_labels(inputs: FieldInputs, classes: ClassTable, cfg: FieldConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> (HxW labels, float32 [C, H, W] distribution) of the joint label field; ``ignore_id``
    (and a zero distribution) where nothing is known: no seed, no evidence, no box, or no
    class allowed."""
    probabilities = solve_field(inputs, len(classes.ids), cfg)
    known = (
        (inputs.seeds >= 0).any()
        or (inputs.evidence is not None and inputs.evidence.any())
        or inputs.allowed is not None
    )
    if not known:
        probabilities[:] = 0.0
        return np.full(inputs.seeds.shape, classes.ignore_id, classes.label_dtype), probabilities
    labels = np.asarray(classes.ids, classes.label_dtype)[probabilities.argmax(axis=0)]
    labels[probabilities.max(axis=0) == 0] = classes.ignore_id
    return labels, probabilities
