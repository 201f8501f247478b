"""``--format coco``: one COCO JSON, ``annotations.json``, that pycocotools' ``COCO`` loads.

    images       [{id, file_name (absolute path of the source image), height, width, seglab_unit}]
    categories   [{id (= class id), name, supercategory: ""}]
    annotations  one per connected region (8-connectivity) of each class in each image:
                 {id, image_id, category_id, segmentation (compressed RLE from
                 pycocotools.mask.encode, counts as text), area, bbox [x, y, w, h], iscrowd: 0,
                 score = 1 - mean uncertainty over the region, uncertainty = that mean}
                 (score and uncertainty are null when the label source has no uncertainty)
    info         description, date_created and the export's provenance

Unlabelled pixels belong to no annotation, so painting every annotation's mask with its
category id onto the ignore value gives back the class map. The file is written as the
images stream past; only the image records stay in memory.
"""

# no ``from __future__ import annotations``: the function ``annotations`` below would shadow it
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as rle
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from seglab.pipeline.exports.formats import ExportOptions
from seglab.pipeline.exports.items import ExportItem


def regions(labels: np.ndarray, class_ids: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, HxW bool mask) of every connected region of every class, class by class,
    regions in scan order of their first pixel."""
    for class_id in class_ids:
        components = connected_components(labels == class_id, connectivity=2)
        for region in regionprops(components):
            mask = np.zeros(labels.shape, bool)
            mask[region.slice] = components[region.slice] == region.label
            yield class_id, mask


def annotations(item: ExportItem, image_id: int, first_id: int, class_ids: list[int]) -> Iterator[dict[str, Any]]:
    """The item's annotations, numbered from ``first_id``."""
    for offset, (class_id, mask) in enumerate(regions(item.labels, class_ids)):
        encoded = rle.encode(np.asfortranarray(mask.astype(np.uint8)))
        uncertainty = None if item.uncertainty is None else float(item.uncertainty[mask].mean())
        yield {
            "id": first_id + offset,
            "image_id": image_id,
            "category_id": int(class_id),
            "segmentation": {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")},
            "area": int(rle.area(encoded)),
            "bbox": [float(v) for v in rle.toBbox(encoded)],
            "iscrowd": 0,
            "score": None if uncertainty is None else 1.0 - uncertainty,
            "uncertainty": uncertainty,
        }


def write(folder: Path, items: Iterable[ExportItem], meta: dict[str, Any], options: ExportOptions) -> dict[str, Any]:
    """Write ``annotations.json`` into ``folder``; -> {"images", "annotations"} counts."""
    class_ids = [c["id"] for c in meta["classes"]]
    images: list[dict[str, Any]] = []
    count = 0
    with open(folder / "annotations.json", "w", encoding="utf-8") as f:
        info = {
            "description": f"seglab labels of stage {meta['stage']}",
            "version": meta["provenance"]["seglab_version"],
            "date_created": datetime.now(UTC).isoformat(),
            "seglab": meta["provenance"],
        }
        f.write('{"info": ' + json.dumps(info) + ', "licenses": [], "annotations": [')
        for image_id, item in enumerate(items, start=1):
            height, width = item.labels.shape
            images.append(
                {"id": image_id, "file_name": item.image, "height": height, "width": width, "seglab_unit": item.unit}
            )
            for annotation in annotations(item, image_id, count + 1, class_ids):
                f.write(("," if count else "") + "\n" + json.dumps(annotation))
                count += 1
        categories = [{"id": c["id"], "name": c["name"], "supercategory": ""} for c in meta["classes"]]
        f.write('\n], "images": ' + json.dumps(images) + ', "categories": ' + json.dumps(categories) + "}\n")
    return {"images": len(images), "annotations": count}
