"""Large images: encode overlapping tiles, decode per tile, stitch the logits back.

An image whose longest side exceeds ``above`` is cut into a grid of cores of ``tile``
pixels; each crop is its core grown by ``halo`` pixels on every side (clipped to the
image), so objects crossing a core border are seen whole by at least one neighbour.
Every crop is encoded by the wrapped backend; features gain a leading tile axis and
``tiles`` records each crop and core as int64 [T, 8] (crop y0, x0, y1, x1, core y0, x0,
y1, x1), ``tile_frames`` int64 [T, 5] each crop's frame, ``frame`` the global one. A
small image keeps the wrapped backend's features, with ``tiles`` [0, 8] and
``tile_frames`` [0, 5].

Decoding a prompt runs the wrapped decoder in every tile whose core holds one of its
positive points (or meets its box), with the points inside that crop, and writes each
tile's logits into its core on one global grid of ``grid_per_tile`` cells per tile
along the longest side; the rest of the grid is strongly negative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from skimage.transform import resize

from seglab.pipeline.core.batcharrays import stack_padded
from seglab.stages.embed import TilingConfig
from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import PADDING, POSITIVE, PromptBatch
from seglab.workers.promptable import PromptableBackend

OUTSIDE = -20.0


def plan_tiles(height: int, width: int, tile: int, halo: int) -> np.ndarray:
    """int64 [T, 8]: crop (y0, x0, y1, x1) and core (y0, x0, y1, x1) of every tile, row-major."""
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    out = []
    for r in range(rows):
        for c in range(cols):
            cy0, cx0 = r * height // rows, c * width // cols
            cy1, cx1 = (r + 1) * height // rows, (c + 1) * width // cols
            out.append(
                [
                    max(0, cy0 - halo),
                    max(0, cx0 - halo),
                    min(height, cy1 + halo),
                    min(width, cx1 + halo),
                    cy0,
                    cx0,
                    cy1,
                    cx1,
                ]
            )
    return np.array(out, np.int64)


class TiledBackend(PromptableBackend):
    """Wraps any backend; transparent for images at or below ``config.above``."""

    def __init__(self, inner: PromptableBackend, config: TilingConfig):
        self.inner = inner
        self.config = config
        self.name = inner.name
        self.grid_size = inner.grid_size
        self.num_candidates = inner.num_candidates

    def feature_names(self) -> tuple[str, ...]:
        return (*self.inner.feature_names(), "tiles", "tile_frames")

    def signature(self) -> dict[str, str]:
        return {**self.inner.signature(), "tiling": self.config.model_dump_json()}

    def _tiled(self, hw: tuple[int, int]) -> bool:
        return self.config.above is not None and max(hw) > self.config.above

    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        small = [i for i, im in enumerate(images) if not self._tiled(im.shape[:2])]
        encoded: dict[int, dict[str, np.ndarray]] = {}
        for i, feats in zip(small, self.inner.encode([images[i] for i in small]) if small else []):
            encoded[i] = {**feats, "tiles": np.zeros((0, 8), np.int64), "tile_frames": np.zeros((0, 5), np.int64)}
        return [encoded[i] if i in encoded else self._encode_tiled(np.asarray(image)) for i, image in enumerate(images)]

    def _encode_tiled(self, image: np.ndarray) -> dict[str, np.ndarray]:
        h, w = image.shape[:2]
        tiles = plan_tiles(h, w, self.config.tile, self.config.halo)
        per_tile = self.inner.encode([image[y0:y1, x0:x1] for y0, x0, y1, x1 in tiles[:, :4]])
        # crops at the image's border are smaller: their features are zero-padded to the largest
        stacked = {name: stack_padded([f[name] for f in per_tile], name) for name in per_tile[0]}
        grid = self.config.grid_per_tile * math.ceil(max(h, w) / self.config.tile)
        stacked["tile_frames"] = stacked.pop("frame")
        return {**stacked, "frame": ImageFrame((h, w), max(h, w), grid).to_array(), "tiles": tiles}

    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        tiles = np.asarray(features["tiles"])
        if len(tiles) == 0:
            return self.inner.decode({k: v for k, v in features.items() if k not in ("tiles", "tile_frames")}, prompts)
        frame = self.frame(features)
        grid, m = frame.grid_size, self.num_candidates
        scale = grid / frame.input_size  # global grid cells per pixel
        logits = np.full((len(prompts), m, grid, grid), OUTSIDE, np.float32)
        quality = np.zeros((len(prompts), m), np.float32)
        used = np.zeros(len(prompts), np.int32)
        for t, (y0, x0, y1, x1, cy0, cx0, cy1, cx1) in enumerate(tiles):
            rows, sub = self._prompts_for_tile(prompts, (y0, x0, y1, x1), (cy0, cx0, cy1, cx1))
            if not len(rows):
                continue
            tile_features = {k: v[t] for k, v in features.items() if k not in ("tiles", "frame", "tile_frames")}
            tile_features["frame"] = features["tile_frames"][t]
            tile_logits, tile_quality = self.inner.decode(tile_features, sub)
            crop = ImageFrame.from_array(features["tile_frames"][t]).grid_to_image(tile_logits)  # [p, M, h, w]
            core = crop[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            gy0, gx0 = int(round(cy0 * scale)), int(round(cx0 * scale))
            gy1, gx1 = max(gy0 + 1, int(round(cy1 * scale))), max(gx0 + 1, int(round(cx1 * scale)))  # >= 1 cell
            logits[rows, :, gy0:gy1, gx0:gx1] = resize(
                core,
                (*core.shape[:2], gy1 - gy0, gx1 - gx0),
                order=1,
                mode="edge",
                anti_aliasing=True,
                preserve_range=True,
            )
            quality[rows] += tile_quality
            used[rows] += 1
        return logits, quality / np.maximum(used, 1)[:, None]

    @staticmethod
    def _prompts_for_tile(prompts: PromptBatch, crop, core) -> tuple[np.ndarray, PromptBatch]:
        """Prompts with a positive point in ``core`` (or a box meeting it), re-expressed in
        crop coordinates with only the points inside the crop."""
        y0, x0, y1, x1 = crop
        cy0, cx0, cy1, cx1 = core
        xy, lab = prompts.coords, prompts.labels
        in_core = (xy[..., 0] >= cx0) & (xy[..., 0] < cx1) & (xy[..., 1] >= cy0) & (xy[..., 1] < cy1)
        in_crop = (xy[..., 0] >= x0) & (xy[..., 0] < x1) & (xy[..., 1] >= y0) & (xy[..., 1] < y1)
        b = prompts.boxes
        box_meets = prompts.has_box & (b[:, 0] < cx1) & (b[:, 2] > cx0) & (b[:, 1] < cy1) & (b[:, 3] > cy0)
        rows = np.flatnonzero((in_core & (lab == POSITIVE)).any(1) | box_meets)
        coords = xy[rows] - np.array([x0, y0], np.float32)
        labels = np.where(in_crop[rows], lab[rows], PADDING).astype(np.int32)
        boxes = b[rows] - np.array([x0, y0, x0, y0], np.float32)
        boxes = np.where(np.isnan(boxes), np.nan, np.clip(boxes, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0]))
        return rows, PromptBatch(
            coords.astype(np.float32), labels, boxes.astype(np.float32), prompts.classes[rows], prompts.components[rows]
        )
