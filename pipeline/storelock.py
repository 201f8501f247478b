"""The run lock: one ``seglab run`` writes to a store at a time.

On a local or shared file system (``StoreLock``), ``<store>/_run.lock`` is locked with a
POSIX record lock (``fcntl.lockf``, which NFS servers honour too) and holds its holder's
host, PID, start time and command. The kernel drops the lock when the holding process
dies, however it dies, so a lock left by a killed run is stale by construction: the next
run takes it and says whose it was. Read-only commands (status, export, report,
evaluate) take no lock.

On object storage (``LeaseLock``) no kernel sees the holder die, so the lock is a lease:
the object ``_run.lock`` names its holder and when the lease ends. It is taken with a
create-only write (S3 ``If-None-Match: *``) or, when an ended or released lease is there,
with a write conditional on that object's ETag (``If-Match``), so of two runs racing for
it exactly one wins. The holder renews the lease from a background thread every third of
its length; a run killed without warning holds the store until its lease ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.objects import Location, Objects
from seglab.pipeline.core.store import LOCK_FILE

if TYPE_CHECKING:
    from obstore import PutMode


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
        record = _holder()
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


LEASE_SECONDS = 60.0
"""How long a lease on an object-storage lock lasts unless renewed."""


def _holder() -> dict:
    """Who holds a lock: this process's host, PID, start time and command."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": sys.argv[:8],
    }


def _gone(holder: dict) -> bool:
    """Whether the holder of a lease is a process of this machine that no longer runs (its
    lease need not be waited out: a killed run on this host is known to be over)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _holder_record(lease_id: str, seconds: float) -> dict:
    return {**_holder(), "lease": lease_id, "expires": time.time() + seconds}


class LeaseLock:
    """Hold ``_run.lock`` under ``objects`` (an object-storage location) for the life of a
    run (a context manager). ``taken_over``: the holder of an ended lease this run took
    the store from (None when the last run released it).

    seconds: the lease's length; the holder renews it every ``seconds / 3``. A holder that
    finds its lease taken (it could not renew in time) stops renewing; ``lost`` says so. The
    lease of a holder on this machine whose process is gone is taken over at once."""

    def __init__(self, objects: Objects, *, seconds: float = LEASE_SECONDS):
        self.objects, self.seconds = objects, seconds
        self.lease_id = uuid.uuid4().hex
        self.taken_over: dict | None = None
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _write(self, record: dict, *, replacing: str | None) -> str | None:
        """Write the lock object: create-only (``replacing`` None) or only while its ETag is
        ``replacing``; -> the new ETag, None when another writer got there first."""
        data = json.dumps(record).encode()
        mode: PutMode = "create" if replacing is None else {"e_tag": replacing}
        try:
            result = obstore.put(self.objects.store, LOCK_FILE, data, mode=mode)
        except (AlreadyExistsError, PreconditionError):
            return None
        return result["e_tag"]

    def _read(self) -> tuple[dict, str] | None:
        """The lock object's holder record and ETag (None: no lock object)."""
        try:
            got = obstore.get(self.objects.store, LOCK_FILE)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(bytes(got.bytes()).decode("utf-8") or "{}")
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), str(got.meta["e_tag"])

    def __enter__(self) -> LeaseLock:
        record = _holder_record(self.lease_id, self.seconds)
        etag = self._write(record, replacing=None)
        if etag is None:
            current = self._read()
            holder, tag = current if current is not None else ({}, None)
            if holder.get("lease") and float(holder.get("expires", 0)) > time.time() and not _gone(holder):
                raise StoreBusy(
                    f"{self.objects}: another seglab run is using this store ({_holder_text(holder)}, its lease "
                    f"ends in {float(holder['expires']) - time.time():.0f}s unless renewed); wait for it to "
                    "finish or stop it, then run again"
                )
            etag = self._write(record, replacing=tag)  # no object any more (tag None): create it
            if etag is None:
                raise StoreBusy(f"{self.objects}: another seglab run took this store's lock just now; run again later")
            self.taken_over = holder if holder.get("lease") else None
        self._etag = etag
        self._renewer = threading.Thread(target=self._renew, name="seglab-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            etag = self._write(_holder_record(self.lease_id, self.seconds), replacing=self._etag)
            if etag is None:
                self.lost = True
                return
            self._etag = etag

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._etag is not None and not self.lost:
            self._write({}, replacing=self._etag)  # an empty record: released cleanly
        self._etag = None


def run_lock(location: str) -> StoreLock | LeaseLock:
    """The run lock for the store at ``location``: a file lock on a local folder (made if
    need be), a lease held by conditional writes on object storage."""
    parsed = Location.parse(location)
    if parsed.local is not None:
        parsed.local.mkdir(parents=True, exist_ok=True)
        return StoreLock(parsed.local)
    return LeaseLock(Objects(parsed))
