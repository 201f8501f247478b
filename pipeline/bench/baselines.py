"""Classical baselines for ``seglab bench quality``: dense labels from the same weak labels
with no pipeline, to show what the pipeline adds.

One pure function per baseline, all with one signature::

    baseline(image, weak, boxes, class_ids, ignore_id, background=None) -> HxW labels

``image`` HxWx3 uint8, ``weak`` HxW class ids (``ignore_id`` where unlabelled), ``boxes``
float32 [B, 5] rows (x0, y0, x1, y1, class), x1 and y1 exclusive pixel edges (what ingest
writes); ``background``: for boxes, a class allowed everywhere that gets no boxes (None:
every class that appears has boxes). The result has the dtype of ``weak`` and a class on
every pixel where anything is known. Rules shared by every baseline:

- Weak pixels keep their class.
- Boxes constrain: a class appears only inside its boxes (the background anywhere), so a
  pixel outside every box takes the background, or no class (``ignore_id``) without one.
  A pixel where one class only is allowed is a seed of it, and so is each box's *core*, its
  middle third in each axis (smaller boxes painted last, so nested objects keep theirs).
  Probabilities of classes not allowed at a pixel are set to 0 before the argmax.

Baselines: ``nearest`` (the class of the nearest seed, as stages/parts/nearest_label.py),
``random_walker`` (scikit-image's, on a downscaled Lab image), ``superpixel_walker`` (Grady's
random walker on a SLIC region graph), ``dense_crf`` (a fully connected CRF over the nearest
fill; needs the ``bench`` extra) and, for boxes only, ``grabcut`` (OpenCV's, per box; needs
the ``bench`` extra). The settings below were chosen on CamVid *train* images only (never on
the evaluation sets), with weak labels simulated as ``seglab simulate-weak`` does.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.ndimage import distance_transform_edt
from scipy.sparse.linalg import splu
from skimage.color import rgb2lab
from skimage.segmentation import random_walker as skimage_random_walker
from skimage.segmentation import slic

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.metrics import class_index
from seglab.stages.parts.nearest_label import nearest_label

BOX_CORE = 1 / 3
"""Share of a box's width and height, centred, whose pixels seed the box's class."""

RW_FACTOR = 2
RW_BETA = 2000.0
RW_MODE = "bf"
"""random_walker: the image is box-averaged by RW_FACTOR per axis (seeds: the majority class of
a cell's seeded pixels), converted to CIE-Lab and standardised (channel means removed, divided by
the overall standard deviation) before skimage's weights exp(-beta |grad|^2 / (10 sqrt(3) std));
the per-class probabilities are upsampled bilinearly. Mode ``bf`` (one sparse LU solve) gave the
same mIoU as ``cg_j`` within 0.2 points and was 1.3-45x faster (4 images, f 1/2/4, beta 130).

Tuning on CamVid train (every 8th of the 367 images: 46; weak labels simulated with seed 0 as
simulate-weak does, boxes for every class; mIoU % pooled over images, the mean of points,
scribbles, coarse and boxes; Unlabelled ignored). Rows f, columns beta 30 60 130 250 500 1000 2000 4000:
  46 images  f=2  53.3 54.3 55.5 56.4 57.0 57.3 57.5 57.5
             f=3  53.5 54.6 55.7 56.3 56.9 57.0 57.3 57.0
             f=4  53.5 54.5 55.5 56.2 56.6 57.1 57.1 56.9
  16 of them f=1  52.6 53.7 54.8 55.8 56.8 57.0  -    -     (every 24th image; f=1 not run above 1000)
             f=2  53.1 54.2 55.6 56.9 57.9 58.0 57.9 57.7
