"""The ``sam2`` backend: SAM 2's Hiera image encoder and its SAM-style mask decoder.

encode: SAM2's preprocessing (stretch to 1024², ImageNet normalisation), the frozen
backbone and ``_prepare_backbone_features`` with ``no_mem_embed`` added, exactly as
``SAM2ImagePredictor.set_image`` -> ``image_embed`` [256, 64, 64], ``high_res_feats_0``
[32, 256, 256], ``high_res_feats_1`` [64, 128, 128] (float16/32) and ``frame``
(original size; ``keep_aspect=False``).
decode: prompt encoder + mask decoder with the cached high-resolution features ->
low-resolution logits [P, 3, 256, 256] over the stretched input and predicted IoU [P, 3],
as ``SAM2ImagePredictor._predict(..., multimask_output=True)`` before upsampling
(without its clamp to ±32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import cast

import numpy as np
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor

from seglab.stages.parts.geometry import ImageFrame
from seglab.workers.devices import autocast
from seglab.workers.frozen_model import FrozenModelBackend
from seglab.workers.model_configs import Sam2Config

GRID = 256


def build_sam2_architecture(config: Sam2Config) -> torch.nn.Module:
    """The SAM2 network for ``config`` with random weights, on the CPU."""
    return build_sam2(
        config.config,
        ckpt_path=None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=list(config.overrides),
        apply_postprocessing=False,
    )


class Sam2Backend(FrozenModelBackend):
    name = "sam2"
    grid_size = GRID
    num_candidates = 3
    state_dict_key = "model"

    def feature_names(self) -> tuple[str, ...]:
        return ("image_embed", "high_res_feats_0", "high_res_feats_1", "frame")

    def build_architecture(self) -> torch.nn.Module:
        return build_sam2_architecture(self.config)

    def model_name(self) -> str:
        return f"sam2/{self.config.config}"

    def preprocessing(self) -> dict:
        return {
            "resize": "stretch",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "overrides": list(self.config.overrides),
        }

    def on_loaded(self, model: torch.nn.Module) -> None:
        # the predictor holds SAM2's transforms and feature-map sizes; we never call set_image
        self.predictor = SAM2ImagePredictor(model)

    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        model = cast(SAM2Base, self.model)  # what build_architecture built
        predictor = self.predictor
        batch = predictor._transforms.forward_batch([np.asarray(im) for im in images]).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            backbone = model.forward_image(batch)
            _, vision_feats, _, _ = model._prepare_backbone_features(backbone)
            if model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        b = len(images)
        feats = [
            feat.permute(1, 2, 0).reshape(b, -1, *size)
            for feat, size in zip(vision_feats[::-1], predictor._bb_feat_sizes[::-1])
        ][::-1]
        arrays = [f.float().cpu().numpy().astype(self.config.feature_dtype) for f in feats]
        return [
            {
                "image_embed": arrays[2][i],
                "high_res_feats_0": arrays[0][i],
                "high_res_feats_1": arrays[1][i],
                "frame": ImageFrame(tuple(im.shape[:2]), model.image_size, GRID, keep_aspect=False).to_array(),
            }
            for i, im in enumerate(images)
        ]

    def cached_tensors(self, features: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensor = partial(torch.as_tensor, dtype=torch.float32, device=self.device)
        return {
            name: tensor(np.asarray(features[name]))[None]
            for name in ("image_embed", "high_res_feats_0", "high_res_feats_1")
        }

    def decode_rows(self, cached, coords, labels, boxes):
        model = self.model
        points = (torch.as_tensor(coords, device=self.device), torch.as_tensor(labels, device=self.device))
        if boxes is not None:  # SAM2 takes a box as two corner points (labels 2, 3) before the clicks
            corners = torch.as_tensor(boxes.reshape(-1, 2, 2), device=self.device)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device).repeat(len(boxes), 1)
            points = (torch.cat([corners, points[0]], 1), torch.cat([corner_labels, points[1]], 1))
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=cached["image_embed"],
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=[cached["high_res_feats_0"], cached["high_res_feats_1"]],
        )
        return low_res, iou
