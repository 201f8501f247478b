"""Augmented views of an image for SCALER's ensemble: a horizontal flip and/or a rescale.

A view is decoded like the original image (its own cached embedding, the prompts and the
weak label moved into it) and its probabilities are mapped back onto the original pixels.
Coordinates map as x' = (W - x) * sx when flipped, else x * sx, and y' = y * sy, where the
view is h' x w' = round(H * scale) x round(W * scale), sx = w' / W and sy = h' / H.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from skimage.transform import resize

from seglab.stages.parts.promptset import PromptBatch


class ViewSpec(BaseModel):
    """One augmented view in the manifest (``embed.views``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip: bool = Field(False, description="Mirror left-right.")
    scale: float = Field(1.0, ge=0.25, le=4.0, description="Resize factor of both sides.")


@dataclass(frozen=True)
class View:
    """A view of an image of ``original_hw`` (H, W)."""

    flip: bool
    scale: float
    original_hw: tuple[int, int]

    @property
    def view_hw(self) -> tuple[int, int]:
        h, w = self.original_hw
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))

    def to_array(self) -> np.ndarray:
        """float64 [4]: flip, scale, H, W (how a view is stored beside its features)."""
        return np.array([float(self.flip), self.scale, *self.original_hw], np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> View:
        flip, scale, h, w = np.asarray(values, np.float64).reshape(4)
        return cls(bool(flip), float(scale), (int(h), int(w)))

    def _resize(self, array: np.ndarray, hw: tuple[int, int], order: int) -> np.ndarray:
        if tuple(array.shape[-2:]) == hw:
            return array
        out = resize(
            array.astype(np.float32, copy=False),
            (*array.shape[:-2], *hw),
            order=order,
            mode="edge",
            anti_aliasing=False,
            preserve_range=True,
        )
        return out.astype(array.dtype) if order == 0 else out.astype(np.float32)

    def image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> h'xw'x3 uint8."""
        moved = np.moveaxis(image[:, ::-1] if self.flip else image, -1, 0)
        out = self._resize(moved, self.view_hw, order=1)
        return np.ascontiguousarray(np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 0, -1))

    def label_map(self, labels: np.ndarray) -> np.ndarray:
        """HxW class ids -> h'xw' (nearest neighbour)."""
        return self._resize(labels[:, ::-1] if self.flip else labels, self.view_hw, order=0)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) original (x, y) -> view (x, y)."""
        (h, w), (vh, vw) = self.original_hw, self.view_hw
        out = np.asarray(xy, np.float64).copy()
        if self.flip:
            out[..., 0] = w - out[..., 0]
        out[..., 0] *= vw / w
        out[..., 1] *= vh / h
        return out.astype(np.float32)

    def prompts(self, batch: PromptBatch) -> PromptBatch:
        boxes = self.points(batch.boxes.reshape(-1, 2, 2)).reshape(-1, 4)
        if self.flip:
            boxes = boxes[:, [2, 1, 0, 3]]
        return PromptBatch(
            self.points(batch.coords), batch.labels, boxes.astype(np.float32), batch.classes, batch.components
        )

    def back(self, array: np.ndarray, order: int = 1) -> np.ndarray:
        """[..., h', w'] in the view -> [..., H, W] on the original pixels."""
        out = self._resize(array, self.original_hw, order)
        return np.ascontiguousarray(out[..., ::-1]) if self.flip else out