Chosen: f=2, beta=2000, the best mean; one setting for every kind, as the best per kind differs
from it by at most 1.7 points (points: f=3 41.6 vs 39.9; scribbles, coarse, boxes: < 0.4). Full
resolution (f=1) is worse at every beta and several times slower. RGB scaled to [0, 1] instead of
standardised Lab (f=2, 16 images): 53.9 / 55.9 / 57.4 at beta 250 / 1000 / 4000."""

SP_AREA = 25
SP_COMPACTNESS = 10.0
SP_BETA = 16.0
"""superpixel_walker: SLIC superpixels of about SP_AREA pixels (compactness SP_COMPACTNESS) at full
resolution; edge weight exp(-SP_BETA dLab^2 / mean dLab^2) between adjacent superpixels' mean Lab.
Tuned as the random walker, on 16 of those CamVid train images (every 24th). Rows (area,
compactness), columns beta 2 4 8 16 32 64 (-: not run):
  (25, 10)    -    -    -  57.5 57.2 56.8      (100, 10) 53.3 54.1 55.0 55.4  -    -
  (25, 20)    -    -    -  57.1 57.1 57.0      (100, 20) 53.4 54.0 54.6 54.8  -    -
  (50, 10)  54.2 55.2 56.1 56.4 56.4 56.6      (100, 30) 52.8 53.5 54.2 54.7  -    -
  (50, 20)  54.0 55.0 56.2 56.7 56.7 56.2      (200, 10) 51.9 52.4 52.7 53.0  -    -
  (50, 30)  53.5 54.4 55.2 55.7  -    -        (200, 20) 52.0 52.6 53.1 53.5  -    -
                                               (200, 30) 51.4 51.9 52.5 52.6  -    -
Chosen: (25, 10, 16), the best mean (the smallest superpixels tried; smaller ones approach the
pixel random walker)."""

CRF_LABEL_PROB = 0.7
CRF_WEAK_PROB = 0.99
CRF_GAUSSIAN = (3.0, 3.0)
CRF_BILATERAL = (30.0, 5.0, 10.0)
CRF_ITERATIONS = 5
"""dense_crf: unary -log p with p = CRF_LABEL_PROB for the nearest fill's class (CRF_WEAK_PROB on
weak pixels and on pixels only one class may take), the rest shared evenly; Gaussian pairwise
(sxy, compat) = CRF_GAUSSIAN, bilateral (sxy, srgb, compat) = CRF_BILATERAL; mean-field iterations.
Bilateral terms tuned on the same 16 CamVid train images (nearest fill alone: 49.6), as sxy:
srgb/compat 5/5 5/10 13/5 13/10 -> 30: 49.4 49.7 49.1 49.0; 60: 49.4 49.6 49.1 48.8;
100: 49.4 49.2 49.2 47.9. Chosen: (30, 5, 10), the best mean: over the nearest fill +1.2 points
(points), +2.4 (scribbles), -0.8 (coarse), -2.8 (boxes). The best per kind differs ((100, 5, 10)
for points and scribbles, +3.3 and +4.4; (30, 5, 5) for coarse and boxes, -0.0 and -1.3) but one
setting is kept: no setting makes the CRF beat the random walker on any kind."""

GC_ITERATIONS = 5
GC_MIN_SIDE = 4
GC_MARGIN = 0.5
"""grabcut: iterations per box; boxes narrower or lower than GC_MIN_SIDE pixels are painted whole;
each box is cut from its crop grown by GC_MARGIN of its size per side (at least 8 pixels), whose
part outside the box is GrabCut's background sample."""

EXTRA_HINT = "pip install -e '.[bench]'"


class MissingExtra(SeglabError):
    """A baseline's optional dependency (the ``bench`` extra) is not installed."""


