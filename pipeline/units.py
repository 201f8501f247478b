"""Enumerate a manifest's units (images) and attach each one's weak label.

Runs on the driver. Point and box tables are parsed once here, so a worker receives only
its unit's rows. Unit ids are image paths relative to the data root with '/' written as
'__' (sample images: their file name), unique by construction.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import skimage.data

from seglab.pipeline.base.errors import InputError, ManifestError
from seglab.pipeline.base.fingerprint import digest
from seglab.pipeline.manifest import ImageSource, Manifest
from seglab.stages.base import Unit
from seglab.stages.parts.weak import assign_to_images, read_box_table, read_point_table

#: weak-label kinds given as one table for all images, and their readers
TABLE_KINDS = {"points": read_point_table, "boxes": read_box_table}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def sample_image_path(name: str) -> Path:
    """A photograph bundled with scikit-image, by name (e.g. 'astronaut')."""
    folder = Path(skimage.data.__file__).parent
    matches = sorted(p for p in folder.iterdir() if p.stem == name and p.suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        available = sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
        raise InputError(folder, f"no bundled sample image '{name}'; available: {', '.join(available)}")
    return matches[0]


def list_images(source: ImageSource, root: Path, manifest_path: str) -> list[Path]:
    """Absolute image paths in a stable order."""
    if source.sample is not None:
        return [sample_image_path(n) for n in source.sample]
    if source.glob is not None:
        paths = [Path(p) for p in globlib.glob(str(root / source.glob), recursive=True)]
        paths = [p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        outside = [p for p in paths if not p.resolve().is_relative_to(root.resolve())]
        if outside:  # a symlink under the root that points elsewhere
            raise ManifestError(
                manifest_path,
                [
                    (
                        "data.images.glob",
                        f"'{outside[0]}' resolves to {outside[0].resolve()}, outside the data root {root}",
                    )
                ],
            )
        if not paths:
            raise ManifestError(manifest_path, [("data.images.glob", f"'{source.glob}' matches no image under {root}")])
        return sorted(paths)
    if source.list is not None:
        lines = Path(source.list).read_text(encoding="utf-8").splitlines()
        entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        table = pq.read_table(source.parquet, columns=[source.column])
        entries = [str(v) for v in table.column(source.column).to_pylist()]
    paths = []
    for entry in entries:
        path = (root / entry).resolve()
        if not path.is_relative_to(root):
            raise ManifestError(manifest_path, [("data.images", f"'{entry}' resolves outside the data root {root}")])
        paths.append(path)
    return paths


def check_weak_source(manifest: Manifest) -> None:
    """ManifestError at data.weak.path unless the weak labels can be read: one table file
    for points and boxes, a folder of label maps for scribbles and coarse masks."""
    weak = manifest.data.weak
    path, table = Path(weak.path), weak.kind in TABLE_KINDS
    if not path.exists():
        problem = f"{path} does not exist"
    elif table and path.is_dir():
        problem = f"{path} is a folder; {weak.kind} are one table file (JSON, CSV or Parquet)"
    elif not table and not path.is_dir():
        problem = f"{path} is a file; {weak.kind} are a folder of <image stem>.png label maps"
    elif not os.access(path, os.R_OK if table else os.R_OK | os.X_OK):
        problem = f"{path} is not readable (permission denied)"
    else:
        return
    raise ManifestError(manifest.path, [("data.weak.path", problem)])


def _image_key(path: Path, root: Path) -> str:
    """An image's path relative to the data root ('/'-separated), or its file name (samples)."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def enumerate_units(manifest: Manifest) -> list[Unit]:
    """The manifest's images as units, each with its weak label (path or table rows), in a
    stable order. ManifestError when the weak labels cannot be read at all; an image
    without a weak label is a unit still (ingest fails it, naming what is missing)."""
    data = manifest.data
    root = Path(data.root)
    check_weak_source(manifest)
    images = list_images(data.images, root, manifest.path)
    units: list[Unit] = []
    keys = {path: _image_key(path, root) for path in images}
    tabular = data.weak.kind in TABLE_KINDS
    rows_by_image = {}
    if tabular:
        weak_path = Path(data.weak.path)
        table = TABLE_KINDS[data.weak.kind](weak_path)
        rows_by_image = assign_to_images(table, keys.values(), path_for_errors=weak_path)
    seen: dict[str, Path] = {}
    for path in images:
        uid = keys[path].replace("/", "__")
        if uid in seen:
            raise ManifestError(
                manifest.path, [("data.images", f"{path} and {seen[uid]} map to the same unit id '{uid}'")]
            )
        seen[uid] = path
        if tabular:
            rows = rows_by_image.get(keys[path], [])
            units.append(Unit(id=uid, image=str(path), weak_rows=tuple(rows), weak_source=data.weak.path))
        else:
            weak = Path(data.weak.path) / f"{path.stem}.png"
            units.append(Unit(id=uid, image=str(path), weak_map=str(weak), weak_source=str(weak)))
    return units


