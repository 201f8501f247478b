"""Weak labels derived from ground-truth masks, as weakly supervised segmentation papers
simulate them, for benchmarking. Pure functions of a mask and a seeded generator.

Every function takes ``mask``: HxW integer class ids, and ``ignore``: ids that are not
classes (e.g. CamVid's 11). Connected components (8-connectivity) smaller than
``min_area`` pixels get no weak label.
- points:    ``per_component`` pixels drawn uniformly from the component's interior
             (eroded by ``margin`` when that leaves anything).
- scribbles: one stroke per component following its skeleton from a random start,
             at most ``max_fraction`` of the skeleton long, ``width`` pixels wide,
             clipped to the component.
- coarse:    the component eroded by ``erode`` pixels, its outline simplified to a
             polygon (tolerance ``tolerance`` px) and filled: it misses the boundary
             and thin parts, like a hasty annotator.
- boxes:     the tight box of each component, except those of the ``background`` class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon
from skimage.measure import approximate_polygon, find_contours
from skimage.measure import label as connected_components
from skimage.morphology import disk, skeletonize


def components(mask: np.ndarray, ignore: Sequence[int], min_area: int) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, bool HxW component) for every component of every class, in class order."""
    for cls in np.unique(mask):
        if int(cls) in ignore:
            continue
        labelled, count = connected_components(mask == cls, connectivity=2, return_num=True)
        sizes = np.bincount(labelled.ravel(), minlength=count + 1)
        for comp in range(1, count + 1):
            if sizes[comp] >= min_area:
                yield int(cls), labelled == comp


def _interior(component: np.ndarray, margin: int) -> np.ndarray:
    eroded = ndimage.binary_erosion(component, disk(margin)) if margin else component
    return eroded if eroded.any() else component


def simulate_points(mask, ignore, rng, *, per_component=3, margin=3, min_area=20) -> list[tuple[int, int, int]]:
    """-> rows (x, y, class): pixel column, pixel row, class id."""
    rows = []
    for cls, comp in components(mask, ignore, min_area):
        yx = np.argwhere(_interior(comp, margin))
        for y, x in yx[rng.choice(len(yx), size=min(per_component, len(yx)), replace=False)]:
            rows.append((int(x), int(y), cls))
    return rows


def _walk(skeleton: np.ndarray, start: tuple[int, int], length: int) -> list[tuple[int, int]]:
    """Breadth-first walk along skeleton pixels from ``start``, at most ``length`` pixels."""
    seen, queue = {start}, deque([start])
    path: list[tuple[int, int]] = []
    h, w = skeleton.shape
    while queue and len(path) < length:
        y, x = queue.popleft()
        path.append((y, x))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and skeleton[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    queue.append((ny, nx))
    return path


def simulate_scribbles(
    mask, ignore, rng, *, unlabelled=255, max_fraction=0.6, width=3, margin=2, min_area=20
) -> np.ndarray:
    """-> HxW uint8/uint16 label map: a stroke per component, ``unlabelled`` elsewhere."""
    out = np.full(mask.shape, unlabelled, np.uint16 if max(int(mask.max()), unlabelled) > 255 else np.uint8)
    for cls, comp in components(mask, ignore, min_area):
        skeleton = skeletonize(_interior(comp, margin))
        yx = np.argwhere(skeleton)
        if not len(yx):
            continue
        start = tuple(yx[rng.integers(len(yx))])
        length = max(1, int(len(yx) * rng.uniform(0.5 * max_fraction, max_fraction)))
        stroke = np.zeros(mask.shape, bool)
        stroke[tuple(np.array(_walk(skeleton, start, length)).T)] = True
        if width > 1:
            stroke = ndimage.binary_dilation(stroke, disk(width // 2))
        out[stroke & comp] = cls
    return out


def simulate_coarse(mask, ignore, rng, *, unlabelled=255, erode=4, tolerance=6.0, min_area=50) -> np.ndarray:
    """-> HxW label map of simplified, shrunken polygons per component."""
    out = np.full(mask.shape, unlabelled, np.uint16 if max(int(mask.max()), unlabelled) > 255 else np.uint8)
    for cls, comp in components(mask, ignore, min_area):
        shrunk = ndimage.binary_erosion(comp, disk(erode)) if erode else comp
        if not shrunk.any():
            continue
        padded = np.pad(shrunk, 1)
        for contour in find_contours(padded.astype(np.float32), 0.5):
            poly = approximate_polygon(contour - 1, tolerance=tolerance * rng.uniform(0.75, 1.25))
            if len(poly) < 3:
                continue
            rr, cc = fill_polygon(poly[:, 0], poly[:, 1], shape=mask.shape)
            inside = comp[rr, cc]  # simplification may cut outside; never label another class
            out[rr[inside], cc[inside]] = cls
    return out


def simulate_boxes(mask, ignore, rng, *, min_area=20, background=None) -> list[tuple[int, int, int, int, int]]:
    """-> rows (x0, y0, x1, y1, class), pixel edges: x1, y1 exclusive. Components of class
    ``background`` get no box (annotators box objects; the background is what no box covers)."""
    rows = []
    for cls, comp in components(mask, (*ignore, background) if background is not None else ignore, min_area):
        ys, xs = np.nonzero(comp)
        rows.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, cls))
    return rows
