"""Enumerate a manifest's units (images) and attach each one's weak label.

Runs on the driver. Point and box tables are parsed once here, so a worker receives only
its unit's rows. Unit ids are image paths relative to the data root with '/' written as
'__' (sample images: their file name), unique by construction.

The data root is a folder, or an s3:// or gs:// URL: then images are the objects under it
(a glob is matched against their keys, pipeline/core/keyglob.py, after one listing under the
glob's literal prefix), a unit's image and weak label map are object URLs, and the same
files give the same unit ids from a bucket as from a folder.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import skimage.data

from seglab.pipeline.base.errors import InputError, ManifestError
from seglab.pipeline.base.fingerprint import digest
from seglab.pipeline.base.objecturl import ListedHeads, head_object, is_object_url, join_key, list_keys
from seglab.pipeline.core.keyglob import glob_prefix, match_keys
from seglab.pipeline.core.paths import object_key
from seglab.pipeline.manifest import ImageSource, Manifest, index_entries
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
    paths = []
    for entry in index_entries(source):
        path = (root / entry).resolve()
        if not path.is_relative_to(root):
            raise ManifestError(manifest_path, [("data.images", f"'{entry}' resolves outside the data root {root}")])
        paths.append(path)
    return paths


def list_sources(source: ImageSource, root: str, manifest_path: str) -> list[str]:
    """Image locations in a stable order: absolute paths under a folder ``root``, object
    URLs under an s3:// or gs:// ``root`` (bundled samples: their paths under either)."""
    if source.sample is None and is_object_url(root):
        return [join_key(root, key) for key in list_object_keys(source, root, manifest_path)]
    return [str(path) for path in list_images(source, Path(root), manifest_path)]


def list_object_keys(source: ImageSource, root: str, manifest_path: str) -> list[str]:
    """Keys (relative to the URL data root ``root``) of the images: those a glob matches,
    sorted, or the entries of an image list or Parquet index, in order. ManifestError naming
    the URL when the listing fails, a glob matches no image or an entry leaves the root."""
    if source.glob is not None:
        return _glob_keys(source.glob, root, manifest_path)
    try:
        return [object_key(entry, root) for entry in index_entries(source)]
    except ValueError as exc:
        raise ManifestError(manifest_path, [("data.images", str(exc))]) from None


def _glob_keys(glob: str, root: str, manifest_path: str) -> list[str]:
    """The image keys under ``root`` matching ``glob``, from one listing under its literal prefix."""
    prefix = glob_prefix(glob)
    folder = join_key(root, prefix)
    try:
        listed = list_keys(folder)
    except OSError as exc:
        raise ManifestError(manifest_path, [("data.images.glob", f"cannot list {folder}: {exc.strerror}")]) from None
    keys = match_keys((f"{prefix}/{key}" if prefix else key for key in listed), glob)
    images = [key for key in keys if PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ManifestError(manifest_path, [("data.images.glob", f"'{glob}' matches no image under {root}")])
    return images


def check_weak_source(manifest: Manifest) -> None:
    """ManifestError at data.weak.path unless the weak labels can be read: one table file
    (or object) for points and boxes, a folder (or prefix) of label maps for scribbles and
    coarse masks."""
    weak = manifest.data.weak
    table = weak.kind in TABLE_KINDS
    if is_object_url(weak.path):
        problem = _weak_object_problem(weak.path, weak.kind, table)
    else:
        problem = _weak_file_problem(Path(weak.path), weak.kind, table)
    if problem is not None:
        raise ManifestError(manifest.path, [("data.weak.path", problem)])


def _weak_file_problem(path: Path, kind: str, table: bool) -> str | None:
    """Why the weak labels at ``path`` cannot be read, or None when they can."""
    if not path.exists():
        return f"{path} does not exist"
    if table and path.is_dir():
        return f"{path} is a folder; {kind} are one table file (JSON, CSV or Parquet)"
    if not table and not path.is_dir():
        return f"{path} is a file; {kind} are a folder of <image stem>.png label maps"
    if not os.access(path, os.R_OK if table else os.R_OK | os.X_OK):
        return f"{path} is not readable (permission denied)"
    return None


def _weak_object_problem(url: str, kind: str, table: bool) -> str | None:
    """Why the weak labels at the object URL ``url`` cannot be read, or None when they can:
    a table is one object, label maps are the objects under a prefix."""
    try:
        if table and head_object(url) is None:
            if list_keys(url):
                return f"{url} is a prefix of objects; {kind} are one table object (JSON, CSV or Parquet)"
            return f"{url} does not exist"
        if not table and not list_keys(url):
            if head_object(url) is not None:
                return f"{url} is one object; {kind} are a prefix of <image stem>.png label maps"
            return f"{url} has no objects under it (no <image stem>.png label maps)"
    except PermissionError as exc:
        return f"{url} is not readable (permission denied: {exc.strerror})"
    except OSError as exc:
        return f"{url} cannot be read: {exc.strerror}"
    return None


def _image_key(path: Path, root: Path) -> str:
    """An image's path relative to the data root ('/'-separated), or its file name (samples)."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def source_key(source: str, root: str) -> str:
    """An image's path relative to the data root ``root`` ('/'-separated; a folder or an
    object URL), or its file name (samples)."""
    if is_object_url(root):
        return source[len(root) + 1 :] if source.startswith(f"{root}/") else PurePosixPath(source).name
    return _image_key(Path(source), Path(root))


def source_identity(source: str) -> str:
    """What tells two listings' images apart: an object URL itself, a path resolved (symlinks followed)."""
    return source if is_object_url(source) else str(Path(source).resolve())


