"""``seglab export``: a label source of a store as a dataset other training stacks load.

Formats (each module's docstring gives its layout): ``png`` (class-map PNGs, uncertainty,
palette, index), ``coco`` (COCO JSON with RLE masks per connected region), ``parquet``
(one row per image). Every export also holds

    export.json   format, stage, round, classes, ignore value, filters, images exported,
                  images dropped by the filters (with their uncertain fraction), units the
                  run ingested that the stage has not finished (not exported), provenance
    SHA256SUMS    '<sha256>  <path>' for every other file (``sha256sum -c SHA256SUMS`` checks it)

and is built in a temporary sibling folder that is renamed into place only when complete
(pipeline/atomic.py): a killed export leaves nothing at ``out`` or a complete dataset.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seglab.pipeline.atomic import atomic_folder
from seglab.pipeline.errors import SeglabError
from seglab.pipeline.exports import coco, parquet, png
from seglab.pipeline.exports.items import ExportItem, items
from seglab.pipeline.labelsource import open_source, provenance
from seglab.pipeline.store import Store

FORMATS = ("png", "coco", "parquet")
CHECKSUMS = "SHA256SUMS"


@dataclass(frozen=True)
class ExportOptions:
    """format: one of FORMATS; stage / round: the label source (default: the last round's
    refine); split: 'training', 'calibration' or 'evaluation' only; max_uncertain: drop
    images whose share of pixels with uncertainty >= uncertain_above exceeds it;
    ignore_value: what unlabelled pixels hold in the export; uncertainty_format: 'png' or
    'npy' (png format); embed_images: image file bytes in the rows (parquet format)."""

    format: str = "png"
    stage: str | None = None
    round: int | None = None
    split: str | None = None
    max_uncertain: float | None = None
    uncertain_above: float = 0.5
    ignore_value: int = 255
    uncertainty_format: str = "png"
    embed_images: bool = False
    overwrite: bool = False

    def check(self, class_ids: list[int]) -> None:
        if self.format not in FORMATS:
            raise SeglabError(f"unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.uncertainty_format not in png.UNCERTAINTY_FORMATS:
            raise SeglabError(f"unknown uncertainty format '{self.uncertainty_format}'; choose png or npy")
        if not 0 <= self.ignore_value <= 65535:
            raise SeglabError(f"--ignore-value {self.ignore_value} is outside 0..65535")
        if self.ignore_value in class_ids:
            raise SeglabError(f"--ignore-value {self.ignore_value} is a class id; pick a value no class uses")
        for name in ("max_uncertain", "uncertain_above"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SeglabError(f"--{name.replace('_', '-')} {value} is outside [0, 1]")


def sha256sums(folder: Path) -> str:
    """'<sha256>  <relative path>' lines for every file under ``folder``, sorted by path."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(folder).as_posix()}\n")
    return "".join(lines)


def _kept(stream: Iterator[ExportItem], max_uncertain: float | None, dropped: list[dict[str, Any]]) -> Iterator[ExportItem]:
    """The items whose uncertain fraction is at most ``max_uncertain``; the others go to ``dropped``."""
    for item in stream:
        if max_uncertain is not None and item.uncertain_fraction > max_uncertain:
            dropped.append({"unit": item.unit, "image": item.image, "uncertain_fraction": item.uncertain_fraction})
            continue
        yield item


def export(store_path: Path | str, out: Path | str, options: ExportOptions) -> dict[str, Any]:
    """Write the export; -> the content of its export.json."""
    store = Store(store_path)
    source = open_source(store, stage=options.stage, round=options.round)
    classes = [{"id": i, "name": n} for i, n in source.classes]
    options.check([c["id"] for c in classes])
    if options.max_uncertain is not None and not source.has_uncertainty:
        raise SeglabError(f"stage '{source.stage}' has no per-pixel uncertainty to filter by (--max-uncertain); "
                          "export a refine stage")
    units = source.in_split(options.split) if options.split else source.units
    if not units:
        raise SeglabError(f"{store.path}: stage '{source.stage}' has no finished {options.split} images")
    meta: dict[str, Any] = {
        "format": options.format, "stage": source.stage, "round": source.round, "classes": classes,
        "ignore_value": options.ignore_value,
        "filters": {"split": options.split, "max_uncertain": options.max_uncertain,
                    "uncertain_above": options.uncertain_above},
        "provenance": provenance(store, source.stage),
        "unfinished": source.unfinished(),
    }
    dropped: list[dict[str, Any]] = []
    stream = _kept(items(source, units, options.ignore_value, options.uncertain_above), options.max_uncertain, dropped)
    with atomic_folder(out, overwrite=options.overwrite) as tmp:
        if options.format == "png":
            written = png.write(tmp, stream, meta, uncertainty_format=options.uncertainty_format)
        elif options.format == "coco":
            written = coco.write(tmp, stream, meta)
        else:
            written = parquet.write(tmp, stream, meta, embed_images=options.embed_images)
        if not written["images"]:
            raise SeglabError(f"no image is left to export: all {len(dropped)} exceed --max-uncertain "
                              f"{options.max_uncertain}")
        meta.update(written=written, dropped=dropped, created=datetime.now(timezone.utc).isoformat())
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
        (tmp / CHECKSUMS).write_text(sha256sums(tmp))
    return meta
