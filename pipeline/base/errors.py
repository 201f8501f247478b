"""Errors seglab raises on purpose. Every message names the file or key at fault."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class SeglabError(Exception):
    """Base class: an error the CLI prints as one line (no traceback unless --verbose)."""


class ManifestError(SeglabError):
    """The manifest is unreadable or invalid. ``problems`` lists (location, message) pairs."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems)
        super().__init__(f"{self.path}: {lines}")


class InputError(SeglabError):
    """Deterministic bad input (an undecodable image, a weak label that does not fit).

    Never retried: running it again would fail the same way.
    """

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep both fields across Ray's pickling
        return (type(self), (self.path, self.problem))


class TransientError(SeglabError):
    """A failure worth retrying (lost worker, I/O hiccup)."""


class SignatureMismatch(SeglabError):
    """Stored outputs were made with a different configuration, model or input."""

    def __init__(self, stage: str, changes: list[str]):
        self.stage = stage
        self.changes = changes
        super().__init__(
            f"stage '{stage}' was computed with different settings: {'; '.join(changes)}. "
            f"Rerun with --force {stage} to recompute it and everything downstream."
        )


class UsageError(SeglabError):
    """A command-line value that cannot be used (an unknown stage name, say); exit 2."""


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def os_error_cause(exc: BaseException | None) -> OSError | None:
    """The OSError of a full disk or an unwritable file in ``exc`` or its chain of causes
    (zarr and numcodecs wrap them), or None. The chain stops at an InputError (an
    unreadable input file is that unit's fault, not the store's) and where an error was
    raised ``from None``."""
    seen = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, InputError):
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE | NOT_WRITABLE:
            return exc
        if (code := _rust_os_error(exc)) is not None:
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


RUST_OS_ERROR = re.compile(r"\(os error ([0-9]+)\)")
"""How obstore (Rust) reports the operating system's error in its message."""


def _rust_os_error(exc: BaseException) -> int | None:
    """The errno an object-store library's error message carries ('... (os error 28)'),
    when it is a full disk or an unwritable file; else None."""
    match = RUST_OS_ERROR.search(str(exc))
    code = int(match.group(1)) if match else None
    return code if code in NO_SPACE | NOT_WRITABLE else None


class StorageError(SeglabError):
    """The disk is full, or a file cannot be written (read-only, another user's). Never
    the fault of the unit being written: nothing is recorded against it."""

    def __init__(self, path: Path | str, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))

    @classmethod
    def from_os_error(cls, exc: OSError, fallback: Path | str) -> StorageError:
        path = exc.filename or fallback
        if exc.errno in NO_SPACE:
            return cls(
                path,
                "no space left on the device; free some space (or choose another folder) and run "
                "again: finished work is kept",
            )
        return cls(
            path,
            f"cannot write here ({exc.strerror or 'not permitted'}): the folder is read-only or "
            "belongs to another user; use a folder you can write to",
        )
