"""ingest: decode each image and its weak label, validate them, and store both.

Outputs per unit:
  image: HxWx3 uint8 RGB (EXIF orientation applied, 16-bit scaled, alpha dropped).
  weak:  HxW label map (uint8, or uint16 when class ids exceed 255): the weak label's
         class id where the weak label says so, ``ignore_id`` elsewhere. Points are
         rasterised to their pixel; boxes label no pixel (a box is not a mask).
  boxes: float32 [B, 5] rows (x0, y0, x1, y1, class) of box weak labels; [0, 5] for
         the other kinds. A box of the background class (``data.weak.background``,
         ``ctx.background``) fails its image: the background has no boxes.
The receipt records the source path (or object URL), the sha256 of the bytes decoded (the
file is read once) and the image size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from pydantic import Field

from seglab.pipeline.base.errors import InputError
from seglab.stages.base import Context, MapStage, Resources, StageConfig, Unit
from seglab.stages.parts.imageio import decode_image, file_exists, read_file_bytes
from seglab.stages.parts.weak import rasterize_points, read_label_map, validate_boxes, validate_points


class IngestConfig(StageConfig):
    batch_size: int = Field(8, ge=1, le=4096)
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Images declaring more pixels are refused before decoding: the worker "
        "memory bound (README, 'Large images') holds up to this size, and decompression bombs are stopped.",
    )


class Ingest(MapStage):
    name = "ingest"
    version = 2  # 2: boxes output
    Config = IngestConfig
    config: IngestConfig
    reads = ()
    resources = Resources(cpus=1)

    def __init__(self, config: IngestConfig):
        super().__init__(config)
        self._decoded_sha256: dict[str, str] = {}
        """unit id -> sha256 of the image bytes ``process`` decoded, until its receipt takes it."""

    def outputs(self, ctx: Context) -> tuple[str, ...]:
        return ("image", "weak", "boxes")

    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        data = read_file_bytes(unit.image)
        image = decode_image(unit.image, max_pixels=self.config.max_pixels, data=data)
        hw = image.shape[:2]
        classes = ctx.classes
        dtype = classes.label_dtype
        boxes = np.zeros((0, 5), np.float32)
        weak = np.full(hw, classes.ignore_id, dtype)
        path_for_errors = unit.weak_source or unit.image
        class_ids = frozenset(classes.ids)
        if ctx.weak_kind == "points":
            points = validate_points(
                unit.weak_rows, path_for_errors=path_for_errors, image_hw=hw, class_ids=class_ids, image=unit.id
            )
            weak = rasterize_points(points, hw, classes.ignore_id, dtype)
        elif ctx.weak_kind == "boxes":
            boxes = validate_boxes(
                unit.weak_rows,
                path_for_errors=path_for_errors,
                image_hw=hw,
                class_ids=class_ids,
                image=unit.id,
                background=ctx.background,
            )
        elif ctx.weak_kind in ("scribbles", "coarse"):
            if unit.weak_map is None or not file_exists(unit.weak_map):
                raise InputError(unit.weak_map or unit.image, "no weak label map for this image")
            assert ctx.unlabelled is not None  # set from data.weak.unlabelled for every label-map kind
            raw = read_label_map(
                unit.weak_map,
                expected_hw=hw,
                class_ids=class_ids,
                unlabelled=ctx.unlabelled,
            )
            weak = np.where(raw == ctx.unlabelled, classes.ignore_id, raw).astype(dtype)
        else:
            raise InputError(unit.weak_source or unit.image, f"weak label kind '{ctx.weak_kind}' cannot be ingested")
        self._decoded_sha256[unit.id] = hashlib.sha256(data).hexdigest()
        return {"image": image, "weak": weak, "boxes": boxes}

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict:
        h, w = outputs["image"].shape[:2]
        return {"source": unit.image, "sha256": self._decoded_sha256.pop(unit.id), "height": int(h), "width": int(w)}
