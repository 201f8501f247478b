"""Weight-free promptable backend: superpixel random walker with colour priors.

A stand-in for SAM built from scikit-image and scipy, so the pipeline runs (and produces
real masks on real photographs) where no checkpoint exists. Same interface as SAM:
``encode`` once per image (cached), ``decode`` many prompt sets from the cache.

Algorithm ("multiscale superpixel random walker with GrabCut-style colour priors"):

1. ``encode``: resize so the long side is ``input_size`` (SAM's frame: the image sits top-left
   on a square canvas; an image over 8 x ``input_size`` is first box-reduced by an integer
   factor, so encoding needs constant memory beyond the image itself); cache CIE-Lab colour, a
   normalised colour-gradient magnitude and SLIC superpixel maps (two fine ones of different
   counts, a medium and a coarse one) over the resized image only: the canvas's padding holds
   nothing to cache (a quarter of a 4:3 image's canvas, half of a 2:1 one's).
2. ``decode`` builds the region-adjacency graph of each fine map (edge weight
   ``exp(-beta * dLab^2 / mean dLab^2 - edge_beta * border gradient) * sqrt(border length)``);
   points seed their regions, the outside of a box seeds background, and without any
   negative evidence the regions geodesically farthest from the positives do.
3. Grady's random walker with priors, ``(L + g A) x = g A prior``, alternates with a
   kernel-density Lab colour model refitted from the current segmentation (GrabCut-style
   hard EM); the fine maps' probabilities are averaged per pixel.
4. Candidates (part / object / larger region) threshold the probability tightly, normally
   and loosely, keep the connected parts holding a positive point (the larger region also
   fills holes) and are blended with their mean over the pixel's superpixel at scale
   fine / medium / coarse. Logit 0 is the boundary; the padding and the outside of a box are
   strongly negative; positive points are clamped inside, negative ones outside.
5. Quality is SAM's stability score (IoU of ``logit > +offset`` and ``logit > -offset``)
   times the mask's boundary contrast ``c / (c + 4)``, c = mean gradient on the mask border
   over the image's mean gradient.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.sparse.linalg import splu
from skimage.color import rgb2lab
from skimage.segmentation import slic
from skimage.transform import resize

from seglab.stages.parts.geometry import ImageFrame, resized_shape
from seglab.stages.parts.promptset import NEGATIVE, POSITIVE, PromptBatch
from seglab.workers.promptable import PromptableBackend

#: logit of the padding and of everything outside a prompt's box
OUTSIDE_LOGIT = -20.0
#: boundary contrast at which the contrast factor of the quality score is 1/2
CONTRAST_HALF = 4.0
#: magnitude of the logit forced onto prompt point locations (3x3 grid cells)
CLAMP_LOGIT = 10.0
#: images whose long side exceeds this many times ``input_size`` are box-reduced before encoding
PRE_REDUCE = 8


class WeightFreeConfig(BaseModel):
    """Knobs of the weight-free backend; its JSON is the features' preprocessing signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["weightfree"] = "weightfree"
    input_size: int = Field(256, ge=64, le=1024, description="long side of the resized image, in pixels")
    fine_segments: tuple[int, ...] = Field(
        (1200, 900),
        min_length=1,
        max_length=4,
        description="SLIC superpixel counts of the fine maps; one random walker per map, probabilities averaged",
    )
    snap_segments: tuple[int, int] = Field(
        (300, 80), description="SLIC superpixel counts of the maps the object / larger-region candidates snap to"
    )
    snap_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the superpixel-averaged logit in a snapped candidate"
    )
    compactness: float = Field(12.0, gt=0.0, le=100.0, description="SLIC compactness (lower follows edges more)")
    slic_iterations: int = Field(10, ge=1, le=50, description="SLIC k-means iterations per superpixel map")
    smoothing: float = Field(0.8, ge=0.0, le=5.0, description="Gaussian sigma (pixels) before Lab and gradient")
    colour_beta: float = Field(10.0, gt=0.0, le=100.0, description="graph weight exp(-beta * dLab^2 / mean dLab^2)")
    edge_beta: float = Field(0.0, ge=0.0, le=100.0, description="graph weight factor exp(-edge_beta * border gradient)")
    prior_weight: float = Field(0.003, ge=0.0, le=10.0, description="weight of the colour prior against the graph")
    box_prior_weight: float = Field(0.03, ge=0.0, le=10.0, description="colour-prior weight when a box is given")
    colour_bandwidth: float = Field(4.0, gt=0.0, le=100.0, description="Lab kernel bandwidth of the colour model")
    em_steps: int = Field(2, ge=0, le=10, description="colour-model refits after the first random-walker solve")
    far_quantile: float = Field(
        0.7,
        gt=0.0,
        lt=1.0,
        description="without negatives: geodesic-distance quantile beyond which regions are background seeds",
    )
    thresholds: tuple[float, float, float] = Field(
        (0.8, 0.7, 0.55), description="walker-probability thresholds of the part, object and larger-region candidates"
    )
    logit_scale: float = Field(20.0, gt=0.0, le=100.0, description="logit = scale * (probability - threshold)")
    stability_offset: float = Field(1.0, gt=0.0, le=10.0, description="SAM stability-score logit offset")

    @field_validator("fine_segments", "snap_segments")
    @classmethod
    def _counts(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not all(2 <= c <= 20000 for c in v):
            raise ValueError("superpixel counts must lie between 2 and 20000")
        return v

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 < t < 1.0 for t in v):
            raise ValueError("thresholds must lie strictly between 0 and 1")
        return v


