"""embed: run the backend's image encoder once per image and keep its features.

Reads ``ingest/image`` (HxWx3 uint8); writes the backend's named feature arrays (for
the weight-free backend, grid-sized colour features and superpixels; always ``frame``).
Images are encoded in batches of ``batch_size``; a batch that fails is retried one
image at a time so that one bad image does not fail its neighbours. Images larger than
``tiling.above`` are encoded as overlapping tiles (workers/tiling.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit


class TilingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    above: int | None = Field(None, ge=64, description="Tile images whose longest side exceeds this (none = never).")
    tile: int = Field(1024, ge=64, le=8192, description="Core size of a tile, in pixels.")
    halo: int = Field(128, ge=0, le=2048, description="Context added around each core, in pixels.")
    grid_per_tile: int = Field(256, ge=32, le=1024, description="Global logit cells per tile along the longest side.")

    @model_validator(mode="after")
    def _sizes(self) -> "TilingConfig":
        if self.above is not None and self.above < self.tile:
            raise ValueError(f"above ({self.above}) must be at least tile ({self.tile})")
        return self


class EmbedConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=256, description="Images per encoder call.")
    tiling: TilingConfig = Field(TilingConfig(), description="Overlapping tiles for large images.")


class Embed(MapStage):
    name = "embed"
    Config = EmbedConfig
    reads = ("ingest/image",)
    resources = Resources(cpus=1, needs_backend=True)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return tuple(ctx.extras["feature_names"])

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        return ctx.backend.encode([inputs["ingest/image"]])[0]

    def process_batch(
        self, units: Sequence[Unit], inputs: Sequence[Mapping[str, np.ndarray]], ctx: Context
    ) -> list[dict[str, np.ndarray] | BaseException]:
        try:
            return list(ctx.backend.encode([i["ingest/image"] for i in inputs]))
        except Exception:
            return super().process_batch(units, inputs, ctx)
