"""``seglab simulate-weak``: derive weak labels from a folder of ground-truth masks.

Each mask gets its own generator seeded by (seed, crc32 of its file name), so the output
for one image does not depend on which other images are in the folder. The output folder
is built under a temporary name and renamed into place when complete:
  points  -> points.csv (image, x, y, class)
  boxes   -> boxes.csv (image, x0, y0, x1, y1, class); none for the ``background`` class
  scribbles / coarse -> <stem>.png label maps (``unlabelled`` where there is no label)
A name list and a limit choose the masks; a ``Progress`` is told of each mask done.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.atomic import atomic_folder
from seglab.pipeline.core.gold import read_mask
from seglab.stages.parts import weak_simulation as sim

MASK_SUFFIXES = {".png", ".bmp", ".tif", ".tiff"}
NAMED_SUFFIXES = MASK_SUFFIXES | {".jpg", ".jpeg", ".webp"}
"""A line of a name list ending in one of these names a file (compared by its stem), else it is a stem."""
KINDS = ("points", "scribbles", "coarse", "boxes")


class Progress(Protocol):
    """What ``simulate_weak`` reports to (``stage`` is the weak-label kind): the masks it
    will read, then each mask done."""

    def start(self, stage: str, total: int, done: int) -> None: ...
    def advance(self, stage: str, count: int) -> None: ...


def read_names(path: Path) -> list[str]:
    """A name list: one image or mask file name, or stem, per line; blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SeglabError(f"cannot read the name list {path}: {exc}") from None
    return [line.strip() for line in lines if line.strip()]


def _stem(name: str) -> str:
    named = Path(name)
    return named.stem if named.suffix.lower() in NAMED_SUFFIXES else named.name


def select_masks(files: Sequence[Path], names: Sequence[str] | None, limit: int | None) -> list[Path]:
    """The masks among ``files`` whose stem is named in ``names`` (all when None), at most
    ``limit`` of them. A name that matches no mask is an error (a typo would silently
    shrink the benchmark)."""
    if names is not None:
        wanted = {_stem(n) for n in names}
        unmatched = sorted(wanted - {p.stem for p in files})
        if unmatched:
            raise SeglabError(f"{len(unmatched)} listed name(s) match no mask (first: '{unmatched[0]}')")
        files = [p for p in files if p.stem in wanted]
    return list(files[:limit] if limit is not None else files)


def simulate_weak(
    *,
    masks: Path,
    kind: str,
    out: Path,
    seed: int,
    ignore: Sequence[int] = (),
    images: Path | None = None,
    unlabelled: int = 255,
    names: Sequence[str] | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    background: int | None = None,
) -> int:
    """Write weak labels of ``kind`` for the masks in ``masks`` (those whose stem ``names``
    names, when given; the first ``limit``); returns the number of masks. ``background``
    (boxes only): the class whose components get no box."""
    if kind not in KINDS:
        raise SeglabError(f"unknown weak-label kind '{kind}'; choose one of {', '.join(KINDS)}")
    if background is not None and kind != "boxes":
        raise SeglabError(
            f"--background is only for --kind boxes, not {kind} (the other kinds label the background like any class)"
        )
    found = sorted(p for p in Path(masks).iterdir() if p.suffix.lower() in MASK_SUFFIXES)
    if not found:
        raise SeglabError(f"{masks}: no mask files ({', '.join(sorted(MASK_SUFFIXES))})")
    files = select_masks(found, names, limit)
    image_names = {p.stem: p.name for p in Path(images).iterdir()} if images else {}
    rows: list[tuple] = []
    if progress:
        progress.start(kind, len(files), 0)
    with atomic_folder(out) as tmp:
        for path in files:
            mask = read_mask(path)
            rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
            image_name = image_names.get(path.stem, path.name)
            if kind == "points":
                rows += [(image_name, *r) for r in sim.simulate_points(mask, ignore, rng)]
            elif kind == "boxes":
                rows += [(image_name, *r) for r in sim.simulate_boxes(mask, ignore, rng, background=background)]
            else:
                make = sim.simulate_scribbles if kind == "scribbles" else sim.simulate_coarse
                Image.fromarray(make(mask, ignore, rng, unlabelled=unlabelled)).save(tmp / f"{path.stem}.png")
            if progress:
                progress.advance(kind, 1)
        if kind in ("points", "boxes"):
            header = ["image", "x", "y", "class"] if kind == "points" else ["image", "x0", "y0", "x1", "y1", "class"]
            with open(tmp / f"{kind}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
    return len(files)
