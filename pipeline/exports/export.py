"""``seglab export``: a label source of a store as a dataset other training stacks load.

Formats (each module's docstring gives its layout): ``png`` (class-map PNGs, uncertainty,
palette, index), ``coco`` (COCO JSON with RLE masks per connected region), ``parquet``
(one row per image). Every export also holds

    export.json   seglab_export (= EXPORT_VERSION), format, stage, round, classes, ignore
                  value, filters, images exported, images dropped by the filters (with their
                  uncertain fraction), the run's units the stage has not finished (not
                  exported: 'unfinished' ids, and 'failed' with the stage and error that
                  stopped each), units skipped as damaged ('damaged', with --skip-damaged), provenance
    SHA256SUMS    '<sha256>  <path>' for every other file, in GNU coreutils' format (a name
                  holding a backslash or newline is escaped, its line starts with '\\'),
                  so ``sha256sum -c SHA256SUMS`` checks it

and is built in a temporary sibling folder that is renamed into place only when complete
(pipeline/core/atomic.py): a killed export leaves nothing at ``out`` or a complete dataset.
Every array is checked against the checksum recorded when it was written; an image whose
arrays are missing or damaged stops the export (``skip_damaged`` leaves it out instead).
``overwrite`` replaces only a folder that is provably an unchanged seglab export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.atomic import MARKER, atomic_folder
from seglab.pipeline.core.store import Store
from seglab.pipeline.exports.formats import FORMATS, ExportOptions
from seglab.pipeline.exports.items import Damaged, ExportItem, items
from seglab.pipeline.exports.labelsource import open_source, provenance

CHECKSUMS = "SHA256SUMS"
EXPORT_VERSION = 1
"""export.json's ``seglab_export``: the mark that a folder is an export seglab wrote."""


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_line(digest: str, name: str) -> bytes:
    """One SHA256SUMS line as GNU ``sha256sum`` writes it: a name holding a backslash or a
    newline is written with '\\\\' and '\\n' for them and the line starts with a backslash."""
    raw = os.fsencode(name)
    if b"\\" in raw or b"\n" in raw:
        return b"\\" + digest.encode() + b"  " + raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n"
    return digest.encode() + b"  " + raw + b"\n"


def parse_checksums(data: bytes) -> dict[str, str] | None:
    """SHA256SUMS content (as ``checksum_line`` writes it) -> {relative path: sha256}; None
    when a line is not in that format."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    listed = {}
    for line in lines:
        escaped = line.startswith(b"\\")
        digest, sep, raw = line[escaped : escaped + 64], line[escaped + 64 : escaped + 66], line[escaped + 66 :]
        if sep != b"  " or len(digest) != 64 or not raw:
            return None
        if escaped:
            pieces = re.findall(rb"\\\\|\\n|\\|[^\\]+", raw, flags=re.S)
            if b"\\" in pieces:  # a lone backslash: no escape GNU writes
                return None
            raw = b"".join({b"\\\\": b"\\", b"\\n": b"\n"}.get(p, p) for p in pieces)
        listed[os.fsdecode(raw)] = digest.decode("ascii", "replace")
    return listed


def sha256sums(folder: Path) -> bytes:
    """``checksum_line`` of every file under ``folder`` but SHA256SUMS and atomic_folder's
    MARKER (gone before the folder is renamed into place), sorted by path."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in (CHECKSUMS, MARKER)
    )
    return b"".join(checksum_line(_hash(p), p.relative_to(folder).as_posix()) for p in files)


