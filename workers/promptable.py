"""The interface every promptable segmenter implements (SAM, SAM 2, the weight-free backend)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from seglab.stages.parts.geometry import ImageFrame
from seglab.stages.parts.promptset import PromptBatch


class PromptableBackend(ABC):
    """Encode images once; decode many prompt sets from the cached features.

    ``encode`` returns, per image, a mapping of named feature arrays that the ``embed``
    stage stores as they are; it always includes ``frame`` (``ImageFrame.to_array()``).
    ``decode`` reads those arrays back and never runs the encoder.

    Constructing a backend must be cheap (the driver builds one to learn its feature
    names and signature); a backend with a model loads it on first use, in a worker.
    """

    name: str
    #: side of the square low-resolution logit grid returned by ``decode``
    grid_size: int = 256
    #: number of candidate masks per prompt (M)
    num_candidates: int = 3

    @abstractmethod
    def feature_names(self) -> tuple[str, ...]:
        """Names of the arrays ``encode`` returns per image (``frame`` included)."""

    @abstractmethod
    def signature(self) -> dict[str, str]:
        """What makes stored features valid: model name, checkpoint sha256, preprocessing."""

    @abstractmethod
    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """images: each HxWx3 uint8 RGB (sizes may differ) -> per-image feature arrays."""

    @abstractmethod
    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        """-> (mask logits float32 [P, M, S, S] on the grid, predicted quality float32 [P, M]).

        S = ``grid_size``; logit > 0 is inside the mask. The grid covers the padded model
        input; ``ImageFrame.grid_to_image`` maps it back onto the original image.
        """

    def frame(self, features: Mapping[str, np.ndarray]) -> ImageFrame:
        return ImageFrame.from_array(features["frame"])
