"""Content hashes and stage signatures.

A stage signature says what its stored outputs were computed from: the validated config
(canonical JSON), the stage version, the model (backend signature with checkpoint
sha256) and the upstream stages' signatures. Per-unit input hashes (ledger) cover the
data itself, so adding images never invalidates finished ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Hash of dtype, shape and bytes (C order) of an array."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data if a.size else b"")
    return h.hexdigest()


def array_crc32c(array: np.ndarray) -> int:
    """CRC32C (Castagnoli, hardware-accelerated) of an array's bytes in C order: a checksum that
    finds accidental damage at about 14 times the speed of ``array_sha256`` (0.044 against 0.62
    ms a MiB here), not an identity."""
    a = np.ascontiguousarray(array)
    return google_crc32c.value(a.reshape(-1).view(np.uint8)) if a.size else 0


def stage_signature(
    *, version: int, config: Mapping[str, Any], model: Mapping[str, str] | None, upstream: Mapping[str, str]
) -> dict[str, Any]:
    """The components of a stage signature; ``digest(signature)`` is its identity."""
    return {"version": version, "config": dict(config), "model": dict(model or {}), "upstream": dict(upstream)}


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where} added ({new[key]!r})")
            elif key not in new:
                out.append(f"{where} removed (was {old[key]!r})")
            else:
                out.extend(_diff(where, old[key], new[key]))
        return out
    if canonical_json(old) != canonical_json(new):
        return [f"{prefix}: {old!r} -> {new!r}"]
    return []


def diff_signatures(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable list of what changed between two signatures, e.g.
    ``config.tau_low: 0.3 -> 0.4`` or ``upstream.embed: 1a2b.. -> 3c4d..``."""
    changes = _diff("", old, new)
    return [c if not c.startswith("upstream.") else c.replace("upstream.", "upstream stage ", 1) for c in changes]