@dataclass(frozen=True)
class UnlabelledImages:
    """Listed images that have no weak label.

    images: their paths relative to data.root (file names for sample images), in run order.
    total: how many images are listed. absent: what they lack, e.g. 'no row in /w/points.csv'.
    """

    images: tuple[str, ...]
    total: int
    absent: str


def unlabelled_images(manifest: Manifest, units: list[Unit]) -> UnlabelledImages:
    """The units of ``enumerate_units(manifest)`` without a weak label: no row in the table
    (points, boxes), or no ``<stem>.png`` in the folder (scribbles, coarse; listed once)."""
    weak, root = manifest.data.weak, Path(manifest.data.root)
    if weak.kind in TABLE_KINDS:
        missing = [u for u in units if not u.weak_rows]
        absent = f"no row in {weak.path}"
    else:
        present = {entry.name for entry in os.scandir(weak.path)}
        missing = [u for u in units if u.weak_map is None or Path(u.weak_map).name not in present]
        absent = f"no <image stem>.png in {weak.path}"
    return UnlabelledImages(tuple(_image_key(Path(u.image), root) for u in missing), len(units), absent)


def file_stat(path: str | Path | None) -> list:
    """[path, size, mtime in ns] (or [path, None] when it does not exist): what identifies
    a file's content without reading it."""
    if path is None or not Path(path).exists():
        return [str(path) if path else None, None]
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def unit_input_digest(unit: Unit) -> str:
    """What identifies a unit's raw inputs without reading them: paths, sizes, mtimes,
    and the table rows themselves. A change recomputes the unit (and what depends on it)."""
    return digest([file_stat(unit.image), file_stat(unit.weak_map), list(unit.weak_rows)])


def gold_units(manifest: Manifest, gold_set: str, units: list[Unit]) -> list[Unit]:
    """The run's units whose images make up ``data.<gold_set>`` (calibration, evaluation).

    ManifestError when a gold image is not among data.images, or when the calibration and
    evaluation sets share an image (a guarantee checked on its own calibration data is none).
    """
    data, root = manifest.data, Path(manifest.data.root)
    by_image = {Path(u.image).resolve(): u for u in units}
    images = [p.resolve() for p in list_images(getattr(data, gold_set).images, root, manifest.path)]
    outside = [p for p in images if p not in by_image]
    if outside:
        raise ManifestError(
            manifest.path,
            [(f"data.{gold_set}.images", f"{len(outside)} image(s) are not among data.images, e.g. {outside[0]}")],
        )
    if data.calibration is not None and data.evaluation is not None:
        other = "evaluation" if gold_set == "calibration" else "calibration"
        shared = set(images) & {p.resolve() for p in list_images(getattr(data, other).images, root, manifest.path)}
        if shared:
            raise ManifestError(
                manifest.path,
                [
                    (
                        "data.calibration",
                        f"{len(shared)} image(s) are also evaluation "
                        f"images, e.g. {sorted(shared)[0]}; keep the two sets apart",
                    )
                ],
            )
    return [by_image[p] for p in images]


def held_out(manifest: Manifest, units: Sequence[Unit]) -> dict[str, list[str]]:
    """Ids of the run's units in each gold set the manifest names ('calibration',
    'evaluation'), in run order; gold images outside data.images are not units."""
    data, root = manifest.data, Path(manifest.data.root)
    sets = {}
    for name in ("calibration", "evaluation"):
        gold = getattr(data, name)
        if gold is not None:
            images = {p.resolve() for p in list_images(gold.images, root, manifest.path)}
            sets[name] = [u.id for u in units if Path(u.image).resolve() in images]
    return sets


def training_units(manifest: Manifest, units: list[Unit]) -> list[Unit]:
    """The run's units a trained stage may learn from: every image that is neither a
    calibration nor an evaluation image (their gold masks must stay unseen by training)."""
    gold = {u for ids in held_out(manifest, units).values() for u in ids}
    return [u for u in units if u.id not in gold]
