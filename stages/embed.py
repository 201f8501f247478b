"""embed: run the backend's image encoder once per image and keep its features.

Reads ``ingest/image`` (HxWx3 uint8); writes the backend's named feature arrays (for
the weight-free backend, grid-sized colour features and superpixels; always ``frame``).
Images are encoded in batches of ``batch_size``; a batch that fails is retried one
image at a time so that one bad image does not fail its neighbours. Images larger than
``tiling.above`` are encoded as overlapping tiles (workers/tiling.py).

With ``views`` (SCALER's augmentation ensemble), each view of the image (stages/parts/views.py)
is encoded too and kept as ``view<k>.<feature>`` beside ``view<k>.spec`` (float64 [4]:
flip, scale, H, W), so that ``select`` decodes every view from the cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.parts.views import View, ViewSpec


class TilingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    above: int | None = Field(None, ge=64, description="Tile images whose longest side exceeds this (none = never).")
    tile: int = Field(1024, ge=64, le=8192, description="Core size of a tile, in pixels.")
    halo: int = Field(128, ge=0, le=2048, description="Context added around each core, in pixels.")
    grid_per_tile: int = Field(256, ge=32, le=1024, description="Global logit cells per tile along the longest side.")

    @model_validator(mode="after")
    def _sizes(self) -> TilingConfig:
        if self.above is not None and self.above < self.tile:
            raise ValueError(f"above ({self.above}) must be at least tile ({self.tile})")
        return self


class EmbedConfig(StageConfig):
    batch_size: int = Field(4, ge=1, le=256, description="Images per encoder call.")
    tiling: TilingConfig = Field(TilingConfig(), description="Overlapping tiles for large images.")
    views: tuple[ViewSpec, ...] = Field(
        (),
        max_length=32,
        description="Augmented views also encoded for the ensemble (SCALER: K=12); "
        "the original image is always view 0.",
    )


def view_prefix(k: int) -> str:
    """Prefix of the k-th augmented view's features (k >= 1)."""
    return f"view{k}."


class Embed(MapStage):
    name = "embed"
    Config = EmbedConfig
    config: EmbedConfig
    reads = ("ingest/image",)
    resources = Resources(cpus=1, needs_backend=True)

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        names = ctx.feature_names
        views = tuple(f"{view_prefix(k)}{n}" for k in range(1, len(self.config.views) + 1) for n in (*names, "spec"))
        return names + views

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        return self._encode([inputs["ingest/image"]], ctx)[0]

    def process_batch(
        self, units: Sequence[Unit], inputs: Sequence[Mapping[str, np.ndarray]], ctx: Context
    ) -> list[dict[str, np.ndarray] | BaseException]:
        try:
            return list(self._encode([i["ingest/image"] for i in inputs], ctx))
        except Exception:
            return super().process_batch(units, inputs, ctx)

    def _encode(self, images: Sequence[np.ndarray], ctx: Context) -> list[dict[str, np.ndarray]]:
        """Every image and its views in one encoder call -> per image its feature arrays."""
        per_image = 1 + len(self.config.views)
        views = [[View(v.flip, v.scale, image.shape[:2]) for v in self.config.views] for image in images]
        batch = [x for image, vs in zip(images, views) for x in (image, *(v.image(image) for v in vs))]
        encoded = ctx.backend.encode(batch)
        results = []
        for i, vs in enumerate(views):
            features = dict(encoded[i * per_image])
            for k, view in enumerate(vs, start=1):
                features.update({f"{view_prefix(k)}{n}": a for n, a in encoded[i * per_image + k].items()})
                features[f"{view_prefix(k)}spec"] = view.to_array()
            results.append(features)
        return results