def weak_map_location(folder: str, image: str) -> str:
    """``folder``/<stem of image>.png: the label map of ``image`` (a path, or an object URL
    when ``folder`` is one)."""
    name = f"{PurePosixPath(image).stem}.png"
    return join_key(folder, name) if is_object_url(folder) else str(Path(folder) / name)


def enumerate_units(manifest: Manifest) -> list[Unit]:
    """The manifest's images as units, each with its weak label (path or table rows), in a
    stable order. ManifestError when the weak labels cannot be read at all; an image
    without a weak label is a unit still (ingest fails it, naming what is missing)."""
    data = manifest.data
    check_weak_source(manifest)
    images = list_sources(data.images, data.root, manifest.path)
    units: list[Unit] = []
    keys = {path: source_key(path, data.root) for path in images}
    tabular = data.weak.kind in TABLE_KINDS
    rows_by_image = {}
    if tabular:
        table = TABLE_KINDS[data.weak.kind](data.weak.path)
        rows_by_image = assign_to_images(table, keys.values(), path_for_errors=data.weak.path)
    seen: dict[str, str] = {}
    for path in images:
        uid = keys[path].replace("/", "__")
        if uid in seen:
            raise ManifestError(
                manifest.path, [("data.images", f"{path} and {seen[uid]} map to the same unit id '{uid}'")]
            )
        seen[uid] = path
        if tabular:
            rows = rows_by_image.get(keys[path], [])
            units.append(Unit(id=uid, image=path, weak_rows=tuple(rows), weak_source=data.weak.path))
        else:
            weak = weak_map_location(data.weak.path, path)
            units.append(Unit(id=uid, image=path, weak_map=weak, weak_source=weak))
    return units


@dataclass(frozen=True)
class UnlabelledImages:
    """Listed images that have no weak label.

    images: their paths (keys) relative to data.root (file names for sample images), in run order.
    total: how many images are listed. absent: what they lack, e.g. 'no row in /w/points.csv'.
    """

    images: tuple[str, ...]
    total: int
    absent: str


def unlabelled_images(manifest: Manifest, units: list[Unit]) -> UnlabelledImages:
    """The units of ``enumerate_units(manifest)`` without a weak label: no row in the table
    (points, boxes), or no ``<stem>.png`` in the folder (scribbles, coarse; listed once)."""
    weak, root = manifest.data.weak, manifest.data.root
    if weak.kind in TABLE_KINDS:
        missing = [u for u in units if not u.weak_rows]
        absent = f"no row in {weak.path}"
    else:
        present = _names_in(weak.path)
        missing = [u for u in units if u.weak_map is None or PurePosixPath(u.weak_map).name not in present]
        absent = f"no <image stem>.png in {weak.path}"
    return UnlabelledImages(tuple(source_key(u.image, root) for u in missing), len(units), absent)