class WeightFreeBackend(PromptableBackend):
    """Promptable backend without weights (the algorithm is in the module docstring)."""

    name = "weightfree"
    grid_size = 256
    num_candidates = 3

    def __init__(self, config: WeightFreeConfig | None = None):
        self.config = config or WeightFreeConfig()

    def feature_names(self) -> tuple[str, ...]:
        return ("lab", "edges", "superpixels", "frame")

    def signature(self) -> dict[str, str]:
        return {
            "model": "weightfree",
            "checkpoint": "none",
            "preprocessing": json.dumps(self.config.model_dump(mode="json"), sort_keys=True, separators=(",", ":")),
        }

    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per image, over its resized pixels (H x W = ``ImageFrame.resized_hw``, the long side
        ``input_size``): ``lab`` float16 [3, H, W] (L, a, b channels), ``edges`` float16 [H, W]
        (Lab Sobel magnitude over its 90th percentile), ``superpixels`` int16 [F + 2, H, W]
        (SLIC labels 0..n-1 of the F = len(fine_segments) fine maps, then the medium and the
        coarse map), ``frame`` int64 [5] (``ImageFrame.to_array``). ``decode`` also reads
        features padded to the N x N canvas, as an earlier seglab cached them."""
        return [self._encode_one(np.asarray(im)) for im in images]

    def _encode_one(self, image: np.ndarray) -> dict[str, np.ndarray]:
        cfg, n = self.config, self.config.input_size
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        h, w = image.shape[:2]
        rh, rw = resized_shape(h, w, n)
        small = (
            resize(_box_reduced(image, n), (rh, rw), order=1, anti_aliasing=True, preserve_range=True).astype(
                np.float32
            )
            / 255.0
        )
        if cfg.smoothing > 0:
            small = ndimage.gaussian_filter(small, (cfg.smoothing, cfg.smoothing, 0))
        small = np.clip(small, 0.0, 1.0)
        lab = rgb2lab(small).astype(np.float32)
        grad = np.sqrt(sum(ndimage.sobel(lab[..., c], a) ** 2 for c in range(3) for a in (0, 1)))
        grad /= max(float(np.percentile(grad, 90)), 1e-6)
        counts = (*cfg.fine_segments, *cfg.snap_segments)
        labels = np.empty((len(counts), rh, rw), dtype=np.int16)  # counts are at most 20000: half the bytes of int32
        for k, count in enumerate(counts):
            segments = slic(
                small,
                n_segments=count,
                compactness=cfg.compactness,
                max_num_iter=cfg.slic_iterations,
                start_label=0,
                enforce_connectivity=True,
                channel_axis=-1,
            )
            labels[k] = np.unique(segments, return_inverse=True)[1].reshape(rh, rw)  # 0..n-1, no gaps
        return {
            "lab": np.ascontiguousarray(lab.transpose(2, 0, 1), np.float16),
            "edges": np.minimum(grad, 60000.0).astype(np.float16),
            "superpixels": labels,
            "frame": ImageFrame((h, w), n, self.grid_size).to_array(),
        }

    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        """-> (logits float32 [P, 3, S, S], quality float32 [P, 3] in [0, 1]), S = 256; the
        candidate axis is (part, object, larger region). Reads only the cached features."""
        s, m, p = self.grid_size, self.num_candidates, len(prompts)
        if p == 0:
            return np.zeros((0, m, s, s), np.float32), np.zeros((0, m), np.float32)
        graph = _RegionGraph(features, self.config, s)
        logits = np.empty((p, m, s, s), np.float32)
        quality = np.empty((p, m), np.float32)
        for i in range(p):
            logits[i], quality[i] = graph.predict(prompts.coords[i], prompts.labels[i], prompts.boxes[i])
        return logits, quality


def _box_reduced(image: np.ndarray, input_size: int) -> np.ndarray:
    """HxWx3 uint8 -> the same image, first shrunk by an integer factor k (block means over
    k x k pixels, in Pillow's uint8 arithmetic) when its long side exceeds
    ``PRE_REDUCE * input_size``, so that the float resize after it sees at most about
    (PRE_REDUCE * input_size)^2 pixels whatever the image's size. Smaller images (every
    image up to 2048 pixels at the default input size) are returned as they are."""
    k = math.ceil(max(image.shape[:2]) / (PRE_REDUCE * input_size))
    if k <= 1:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(k))


class _Walker:
    """Random walker on the region-adjacency graph of one fine superpixel map [rh, rw]."""

    def __init__(self, fine: np.ndarray, lab: np.ndarray, edges: np.ndarray, cfg: WeightFreeConfig):
        """fine int32 [rh, rw] labels 0..n-1; lab float32 [3, rh, rw]; edges float32 [rh, rw]."""
        self.cfg, self.fine = cfg, fine
        n = self.n = int(fine.max()) + 1
        self.area = np.bincount(fine.ravel(), minlength=n).astype(np.float64)
        colour = np.stack([np.bincount(fine.ravel(), c.ravel(), n) for c in lab], 1) / self.area[:, None]
        # region adjacency from 4-neighbour pixel pairs that cross a superpixel border
        a = np.r_[fine[:, :-1].ravel(), fine[:-1, :].ravel()]
        b = np.r_[fine[:, 1:].ravel(), fine[1:, :].ravel()]
        e = np.r_[np.maximum(edges[:, :-1], edges[:, 1:]).ravel(), np.maximum(edges[:-1, :], edges[1:, :]).ravel()]
        cut = a != b
        key = np.minimum(a[cut], b[cut]).astype(np.int64) * n + np.maximum(a[cut], b[cut])
        pairs, inverse, length = np.unique(key, return_inverse=True, return_counts=True)
        border = np.bincount(inverse, e[cut]) / length
        ia, ib = pairs // n, pairs % n
        d2 = ((colour[ia] - colour[ib]) ** 2).sum(1)
        d2 /= d2.mean() + 1e-9
        weight = np.exp(-cfg.colour_beta * d2 - cfg.edge_beta * border) * np.sqrt(length) + 1e-6
        sym = (np.r_[ia, ib], np.r_[ib, ia])
        w = sparse.csr_matrix((np.r_[weight, weight], sym), shape=(n, n))
        self.laplacian = (sparse.diags(np.asarray(w.sum(1)).ravel()) - w).tocsr()
        cost = np.sqrt(d2) + border + 0.1
        self.geodesic = sparse.csr_matrix((np.r_[cost, cost], sym), shape=(n, n))
        self.colour = colour  # float64 [n, 3] mean Lab per region
        # colour model on the image's palette, set by _RegionGraph: kernel float64 [U, U]
        # between palette colours, and the palette entry of each region intp [n]
        self.kernel, self.palette_index = np.ones((1, 1)), np.zeros(n, np.intp)

    def solve(self, pos: tuple, neg: tuple, inside: np.ndarray | None) -> np.ndarray:
        """Seeds from (rows, cols) of positive / negative points on the canvas and an optional
        box mask bool [rh, rw] -> foreground probability float64 [n] per region."""
        cfg = self.cfg
        fg = np.zeros(self.n, bool)
        fg[self.fine[pos]] = True
        bg = np.zeros(self.n, bool)
        bg[self.fine[neg]] = True
        if inside is not None:
            bg |= np.bincount(self.fine.ravel(), inside.ravel(), self.n) < 0.5 * self.area
        bg &= ~fg
        if not bg.any() and fg.any():
            far = csgraph.dijkstra(self.geodesic, indices=np.flatnonzero(fg), min_only=True)
            bg = far > np.quantile(far, cfg.far_quantile)
        seeded = fg | bg
        free = np.flatnonzero(~seeded)
        x = fg.astype(np.float64)
        if free.size == 0:
            return x
        weight = cfg.prior_weight if inside is None else cfg.box_prior_weight
        gamma = weight * self.area / self.area.mean() + 1e-9
        solver = splu((self.laplacian[free][:, free] + sparse.diags(gamma[free])).tocsc(), permc_spec="MMD_AT_PLUS_A")
        base = -(self.laplacian[free][:, np.flatnonzero(seeded)] @ x[seeded])
        label, other = (fg, bg) if inside is None else (~bg, bg)  # GrabCut: a box starts as foreground
        cells, size = self.palette_index, len(self.kernel)
        for _ in range(cfg.em_steps + 1):
            # kernel density of the foreground / background colours, on the palette (no BLAS:
            # threaded BLAS on small products stalls when the cores are shared)
            pf = np.einsum("ij,j->i", self.kernel, np.bincount(cells, self.area * label, size))
            pb = np.einsum("ij,j->i", self.kernel, np.bincount(cells, self.area * other, size))
            pf /= max(float(self.area @ label), 1e-9)
            pb /= max(float(self.area @ other), 1e-9)
            prior = (pf / (pf + pb + 1e-12))[cells]
            x[free] = solver.solve(base + gamma[free] * prior[free])
            label = (x > 0.5) & ~bg
            other = ~label
        return np.clip(x, 0.0, 1.0)


class _RegionGraph:
    """Decode-time state of one image, derived from its cached features and shared by prompts."""

    def __init__(self, features: Mapping[str, np.ndarray], cfg: WeightFreeConfig, grid_size: int):
        self.cfg, self.grid_size = cfg, grid_size
        self.frame = ImageFrame.from_array(features["frame"])
        self.rh, self.rw = self.frame.resized_hw
        image = (slice(0, self.rh), slice(0, self.rw))  # features of an earlier seglab are padded to the canvas
        sp = np.asarray(features["superpixels"], np.int32)[(slice(None), *image)]  # int16 stored, int32 indexes
        lab = np.asarray(features["lab"], np.float32)[(slice(None), *image)]
        n = self.frame.input_size
        edges = np.zeros((n, n), np.float32)  # the canvas: 0 in the padding
        edges[image] = np.asarray(features["edges"], np.float32)[image]
        nf = len(cfg.fine_segments)
        self.walkers = [_Walker(np.ascontiguousarray(sp[k]), lab, edges[image], cfg) for k in range(nf)]
        # shared colour palette: superpixel colours binned at half the kernel bandwidth
        colours = np.concatenate([w.colour for w in self.walkers])
        bins = np.floor(colours / (0.5 * cfg.colour_bandwidth)).astype(np.int64)
        _, index = np.unique(bins, axis=0, return_inverse=True)
        index = index.reshape(-1)
        counts = np.bincount(index).astype(np.float64)
        centres = np.stack([np.bincount(index, c) for c in colours.T], 1) / counts[:, None]
        kernel = np.exp(-((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1) / (2.0 * cfg.colour_bandwidth**2))
        kernel[kernel < 1e-12] = 0.0
        start = 0
        for w in self.walkers:
            w.kernel, w.palette_index = kernel, index[start : start + w.n]
            start += w.n
        self.snap = [np.ascontiguousarray(sp[k]) for k in range(nf, sp.shape[0])]
        self.snap_counts = [np.bincount(lb.ravel()).astype(np.float64) for lb in self.snap]
        if cfg.input_size == grid_size:
            self.grid_edges = edges
        else:
            self.grid_edges = resize(edges, (grid_size, grid_size), order=1, anti_aliasing=True)
        gh, gw = self.frame.grid_hw
        self.edge_mean = float(self.grid_edges[:gh, :gw].mean()) + 1e-6

    def _cells(self, xy: np.ndarray, size: tuple[int, int], to_grid: bool) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) intp of original-pixel points (x, y) on the canvas or on the grid."""
        xy = self.frame.scale_to_grid(xy) if to_grid else self.frame.scale_to_input(xy)
        rows = np.clip(np.floor(xy[:, 1]), 0, size[0] - 1).astype(np.intp)
        cols = np.clip(np.floor(xy[:, 0]), 0, size[1] - 1).astype(np.intp)
        return rows, cols

    def predict(self, coords: np.ndarray, labels: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One prompt -> (logits float32 [3, S, S], quality float32 [3])."""
        cfg, s, hw = self.cfg, self.grid_size, (self.rh, self.rw)
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        labels = np.asarray(labels).reshape(-1)
        pos_xy, neg_xy = coords[labels == POSITIVE], coords[labels == NEGATIVE]
        pos, neg = self._cells(pos_xy, hw, False), self._cells(neg_xy, hw, False)
        box = np.asarray(box, np.float64).reshape(-1)
        inside = None
        if box.size == 4 and not np.isnan(box).any():
            (x0, y0), (x1, y1) = self.frame.scale_to_input(box.reshape(2, 2))
            inside = np.zeros(hw, bool)
            inside[
                max(0, int(np.floor(min(y0, y1)))) : int(np.ceil(max(y0, y1))) + 1,
                max(0, int(np.floor(min(x0, x1)))) : int(np.ceil(max(x0, x1))) + 1,
            ] = True
        prob = sum(w.solve(pos, neg, inside)[w.fine] for w in self.walkers) / len(self.walkers)
        out = np.full((3, cfg.input_size, cfg.input_size), OUTSIDE_LOGIT, np.float32)
        for k, t in enumerate(cfg.thresholds):
            mask = prob > t
            if len(pos[0]):
                comp, _ = ndimage.label(mask)
                mask = np.isin(comp, comp[pos][comp[pos] > 0])
            if k == 2:
                holes, _ = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
                mask |= (holes > 0) & ~np.isin(holes, holes[neg])
            pixel = cfg.logit_scale * np.where(mask, np.maximum(prob - t, 0.05), np.minimum(prob - t, -0.05))
            if k > 0 and cfg.snap_weight > 0:
                pixel = (1 - cfg.snap_weight) * pixel + cfg.snap_weight * self._average(k - 1, pixel)
            if inside is not None:
                pixel[~inside] = OUTSIDE_LOGIT
            out[k, : self.rh, : self.rw] = pixel
        gh, gw = self.frame.grid_hw
        if cfg.input_size != s:
            out = resize(out, (3, s, s), order=1, mode="edge", anti_aliasing=False).astype(np.float32)
            out[:, gh:, :] = OUTSIDE_LOGIT
            out[:, :, gw:] = OUTSIDE_LOGIT
        for pts, value, op in ((neg_xy, -CLAMP_LOGIT, np.minimum), (pos_xy, CLAMP_LOGIT, np.maximum)):
            rows, cols = self._cells(pts, (gh, gw), True)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = np.clip(rows + dr, 0, gh - 1), np.clip(cols + dc, 0, gw - 1)
                    out[:, r, c] = op(out[:, r, c], value)
        quality = np.array([self._quality(o[:gh, :gw]) for o in out], np.float32)
        return out, quality

    def _average(self, k: int, pixel: np.ndarray) -> np.ndarray:
        """Mean of ``pixel`` float32 [rh, rw] over each snapping superpixel of scale ``k``, painted back."""
        lb = self.snap[k]
        sums = np.bincount(lb.ravel(), pixel.ravel(), len(self.snap_counts[k]))
        return (sums / np.maximum(self.snap_counts[k], 1))[lb]

    def _quality(self, logit: np.ndarray) -> float:
        """Stability score x boundary contrast of a cropped grid logit map [gh, gw], in [0, 1]."""
        off = self.cfg.stability_offset
        stable = float((logit > off).sum()) / max(float((logit > -off).sum()), 1.0)
        mask = logit > 0
        if not mask.any() or mask.all():
            return 0.0
        edge = mask ^ ndimage.binary_erosion(mask)
        contrast = float(self.grid_edges[: logit.shape[0], : logit.shape[1]][edge].mean()) / self.edge_mean
        return stable * contrast / (contrast + CONTRAST_HALF)
