"""The run lock: one ``seglab run`` writes to a store at a time.

``<store>/_run.lock`` is locked with a POSIX record lock (``fcntl.lockf``, which NFS
servers honour too) and holds its holder's host, PID, start time and command. The kernel
drops the lock when the holding process dies, however it dies, so a lock left by a killed
run is stale by construction: the next run takes it and says whose it was. Read-only
commands (status, export, report, evaluate) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.store import LOCK_FILE


class StoreBusy(SeglabError):
    """Another run holds the store's lock."""


def _holder_text(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        if holder
        else "a process that has not yet written its name"
    )


class StoreLock:
    """Hold ``<store>/_run.lock`` for the life of a run (a context manager).

    ``taken_over``: the holder a killed earlier run left in the file (None when the last
    run released the lock cleanly)."""

    def __init__(self, store: Path | str):
        self.path = Path(store) / LOCK_FILE
        self.taken_over: dict | None = None
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd)
            os.close(fd)
            raise StoreBusy(
                f"{self.path.parent}: another seglab run is using this store ({_holder_text(holder)}); "
                "wait for it to finish or stop it, then run again"
            ) from None
        self.taken_over = self._read(fd) or None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": sys.argv[:8],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            finally:
                os.close(self._fd)  # closing releases the lock
                self._fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}
