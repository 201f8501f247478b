"""embed: run the backend's image encoder once per image and keep its features.

Reads ``ingest/image`` (HxWx3 uint8); writes the backend's named feature arrays (for
the weight-free backend, grid-sized colour features and superpixels; always ``frame``).
Images are encoded in batches of ``batch_size``; a batch that fails is retried one
image at a time so that one bad image does not fail its neighbours.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import Field

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit


class EmbedConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=256, description="Images per encoder call.")


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
