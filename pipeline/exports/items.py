"""What every export format writes per image, and how label maps become PNG images.

An ``ExportItem`` is one image of the chosen label source after the export's filters:
its class map with unlabelled pixels set to the export's ignore value, and its
uncertainty when the source has one. A unit whose stored arrays are missing or differ from
what their writer recorded becomes a ``Damaged`` record instead, never an item.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.pipeline.core.store import StoreError
from seglab.pipeline.exports.labelsource import LabelSource
from seglab.pipeline.exports.palette import palette


@dataclass(frozen=True)
class ExportItem:
    """unit: store unit id; image: absolute path of the source image (None when ingest's
    ledger records none); name: file stem the export uses for it (the image's stem, or the
    unit id where stems collide); labels: HxW uint8 (uint16 when a class id or the ignore
    value exceeds 255) class ids, the export's ignore value where unlabelled; uncertainty:
    HxW float32 in [0, 1] (0 = certain) or None; uncertain_fraction / mean_uncertainty: of
    this image (None without uncertainty)."""

    unit: str
    image: str | None
    name: str
    labels: np.ndarray
    uncertainty: np.ndarray | None
    uncertain_fraction: float | None
    mean_uncertainty: float | None


@dataclass(frozen=True)
class Damaged:
    """A unit left out because its stored arrays are missing or damaged. unit, image: as in
    ``ExportItem``; problem: the store's one-line account of the first array at fault."""

    unit: str
    image: str | None
    problem: str


def file_stems(source: LabelSource, units: Sequence[str]) -> dict[str, str]:
    """unit -> export file stem: the image file's stem (what trainers pair label files by),
    or the unit id for images whose stems collide."""
    stems = {u: Path(source.images[u] or u).stem for u in units}
    counts = Counter(stems.values())
    return {u: s if counts[s] == 1 else u for u, s in stems.items()}


def remap_ignore(labels: np.ndarray, stored: int, value: int) -> np.ndarray:
    """Class map with the store's ignore id replaced by ``value`` (widened to uint16 when needed)."""
    dtype = np.uint16 if value > 255 or labels.dtype == np.uint16 else np.uint8
    out = labels.astype(dtype, copy=True)
    out[labels == stored] = value
    return out


def label_image(labels: np.ndarray) -> Image.Image:
    """uint8 class map -> palette ('P') image whose pixel values are the class ids;
    uint16 -> 16-bit greyscale ('I;16')."""
    if labels.dtype == np.uint8:
        image = Image.fromarray(labels, mode="P")
        image.putpalette(palette())
        return image
    return Image.fromarray(labels.astype(np.uint16))


def uncertainty_image(uncertainty: np.ndarray) -> Image.Image:
    """HxW [0, 1] float -> 8-bit greyscale ('L') image of round(255 u): 0 = certain,
    255 = most uncertain."""
    return Image.fromarray(np.rint(np.clip(uncertainty, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def items(
    source: LabelSource, units: Sequence[str], ignore_value: int, uncertain_above: float, damaged: list[Damaged]
) -> Iterator[ExportItem]:
    """The units' items, read from the store one at a time and checked against their
    records; a pixel is uncertain when its uncertainty is at least ``uncertain_above``.
    Units whose arrays are missing or damaged go to ``damaged``."""
    stems = file_stems(source, units)
    for unit in units:
        try:
            labels, uncertainty = source.labels(unit), source.uncertainty(unit)
        except StoreError as exc:  # CorruptOutput included
            damaged.append(Damaged(unit, source.images[unit], str(exc)))
            continue
        yield ExportItem(
            unit=unit,
            image=source.images[unit],
            name=stems[unit],
            labels=remap_ignore(labels, source.ignore_id, ignore_value),
            uncertainty=uncertainty,
            uncertain_fraction=None if uncertainty is None else float((uncertainty >= uncertain_above).mean()),
            mean_uncertainty=None if uncertainty is None else float(uncertainty.mean()),
        )
