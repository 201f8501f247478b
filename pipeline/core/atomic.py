"""Folders written outside Zarr (exports, simulated weak labels) appear whole or not at all.

The folder is filled under a hidden sibling named after the writing process
(``.<name>.<pid>.<8 hex>``) and renamed into place when complete. The sibling carries a
marker file (``MARKER``: pid, host, time) from the moment it is made until just before the
rename, so the final folder never holds it. A writer killed without warning leaves only
that sibling; the next write to the same folder removes it, and only it: a folder that lacks
the marker, or whose name, pid or host differ from it, or whose writer still runs, is
someone else's and stays.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from seglab.pipeline.base.errors import SeglabError

MARKER = ".seglab-partial"


@dataclass(frozen=True)
class Partial:
    """Who made a temporary folder, as its ``MARKER`` says (which also holds ``created``,
    unix seconds, for a person looking at it): the writing process's pid and host."""

    pid: int
    host: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _marker(folder: Path) -> Partial | None:
    """The folder's ``MARKER`` record; None when it has none or it cannot be read."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return Partial(pid=int(record["pid"]), host=str(record["host"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _abandoned(sibling: Path, pattern: re.Pattern[str]) -> bool:
    """Whether ``sibling`` is a temporary folder of this module whose writer, on this host, is gone."""
    match = pattern.fullmatch(sibling.name)
    if not match or sibling.is_symlink() or not sibling.is_dir():
        return False
    partial = _marker(sibling)
    return (
        partial is not None
        and partial.pid == int(match.group(1))
        and partial.host == socket.gethostname()
        and not _alive(partial.pid)
    )


def remove_abandoned(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by writers that no longer run; -> removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}")
    removed = []
    for sibling in out.parent.iterdir():
        if _abandoned(sibling, pattern):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _new_sibling(out: Path) -> Path:
    """A new folder ``.<name>.<pid>.<8 hex>`` beside ``out`` holding only ``MARKER``. Made
    with mkdir's mode 0o777 less the umask, as any folder the user makes: tempfile.mkdtemp's
    0o700 would keep an export from the other users of a shared file system."""
    while True:
        sibling = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            sibling.mkdir(0o777)
            break
        except FileExistsError:
            continue
    record = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
    (sibling / MARKER).write_text(json.dumps(record), encoding="utf-8")
    return sibling


@contextmanager
def atomic_folder(out: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill (it holds ``MARKER``, which the caller
    leaves alone and which is gone before the rename); on success it is renamed to ``out``
    (replacing it when ``overwrite``), on any failure it is removed."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise SeglabError(f"{out} already exists (choose a new folder, or pass --overwrite where offered)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = _new_sibling(out)
    try:
        yield tmp
        (tmp / MARKER).unlink()
        if out.exists():  # the old folder leaves by rename too, so a kill here leaves one whole folder
            old = _new_sibling(out)
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
