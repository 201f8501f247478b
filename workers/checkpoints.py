"""Checkpoints are untrusted input: hashed, unpickled only as tensors, matched exactly.

``torch.load(weights_only=True)`` refuses any pickle that would build an arbitrary
object, so a malicious checkpoint cannot run code. The state dict must name exactly the
architecture's parameters: a missing or unexpected key is an error naming the keys.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from seglab.pipeline.base.errors import InputError
from seglab.pipeline.base.fingerprint import file_sha256

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: what torch's refusal says the pickle wanted to call, or the pickle opcode it stopped at
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class) (\S+)")
_OPCODE = re.compile(r"Unsupported operand (\d+)")


def checkpoint_sha256(path: Path | str) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    return file_sha256(path)


def describe_load_failure(exc: Exception) -> str:
    """A one-line reason why ``torch.load(weights_only=True)`` refused a file.

    torch's own messages run to many lines, carry terminal colour codes and suggest loading
    the file with ``weights_only=False``, which is exactly what must not be done here.
    """
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        if found := _GLOBAL.search(text):
            return (
                f"not a safe tensor checkpoint: unpickling it would call {found.group(1).rstrip('.')}, not "
                f"just rebuild tensors, so weights_only loading refused it without running any of it; use a "
                f"file that holds only a state dict of tensors"
            )
        found = _OPCODE.search(text)
        where = f" at pickle opcode {found.group(1)}" if found else ""
        return (
            f"not a safe tensor checkpoint: weights_only loading refused it{where} without running any of it "
            f"(a damaged file, or a pickle that is not a plain state dict of tensors)"
        )
    if isinstance(exc, EOFError) or "central directory" in text or "truncated" in text.lower():
        return "the checkpoint file is empty or truncated (an incomplete download or copy?); replace it"
    first = next((line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()), "")
    detail = f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
    return f"not a PyTorch tensor checkpoint, or a damaged one ({detail})"


def load_state_dict(
    path: Path | str, *, nested_key: str | None = None, data: bytes | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors on the CPU without executing pickled code.

    ``nested_key``: checkpoints that wrap the state dict (SAM2's ``{"model": ...}``).
    ``data``: the checkpoint's bytes, read from object storage (``path`` then only names it).
    """
    path = Path(path)
    try:
        loaded = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint file not found") from None
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError for torn zips, EOFError, ...
        raise InputError(path, describe_load_failure(exc)) from None
    if nested_key is not None and isinstance(loaded, Mapping) and nested_key in loaded:
        loaded = loaded[nested_key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(path, "checkpoint does not hold a state dict of tensors")
    return dict(loaded)


def load_exact(
    module: torch.nn.Module, path: Path | str, *, nested_key: str | None = None, data: bytes | None = None
) -> None:
    """Load ``path`` (or its ``data``) into ``module``; every parameter and buffer must match
    by name and shape."""
    state = load_state_dict(path, nested_key=nested_key, data=data)
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
