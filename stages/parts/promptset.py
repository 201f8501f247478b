"""The prompt batch that travels from the ``prompts`` stage to a backend's decoder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE, PADDING = 1, 0, -1


@dataclass(frozen=True)
class PromptBatch:
    """P prompts for one image, in original image pixel coordinates.

    coords: float32 [P, K, 2], (x, y) per point.
    labels: int32 [P, K]; 1 positive, 0 negative, -1 padding (SAM's convention).
    boxes: float32 [P, 4] XYXY; a row of NaN means the prompt has no box.
    classes: int32 [P], the class each prompt asks for.
    components: int32 [P], the weak-label component (per class) the prompt came from.
    """

    coords: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    components: np.ndarray

    def __post_init__(self) -> None:
        p = len(self.classes)
        if self.coords.shape[:1] != (p,) or self.coords.shape[2:] != (2,):
            raise ValueError(f"coords must be [P, K, 2] with P={p}, got {self.coords.shape}")
        if self.labels.shape != self.coords.shape[:2]:
            raise ValueError(f"labels must be {self.coords.shape[:2]}, got {self.labels.shape}")
        if self.boxes.shape != (p, 4) or self.components.shape != (p,):
            raise ValueError(
                f"boxes must be [P, 4] and components [P], got {self.boxes.shape}, {self.components.shape}"
            )

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def has_box(self) -> np.ndarray:
        """bool [P]."""
        return ~np.isnan(self.boxes).any(axis=1)

    @classmethod
    def empty(cls) -> PromptBatch:
        return cls(
            coords=np.zeros((0, 0, 2), np.float32),
            labels=np.zeros((0, 0), np.int32),
            boxes=np.zeros((0, 4), np.float32),
            classes=np.zeros((0,), np.int32),
            components=np.zeros((0,), np.int32),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays the ``prompts`` stage stores, keyed by output name."""
        return {
            "coords": self.coords.astype(np.float32),
            "labels": self.labels.astype(np.int32),
            "boxes": self.boxes.astype(np.float32),
            "classes": self.classes.astype(np.int32),
            "components": self.components.astype(np.int32),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> PromptBatch:
        return cls(
            **{k: np.asarray(arrays[prefix + k]) for k in ("coords", "labels", "boxes", "classes", "components")}
        )
