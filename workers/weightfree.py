"""Weight-free promptable backend: superpixel random walker with colour priors.

A stand-in for SAM built from scikit-image and scipy, so the pipeline runs (and produces
real masks on real photographs) where no checkpoint exists.

Algorithm ("multiscale superpixel random walker with GrabCut-style colour priors"):

* ``encode`` resizes the image so its long side is ``input_size`` (SAM's frame, padded
  bottom/right to a square canvas) and caches CIE-Lab colour, a normalised colour-gradient
  magnitude and SLIC superpixels at three granularities (fine, medium, coarse).
* ``decode`` builds the region-adjacency graph of the fine superpixels (edge weight falls
  with Lab difference and with the gradient along the shared border), turns points into
  seed regions (box exterior = background seeds) and solves Grady's random walker with
  priors, ``(L + g*A) x = g*A*prior``, alternating with a kernel-density colour model
  refitted from the soft solution (a few EM steps, as in GrabCut). Without any negative
  evidence, background seeds come from the geodesic distance to the positive seeds.
* The three candidates (part / object / larger region) are the fine solution averaged over
  the superpixels of scale 0, 1, 2 with a bias from tight to loose; logit 0 is the
  boundary, the padding and the outside of a box are strongly negative, positive points are
  clamped inside and negative points outside every candidate.
* Quality is SAM's stability score (IoU between ``logit > +offset`` and ``logit > -offset``)
  times the boundary contrast of the mask (gradient on its border vs. inside it).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.sparse.linalg import spsolve
from skimage.color import rgb2lab
from skimage.segmentation import slic
from skimage.transform import resize

from seglab.stages.geometry import ImageFrame, resized_shape
from seglab.stages.promptset import NEGATIVE, POSITIVE, PromptBatch
from seglab.workers.backend import PromptableBackend

#: logit given to the padding and to everything outside a prompt's box
OUTSIDE_LOGIT = -20.0
#: magnitude of the logit forced onto prompt point locations
CLAMP_LOGIT = 8.0


class WeightFreeConfig(BaseModel):
    """Knobs of the weight-free backend; its JSON is the features' preprocessing signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["weightfree"] = "weightfree"
    input_size: int = Field(256, ge=64, le=1024, description="long side of the resized image, in pixels")
    segments: tuple[int, int, int] = Field(
        (1200, 300, 80), description="SLIC superpixel counts for the fine, medium and coarse scales (decreasing)"
    )
    compactness: float = Field(8.0, gt=0.0, le=100.0, description="SLIC compactness (lower follows edges more closely)")
    smoothing: float = Field(0.8, ge=0.0, le=5.0, description="Gaussian sigma (pixels) applied before Lab/gradient")
    colour_beta: float = Field(4.0, gt=0.0, le=100.0, description="edge weight exp(-beta * dLab^2 / mean dLab^2)")
    edge_beta: float = Field(2.0, ge=0.0, le=100.0, description="edge weight exp(-edge_beta * border gradient)")
    prior_weight: float = Field(0.001, ge=0.0, le=10.0, description="weight of the colour prior against the graph")
    colour_bandwidth: float = Field(8.0, gt=0.0, le=100.0, description="Lab kernel bandwidth of the colour model")
    em_steps: int = Field(2, ge=0, le=10, description="colour-model refits after the first random-walker solve")
    logit_scale: float = Field(6.0, gt=0.0, le=50.0, description="logit = scale * log-odds-like score")
    candidate_bias: float = Field(0.3, ge=0.0, le=10.0, description="logit bias: -b part, 0 object, +b larger region")
    far_quantile: float = Field(0.8, gt=0.5, le=1.0, description="with negatives, superpixels geodesically "
                                "farther from the positives than this quantile also seed the background (1 = off)")
    stability_offset: float = Field(1.0, gt=0.0, le=10.0, description="SAM stability-score logit offset")

    @field_validator("segments")
    @classmethod
    def _decreasing(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not (v[0] > v[1] > v[2] >= 2) or v[0] > 20000:
            raise ValueError("segments must be strictly decreasing, between 2 and 20000")
        return v


class WeightFreeBackend(PromptableBackend):
    """Promptable backend without weights (see module docstring for the algorithm)."""

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

    # ------------------------------------------------------------------ encode
    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per image: ``lab`` float16 [3, N, N] (L, a, b), ``edges`` float16 [N, N] (gradient
        magnitude / its 90th percentile), ``superpixels`` int32 [3, N, N] (fine, medium, coarse;
        -1 in the padding), ``frame`` int64 [4]. N = ``input_size``; real pixels sit top-left."""
        return [self._encode_one(np.asarray(im)) for im in images]

    def _encode_one(self, image: np.ndarray) -> dict[str, np.ndarray]:
        cfg, n = self.config, self.config.input_size
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        h, w = image.shape[:2]
        rh, rw = resized_shape(h, w, n)
        small = resize(image, (rh, rw), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32) / 255.0
        if cfg.smoothing > 0:
            small = ndimage.gaussian_filter(small, (cfg.smoothing, cfg.smoothing, 0))
        lab = rgb2lab(np.clip(small, 0.0, 1.0)).astype(np.float32)
        grad = np.sqrt(sum(ndimage.sobel(lab[..., c], a) ** 2 for c in range(3) for a in (0, 1)))
        grad /= max(float(np.percentile(grad, 90)), 1e-6)
        labels = np.full((3, n, n), -1, dtype=np.int32)
        for s, count in enumerate(cfg.segments):
            labels[s, :rh, :rw] = slic(
                small, n_segments=count, compactness=cfg.compactness, start_label=0, convert2lab=True,
                enforce_connectivity=True, channel_axis=-1,
            )
        lab_out = np.zeros((3, n, n), np.float16)
        lab_out[:, :rh, :rw] = lab.transpose(2, 0, 1)
        edges = np.zeros((n, n), np.float16)
        edges[:rh, :rw] = np.minimum(grad, 60000)
        frame = ImageFrame((h, w), n, self.grid_size).to_array()
        return {"lab": lab_out, "edges": edges, "superpixels": labels, "frame": frame}

    # ------------------------------------------------------------------ decode
    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        """-> (logits float32 [P, 3, 256, 256], quality float32 [P, 3]); candidate axis is
        (part, object, larger region). Uses only the cached features, never the image."""
        s, m = self.grid_size, self.num_candidates
        p = len(prompts)
        if p == 0:
            return np.zeros((0, m, s, s), np.float32), np.zeros((0, m), np.float32)
        graph = _Graph(features, self.config)
        frame = self.frame(features)
        logits = np.empty((p, m, s, s), np.float32)
        quality = np.empty((p, m), np.float32)
        for i in range(p):
            logits[i], quality[i] = self._decode_one(graph, frame, prompts.coords[i], prompts.labels[i], prompts.boxes[i])
        return logits, quality

    def _decode_one(self, g: "_Graph", frame: ImageFrame, coords, labels, box) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        rh, rw = g.rh, g.rw
        xy = frame.scale_to_input(np.asarray(coords, np.float64).reshape(-1, 2))
        cols = np.clip(np.floor(xy[:, 0]), 0, rw - 1).astype(np.intp)
        rows = np.clip(np.floor(xy[:, 1]), 0, rh - 1).astype(np.intp)
        lab = np.asarray(labels).reshape(-1)
        pos = (rows[lab == POSITIVE], cols[lab == POSITIVE])
        neg = (rows[lab == NEGATIVE], cols[lab == NEGATIVE])
        inside = np.ones((rh, rw), bool)
        has_box = not np.isnan(np.asarray(box, np.float64)).any()
        if has_box:
            (x0, y0), (x1, y1) = frame.scale_to_input(np.asarray(box, np.float64).reshape(2, 2))
            r0, r1 = int(np.clip(np.floor(min(y0, y1)), 0, rh - 1)), int(np.clip(np.ceil(max(y0, y1)), 1, rh))
            c0, c1 = int(np.clip(np.floor(min(x0, x1)), 0, rw - 1)), int(np.clip(np.ceil(max(x0, x1)), 1, rw))
            inside[:] = False
            inside[r0:r1, c0:c1] = True
        x = g.solve(g.fine[pos], g.fine[neg], inside if has_box else None)
        score = np.log(np.clip(x, 1e-4, 1 - 1e-4) / np.clip(1 - x, 1e-4, 1 - 1e-4))
        fine_logit = cfg.logit_scale * np.tanh(score / 4.0)
        pixel = fine_logit[g.fine]
        out = np.full((3, cfg.input_size, cfg.input_size), OUTSIDE_LOGIT, np.float32)
        for k in range(3):
            snapped = pixel if k == 0 else g.average(k, pixel)
            cand = 0.5 * (pixel + snapped) + (k - 1) * cfg.candidate_bias
            cand[~inside] = OUTSIDE_LOGIT
            _clamp(cand, pos, CLAMP_LOGIT, np.maximum)
            _clamp(cand, neg, -CLAMP_LOGIT, np.minimum)
            out[k, :rh, :rw] = cand
        if cfg.input_size != self.grid_size:
            out = resize(out, (3, self.grid_size, self.grid_size), order=1, mode="edge", anti_aliasing=False)
            gh, gw = frame.grid_hw
            out[:, gh:, :] = OUTSIDE_LOGIT
            out[:, :, gw:] = OUTSIDE_LOGIT
        solution = pixel > 0
        if cfg.input_size == self.grid_size:
            quality = [g.quality(o[:rh, :rw], cfg.stability_offset, solution) for o in out]
        else:
            quality = [g.quality(o, cfg.stability_offset) for o in out]
        return out.astype(np.float32, copy=False), np.array(quality, np.float32)


def _clamp(cand: np.ndarray, where: tuple[np.ndarray, np.ndarray], value: float, op) -> None:
    """Force ``value`` (via ``op``) on the 3x3 neighbourhood of each (row, col) in ``where``."""
    h, w = cand.shape
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = np.clip(where[0] + dr, 0, h - 1), np.clip(where[1] + dc, 0, w - 1)
            cand[r, c] = op(cand[r, c], value)


class _Graph:
    """Per-image decode state derived from cached features (shared by all prompts)."""

    def __init__(self, features: Mapping[str, np.ndarray], cfg: WeightFreeConfig):
        self.cfg = cfg
        sp = np.asarray(features["superpixels"])
        valid = sp[0] >= 0
        self.rh, self.rw = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
        rh, rw = self.rh, self.rw
        self.labels = [np.ascontiguousarray(sp[k, :rh, :rw]) for k in range(3)]
        self.fine = self.labels[0]
        self.edges = np.asarray(features["edges"], np.float32)[:rh, :rw]
        lab = np.asarray(features["lab"], np.float32)[:, :rh, :rw].reshape(3, -1)
        n = int(self.fine.max()) + 1
        flat = self.fine.ravel()
        self.area = np.bincount(flat, minlength=n).astype(np.float64)
        self.colour = np.stack([np.bincount(flat, c, minlength=n) for c in lab], 1) / self.area[:, None]
        # region adjacency: horizontal and vertical neighbour pairs with different labels
        a = np.concatenate([self.fine[:, :-1].ravel(), self.fine[:-1, :].ravel()])
        b = np.concatenate([self.fine[:, 1:].ravel(), self.fine[1:, :].ravel()])
        e = np.concatenate([np.maximum(self.edges[:, :-1], self.edges[:, 1:]).ravel(),
                            np.maximum(self.edges[:-1, :], self.edges[1:, :]).ravel()])
        cut = a != b
        a, b, e = np.minimum(a[cut], b[cut]), np.maximum(a[cut], b[cut]), e[cut]
        key = a.astype(np.int64) * n + b
        uniq, inv, count = np.unique(key, return_inverse=True, return_counts=True)
        border = np.bincount(inv, e) / count
        ia, ib = uniq // n, uniq % n
        d2 = ((self.colour[ia] - self.colour[ib]) ** 2).sum(1)
        self.dist = np.sqrt(d2) / np.sqrt(d2.mean() + 1e-9) + border
        wgt = np.exp(-cfg.colour_beta * d2 / (d2.mean() + 1e-9) - cfg.edge_beta * border) * np.sqrt(count) + 1e-6
        self.n, self.ia, self.ib = n, ia, ib
        w = sparse.coo_matrix((np.r_[wgt, wgt], (np.r_[ia, ib], np.r_[ib, ia])), shape=(n, n)).tocsr()
        self.laplacian = (sparse.diags(np.asarray(w.sum(1)).ravel()) - w).tocsr()
        self.geo = sparse.coo_matrix((np.r_[self.dist, self.dist] + 0.05, (np.r_[ia, ib], np.r_[ib, ia])), shape=(n, n)).tocsr()
        cd = ((self.colour[:, None, :] - self.colour[None, :, :]) ** 2).sum(-1)
        self.kernel = np.exp(-cd / (2 * cfg.colour_bandwidth ** 2))
        self.counts = [np.bincount(lb.ravel()) for lb in self.labels]
        rr, cc = np.mgrid[:rh, :rw]
        self.centre = np.stack([np.bincount(flat, rr.ravel(), n), np.bincount(flat, cc.ravel(), n)], 1) / self.area[:, None]
        self.edge_mean = float(self.edges.mean()) + 1e-6

    def average(self, k: int, pixel: np.ndarray) -> np.ndarray:
        """Mean of ``pixel`` [rh, rw] over each superpixel of scale ``k``, painted back."""
        lb = self.labels[k]
        return (np.bincount(lb.ravel(), pixel.ravel(), len(self.counts[k])) / np.maximum(self.counts[k], 1))[lb]

    def solve(self, pos: np.ndarray, neg: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
        """Foreground probability float64 [n] per fine superpixel (random walker with priors)."""
        cfg, n = self.cfg, self.n
        fg = np.zeros(n, bool)
        fg[pos] = True
        bg = np.zeros(n, bool)
        bg[neg] = True
        if inside is not None:
            frac = np.bincount(self.fine.ravel(), inside.ravel(), n) / self.area
            bg |= frac < 0.5
        bg &= ~fg
        if fg.any():
            # superpixels geodesically far from every positive are background evidence even
            # when negatives exist: a few negatives leave most of the image unconstrained
            d = csgraph.dijkstra(self.geo, indices=np.flatnonzero(fg), min_only=True)
            far = d > np.quantile(d, 0.7 if not bg.any() else self.cfg.far_quantile)
            bg |= far & ~fg
        x = np.where(fg, 1.0, np.where(bg, 0.0, 0.5))
        if inside is not None and not fg.any():
            x = np.where(bg, 0.0, 1.0)
        for _ in range(cfg.em_steps + 1):
            wf, wb = self.area * np.clip(x, 0, 1), self.area * np.clip(1 - x, 0, 1)
            pf = self.kernel @ wf / max(wf.sum(), 1e-9)
            pb = self.kernel @ wb / max(wb.sum(), 1e-9)
            prior = pf / (pf + pb + 1e-12)
            x = self._random_walk(fg, bg, prior)
        return x

    def _random_walk(self, fg: np.ndarray, bg: np.ndarray, prior: np.ndarray) -> np.ndarray:
        seeded = fg | bg
        free = ~seeded
        x = fg.astype(np.float64)
        if not free.any():
            return x
        gam = self.cfg.prior_weight * self.area / self.area.mean()
        lap = self.laplacian[free][:, free] + sparse.diags(gam[free] + 1e-9)
        rhs = gam[free] * prior[free] - self.laplacian[free][:, seeded] @ x[seeded]
        x[free] = spsolve(lap.tocsc(), rhs)
        return np.clip(x, 0.0, 1.0)

    def quality(self, logit: np.ndarray, offset: float, solution: np.ndarray | None = None) -> float:
        """Predicted quality of one candidate, in [0, 1]: SAM's stability score, times the
        candidate's IoU with the unsnapped random-walker solution (``solution``, bool
        [rh, rw]; a candidate far from what the walker found is a worse bet), times the
        boundary contrast (gradient on the mask border against the image mean)."""
        hi, lo = logit > offset, logit > -offset
        stab = hi.sum() / max(lo.sum(), 1)
        mask = logit > 0
        if solution is None or not mask.any() or mask.all():
            return float(stab)
        agreement = (mask & solution).sum() / max((mask | solution).sum(), 1)
        border = mask ^ ndimage.binary_erosion(mask)
        contrast = self.edges[border].mean() / self.edge_mean
        return float(stab * agreement * contrast / (1.0 + contrast))