def _optional(module: str, baseline: str) -> Any:
    """Import an optional dependency of a baseline; MissingExtra naming the extra when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"the {baseline} baseline needs the bench extra: {EXTRA_HINT} (cannot import {module})"
        ) from None


# -- the problem every baseline solves ------------------------------------------------------------


@dataclass(frozen=True)
class Seeds:
    """Weak labels and boxes in class-index space (positions in ``ids``).

    seeds: HxW intp, the seed class or -1; known: HxW bool, weak pixels (kept in the output);
    certain: known, or the only class allowed there; allowed: bool [C, H, W], or None without boxes.
    """

    ids: np.ndarray
    seeds: np.ndarray
    known: np.ndarray
    certain: np.ndarray
    allowed: np.ndarray | None
    ignore_id: int
    dtype: np.dtype

    @property
    def classes(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int]:
        return self.seeds.shape  # type: ignore[return-value]


def _box_pixels(box: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) float pixel edges -> (r0, r1, c0, c1) integer slices inside ``shape``, non-empty."""
    h, w = shape
    c0 = min(max(int(math.floor(box[0])), 0), w - 1)
    r0 = min(max(int(math.floor(box[1])), 0), h - 1)
    c1 = max(min(int(math.ceil(box[2])), w), c0 + 1)
    r1 = max(min(int(math.ceil(box[3])), h), r0 + 1)
    return r0, r1, c0, c1


def _core(r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int]:
    """The middle BOX_CORE of a box in each axis (at least its central pixel)."""

    def middle(a: int, b: int) -> tuple[int, int]:
        cut = (b - a) * (1 - BOX_CORE) / 2
        lo, hi = int(math.floor(a + cut)), int(math.ceil(b - cut))
        if hi <= lo:
            lo = (a + b - 1) // 2
            hi = lo + 1
        return lo, hi

    return (*middle(r0, r1), *middle(c0, c1))


def boxes_by_area(boxes: np.ndarray, ids: np.ndarray, shape: tuple[int, int]) -> list[tuple[int, int, int, int, int]]:
    """Boxes whose class is one of ``ids`` -> (r0, r1, c0, c1, class index), largest first (paint in
    this order and smaller boxes win)."""
    out = []
    index, is_class = class_index(np.asarray(boxes[:, 4]).round().astype(np.int64), ids) if len(boxes) else ((), ())
    for box, k, ok in zip(boxes, index, is_class):
        if ok:
            out.append((*_box_pixels(box, shape), int(k)))
    return sorted(out, key=lambda b: -(b[1] - b[0]) * (b[3] - b[2]))


def seeds_of(
    weak: np.ndarray, boxes: np.ndarray, class_ids: tuple[int, ...], ignore_id: int, background: int | None = None
) -> Seeds:
    """The seeds, certainties and box constraints of one image (module doc)."""
    ids = np.asarray(class_ids, np.int64)
    index, is_class = class_index(weak.astype(np.int64), ids)
    known = is_class & (weak != ignore_id)
    seeds = np.where(known, index, -1).astype(np.intp)
    certain = known.copy()
    allowed = None
    boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
    if len(boxes) or background is not None:
        ordered = boxes_by_area(boxes, ids, weak.shape)
        allowed = np.zeros((len(ids), *weak.shape), bool)
        for r0, r1, c0, c1, k in ordered:
            allowed[k, r0:r1, c0:c1] = True
        if background is not None:
            found, ok = class_index(np.asarray([background]), ids)
            if not ok[0]:
                raise SeglabError(f"background class {background} is not one of the classes {list(class_ids)}")
            allowed[int(found[0])] = True
        allowed[seeds[known], *np.nonzero(known)] = True  # weak pixels may take their class
        count = allowed.sum(0)
        single = (count == 1) & ~known
        seeds[single] = np.argmax(allowed, 0)[single]
        certain |= single
        for r0, r1, c0, c1, k in ordered:  # smaller boxes last: nested objects keep their core
            a, b, c, d = _core(r0, r1, c0, c1)
            core = seeds[a:b, c:d]
            core[~known[a:b, c:d]] = k
    return Seeds(ids, seeds, known, certain, allowed, ignore_id, weak.dtype)


