"""Manifest path fields: resolved at validation time and refused when unsafe.

Relative paths resolve against the data root (data paths) or the manifest's folder
(store, checkpoints, weak labels); image lists and Parquet indexes are looked for beside
the manifest, then under the data root (they may be objects too). Data paths must stay inside the data root. URLs
are refused, except under a data root that is an object-storage URL (``s3://``,
``gs://``): its data paths are then keys relative to it, and ``resolve`` makes them URLs
under it. The folders come from the validation context that ``parse_manifest`` passes to
pydantic; without one (a manifest built in code) nothing is checked on disk.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

from seglab.pipeline.base.objecturl import head_object, is_object_url, join_key

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def url_root(info: ValidationInfo) -> str | None:
    """The data root of the manifest being loaded when it is an object-storage URL, else None."""
    root = str((info.context or {}).get("root", ""))
    return root if is_object_url(root) else None


def object_key(entry: str, root: str) -> str:
    """A data path under the URL data root ``root`` -> its key relative to it ('/'-separated,
    '.' and repeated '/' dropped; '' for the root itself). ValueError naming ``entry`` when it
    is absolute or has a '..' part (a key cannot leave its root), or is a URL elsewhere."""
    if is_url(entry):
        url = entry.rstrip("/")
        if url != root and not url.startswith(f"{root}/"):
            raise ValueError(f"'{entry}' is outside the data root {root}")
        entry = url[len(root) + 1 :]
    key = PurePosixPath(entry.strip())
    if key.is_absolute() or ".." in key.parts:
        raise ValueError(
            f"'{entry}' would be outside the data root {root}: under a URL data root a data path is "
            f"a key relative to it, with no '..' and not absolute"
        )
    return "/".join(key.parts)


def _absolute(value: str, base: Path) -> Path:
    """``value`` (``~`` expanded; relative: against ``base``) -> resolved absolute path;
    ValueError for a URL or a path that cannot be resolved."""
    if is_url(value):
        raise ValueError(f"'{value}' is a URL; only local paths are accepted")
    try:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, an unknown ~user, a symlink loop
        raise ValueError(f"{value!r} is not a usable path ({exc})") from None


def resolve(value: str, info: ValidationInfo, *, under_root: bool = True) -> str:
    """-> absolute path (a URL for a data path under a URL data root); ValueError for a URL
    or a data path outside the data root."""
    ctx = info.context or {}
    root_url = url_root(info)
    if under_root and root_url is not None:
        return join_key(root_url, object_key(value, root_url))
    resolved = _absolute(value, Path(ctx.get("root" if under_root else "manifest_dir", ".")))
    if under_root and "root" in ctx and not resolved.is_relative_to(Path(ctx["root"]).resolve()):
        raise ValueError(f"'{value}' resolves to {resolved}, outside the data root {ctx['root']}")
    return str(resolved)


def resolve_index(value: str, info: ValidationInfo) -> str:
    """An image list or Parquet index -> absolute path; the file may be anywhere (a subset of
    a read-only dataset), only its entries must stay inside the data root.

    Under a URL data.root an s3:// or gs:// URL names an object. A relative path is looked for beside the manifest,
    then under data.root (where it had to be before: a file, or under a URL data.root the
    object of that key), and the first that is there is taken. ValueError for another URL
    and, while a manifest is loaded, when no candidate is there (naming each place looked at)."""
    if is_object_url(value) and url_root(info) is not None:
        return value
    beside = resolve(value, info, under_root=False)
    ctx = info.context
    if not ctx or Path(beside).is_file():
        return beside
    if (root_url := url_root(info)) is not None:
        url = join_key(root_url, object_key(value, root_url))
        try:
            found = head_object(url) is not None
        except OSError as exc:
            raise ValueError(f"'{value}': cannot ask {url} ({exc.strerror})") from None
        if not found:
            raise ValueError(f"'{value}' is not a file: looked for {beside} (beside the manifest) and the object {url}")
        return url
    under_root = str(_absolute(value, Path(ctx["root"])))
    if Path(under_root).is_file():
        return under_root
    if under_root == beside:  # an absolute path, or data.root is the manifest's folder
        raise ValueError(f"'{value}' ({beside}) is not a file")
    raise ValueError(
        f"'{value}' is not a file: looked for {beside} (beside the manifest) and {under_root} (under data.root)"
    )


#: folders that hold no datasets; walking them never ends well (/proc/self/root is /)
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_data_root(root: Path) -> None:
    """ValueError unless ``root`` (resolved) is an existing folder outside SYSTEM_FOLDERS."""
    if not root.exists():
        raise ValueError(f"{root} does not exist")
    if root.is_file():
        raise ValueError(f"{root} is a file, not a folder")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    system = next((folder for folder in SYSTEM_FOLDERS if root.is_relative_to(folder)), None)
    if system is not None:
        raise ValueError(f"{root} is inside the system folder {system}, not a dataset")


def check_glob_walk(glob: str, root: Path) -> None:
    """ValueError for a recursive glob ('**') over the whole file system (data.root /):
    it would walk every mounted disk and /proc, for minutes, to find a dataset's images."""
    if "**" in glob and root == Path(root.anchor):
        raise ValueError(
            f"'{glob}' at data.root {root} walks the whole file system; set data.root to the "
            f"dataset's folder, use a narrower glob without '**', or a list file (data.images.list)"
        )


def _existing_file(value: str, info: ValidationInfo) -> str:
    resolved = resolve(value, info, under_root=False)
    if info.context and not Path(resolved).is_file():
        raise ValueError(f"'{value}' ({resolved}) is not a file")
    return resolved


#: a file beside the manifest (e.g. a checkpoint) that must exist
ManifestFile = Annotated[str, AfterValidator(_existing_file)]
