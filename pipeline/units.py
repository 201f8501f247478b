"""Enumerate a manifest's units (images) and attach each one's weak label.

Runs on the driver. Point and box tables are parsed once here, so a worker receives only
its unit's rows. Unit ids are image paths relative to the data root with '/' written as
'__' (sample images: their file name), unique by construction.
"""
from __future__ import annotations

import glob as globlib
from pathlib import Path

import pyarrow.parquet as pq

from seglab.pipeline.errors import InputError, ManifestError
from seglab.pipeline.fingerprint import digest
from seglab.pipeline.manifest import ImageSource, Manifest
from seglab.stages.base import Unit
from seglab.stages.weak import assign_to_images, read_box_table, read_point_table

#: weak-label kinds given as one table for all images, and their readers
TABLE_KINDS = {"points": read_point_table, "boxes": read_box_table}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def sample_image_path(name: str) -> Path:
    """A photograph bundled with scikit-image, by name (e.g. 'astronaut')."""
    import skimage.data

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
            raise ManifestError(manifest_path, [("data.images.glob", f"'{outside[0]}' resolves to {outside[0].resolve()}, "
                                                 f"outside the data root {root}")])
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


def enumerate_units(manifest: Manifest) -> list[Unit]:
    data = manifest.data
    root = Path(data.root)
    images = list_images(data.images, root, manifest.path)
    units: list[Unit] = []
    keys = {path: path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name for path in images}
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
            raise ManifestError(manifest.path, [("data.images", f"{path} and {seen[uid]} map to the same unit id '{uid}'")])
        seen[uid] = path
        if tabular:
            rows = rows_by_image.get(keys[path], [])
            units.append(Unit(id=uid, image=str(path), weak_rows=tuple(map(tuple, rows)), weak_source=data.weak.path))
        else:
            weak = Path(data.weak.path) / f"{path.stem}.png"
            units.append(Unit(id=uid, image=str(path), weak_map=str(weak), weak_source=str(weak)))
    return units


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
        raise ManifestError(manifest.path, [(f"data.{gold_set}.images", f"{len(outside)} image(s) are not among "
                                             f"data.images, e.g. {outside[0]}")])
    if data.calibration is not None and data.evaluation is not None:
        other = "evaluation" if gold_set == "calibration" else "calibration"
        shared = set(images) & {p.resolve() for p in list_images(getattr(data, other).images, root, manifest.path)}
        if shared:
            raise ManifestError(manifest.path, [("data.calibration", f"{len(shared)} image(s) are also evaluation "
                                                 f"images, e.g. {sorted(shared)[0]}; keep the two sets apart")])
    return [by_image[p] for p in images]


def held_out(manifest: Manifest, units: list[Unit]) -> dict[str, list[str]]:
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
