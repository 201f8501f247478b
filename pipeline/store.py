"""The run store: a Zarr v3 folder laid out by stage, plus the driver's ledger.

Layout::

    run.zarr/
      zarr.json                 attrs: seglab version, manifest hash, created
      <stage>/                  group; attrs: signature, signature digest, summary
        <output>/<unit id>      one array per unit (images differ in size), one chunk
      _ledger/<stage>.jsonl     append-only: one line per finished or failed unit
      _commits/<stage>/<unit>.json  the worker's record that a unit's outputs are complete
      _checkpoints/<stage>/     a trained stage's checkpoint files (written atomically)
                                (_ledger, _commits and _checkpoints are zarr groups holding plain files)

Only this module imports zarr. Data arrays are written by workers (one unit = one writer);
group attributes and the ledger only by the driver. A unit is done when its ledger line
says so, never because a chunk exists (zarr skips chunks equal to the fill value).

A worker writes a unit's commit record (atomically, after every array of the unit is
written) with the output hashes, the input digest and the stage signature it computed
with. A driver killed before it appended the unit's ledger line finds the record on the
next run and adopts the unit instead of recomputing it (``Runner.plan``); a unit killed
mid-write has no record, so its torn chunks are never accepted. A reader checks every
input it reads against the hash its producer recorded (``verify_reads``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from seglab.pipeline.errors import SeglabError
from seglab.pipeline.fingerprint import array_sha256

LEDGER_DIR = "_ledger"
COMMIT_DIR = "_commits"
CHECKPOINT_DIR = "_checkpoints"
PLAIN_FOLDERS = (LEDGER_DIR, COMMIT_DIR, CHECKPOINT_DIR)


class StoreError(SeglabError):
    pass


class CorruptOutput(StoreError):
    """Stored arrays of a unit that do not decode or do not match their producer's hash;
    ``paths``: the 'stage/output' paths at fault. The producing stage must redo the unit."""

    def __init__(self, store: Path | str, unit: str, paths: Sequence[str]):
        self.store, self.unit, self.paths = str(store), unit, list(paths)
        super().__init__(f"{store}: stored {', '.join(f'{p}/{unit}' for p in paths)} is damaged "
                         "(does not decode or differs from the hash recorded when it was written)")

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (type(self), (self.store, self.unit, self.paths))


class Store:
    """A run store at ``path`` (a local or shared-filesystem folder)."""

    def __init__(self, path: Path | str, *, create: bool = False, attrs: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not create and not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: no seglab store here (run `seglab run` first)")
        try:
            self._root = zarr.open_group(self.path, mode="a" if create else "r+", zarr_format=3)
        except Exception as exc:  # zarr raises several types for a damaged folder
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None
        for folder in PLAIN_FOLDERS:
            if create and folder not in self._root:
                self._root.require_group(folder)  # a group, so zarr recognises the folder
        if create and attrs:
            missing = {k: v for k, v in attrs.items() if k not in self._root.attrs}
            if missing:
                self._root.attrs.update(missing)

    # -- metadata (driver) --------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._root.attrs)

    def set_root_attrs(self, **attrs: Any) -> None:
        self._root.attrs.update(attrs)

    def stages(self) -> list[str]:
        return sorted(name for name, _ in self._root.groups() if name not in PLAIN_FOLDERS)

    def stage_attrs(self, stage: str) -> dict[str, Any]:
        return dict(self._root[stage].attrs) if stage in self._root else {}

    def set_stage_attrs(self, stage: str, **attrs: Any) -> None:
        group = self._root.require_group(stage)
        group.attrs.update(attrs)

    def prepare_stage(self, stage: str, outputs: Iterable[str]) -> None:
        """Create the stage's output groups (driver, before workers write into them:
        concurrent creation of one group by several workers races)."""
        group = self._root.require_group(stage)
        for name in outputs:
            group.require_group(name)

    def clear_stage(self, stage: str) -> None:
        """Remove a stage's arrays, attributes, ledger and checkpoints."""
        if stage in self._root:
            del self._root[stage]
        ledger = self.path / LEDGER_DIR / f"{stage}.jsonl"
        ledger.unlink(missing_ok=True)
        shutil.rmtree(self.path / stage, ignore_errors=True)
        shutil.rmtree(self.path / COMMIT_DIR / stage, ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)

    def checkpoint_dir(self, stage: str) -> Path:
        """Where a trained stage keeps its checkpoint files (outside the Zarr hierarchy)."""
        return self.path / CHECKPOINT_DIR / stage

    def ledger(self, stage: str) -> "Ledger":
        return Ledger(self.path / LEDGER_DIR / f"{stage}.jsonl")

    # -- data (workers) ----------------------------------------------------------------
    def write_unit(self, stage: str, unit: str, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Write one unit's outputs; returns per output its sha256, shape and dtype.

        Idempotent: a retry overwrites the same arrays with the same content. The output
        groups must exist (``prepare_stage``).
        """
        receipt: dict[str, dict[str, Any]] = {}
        for name, value in arrays.items():
            array = np.ascontiguousarray(value)
            group = self._root[f"{stage}/{name}"]
            target = group.create_array(
                unit,
                shape=array.shape,
                dtype=array.dtype,
                chunks=tuple(max(1, s) for s in array.shape) or None,
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
            if array.size:
                target[...] = array
            receipt[name] = {"sha256": array_sha256(array), "shape": list(array.shape), "dtype": array.dtype.str}
        return receipt

    def commit_unit(self, stage: str, unit: str, record: Mapping[str, Any]) -> None:
        """Record (worker side, after ``write_unit``) that the unit's outputs are complete:
        ``record`` holds its receipt (outputs, info), input digest and stage signature.
        Written to a temporary file and renamed, so a record is whole or absent."""
        path = self.path / COMMIT_DIR / stage / f"{unit}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)

    def committed(self, stage: str, unit: str) -> dict[str, Any] | None:
        """The unit's commit record, or None when there is none (or it cannot be read)."""
        try:
            record = json.loads((self.path / COMMIT_DIR / stage / f"{unit}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def forget_commit(self, stage: str, unit: str) -> None:
        """Drop a unit's commit record (its outputs were found damaged: it must be redone)."""
        (self.path / COMMIT_DIR / stage / f"{unit}.json").unlink(missing_ok=True)

    def read_unit(self, paths: Iterable[str], unit: str) -> dict[str, np.ndarray]:
        """Read 'stage/output' arrays of one unit -> {'stage/output': array}; StoreError when
        one is missing, CorruptOutput when one does not decode."""
        return self.verify_reads(paths, unit, {})

    def read_array(self, path: str, unit: str) -> np.ndarray:
        """One 'stage/output' array of one unit (``read_unit`` of a single path)."""
        return self.read_unit([path], unit)[path]

    def verify_reads(self, paths: Iterable[str], unit: str, expected: Mapping[str, str]) -> dict[str, np.ndarray]:
        """``read_unit``, checking each array against the sha256 its producer recorded
        (``expected``: 'stage/output' -> sha256; paths without one are not checked).
        CorruptOutput names every array that cannot be decoded or differs from its record."""
        out: dict[str, np.ndarray] = {}
        corrupt: list[str] = []
        for path in paths:
            key = f"{path}/{unit}"
            try:
                out[path] = np.asarray(self._root[key][...])
            except KeyError:
                raise StoreError(f"{self.path}: '{key}' is missing (upstream stage not done for this unit?)") from None
            except Exception:  # a torn or truncated chunk fails to decode
                corrupt.append(path)
                continue
            if path in expected and array_sha256(out[path]) != expected[path]:
                corrupt.append(path)
        if corrupt:
            raise CorruptOutput(self.path, unit, corrupt)
        return out

    def has_unit(self, path: str, unit: str) -> bool:
        return f"{path}/{unit}" in self._root


def done_units(entries: Mapping[str, Mapping[str, Any]], signature: str) -> set[str]:
    """Of loaded ledger entries, the units done with the stage ``signature`` digest."""
    return {u for u, e in entries.items() if e.get("status") == "done" and e.get("signature") == signature}


class Ledger:
    """Append-only JSON lines: {"unit", "status": done|failed, "inputs", "signature",
    "receipt" | "error", "time"}. The last line for a unit wins; a torn last line (the
    driver killed mid-append) is ignored."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return entries
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and "unit" in entry:
                    entries[entry["unit"]] = entry
        return entries

    def done(self, signature: str) -> set[str]:
        """Units whose last line says done with the stage ``signature`` digest."""
        return done_units(self.load(), signature)

    def append(self, entries: Sequence[Mapping[str, Any]]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        text = "".join(json.dumps({**e, "time": e.get("time", now)}, separators=(",", ":")) + "\n" for e in entries)
        with open(self.path, "a+b") as f:
            if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                text = "\n" + text  # close a torn line left by a killed driver
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
