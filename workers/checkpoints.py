"""Checkpoints are untrusted input: hashed, unpickled only as tensors, matched exactly.

``torch.load(weights_only=True)`` refuses any pickle that would build an arbitrary
object, so a malicious checkpoint cannot run code. The state dict must name exactly the
architecture's parameters: a missing or unexpected key is an error naming the keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from seglab.pipeline.errors import InputError
from seglab.pipeline.fingerprint import file_sha256


def checkpoint_sha256(path: Path | str) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    return file_sha256(path)


def load_state_dict(path: Path | str, *, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors on the CPU without executing pickled code.

    ``nested_key``: checkpoints that wrap the state dict (SAM2's ``{"model": ...}``).
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint file not found") from None
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError for torn zips
        reason = str(exc).splitlines()[0][:300]
        raise InputError(path, f"not a safe tensor checkpoint (refused by weights_only loading): {reason}") from None
    if nested_key is not None and isinstance(loaded, Mapping) and nested_key in loaded:
        loaded = loaded[nested_key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(path, "checkpoint does not hold a state dict of tensors")
    return dict(loaded)


def load_exact(module: torch.nn.Module, path: Path | str, *, nested_key: str | None = None) -> None:
    """Load ``path`` into ``module``; every parameter and buffer must match by name and shape."""
    state = load_state_dict(path, nested_key=nested_key)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise InputError(path, "checkpoint does not match the architecture; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