def to_labels(index: np.ndarray, s: Seeds) -> np.ndarray:
    """HxW class index (-1: none) -> HxW class ids in the weak label's dtype; weak pixels keep
    their class, pixels where no class is allowed take none."""
    index = np.asarray(index, np.intp).copy()
    if s.allowed is not None:
        index[~s.allowed.any(0)] = -1
    index[s.known] = s.seeds[s.known]
    out = np.full(s.shape, s.ignore_id, np.int64)
    out[index >= 0] = s.ids[index[index >= 0]]
    return out.astype(s.dtype)


def constrained_nearest(s: Seeds, seeds: np.ndarray | None = None) -> np.ndarray:
    """HxW class index of the nearest seed of a class allowed at the pixel (-1 where none is, or
    there are no seeds). ``seeds``: other seeds than ``s.seeds``, same convention."""
    seeds = s.seeds if seeds is None else seeds
    if (seeds < 0).all():
        return np.full(s.shape, -1, np.intp)
    near = nearest_label(seeds, -1).astype(np.intp)
    if s.allowed is None:
        return near
    rows, cols = np.indices(s.shape)
    ok = s.allowed[near, rows, cols]
    if ok.all():
        return near
    best = np.full(s.shape, np.inf)
    choice = np.full(s.shape, -1, np.intp)
    for k in np.unique(seeds[seeds >= 0]):
        dist = distance_transform_edt(seeds != k)
        better = s.allowed[k] & (dist < best)
        best[better], choice[better] = dist[better], k
    return np.where(ok, near, choice)


def decide(prob: np.ndarray, s: Seeds) -> np.ndarray:
    """float [C, H, W] class probabilities -> HxW class index: the most probable allowed class
    (the nearest allowed seed's where every allowed class has probability 0)."""
    if s.allowed is None:
        return np.argmax(prob, 0)
    masked = np.where(s.allowed, prob, 0)
    index = np.argmax(masked, 0)
    empty = masked.max(0) <= 0
    if empty.any():
        index[empty] = constrained_nearest(s)[empty]
    return index


def _one_class(s: Seeds) -> np.ndarray | None:
    """The labels when at most one class is seeded (nothing to segment), else None."""
    present = np.unique(s.seeds[s.seeds >= 0])
    if len(present) == 0:
        return np.full(s.shape, s.ignore_id, s.dtype)
    if len(present) == 1:
        index = np.full(s.shape, int(present[0]), np.intp)
        if s.allowed is not None:  # where that class may not be, nothing seeded may be
            index[~s.allowed[int(present[0])]] = -1
        return to_labels(index, s)
    return None


# -- image helpers --------------------------------------------------------------------------------


