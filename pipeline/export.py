"""Export a stage's class maps as PNG files other trainers read directly.

Layout written (atomically: built in a temporary sibling folder, then renamed)::

    OUT/labels/<image stem>.png palette PNG ('P' mode): pixel value = class id, ignore = ignore_id
    OUT/index.json             classes, ignore id, provenance, and per image: source, label file
    OUT/index.csv              image,label
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.pipeline.atomic import atomic_folder
from seglab.pipeline.errors import SeglabError
from seglab.pipeline.store import Store


def palette(num: int = 256) -> list[int]:
    """A distinct colour per class id (PASCAL VOC's bit-interleaved palette)."""
    colours = []
    for i in range(num):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def export_png(store_path: Path | str, out: Path | str, *, stage: str = "refine", overwrite: bool = False) -> dict:
    """Write every done unit's ``<stage>/labels`` as a PNG; returns the index written."""
    store = Store(store_path)
    entries = {u: e for u, e in store.ledger(stage).load().items() if e.get("status") == "done"}
    if not entries:
        raise SeglabError(f"{store.path}: stage '{stage}' has no finished units to export")
    sources = {u: e.get("info", {}).get("source") for u, e in store.ledger("ingest").load().items()}
    attrs = store.attrs
    stems = Counter(Path(u).stem for u in entries)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        (tmp / "labels").mkdir()
        images = []
        for unit in sorted(entries):
            labels = store.read_unit([f"{stage}/labels"], unit)[f"{stage}/labels"]
            name = f"labels/{Path(unit).stem if stems[Path(unit).stem] == 1 else unit}.png"
            if labels.dtype == np.uint8:
                img = Image.fromarray(labels, mode="P")
                img.putpalette(palette())
            else:
                img = Image.fromarray(labels.astype(np.uint16))
            img.save(tmp / name)
            images.append({"unit": unit, "image": sources.get(unit), "label": name})
        index = {
            "stage": stage,
            "classes": attrs.get("classes", []),
            "ignore_id": int(attrs.get("ignore_id", 255)),
            "provenance": {k: attrs.get(k) for k in ("seglab_version", "manifest_hash")},
            "images": images,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
        with open(tmp / "index.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label"])
            writer.writerows([i["image"], i["label"]] for i in images)
    return index
