"""Globs over object keys, with the meaning Python's ``glob.glob(..., recursive=True)``
gives them over a folder, so that ``data.images.glob`` selects the same images from a
bucket as from the same files on disk.

A pattern and a key are '/'-separated parts. ``*``, ``?`` and ``[...]`` match within one
part (``*`` never crosses '/'); a part that is exactly ``**`` matches any number of parts,
none included; ``**`` as the last part matches every key below. As on disk, a wildcard does
not match a name starting with '.' unless its own part starts with '.', and ``**`` never
enters one; a part without wildcards matches only itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

_MAGIC = re.compile(r"[*?[]")


def pattern_parts(glob: str) -> tuple[str, ...]:
    """'./images//*.png' -> ('images', '*.png'): the parts a local path would have."""
    return PurePosixPath(glob).parts


def glob_prefix(glob: str) -> str:
    """The longest leading run of parts without wildcards, the last part excluded: the
    folder a listing of every key the glob may match starts from ('' for the root)."""
    return "/".join(_until_magic(pattern_parts(glob)[:-1]))


def _until_magic(parts: Sequence[str]) -> Iterable[str]:
    for part in parts:
        if _MAGIC.search(part):
            return
        yield part


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _part_matches(name: str, pattern: str) -> bool:
    if not _MAGIC.search(pattern):
        return name == pattern
    return (not _hidden(name) or _hidden(pattern)) and fnmatchcase(name, pattern)


def _matches(parts: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether key ``parts`` match pattern ``patterns`` from the first of each on."""
    if not patterns:
        return not parts
    head, rest = patterns[0], patterns[1:]
    if head != "**":
        return bool(parts) and _part_matches(parts[0], head) and _matches(parts[1:], rest)
    if not rest:  # '**' last: every key below (a key is a file, never the folder itself)
        return bool(parts) and not any(map(_hidden, parts))
    for skipped in range(len(parts)):
        if _matches(parts[skipped:], rest):
            return True
        if _hidden(parts[skipped]):
            return False
    return False


def key_matches(key: str, glob: str) -> bool:
    """Whether the object key ``key`` ('/'-separated, relative to the data root) matches ``glob``."""
    return _matches(key.split("/"), pattern_parts(glob))


def match_keys(keys: Iterable[str], glob: str) -> list[str]:
    """The keys ``glob`` matches, sorted."""
    patterns = pattern_parts(glob)
    return sorted(key for key in keys if _matches(key.split("/"), patterns))
