"""Manifest sections of the model backends (pydantic only: loading a manifest never
imports torch). The backends themselves live in sam.py and sam2.py."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from seglab.pipeline.core.paths import ManifestFile

Precision = Literal["auto", "bf16", "fp16", "fp32"]
PROMPT_BATCH_HELP = (
    "Prompts per mask-decoder call; unset: 64 on a GPU, 4 on the CPU, where a large "
    "batch's activations are mapped afresh by every call and page faults dominate."
)


class VitShape(BaseModel):
    """A ViT image-encoder shape other than the three released ones (compact or custom
    checkpoints built from segment-anything's own modules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(ge=16, le=2048)
    depth: int = Field(ge=1, le=64)
    num_heads: int = Field(ge=1, le=64)
    global_attn_indexes: tuple[int, ...]


class SamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["sam"] = "sam"
    model: Literal["vit_b", "vit_l", "vit_h", "custom"] = Field("vit_b", description="Released SAM encoder size.")
    checkpoint: ManifestFile = Field(description="State-dict file (loaded with weights_only=True; keys must match).")
    encoder: VitShape | None = Field(None, description="Encoder shape when model is 'custom'.")
    precision: Precision = Field("auto", description="Encoder autocast: auto, bf16, fp16 or fp32 (off).")
    feature_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of stored embeddings.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt_batch: int | None = Field(None, ge=1, le=4096, description=PROMPT_BATCH_HELP)


Sam2ModelConfig = Literal[
    "configs/sam2/sam2_hiera_t.yaml",
    "configs/sam2/sam2_hiera_s.yaml",
    "configs/sam2/sam2_hiera_b+.yaml",
    "configs/sam2/sam2_hiera_l.yaml",
    "configs/sam2.1/sam2.1_hiera_t.yaml",
    "configs/sam2.1/sam2.1_hiera_s.yaml",
    "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "configs/sam2.1/sam2.1_hiera_l.yaml",
]
SAM2_CONFIGS: tuple[str, ...] = get_args(Sam2ModelConfig)


class Sam2Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["sam2"] = "sam2"
    config: Sam2ModelConfig = Field("configs/sam2.1/sam2.1_hiera_t.yaml", description="sam2 model config.")
    checkpoint: ManifestFile = Field(description="SAM2 checkpoint ({'model': state dict}); weights_only loading.")
    overrides: tuple[str, ...] = Field(
        (), description="Hydra overrides for a variant architecture, e.g. '++model.image_encoder.trunk.embed_dim=48'."
    )
    precision: Precision = "auto"
    feature_dtype: Literal["float16", "float32"] = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt_batch: int | None = Field(None, ge=1, le=4096, description=PROMPT_BATCH_HELP)