def standard_lab(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float64 CIE-Lab, channel means removed, divided by its overall std."""
    lab = rgb2lab(image)
    lab -= lab.reshape(-1, 3).mean(0)
    std = float(lab.std())
    return lab / std if std > 1e-9 else lab


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """HxWxK -> ceil(H/f)xceil(W/f)xK means over f x f cells (edge-padded)."""
    if factor == 1:
        return values
    h, w = values.shape[:2]
    ph, pw = -h % factor, -w % factor
    padded = np.pad(values, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return padded.reshape((h + ph) // factor, factor, (w + pw) // factor, factor, -1).mean((1, 3))


def block_seeds(seeds: np.ndarray, factor: int, classes: int) -> np.ndarray:
    """HxW seed index (-1: none) -> the cells' seeds: the class most of a cell's seeded pixels hold
    (a thin scribble keeps every cell it crosses)."""
    if factor == 1:
        return seeds
    h, w = seeds.shape
    sh, sw = -(-h // factor), -(-w // factor)
    rows, cols = np.nonzero(seeds >= 0)
    cell = (rows // factor) * sw + cols // factor
    counts = np.bincount(cell * classes + seeds[rows, cols], minlength=sh * sw * classes).reshape(sh * sw, classes)
    out = np.where(counts.any(1), np.argmax(counts, 1), -1)
    return out.reshape(sh, sw).astype(np.intp)


def _bilinear(size: int, small: int, factor: int) -> np.ndarray:
    """float32 [size, small]: bilinear weights from cell centres to pixel centres along one axis."""
    u = np.clip((np.arange(size) + 0.5) / factor - 0.5, 0, small - 1)
    lo = np.floor(u).astype(np.intp)
    hi = np.minimum(lo + 1, small - 1)
    frac = (u - lo).astype(np.float32)
    matrix = np.zeros((size, small), np.float32)
    np.add.at(matrix, (np.arange(size), lo), 1 - frac)
    np.add.at(matrix, (np.arange(size), hi), frac)
    return matrix


def upsample(prob: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """float [C, h, w] on the cells -> float32 [C, H, W], bilinear between cell centres."""
    if factor == 1:
        return prob.astype(np.float32, copy=False)
    rows = _bilinear(shape[0], prob.shape[1], factor)
    cols = _bilinear(shape[1], prob.shape[2], factor)
    return np.matmul(np.matmul(rows, prob.astype(np.float32)), cols.T)


# -- the baselines --------------------------------------------------------------------------------


def nearest(
    image: np.ndarray,
    weak: np.ndarray,
    boxes: np.ndarray,
    class_ids: tuple[int, ...],
    ignore_id: int,
    background: int | None = None,
) -> np.ndarray:
    """The class of the nearest seed (for weak pixels alone: ``nearest_label``)."""
    s = seeds_of(weak, boxes, class_ids, ignore_id, background)
    return to_labels(constrained_nearest(s), s)


def random_walker(
    image: np.ndarray,
    weak: np.ndarray,
    boxes: np.ndarray,
    class_ids: tuple[int, ...],
    ignore_id: int,
    background: int | None = None,
    *,
    factor: int = RW_FACTOR,
    beta: float = RW_BETA,
    mode: str = RW_MODE,
) -> np.ndarray:
    """scikit-image's multi-label random walker (Grady 2006) seeded with the seeds, on the image
    box-averaged by ``factor`` (RW_FACTOR), per-class probabilities upsampled bilinearly."""
    s = seeds_of(weak, boxes, class_ids, ignore_id, background)
    trivial = _one_class(s)
    if trivial is not None:
        return trivial
    data = block_mean(standard_lab(image), factor)
    small = block_seeds(s.seeds, factor, s.classes)
    present = np.unique(small[small >= 0])
    prob = np.zeros((s.classes, *small.shape), np.float64)
    if (small >= 0).all() or len(present) < 2 or float(data.std()) <= 1e-9:
        # every cell seeded, one class left or a flat image: no walk to make
        prob[nearest_label(small, -1), *np.indices(small.shape)] = 1.0
    else:
        markers = np.where(small >= 0, np.searchsorted(present, small) + 1, 0).astype(np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # probability-range and convergence notes
            walked = skimage_random_walker(data, markers, beta=beta, mode=mode, return_full_prob=True, channel_axis=-1)
        prob[present] = walked
    return to_labels(decide(upsample(prob, factor, s.shape), s), s)


def superpixels(image: np.ndarray, area: float, compactness: float) -> np.ndarray:
    """HxW int labels 0..n-1 of SLIC superpixels of about ``area`` pixels (Lab, connectivity enforced)."""
    h, w = image.shape[:2]
    segments = slic(
        image, n_segments=max(1, round(h * w / area)), compactness=compactness, start_label=0, channel_axis=-1
    )
    return np.unique(segments, return_inverse=True)[1].reshape(h, w)


def superpixel_walker(
    image: np.ndarray,
    weak: np.ndarray,
    boxes: np.ndarray,
    class_ids: tuple[int, ...],
    ignore_id: int,
    background: int | None = None,
    *,
    area: float = SP_AREA,
    compactness: float = SP_COMPACTNESS,
    beta: float = SP_BETA,
    segments: np.ndarray | None = None,
) -> np.ndarray:
    """Grady's multi-label random walker on the region adjacency graph of SLIC superpixels: edge
    weight exp(-beta dLab^2 / mean dLab^2) between neighbours' mean Lab colours; a superpixel holding
    seeds is a seed of their majority class; one factorisation, one solve per class.
    ``segments``: precomputed ``superpixels`` (for tuning)."""
    s = seeds_of(weak, boxes, class_ids, ignore_id, background)
    trivial = _one_class(s)
    if trivial is not None:
        return trivial
    sp = superpixels(image, area, compactness) if segments is None else segments
    n = int(sp.max()) + 1
    flat = sp.ravel()
    size = np.bincount(flat, minlength=n).astype(np.float64)
    lab = rgb2lab(image).reshape(-1, 3)
    colour = np.stack([np.bincount(flat, lab[:, c], n) for c in range(3)], 1) / np.maximum(size, 1)[:, None]
    a = np.r_[sp[:, :-1].ravel(), sp[:-1, :].ravel()]
    b = np.r_[sp[:, 1:].ravel(), sp[1:, :].ravel()]
    cut = a != b
    pairs = np.unique(np.minimum(a[cut], b[cut]).astype(np.int64) * n + np.maximum(a[cut], b[cut]))
    ia, ib = pairs // n, pairs % n
    d2 = ((colour[ia] - colour[ib]) ** 2).sum(1)
    weight = np.exp(-beta * d2 / (d2.mean() + 1e-12)) + 1e-6
    adjacency = sparse.csr_matrix((np.r_[weight, weight], (np.r_[ia, ib], np.r_[ib, ia])), shape=(n, n))
    laplacian = (sparse.diags(np.asarray(adjacency.sum(1)).ravel()) - adjacency).tocsr()
    rows, cols = np.nonzero(s.seeds >= 0)
    counts = np.bincount(sp[rows, cols] * s.classes + s.seeds[rows, cols], minlength=n * s.classes).reshape(
        n, s.classes
    )
    seeded = counts.any(1)
    prob = np.zeros((n, s.classes))
    prob[np.flatnonzero(seeded), np.argmax(counts[seeded], 1)] = 1.0
    free = np.flatnonzero(~seeded)
    if free.size:
        fixed = np.flatnonzero(seeded)
        rhs = -(laplacian[free][:, fixed] @ prob[fixed])
        prob[free] = splu(laplacian[free][:, free].tocsc()).solve(np.ascontiguousarray(rhs))
    return to_labels(decide(np.moveaxis(prob[sp], -1, 0), s), s)


def dense_crf(
    image: np.ndarray,
    weak: np.ndarray,
    boxes: np.ndarray,
    class_ids: tuple[int, ...],
    ignore_id: int,
    background: int | None = None,
    *,
    label_prob: float | None = None,
    bilateral: tuple[float, float, float] | None = None,
    iterations: int | None = None,
) -> np.ndarray:
    """A fully connected CRF (Kraehenbuehl & Koltun 2011, pydensecrf) over the nearest fill: unary
    from its labels (CRF_LABEL_PROB; CRF_WEAK_PROB where the class is certain), Gaussian and
    bilateral pairwise terms, mean-field inference; box constraints on the result."""
    dcrf = _optional("pydensecrf.densecrf", "dense_crf")
    utils = _optional("pydensecrf.utils", "dense_crf")
    label_prob = CRF_LABEL_PROB if label_prob is None else label_prob
    sxy, srgb, compat = CRF_BILATERAL if bilateral is None else bilateral
    iterations = CRF_ITERATIONS if iterations is None else iterations
    s = seeds_of(weak, boxes, class_ids, ignore_id, background)
    trivial = _one_class(s)
    if trivial is not None:
        return trivial
    fill = constrained_nearest(s)
    if (fill < 0).all():
        return np.full(s.shape, s.ignore_id, s.dtype)
    h, w = s.shape
    labels = np.maximum(fill, 0)
    unary = np.where(
        s.certain.ravel()[None],
        utils.unary_from_labels(labels, s.classes, CRF_WEAK_PROB, zero_unsure=False),
        utils.unary_from_labels(labels, s.classes, label_prob, zero_unsure=False),
    )
    unary[:, (fill < 0).ravel()] = math.log(s.classes)  # nothing known: uniform (ignore in the output)
    crf = dcrf.DenseCRF2D(w, h, s.classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    crf.addPairwiseGaussian(sxy=CRF_GAUSSIAN[0], compat=CRF_GAUSSIAN[1])
    crf.addPairwiseBilateral(
        sxy=sxy, srgb=srgb, rgbim=np.array(image, np.uint8, order="C"), compat=compat
    )  # a writable copy
    q = np.asarray(crf.inference(iterations), np.float32).reshape(s.classes, h, w)
    return to_labels(np.where(fill >= 0, decide(q, s), -1), s)


def grabcut(
    image: np.ndarray,
    weak: np.ndarray,
    boxes: np.ndarray,
    class_ids: tuple[int, ...],
    ignore_id: int,
    background: int | None = None,
    *,
    iterations: int | None = None,
) -> np.ndarray:
    """OpenCV's GrabCut (``GC_INIT_WITH_RECT``) per box, its foreground painted with the box's class,
    smaller boxes last; pixels no box claims take ``background``, or without one the class of the
    nearest painted pixel allowed there. Boxes under GC_MIN_SIDE pixels a side, or filling their
    whole crop, are painted whole."""
    cv2 = _optional("cv2", "grabcut")
    iterations = GC_ITERATIONS if iterations is None else iterations
    s = seeds_of(weak, boxes, class_ids, ignore_id, background)
    h, w = s.shape
    bgr = np.ascontiguousarray(image[..., ::-1], np.uint8)
    painted = np.full(s.shape, -1, np.intp)
    for r0, r1, c0, c1, k in boxes_by_area(np.asarray(boxes, np.float32).reshape(-1, 5), s.ids, s.shape):
        fg = None
        if r1 - r0 >= GC_MIN_SIDE and c1 - c0 >= GC_MIN_SIDE:
            mr, mc = max(8, round(GC_MARGIN * (r1 - r0))), max(8, round(GC_MARGIN * (c1 - c0)))
            R0, R1, C0, C1 = max(0, r0 - mr), min(h, r1 + mr), max(0, c0 - mc), min(w, c1 + mc)
            if (R0, R1, C0, C1) != (r0, r1, c0, c1):  # some background outside the box to learn from
                mask = np.zeros((R1 - R0, C1 - C0), np.uint8)
                models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
                cv2.setRNGSeed(0)
                try:
                    cv2.grabCut(
                        np.ascontiguousarray(bgr[R0:R1, C0:C1]),
                        mask,
                        (c0 - C0, r0 - R0, c1 - c0, r1 - r0),
                        *models,
                        iterations,
                        cv2.GC_INIT_WITH_RECT,
                    )
                    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
                except cv2.error:
                    fg = None
                if fg is not None:
                    painted[R0:R1, C0:C1][fg] = k
                    continue
        painted[r0:r1, c0:c1] = k
    painted[s.known] = s.seeds[s.known]
    if background is not None:
        bg = int(class_index(np.asarray([background]), s.ids)[0][0])
        return to_labels(np.where(painted >= 0, painted, bg), s)
    if s.allowed is None:
        return to_labels(constrained_nearest(s), s)
    return to_labels(np.where(painted >= 0, painted, constrained_nearest(s, painted)), s)


Baseline = Callable[..., np.ndarray]
BASELINES: dict[str, Baseline] = {
    "nearest": nearest,
    "random_walker": random_walker,
    "superpixel_walker": superpixel_walker,
    "dense_crf": dense_crf,
    "grabcut": grabcut,
}
"""Every baseline by name, in the order results are shown."""
BOXES_ONLY = frozenset({"grabcut"})


def baselines_for(kind: str) -> tuple[str, ...]:
    """The baselines that apply to a weak-label kind (GrabCut needs boxes)."""
    return tuple(name for name in BASELINES if kind == "boxes" or name not in BOXES_ONLY)
