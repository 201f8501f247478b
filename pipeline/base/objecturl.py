"""Files and objects by location: a local path, or the URL of one object (``s3://bucket/key``,
``gs://bucket/key``) read through obstore.

This is where obstore stores are built from URLs (``open_store``), for the store
(pipeline/core/objects.py) and for the data a manifest names alike. Credentials, endpoints
and regions come from the environment as each cloud's tools read them
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), so Ray workers started in that environment read
the same objects as the driver.

Failures come out as the built-in errors a local file raises, each with a one-line
message: ``FileNotFoundError`` (no such object, or no such bucket), ``PermissionError``
(denied, or not authenticated) and ``OSError`` (anything else: an unreachable endpoint, a
refused request), so callers treat an object like a file.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import ObjectStore, from_url

if TYPE_CHECKING:
    from obstore import ObjectMeta

URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
SCHEMES = ("file", "s3", "gs")
"""URL schemes a location may have (plain paths are local too)."""
OBJECT_SCHEMES = ("s3", "gs")
"""The schemes of object storage (``file://`` names a local path)."""
#: prefixes of the environment variables obstore configures a store from
_CONFIG_PREFIXES = ("AWS_", "GOOGLE_")


def is_object_url(location: str | Path) -> bool:
    """Whether ``location`` is an s3:// or gs:// URL (not a path, not file://)."""
    match = URL.match(str(location))
    return match is not None and match["scheme"].lower() in OBJECT_SCHEMES


def open_store(url: str) -> ObjectStore:
    """obstore's store for ``url`` (its path becomes the store's prefix), configured from the
    environment; one store per URL and environment, shared by the callers. ValueError or
    obstore's errors when the URL cannot be opened."""
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONFIG_PREFIXES)))
    return _store(url, environment)


@functools.lru_cache(maxsize=64)
def _store(url: str, environment: tuple[tuple[str, str], ...]) -> ObjectStore:
    """``environment`` is only the cache key: from_url reads the variables itself."""
    return from_url(url)


def forget_stores() -> None:
    """Drop the cached stores (and with them their connection pools)."""
    _store.cache_clear()


@dataclass(frozen=True)
class ObjectHead:
    """What identifies an object's content without reading it: ``size`` in bytes and
    ``version``, its e_tag (or its last-modified time where the service gives no e_tag)."""

    size: int
    version: str


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b.png' -> ('s3://bucket', 'a/b.png'); the key is '' for a bucket."""
    match = URL.match(url)
    if match is None or match["scheme"].lower() not in OBJECT_SCHEMES:
        raise ValueError(f"{url}: not an {' or '.join(f'{s}://' for s in OBJECT_SCHEMES)} URL")
    bucket, _, key = match["rest"].partition("/")
    return f"{match['scheme'].lower()}://{bucket}", key.strip("/")


def join_key(url: str, key: str) -> str:
    """The URL of ``key`` ('/'-separated, relative) under the prefix ``url``."""
    return f"{url.rstrip('/')}/{key}" if key else url.rstrip("/")


def failure_reason(exc: BaseException) -> str:
    """One line saying why a storage request failed ('the bucket does not exist', or the
    first line of the service's message)."""
    text = str(exc).strip()
    if "NoSuchBucket" in text:
        return "the bucket does not exist"
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _as_os_errors(url: str) -> Iterator[None]:
    """obstore's failures while the block runs -> FileNotFoundError, PermissionError or
    OSError naming ``url``, with one-line messages."""
    try:
        yield
    except FileNotFoundError as exc:  # obstore's NotFound: no such object, or no such bucket
        what = "bucket not found" if "NoSuchBucket" in str(exc) else "object not found"
        raise FileNotFoundError(errno.ENOENT, what, url) from None
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise PermissionError(errno.EACCES, failure_reason(exc), url) from None
    except (BaseError, ValueError, OSError) as exc:
        raise OSError(errno.EIO, failure_reason(exc), url) from None


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a file or an object; the built-in errors of a file otherwise."""
    if not is_object_url(location):
        return Path(location).read_bytes()
    url = str(location)
    bucket, key = split_url(url)
    with _as_os_errors(url):
        return bytes(obstore.get(open_store(bucket), key).bytes())


def head_object(url: str) -> ObjectHead | None:
    """The object's size and version, or None when there is no object at ``url``."""
    bucket, key = split_url(url)
    try:
        with _as_os_errors(url):
            meta = obstore.head(open_store(bucket), key)
    except FileNotFoundError:
        return None
    return _object_head(meta)


def _object_head(meta: ObjectMeta) -> ObjectHead:
    """An ``ObjectHead`` from obstore's metadata of one object (a head's or a listing's)."""
    version = meta.get("e_tag") or meta["last_modified"].isoformat()
    return ObjectHead(size=int(meta["size"]), version=str(version))


def heads_under(url: str) -> dict[str, ObjectHead]:
    """The objects directly under the prefix ``url`` (not those deeper down), by URL, with
    their heads: one listing (paged by the service, 1,000 objects a request on S3), where
    asking each object would be a request apiece. The listing's e_tag is the head's."""
    bucket, prefix = split_url(url)
    with _as_os_errors(url):
        listed = obstore.list_with_delimiter(open_store(bucket), f"{prefix}/" if prefix else None)
    return {join_key(bucket, meta["path"]): _object_head(meta) for meta in listed["objects"]}


class ListedHeads:
    """Object heads answered from listings: the first question about an object lists its
    parent prefix (``heads_under``), later ones about its siblings are answered from that
    listing. For one planning pass: a listing is as old as the pass."""

    def __init__(self) -> None:
        self._by_parent: dict[str, dict[str, ObjectHead]] = {}

    def head(self, url: str) -> ObjectHead | None:
        """The object's head, or None when the listing of its parent does not hold it."""
        parent = url.rstrip("/").rsplit("/", 1)[0]
        if parent not in self._by_parent:
            self._by_parent[parent] = heads_under(parent)
        return self._by_parent[parent].get(url)


def exists(location: str | Path) -> bool:
    """Whether a file or an object is there (OSError when an object cannot be asked after)."""
    return head_object(str(location)) is not None if is_object_url(location) else Path(location).exists()


def list_keys(url: str) -> list[str]:
    """Keys of the objects under the prefix ``url`` (a folder: 's3://b/data' lists
    'data/...'), relative to it, sorted; [] when there are none."""
    bucket, prefix = split_url(url)
    with _as_os_errors(url):
        batches = obstore.list(open_store(bucket), f"{prefix}/" if prefix else None)
        keys = [meta["path"] for batch in batches for meta in batch]
    return sorted(key[len(prefix) + 1 :] if prefix else key for key in keys)
