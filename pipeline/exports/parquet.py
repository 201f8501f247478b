"""``--format parquet``: ``labels.parquet``, one row per image, read by pyarrow and by
Hugging Face ``datasets.load_dataset("parquet", data_files=...)``.

Columns:
    unit                 string, the store's unit id
    image                struct<bytes: binary, path: string>: the source image's path, and its
                         file bytes with ``embed_images`` (else null)
    label                struct<bytes, path>: PNG of the class map (as ``png`` writes it)
    uncertainty          struct<bytes, path>: 8-bit PNG, round(255 u), 0 = certain; null without
    height, width        int32
    class_ids            list<int32>: the classes present in the label map, ascending
    class_names          list<string>: their names
    mean_uncertainty     float32 (null without uncertainty)
    uncertain_fraction   float32: share of pixels at or above the export's uncertain threshold
    stage, round         string, int32: the label source
    provenance           string: the export's provenance as JSON (dictionary-encoded, so cheap)

The image/label/uncertainty structs are what ``datasets`` calls an ``Image`` feature; the
schema metadata says so (key ``huggingface``), so ``load_dataset`` decodes them to PIL
images. The schema metadata key ``seglab`` holds the export's description as JSON.
Rows are written in row groups of ``ROW_GROUP`` images, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seglab.pipeline.base.objecturl import read_bytes
from seglab.pipeline.exports.formats import ExportOptions
from seglab.pipeline.exports.items import ExportItem, label_image, png_bytes, uncertainty_image

ROW_GROUP = 64
FILE = "labels.parquet"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("image", IMAGE),
        ("label", IMAGE),
        ("uncertainty", IMAGE),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("class_ids", pa.list_(pa.int32())),
        ("class_names", pa.list_(pa.string())),
        ("mean_uncertainty", pa.float32()),
        ("uncertain_fraction", pa.float32()),
        ("stage", pa.string()),
        ("round", pa.int32()),
        ("provenance", pa.string()),
    ]
)


def _feature(t: pa.DataType) -> dict[str, Any]:
    """The ``datasets`` feature of one column type, in its JSON form."""
    if t == IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(t):
        return {"_type": "Sequence", "feature": _feature(t.value_type)}
    return {"_type": "Value", "dtype": {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}[t]}


def huggingface_features() -> dict[str, Any]:
    return {"info": {"features": {f.name: _feature(f.type) for f in SCHEMA}}}


def _row(item: ExportItem, meta: dict[str, Any], names: dict[int, str], embed_images: bool) -> dict[str, Any]:
    present = [int(c) for c in np.unique(item.labels) if int(c) in names]
    uncertainty = None
    if item.uncertainty is not None:
        uncertainty = {"bytes": png_bytes(uncertainty_image(item.uncertainty)), "path": f"{item.name}.uncertainty.png"}
    height, width = item.labels.shape
    image_bytes = None
    if embed_images:
        assert item.image is not None  # ingest's receipt of a finished unit records its source
        image_bytes = read_bytes(item.image)  # a file, or an object under a URL data.root
    return {
        "unit": item.unit,
        "image": {"bytes": image_bytes, "path": item.image},
        "label": {"bytes": png_bytes(label_image(item.labels)), "path": f"{item.name}.png"},
        "uncertainty": uncertainty,
        "height": height,
        "width": width,
        "class_ids": present,
        "class_names": [names[c] for c in present],
        "mean_uncertainty": item.mean_uncertainty,
        "uncertain_fraction": item.uncertain_fraction,
        "stage": meta["stage"],
        "round": meta["round"],
        "provenance": json.dumps(meta["provenance"], sort_keys=True),
    }


def write(folder: Path, items: Iterable[ExportItem], meta: dict[str, Any], options: ExportOptions) -> dict[str, Any]:
    """Write ``labels.parquet`` into ``folder`` (image bytes with ``options.embed_images``);
    -> {"images": rows}."""
    embed_images = options.embed_images
    names = {c["id"]: c["name"] for c in meta["classes"]}
    schema = SCHEMA.with_metadata({"huggingface": json.dumps(huggingface_features()), "seglab": json.dumps(meta)})
    count, batch = 0, []
    with pq.ParquetWriter(folder / FILE, schema) as writer:
        for item in items:
            batch.append(_row(item, meta, names, embed_images))
            if len(batch) == ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return {"images": count}
