"""Folders written outside Zarr (exports, simulated weak labels) appear whole or not at all.

The folder is filled under a hidden sibling named after the writing process
(``.<name>.<pid>.<random>``) and renamed into place when complete. A writer killed
without warning leaves only that sibling; the next write to the same folder removes the
siblings of processes that are gone.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seglab.pipeline.errors import SeglabError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by writers that no longer run; -> removed."""
    removed = []
    for sibling in out.parent.glob(f".{out.name}.*"):
        pid = sibling.name[len(out.name) + 2:].split(".", 1)[0]
        if sibling.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _new_sibling(out: Path) -> Path:
    """A new empty folder ``.<name>.<pid>.<random>`` beside ``out``. Made with mkdir's mode
    0o777 less the umask, as any folder the user makes: tempfile.mkdtemp's 0o700 would keep
    an export from the other users of a shared file system."""
    while True:
        sibling = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            sibling.mkdir(0o777)
            return sibling
        except FileExistsError:
            continue


@contextmanager
def atomic_folder(out: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it is renamed to ``out``
    (replacing it when ``overwrite``), on any failure it is removed."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise SeglabError(f"{out} already exists (choose a new folder, or pass --overwrite where offered)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = _new_sibling(out)
    try:
        yield tmp
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
