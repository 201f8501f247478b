"""``--format png``: the folder layout PIL and semantic-segmentation trainers read directly.

    labels/<stem>.png        class map: palette ('P') PNG whose pixel values are class ids
                             (16-bit greyscale when an id exceeds 255); ignore = the export's value
    uncertainty/<stem>.png   8-bit greyscale, round(255 u): 0 = certain (or <stem>.npy: float16 u)
    palette.json             [{id, name, color: [r, g, b]}] for every class
    index.csv                image,label,uncertainty (label paths relative to the export)
    index.json               classes, ignore value, and per image: unit, image, label,
                             uncertainty, height, width, mean_uncertainty, uncertain_fraction

<stem> is the source image's file stem, so a trainer that pairs images and annotations by
name (images/<stem>.jpg with labels/<stem>.png) finds them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from seglab.pipeline.exports.formats import ExportOptions
from seglab.pipeline.exports.items import ExportItem, label_image, uncertainty_image
from seglab.pipeline.exports.palette import colour_of


def write(folder: Path, items: Iterable[ExportItem], meta: dict[str, Any], options: ExportOptions) -> dict[str, Any]:
    """Write the layout above into ``folder`` (uncertainty as ``options.uncertainty_format``);
    -> {"images": count}."""
    uncertainty_format = options.uncertainty_format
    (folder / "labels").mkdir()
    rows = []
    for item in items:
        label = f"labels/{item.name}.png"
        label_image(item.labels).save(folder / label)
        uncertainty = None
        if item.uncertainty is not None:
            (folder / "uncertainty").mkdir(exist_ok=True)
            uncertainty = f"uncertainty/{item.name}.{uncertainty_format}"
            if uncertainty_format == "npy":
                np.save(folder / uncertainty, item.uncertainty.astype(np.float16))
            else:
                uncertainty_image(item.uncertainty).save(folder / uncertainty)
        height, width = item.labels.shape
        rows.append(
            {
                "unit": item.unit,
                "image": item.image,
                "label": label,
                "uncertainty": uncertainty,
                "height": height,
                "width": width,
                "mean_uncertainty": item.mean_uncertainty,
                "uncertain_fraction": item.uncertain_fraction,
            }
        )
    classes = meta["classes"]
    (folder / "palette.json").write_text(
        json.dumps([{**c, "color": list(colour_of(c["id"]))} for c in classes], indent=2)
    )
    (folder / "index.json").write_text(
        json.dumps({"classes": classes, "ignore_value": meta["ignore_value"], "images": rows}, indent=2)
    )
    with open(folder / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "uncertainty"])
        writer.writerows([r["image"], r["label"], r["uncertainty"] or ""] for r in rows)
    return {"images": len(rows)}
