"""``seglab simulate-weak``: derive weak labels from a folder of ground-truth masks.

Each mask gets its own generator seeded by (seed, crc32 of its file name), so the output
for one image does not depend on which other images are in the folder. The output folder
is built under a temporary name and renamed into place when complete:
  points  -> points.csv (image, x, y, class)
  boxes   -> boxes.csv (image, x0, y0, x1, y1, class)
  scribbles / coarse -> <stem>.png label maps (``unlabelled`` where there is no label)
"""
from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.pipeline.atomic import atomic_folder
from seglab.pipeline.errors import InputError, SeglabError
from seglab.stages import weak_simulation as sim
from seglab.stages.imageio import open_checked

MASK_SUFFIXES = {".png", ".bmp", ".tif", ".tiff"}
KINDS = ("points", "scribbles", "coarse", "boxes")


def read_mask(path: Path) -> np.ndarray:
    """A single-channel class-id mask -> HxW int64."""
    image, _ = open_checked(path, max_pixels=1 << 28)
    if image.mode not in ("L", "P", "I;16", "I", "1"):
        raise InputError(path, f"a mask must hold one class id per pixel, got mode {image.mode}")
    return np.asarray(image).astype(np.int64)


def simulate_weak(*, masks: Path, kind: str, out: Path, seed: int, ignore: Sequence[int] = (),
                  images: Path | None = None, unlabelled: int = 255) -> int:
    """Write weak labels of ``kind`` for every mask in ``masks``; returns the number of masks."""
    if kind not in KINDS:
        raise SeglabError(f"unknown weak-label kind '{kind}'; choose one of {', '.join(KINDS)}")
    files = sorted(p for p in Path(masks).iterdir() if p.suffix.lower() in MASK_SUFFIXES)
    if not files:
        raise SeglabError(f"{masks}: no mask files ({', '.join(sorted(MASK_SUFFIXES))})")
    names = {p.stem: p.name for p in Path(images).iterdir()} if images else {}
    rows: list[tuple] = []
    with atomic_folder(out) as tmp:
        for path in files:
            mask = read_mask(path)
            rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
            image_name = names.get(path.stem, path.name)
            if kind == "points":
                rows += [(image_name, *r) for r in sim.simulate_points(mask, ignore, rng)]
            elif kind == "boxes":
                rows += [(image_name, *r) for r in sim.simulate_boxes(mask, ignore, rng)]
            else:
                make = sim.simulate_scribbles if kind == "scribbles" else sim.simulate_coarse
                Image.fromarray(make(mask, ignore, rng, unlabelled=unlabelled)).save(tmp / f"{path.stem}.png")
        if kind in ("points", "boxes"):
            header = ["image", "x", "y", "class"] if kind == "points" else ["image", "x0", "y0", "x1", "y1", "class"]
            with open(tmp / f"{kind}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
    return len(files)
