"""Folders written outside Zarr (exports, simulated weak labels) appear whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seglab.pipeline.errors import SeglabError


@contextmanager
def atomic_folder(out: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it is renamed to ``out``
    (replacing it when ``overwrite``), on any failure it is removed."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise SeglabError(f"{out} already exists (choose a new folder, or pass --overwrite where offered)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
