"""Errors seglab raises on purpose. Every message names the file or key at fault."""
from __future__ import annotations

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