def _names_in(folder: str) -> set[str]:
    """Names of the entries of a folder, or of the objects directly under a prefix URL."""
    if not is_object_url(folder):
        return {entry.name for entry in os.scandir(folder)}
    try:
        return {key for key in list_keys(folder) if "/" not in key}
    except OSError as exc:
        raise InputError(folder, f"cannot list the label maps: {exc.strerror}") from None


def file_stat(path: str | Path | None, heads: ListedHeads | None = None) -> list:
    """[path, size, mtime in ns] (or [path, None] when it does not exist): what identifies
    a file's content without reading it. For an object's URL: [url, size, e_tag] (its
    last-modified time where there is no e_tag), from ``heads`` (listings of its prefix)
    when given, else from its own head."""
    if path is not None and is_object_url(path):
        return _object_stat(str(path), heads)
    if not path:
        return [None, None]
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _object_stat(url: str, heads: ListedHeads | None) -> list:
    """``file_stat`` of an object: [url, None] when there is none; InputError naming the URL
    when the object store cannot be asked."""
    try:
        head = heads.head(url) if heads is not None else head_object(url)
    except OSError as exc:
        raise InputError(url, f"cannot read the object's size and version: {exc.strerror}") from None
    return [url, None] if head is None else [url, head.size, head.version]


def unit_input_digest(unit: Unit, heads: ListedHeads | None = None) -> str:
    """What identifies a unit's raw inputs without reading them: paths, sizes, mtimes (or
    an object's size and e_tag, from ``heads`` when given), and the table rows themselves.
    A change recomputes the unit (and what depends on it)."""
    return digest([file_stat(unit.image, heads), file_stat(unit.weak_map, heads), list(unit.weak_rows)])


def input_digests(units: Sequence[Unit]) -> np.ndarray:
    """uint8 [len(units), 32]: ``unit_input_digest`` of each unit, objects' heads taken from
    one listing per prefix they are in instead of a request per object."""
    heads = ListedHeads()
    digests = np.empty((len(units), 32), np.uint8)
    for at, unit in enumerate(units):
        digests[at] = np.frombuffer(bytes.fromhex(unit_input_digest(unit, heads)), np.uint8)
    return digests


def gold_units(manifest: Manifest, gold_set: str, units: list[Unit]) -> list[Unit]:
    """The run's units whose images make up ``data.<gold_set>`` (calibration, evaluation).

    ManifestError when a gold image is not among data.images, or when the calibration and
    evaluation sets share an image (a guarantee checked on its own calibration data is none).
    """
    data = manifest.data
    by_image = {source_identity(u.image): u for u in units}
    images = [source_identity(s) for s in list_sources(getattr(data, gold_set).images, data.root, manifest.path)]
    outside = [p for p in images if p not in by_image]
    if outside:
        raise ManifestError(
            manifest.path,
            [(f"data.{gold_set}.images", f"{len(outside)} image(s) are not among data.images, e.g. {outside[0]}")],
        )
    if data.calibration is not None and data.evaluation is not None:
        other = "evaluation" if gold_set == "calibration" else "calibration"
        others = list_sources(getattr(data, other).images, data.root, manifest.path)
        shared = set(images) & {source_identity(s) for s in others}
        if shared:
            raise ManifestError(
                manifest.path,
                [
                    (
                        "data.calibration",
                        f"{len(shared)} image(s) are also evaluation "
                        f"images, e.g. {min(shared, key=PurePosixPath)}; keep the two sets apart",
                    )
                ],
            )
    return [by_image[p] for p in images]


def held_out(manifest: Manifest, units: Sequence[Unit]) -> dict[str, list[str]]:
    """Ids of the run's units in each gold set the manifest names ('calibration',
    'evaluation'), in run order; gold images outside data.images are not units."""
    data = manifest.data
    sets = {}
    for name in ("calibration", "evaluation"):
        gold = getattr(data, name)
        if gold is not None:
            images = {source_identity(s) for s in list_sources(gold.images, data.root, manifest.path)}
            sets[name] = [u.id for u in units if source_identity(u.image) in images]
    return sets


def training_units(manifest: Manifest, units: list[Unit]) -> list[Unit]:
    """The run's units a trained stage may learn from: every image that is neither a
    calibration nor an evaluation image (their gold masks must stay unseen by training)."""
    gold = {u for ids in held_out(manifest, units).values() for u in ids}
    return [u for u in units if u.id not in gold]
