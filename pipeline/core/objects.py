"""Where a store lives: a local folder or an object-storage prefix, as one key/value interface.

A location is a plain path, ``file://`` URL, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
Every one is opened through obstore (``LocalStore`` for local folders), so the same code
writes a store on a laptop's disk and in a bucket; Zarr arrays go through zarr's
``ObjectStore`` over the same obstore store. Credentials, endpoints and regions come from
the environment as each cloud's tools read them (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), through
``open_store`` (pipeline/base/objecturl.py), which the data readers share.

Object stores have no appends and no renames: an object is written whole or not at all,
and ``create`` writes one only when its key is free (S3 ``If-None-Match: *``; a local
file made with ``O_EXCL``), which is how a writer claims a name nobody else may take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import LocalStore, ObjectStore
from zarr.storage import ObjectStore as ZarrObjectStore

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.objecturl import SCHEMES, URL, open_store


class LocationError(SeglabError):
    """A store location that cannot be used (unknown scheme, no bucket, unreachable)."""


@dataclass(frozen=True)
class Location:
    """A parsed store location: ``local`` folder (absolute) or ``url`` of an object-storage
    prefix (scheme, bucket and prefix, without a trailing '/')."""

    text: str
    local: Path | None = None
    url: str | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "store") -> Location:
        """LocationError naming ``text`` when it is not a path or a supported URL (``what``:
        the kind of location, for the message)."""
        match = URL.match(text)
        if match is None:
            return cls(text, local=Path(text).expanduser().resolve())
        scheme, rest = match["scheme"].lower(), match["rest"].rstrip("/")
        if scheme not in SCHEMES:
            raise LocationError(
                f"{text}: a URL of scheme '{scheme}://', where no {what} can be (use a path or a "
                f"{', '.join(f'{s}://' for s in SCHEMES)} URL)"
            )
        if scheme == "file":
            if not rest.startswith("/"):
                raise LocationError(f"{text}: a file:// URL needs an absolute path (file:///folder)")
            return cls(text, local=Path(rest).resolve())
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise LocationError(f"{text}: no bucket named (write {scheme}://bucket/prefix)")
        return cls(text, url=f"{scheme}://{rest}")

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else str(self.url)


class Objects:
    """The objects under one location, by '/'-separated key relative to it.

    Local folders are made on first write. Every failure of the storage service itself
    (unreachable endpoint, denied access) surfaces as OSError subclasses from obstore, which
    the callers turn into one line naming the location."""

    def __init__(self, location: Location | str):
        self.location = location if isinstance(location, Location) else Location.parse(location)
        self._store: ObjectStore | None = None
        if self.location.local is None:
            assert self.location.url is not None
            try:
                self._store = open_store(self.location.url)
            except (BaseError, ValueError) as exc:
                raise LocationError(f"{self.location}: cannot open ({_first_line(exc)})") from None

    @property
    def store(self) -> ObjectStore:
        """obstore's store; a local folder is made on first use (reading a location that
        does not exist makes nothing: see ``_absent``)."""
        if self._store is None:
            assert self.location.local is not None
            self._store = LocalStore(self.location.local, mkdir=True)
        return self._store

    def _absent(self) -> bool:
        """Whether the location is a local folder that does not exist (yet)."""
        return self._store is None and self.location.local is not None and not self.location.local.is_dir()

    def __str__(self) -> str:
        return str(self.location)

    def get(self, key: str) -> bytes | None:
        """The object's bytes; None when there is no object at ``key``."""
        if self._absent():
            return None
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write the object whole, replacing what is there."""
        obstore.put(self.store, key, data)

    def create(self, key: str, data: bytes | memoryview) -> bool:
        """Write the object only when nothing is at ``key``; -> False when something was."""
        try:
            obstore.put(self.store, key, data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def exists(self, key: str) -> bool:
        if self._absent():
            return False
        try:
            obstore.head(self.store, key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder: keys start with ``prefix/``; '': every key), sorted."""
        folder = prefix.strip("/")
        if self._absent():
            return []
        keys = [meta["path"] for batch in obstore.list(self.store, f"{folder}/" if folder else None) for meta in batch]
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects (a key already gone is no error)."""
        keys = list(keys)
        if self.location.local is None:
            if keys:
                obstore.delete(self.store, keys)  # S3 and GCS: a missing key is no error
            return
        for key in keys:  # the local file system reports a missing key; it is gone all the same
            try:
                obstore.delete(self.store, key)
            except FileNotFoundError:
                pass
            self._prune_folders(key)

    def _prune_folders(self, key: str) -> None:
        """Remove the local folders a deleted key leaves empty, up to (not including) the root."""
        assert self.location.local is not None
        folder = (self.location.local / key).parent
        while folder != self.location.local and folder.is_relative_to(self.location.local):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                return
            folder = folder.parent

    def zarr_store(self, *, read_only: bool = False) -> ZarrObjectStore:
        """zarr's view of the same objects."""
        return ZarrObjectStore(self.store, read_only=read_only)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
