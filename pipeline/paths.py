"""Manifest path fields: resolved at validation time and refused when unsafe.

Relative paths resolve against the data root (data paths) or the manifest's folder
(store, checkpoints); URLs are refused; data paths must stay inside the data root. The
folders come from the validation context that ``parse_manifest`` passes to pydantic.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def resolve(value: str, info: ValidationInfo, *, under_root: bool = True) -> str:
    """-> absolute path; ValueError for a URL or a data path outside the data root."""
    if is_url(value):
        raise ValueError(f"'{value}' is a URL; only local paths are accepted")
    ctx = info.context or {}
    base = Path(ctx.get("root" if under_root else "manifest_dir", "."))
    try:
        path = Path(value).expanduser()
        resolved = (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, an unknown ~user, a symlink loop
        raise ValueError(f"{value!r} is not a usable path ({exc})") from None
    if under_root and "root" in ctx and not resolved.is_relative_to(Path(ctx["root"]).resolve()):
        raise ValueError(f"'{value}' resolves to {resolved}, outside the data root {ctx['root']}")
    return str(resolved)


def _existing_file(value: str, info: ValidationInfo) -> str:
    resolved = resolve(value, info, under_root=False)
    if info.context and not Path(resolved).is_file():
        raise ValueError(f"'{value}' ({resolved}) is not a file")
    return resolved


#: a file beside the manifest (e.g. a checkpoint) that must exist
ManifestFile = Annotated[str, AfterValidator(_existing_file)]