def check_replaceable(out: Path) -> None:
    """SeglabError unless ``out`` is a seglab export that nothing was added to or changed in
    since it was written: its export.json says it is one (``seglab_export``, or the format,
    stage and provenance every export.json has held) and its SHA256SUMS lists every other
    file in it with the content it holds."""

    def refuse(why: str) -> SeglabError:
        return SeglabError(f"{out}: not replaced by --overwrite: {why}; choose a new --out, or move it away yourself")

    if not out.is_dir() or out.is_symlink():
        raise refuse("it is not a folder seglab exported")
    try:
        meta = json.loads((out / "export.json").read_text(encoding="utf-8"))
        listed = parse_checksums((out / CHECKSUMS).read_bytes())
    except (OSError, ValueError):
        raise refuse("it holds no readable export.json and SHA256SUMS, so it is not a seglab export") from None
    marked = isinstance(meta, dict) and (
        meta.get("seglab_export") == EXPORT_VERSION
        or (meta.get("format") in FORMATS and "stage" in meta and isinstance(meta.get("provenance"), dict))
    )
    if not marked or listed is None or "export.json" not in listed:
        raise refuse("its export.json or SHA256SUMS is not seglab's, so it is not a seglab export")
    folders = {parent for name in listed for parent in Path(name).parents}
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if name == CHECKSUMS or (path.is_dir() and not path.is_symlink() and Path(name) in folders):
            continue
        if name not in listed:
            raise refuse(f"'{name}' is not part of the export (SHA256SUMS does not list it)")
        if _hash(path) != listed[name]:
            raise refuse(f"'{name}' changed since the export was written (it differs from SHA256SUMS)")
    for name in listed:
        if not (out / name).is_file():
            raise refuse(f"'{name}', listed in SHA256SUMS, is missing")


def _kept(
    stream: Iterator[ExportItem], max_uncertain: float | None, dropped: list[dict[str, Any]]
) -> Iterator[ExportItem]:
    """The items whose uncertain fraction is at most ``max_uncertain``; the others go to ``dropped``."""
    for item in stream:
        if max_uncertain is not None:
            assert item.uncertain_fraction is not None  # export refuses --max-uncertain without uncertainty
            if item.uncertain_fraction > max_uncertain:
                dropped.append({"unit": item.unit, "image": item.image, "uncertain_fraction": item.uncertain_fraction})
                continue
        yield item


def export(store_path: Path | str, out: Path | str, options: ExportOptions) -> dict[str, Any]:
    """Write the export; -> the content of its export.json."""
    store = Store(store_path)
    source = open_source(store, stage=options.stage, round=options.round)
    classes = [{"id": i, "name": n} for i, n in source.classes]
    options.check([i for i, _ in source.classes])
    if options.max_uncertain is not None and not source.has_uncertainty:
        raise SeglabError(
            f"stage '{source.stage}' has no per-pixel uncertainty to filter by (--max-uncertain); export a refine stage"
        )
    units = source.in_split(options.split) if options.split else source.units
    if not units:
        raise SeglabError(f"{store.path}: stage '{source.stage}' has no finished {options.split} images")
    if options.overwrite and Path(out).exists():
        check_replaceable(Path(out).resolve())
    unfinished = source.unfinished()
    meta: dict[str, Any] = {
        "seglab_export": EXPORT_VERSION,
        "format": options.format,
        "stage": source.stage,
        "round": source.round,
        "classes": classes,
        "ignore_value": options.ignore_value,
        "filters": {
            "split": options.split,
            "max_uncertain": options.max_uncertain,
            "uncertain_above": options.uncertain_above,
        },
        "provenance": provenance(store, source.stage),
        "unfinished": [u.unit for u in unfinished],
        "failed": [asdict(u) for u in unfinished],
    }
    dropped: list[dict[str, Any]] = []
    damaged: list[Damaged] = []
    stream = _kept(
        items(source, units, options.ignore_value, options.uncertain_above, damaged), options.max_uncertain, dropped
    )
    with atomic_folder(out, overwrite=options.overwrite) as tmp:
        written = FORMATS[options.format].writer()(tmp, stream, meta, options)
        if damaged and not options.skip_damaged:
            raise damaged_error(store, source.stage, damaged)
        if not written["images"]:
            raise SeglabError(
                f"no image is left to export: {len(dropped)} exceed --max-uncertain "
                f"{options.max_uncertain}, {len(damaged)} are damaged"
            )
        meta.update(
            written=written,
            dropped=dropped,
            damaged=[asdict(d) for d in damaged],
            created=datetime.now(UTC).isoformat(),
        )
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
        (tmp / CHECKSUMS).write_bytes(sha256sums(tmp))
    return meta


def damaged_error(store: Store, stage: str, damaged: list[Damaged]) -> SeglabError:
    """The one line that refuses an export with damaged images: which, why, and what to do."""
    manifest = store.attrs.get("manifest_path") or "MANIFEST"
    shown = ", ".join(d.unit for d in damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
    return SeglabError(
        f"{store.path}: not exported: the stored arrays of {len(damaged)} {stage} images are missing "
        f"or damaged ({shown}; first: {damaged[0].problem}); `seglab run {manifest}` redoes them, "
        "or pass --skip-damaged to export the others"
    )
