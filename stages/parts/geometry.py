"""Coordinate frames shared by every promptable backend.

A backend sees an image resized so that its longest side is ``input_size`` and padded
at the bottom/right to ``input_size x input_size`` (SAM's convention), or, with
``keep_aspect=False``, stretched to the square (SAM2's convention). Mask logits come
back on a square ``grid_size x grid_size`` grid covering that padded input. ``ImageFrame``
maps prompts from original pixel coordinates onto that grid and maps grid arrays back
onto the original image, so that selection can work at low resolution and upsample only
what it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.transform import resize


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Shape (h, w) of an image resized so that its longest side is ``long_side``; a side
    that would round to 0 (a strip thinner than 1 / (2 * long_side) of its length) keeps 1."""
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class ImageFrame:
    """Geometry of one image as a backend sees it.

    original_hw: (H, W) of the decoded image.
    input_size: side of the square padded model input.
    grid_size: side of the square low-resolution mask grid (covers the padded input).
    keep_aspect: resize the longest side and pad (SAM), or stretch to the square (SAM2).
    """

    original_hw: tuple[int, int]
    input_size: int
    grid_size: int
    keep_aspect: bool = True

    @property
    def resized_hw(self) -> tuple[int, int]:
        if not self.keep_aspect:
            return self.input_size, self.input_size
        return resized_shape(*self.original_hw, self.input_size)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Extent (h, w) of the real image on the grid; the rest is padding."""
        rh, rw = self.resized_hw
        f = self.grid_size / self.input_size
        return max(1, min(self.grid_size, round(rh * f))), max(1, min(self.grid_size, round(rw * f)))

    def to_array(self) -> np.ndarray:
        """int64 [5]: H, W, input_size, grid_size, keep_aspect (how frames are stored)."""
        return np.array([*self.original_hw, self.input_size, self.grid_size, int(self.keep_aspect)], dtype=np.int64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> ImageFrame:
        h, w, input_size, grid_size, keep_aspect = (int(v) for v in np.asarray(values).reshape(-1)[:5])
        return cls((h, w), input_size, grid_size, bool(keep_aspect))

    def scale_to_input(self, xy: np.ndarray) -> np.ndarray:
        """Original pixel coordinates (..., 2) as (x, y) -> padded-input coordinates."""
        h, w = self.original_hw
        rh, rw = self.resized_hw
        out = np.asarray(xy, dtype=np.float64).copy()
        out[..., 0] *= rw / w
        out[..., 1] *= rh / h
        return out

    def scale_to_grid(self, xy: np.ndarray) -> np.ndarray:
        """Original pixel coordinates (..., 2) as (x, y) -> grid coordinates (x, y)."""
        return self.scale_to_input(xy) * (self.grid_size / self.input_size)

    def grid_to_image(self, grid: np.ndarray, order: int = 1) -> np.ndarray:
        """Map grid arrays [..., S, S] onto the original image: [..., H, W].

        Crops the padding, then resizes (bilinear for ``order=1``, nearest for 0).
        The dtype of float input is kept; integer input needs ``order=0``.
        """
        gh, gw = self.grid_hw
        cropped = np.asarray(grid)[..., :gh, :gw]
        lead = cropped.shape[:-2]
        out_shape = (*lead, *self.original_hw)
        if order == 0:
            rows = np.minimum((np.arange(self.original_hw[0]) + 0.5) * gh / self.original_hw[0], gh - 1).astype(np.intp)
            cols = np.minimum((np.arange(self.original_hw[1]) + 0.5) * gw / self.original_hw[1], gw - 1).astype(np.intp)
            return cropped[..., rows[:, None], cols[None, :]]
        resized = resize(
            cropped.astype(np.float32, copy=False),
            out_shape,
            order=order,
            mode="edge",
            anti_aliasing=False,
            preserve_range=True,
        )
        return resized.astype(grid.dtype if np.issubdtype(grid.dtype, np.floating) else np.float32, copy=False)

    def image_to_grid(self, image: np.ndarray, order: int = 1) -> np.ndarray:
        """Resize an image-sized array [H, W, ...] onto the padded grid [S, S, ...] (zero padding)."""
        gh, gw = self.grid_hw
        arr = np.asarray(image)
        small = resize(
            arr.astype(np.float32, copy=False),
            (gh, gw, *arr.shape[2:]),
            order=order,
            mode="edge",
            anti_aliasing=order > 0,
            preserve_range=True,
        )
        out = np.zeros((self.grid_size, self.grid_size, *arr.shape[2:]), dtype=np.float32)
        out[:gh, :gw] = small
        return out
