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

import json
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch

from seglab.stages.geometry import ImageFrame
from seglab.stages.promptset import PromptBatch
from seglab.workers.backend import PromptableBackend
from seglab.workers.model_configs import Sam2Config
from seglab.workers.checkpoints import checkpoint_sha256, load_exact
from seglab.workers.devices import autocast, autocast_dtype, pick_device

GRID = 256
def build_sam2_architecture(config: Sam2Config) -> torch.nn.Module:
    """The SAM2 network for ``config`` with random weights, on the CPU."""
    from sam2.build_sam import build_sam2

    return build_sam2(config.config, ckpt_path=None, device="cpu", mode="eval",
                      hydra_overrides_extra=list(config.overrides), apply_postprocessing=False)


class Sam2Backend(PromptableBackend):
    name = "sam2"
    grid_size = GRID
    num_candidates = 3

    def __init__(self, config: Sam2Config):
        self.config = config
        self._model = None
        self._sha256: str | None = None

    def feature_names(self) -> tuple[str, ...]:
        return ("image_embed", "high_res_feats_0", "high_res_feats_1", "frame")

    def signature(self) -> dict[str, str]:
        if self._sha256 is None:
            self._sha256 = checkpoint_sha256(self.config.checkpoint)
        preprocessing = {"resize": "stretch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "precision": self.config.precision, "feature_dtype": self.config.feature_dtype,
                         "overrides": list(self.config.overrides)}
        return {"model": f"sam2/{self.config.config}", "checkpoint": self._sha256,
                "preprocessing": json.dumps(preprocessing, sort_keys=True)}

    @property
    def model(self):
        if self._model is None:
            from sam2.sam2_image_predictor import SAM2ImagePredictor

            model = build_sam2_architecture(self.config)
            load_exact(model, self.config.checkpoint, nested_key="model")
            self.device = pick_device(self.config.device)
            self.dtype = autocast_dtype(self.device, self.config.precision)
            model.eval().requires_grad_(False).to(self.device)
            # the predictor holds SAM2's transforms and feature-map sizes; we never call set_image
            self.predictor = SAM2ImagePredictor(model)
            self._model = model
        return self._model

    def encode(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        model = self.model
        predictor = self.predictor
        batch = predictor._transforms.forward_batch([np.asarray(im) for im in images]).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            backbone = model.forward_image(batch)
            _, vision_feats, _, _ = model._prepare_backbone_features(backbone)
            if model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        b = len(images)
        feats = [feat.permute(1, 2, 0).reshape(b, -1, *size)
                 for feat, size in zip(vision_feats[::-1], predictor._bb_feat_sizes[::-1])][::-1]
        arrays = [f.float().cpu().numpy().astype(self.config.feature_dtype) for f in feats]
        return [
            {"image_embed": arrays[2][i], "high_res_feats_0": arrays[0][i], "high_res_feats_1": arrays[1][i],
             "frame": ImageFrame(tuple(im.shape[:2]), model.image_size, GRID, keep_aspect=False).to_array()}
            for i, im in enumerate(images)
        ]

    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        model = self.model
        p = len(prompts)
        logits = np.zeros((p, 3, GRID, GRID), np.float32)
        quality = np.zeros((p, 3), np.float32)
        if p == 0:
            return logits, quality
        tensor = partial(torch.as_tensor, dtype=torch.float32, device=self.device)
        embed = tensor(np.asarray(features["image_embed"]))[None]
        high_res = [tensor(np.asarray(features[f"high_res_feats_{i}"]))[None] for i in (0, 1)]
        frame = self.frame(features)
        coords = frame.scale_to_input(prompts.coords)
        boxes = frame.scale_to_input(prompts.boxes.reshape(-1, 2, 2))
        step = self.config.prompt_batch
        with torch.inference_mode():
            for boxed in (False, True):  # as in SAM, padding slots would change the decoder's output
                index = np.flatnonzero(prompts.has_box == boxed)
                for start in range(0, len(index), step):
                    rows = index[start : start + step]
                    points = (tensor(coords[rows]),
                              torch.as_tensor(prompts.labels[rows], dtype=torch.int, device=self.device))
                    if boxed:  # SAM2 takes a box as two corner points (labels 2, 3) before the clicks
                        corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(len(rows), 1)
                        points = (torch.cat([tensor(boxes[rows]), points[0]], 1), torch.cat([corner_labels, points[1]], 1))
                    logits[rows], quality[rows] = self._decode_rows(model, embed, high_res, points)
        return logits, quality

    def _decode_rows(self, model, embed, high_res, points):
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=high_res,
        )
        return low_res.float().cpu().numpy(), iou.float().cpu().numpy()
