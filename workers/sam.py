"""The ``sam`` backend: segment-anything's ViT image encoder, prompt encoder and mask decoder.

encode: SAM's own preprocessing (``ResizeLongestSide(1024)``, normalise, pad to 1024²),
then the frozen image encoder -> ``image_embed`` float16/32 [256, 64, 64] per image, plus
``frame`` (original size; SAM's resized size follows from it exactly).
decode: prompt encoder + mask decoder from the cached embedding only -> low-resolution
logits [P, 3, 256, 256] over the padded 1024² input and predicted IoU [P, 3], exactly
what ``SamPredictor.predict_torch(..., multimask_output=True, return_logits=True)``
computes before upsampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import cast

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from seglab.stages.parts.geometry import ImageFrame
from seglab.workers.devices import autocast
from seglab.workers.frozen_model import FrozenModelBackend
from seglab.workers.model_configs import SamConfig

IMAGE_SIZE = 1024
GRID = 256


def build_sam_architecture(config: SamConfig) -> torch.nn.Module:
    """The SAM network for ``config`` with random weights (the checkpoint loads after)."""
    if config.model != "custom":
        return sam_model_registry[config.model](checkpoint=None)
    if config.encoder is None:
        raise ValueError("model 'custom' needs an encoder shape")
    shape = config.encoder
    return _build_sam(
        encoder_embed_dim=shape.embed_dim,
        encoder_depth=shape.depth,
        encoder_num_heads=shape.num_heads,
        encoder_global_attn_indexes=list(shape.global_attn_indexes),
        checkpoint=None,
    )


class SamBackend(FrozenModelBackend):
    name = "sam"
    grid_size = GRID
    num_candidates = 3

    def feature_names(self) -> tuple[str, ...]:
        return ("image_embed", "frame")

    def build_architecture(self) -> torch.nn.Module:
        return build_sam_architecture(self.config)

    def model_name(self) -> str:
        model = self.config.model
        return f"sam/{model}" if model != "custom" else f"sam/custom{self.config.encoder.model_dump_json()}"

    def preprocessing(self) -> dict:
        return {
            "resize_longest_side": IMAGE_SIZE,
            "pad": "bottom-right",
            "pixel_mean": [123.675, 116.28, 103.53],
            "pixel_std": [58.395, 57.12, 57.375],
        }

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> float32 [3, 1024, 1024], exactly as ``SamPredictor.set_image``."""
        model = cast(Sam, self.model)  # what build_architecture built
        resized = ResizeLongestSide(IMAGE_SIZE).apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
        return model.preprocess(tensor[None])[0]

    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        model = cast(Sam, self.model)  # what build_architecture built
        batch = torch.stack([self.preprocess(np.asarray(im)) for im in images])
        with torch.inference_mode(), autocast(self.device, self.dtype):
            embed = model.image_encoder(batch)
        embed = embed.float().cpu().numpy().astype(self.config.feature_dtype)
        return [
            {"image_embed": embed[i], "frame": ImageFrame(tuple(im.shape[:2]), IMAGE_SIZE, GRID).to_array()}
            for i, im in enumerate(images)
        ]

    def cached_tensors(self, features: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        embed = torch.as_tensor(np.asarray(features["image_embed"]), dtype=torch.float32, device=self.device)
        return {"image_embed": embed[None]}

    def decode_rows(self, cached, coords, labels, boxes):
        model = self.model
        as_tensor = partial(torch.as_tensor, device=self.device)
        points = None
        if coords.shape[1] and (labels >= 0).any():
            points = (as_tensor(coords, dtype=torch.float32), as_tensor(labels, dtype=torch.int))
        sparse, dense = model.prompt_encoder(
            points=points, boxes=None if boxes is None else as_tensor(boxes, dtype=torch.float32), masks=None
        )
        return model.mask_decoder(
            image_embeddings=cached["image_embed"],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
