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
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.fingerprint import array_sha256
from seglab.pipeline.core.ledger import ArrayRecord, Ledger, Receipt, parse_entry

LEDGER_DIR = "_ledger"
COMMIT_DIR = "_commits"
CHECKPOINT_DIR = "_checkpoints"
PLAIN_FOLDERS = (LEDGER_DIR, COMMIT_DIR, CHECKPOINT_DIR)
LOCK_FILE = "_run.lock"
"""The run lock (pipeline/storelock.py), a plain file at the store's root."""


class StoreError(SeglabError):
    pass


class CorruptOutput(StoreError):
    """Stored arrays of a unit that do not decode or do not match their producer's hash;
    ``paths``: the 'stage/output' paths at fault. The producing stage must redo the unit."""

    def __init__(self, store: Path | str, unit: str, paths: Sequence[str]):
        self.store, self.unit, self.paths = str(store), unit, list(paths)
        super().__init__(
            f"{store}: stored {', '.join(f'{p}/{unit}' for p in paths)} is damaged "
            "(does not decode or differs from the hash recorded when it was written)"
        )

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (type(self), (self.store, self.unit, self.paths))


MARK = "seglab_store"
"""Root attribute every store seglab creates carries (stores of earlier versions: ``seglab_version``)."""


def is_store(path: Path | str) -> bool:
    """Whether ``path`` holds a store seglab made: a Zarr v3 group whose ``zarr.json``
    carries seglab's mark. Reads that one file; never zarr's directory listing."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    attrs = meta.get("attributes")
    return meta.get("node_type") == "group" and isinstance(attrs, dict) and (MARK in attrs or "seglab_version" in attrs)


def check_store_path(path: Path | str) -> bool:
    """Whether a store may be made or used at ``path``: True when a seglab store is there,
    False when nothing (or an empty folder, or one holding only a run lock) is; StoreError
    naming the path when something else is, which seglab must not write into."""
    path = Path(path)
    if is_store(path):
        return True
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise StoreError(f"{path}: exists and is not a folder; choose another store path")
    entries = [p.name for p in path.iterdir()]
    if set(entries) <= {LOCK_FILE}:
        return False
    raise StoreError(
        f"{path}: exists and is not a seglab store (it holds {', '.join(sorted(entries)[:3])}"
        f"{' ...' if len(entries) > 3 else ''}); seglab creates a store only in a new or empty folder"
    )


class Store:
    """A run store at ``path`` (a local or shared-filesystem folder).

    ``create``: make the store when nothing is at ``path`` (or an empty folder is); a
    folder holding anything else is refused (``check_store_path``), so seglab never
    appends to or clears files that are not its own. Without ``create`` the store must exist.
    """

    def __init__(self, path: Path | str, *, create: bool = False, attrs: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.problems: dict[str, str] = {}
        """Problems found while reading the store (malformed ledger lines), each once, in
        order: message -> the stage it concerns."""
        exists = check_store_path(self.path) if create else is_store(self.path)
        if not create and not exists:
            if (self.path / "zarr.json").exists():
                raise StoreError(f"{self.path}: not a seglab store (its zarr.json carries no seglab mark)")
            raise StoreError(f"{self.path}: no seglab store here (run `seglab run` first)")
        try:
            if exists:
                self._root = zarr.open_group(self.path, mode="r+", zarr_format=3)
            else:  # one write of zarr.json with the mark: a store is never half-marked
                self._root = zarr.create_group(
                    self.path, zarr_format=3, attributes={MARK: 1, **(attrs or {})}, overwrite=False
                )
        except Exception as exc:  # zarr raises several types for a damaged folder
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None
        for folder in PLAIN_FOLDERS:
            if create and folder not in self._root:
                self._root.require_group(folder)  # a group, so zarr recognises the folder
        if create and attrs and exists:
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
        """Names of the stage groups the store holds, sorted. Listed from the folder (zarr's
        own listing warns about every plain file, such as the run lock, at the root)."""
        return sorted(
            p.name
            for p in self.path.iterdir()
            if STAGE_NAME.fullmatch(p.name) and p.name not in PLAIN_FOLDERS and (p / "zarr.json").is_file()
        )

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

    def clear_stage(self, stage: str) -> list[Path]:
        """Remove what seglab wrote for a stage: its Zarr arrays and groups, attributes,
        ledger, commit records and checkpoints. Anything else found among them (a file a
        user put into the stage's folder) stays; -> those paths."""
        if not STAGE_NAME.fullmatch(stage) or stage in PLAIN_FOLDERS:
            raise StoreError(f"{self.path}: '{stage}' is not a stage name")
        (self.path / LEDGER_DIR / f"{stage}.jsonl").unlink(missing_ok=True)
        left = remove_zarr_tree(self.path / stage)
        left += _remove_matching(self.path / COMMIT_DIR / stage, _is_commit_file)
        checkpoints = self.checkpoint_dir(stage)
        if checkpoints.is_dir():
            for entry in checkpoints.iterdir():
                if entry.name == RAY_TRAIN_DIR and entry.is_dir():
                    shutil.rmtree(entry)  # Ray Train's own files, in the folder seglab gave it
                elif CHECKPOINT_KEY.fullmatch(entry.name) and entry.is_dir():
                    left += _remove_matching(entry, lambda path: bool(CHECKPOINT_FILE.fullmatch(path.name)))
                else:
                    left.append(entry)
            _rmdir_if_empty(checkpoints)
        return left

    def checkpoint_dir(self, stage: str) -> Path:
        """Where a trained stage keeps its checkpoint files (outside the Zarr hierarchy)."""
        return self.path / CHECKPOINT_DIR / stage

    def ledger(self, stage: str) -> Ledger:
        return Ledger(self.path / LEDGER_DIR / f"{stage}.jsonl", self.problems)

    def problems_of(self, stage: str) -> list[str]:
        """The problems found so far in what the store holds for ``stage``."""
        return [message for message, where in self.problems.items() if where == stage]

    def remove_other_checkpoints(self, stage: str, keep: str) -> None:
        """Remove a trained stage's checkpoint folders of other training inputs than ``keep``
        (a 16-hex-digit key), only the files the trainer writes into them."""
        folder = self.checkpoint_dir(stage)
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.name != keep and CHECKPOINT_KEY.fullmatch(entry.name) and entry.is_dir():
                _remove_matching(entry, lambda path: bool(CHECKPOINT_FILE.fullmatch(path.name)))

    # -- data (workers) ----------------------------------------------------------------
    def write_unit(self, stage: str, unit: str, arrays: Mapping[str, np.ndarray]) -> dict[str, ArrayRecord]:
        """Write one unit's outputs; returns per output its record (sha256, shape, dtype).

        Idempotent: a retry overwrites the same arrays with the same content. The output
        groups must exist (``prepare_stage``).
        """
        receipt: dict[str, ArrayRecord] = {}
        for name, value in arrays.items():
            array = np.ascontiguousarray(value)
            group = self._root[f"{stage}/{name}"]
            assert isinstance(group, zarr.Group)  # made by ``prepare_stage``
            target = group.create_array(
                unit,
                shape=array.shape,
                dtype=array.dtype,
                chunks=tuple(max(1, s) for s in array.shape) or "auto",
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
            if array.size:
                target[...] = array
            receipt[name] = ArrayRecord(array_sha256(array), tuple(array.shape), array.dtype.str)
        return receipt

    def commit_unit(self, stage: str, receipt: Receipt) -> None:
        """Record (worker side, after ``write_unit``) that the unit's outputs are complete:
        its receipt, with the input digest and stage signature it was made with. Written
        to a temporary file and renamed, so a record is whole or absent."""
        path = self.path / COMMIT_DIR / stage / f"{receipt.unit}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(receipt.to_json(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)

    def committed(self, stage: str, unit: str) -> Receipt | None:
        """The unit's commit record, or None when there is none (or it is not a whole,
        valid record of that unit done)."""
        try:
            record = parse_entry((self.path / COMMIT_DIR / stage / f"{unit}.json").read_bytes())
        except OSError:
            return None
        return record if isinstance(record, Receipt) and record.unit == unit else None

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
        out: dict[str, np.ndarray | None] = {}
        for path in paths:
            try:
                out[path] = self._checked(path, unit, expected.get(path))
            except KeyError:
                raise StoreError(
                    f"{self.path}: '{path}/{unit}' is missing (upstream stage not done for this unit?)"
                ) from None
        corrupt = [path for path, value in out.items() if value is None]
        if corrupt:
            raise CorruptOutput(self.path, unit, corrupt)
        return {path: value for path, value in out.items() if value is not None}

    def read_recorded(self, path: str, unit: str, record: ArrayRecord) -> np.ndarray:
        """One 'stage/output' array of one unit, checked against the ``record`` its writer
        made (as ``write_unit`` returns it): the declared
        shape and dtype before anything is read (a damaged ``zarr.json`` declaring a huge
        array allocates nothing), the content's sha256 after. StoreError when the array is
        missing, CorruptOutput when it differs from its record or does not decode."""
        try:
            value = self._checked(path, unit, record.sha256, record.shape, record.dtype)
        except KeyError:
            raise StoreError(f"{self.path}: '{path}/{unit}' is missing (its unit is recorded as done)") from None
        if value is None:
            raise CorruptOutput(self.path, unit, [path])
        return value

    def _checked(
        self, path: str, unit: str, sha256: str | None, shape: tuple[int, ...] | None = None, dtype: str | None = None
    ) -> np.ndarray | None:
        """The unit's array at 'stage/output' ``path``, or None when it does not decode or
        differs from the ``shape`` and ``dtype`` given (checked from its metadata, before
        anything is read) or from ``sha256`` (None: not checked). KeyError when it is absent."""
        try:
            array = self._root[f"{path}/{unit}"]
        except KeyError:
            raise
        except Exception:  # an unreadable zarr.json
            return None
        if (
            not isinstance(array, zarr.Array)
            or (shape is not None and tuple(array.shape) != shape)
            or (dtype and np.dtype(array.dtype).str != dtype)
        ):
            return None
        try:
            value = np.asarray(array[...])
        except Exception:  # a torn or truncated chunk fails to decode
            return None
        return None if sha256 is not None and array_sha256(value) != sha256 else value

    def missing_outputs(self, stage: str, unit: str, outputs: Iterable[str]) -> list[str]:
        """Of a unit's ``outputs`` (names) in ``stage``, those whose array is gone from the
        store (its ``zarr.json`` absent): one stat each, nothing read."""
        return [name for name in outputs if not (self.path / stage / name / unit / "zarr.json").is_file()]

    def has_unit(self, path: str, unit: str) -> bool:
        return f"{path}/{unit}" in self._root


STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[0-9]+)?")
"""What a stage's name (= its store group) looks like: 'select', 'refine.2'."""
COMMIT_TMP = re.compile(r"\..+\.json\.[0-9]+\.tmp")
"""Temporary names ``commit_unit`` writes a record under before renaming it."""
CHECKPOINT_KEY = re.compile(r"[0-9a-f]{16}")
"""Folders of one training input's checkpoints, named by the key's first 16 hex digits."""
CHECKPOINT_FILE = re.compile(r"epoch-[0-9]{4,}\.pt|\.epoch-[0-9]{4,}\.pt\.[0-9]+\.tmp")
"""Files workers/trainer.py writes into a checkpoint folder."""
RAY_TRAIN_DIR = "_ray"
"""Ray Train's storage folder beside a stage's checkpoint folders (workers/trainer.py)."""


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (holds files seglab did not write) or already gone
        pass


def _is_commit_file(path: Path) -> bool:
    """Whether ``path`` is a file ``commit_unit`` wrote: a temporary name of its, or a
    record '<unit>.json' whose JSON names that unit (a user's JSON file there is not one)."""
    if COMMIT_TMP.fullmatch(path.name):
        return True
    if path.suffix != ".json":
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("unit") == path.stem


def _remove_matching(folder: Path, seglabs: Callable[[Path], bool]) -> list[Path]:
    """Remove the files directly in ``folder`` that ``seglabs`` proves seglab wrote, then
    the folder if that emptied it; -> the entries left."""
    if not folder.is_dir():
        return []
    left = []
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink() and seglabs(entry):
            entry.unlink()
        else:
            left.append(entry)
    _rmdir_if_empty(folder)
    return left


def remove_zarr_tree(folder: Path) -> list[Path]:
    """Remove the Zarr v3 hierarchy rooted at ``folder`` (groups with their child nodes,
    arrays with their chunks under ``c/``), leaving every other file; -> the paths left.
    A folder without a ``zarr.json`` is not a Zarr node and is left whole."""
    meta = folder / "zarr.json"
    if folder.is_symlink() or not meta.is_file():
        return [folder] if folder.exists() or folder.is_symlink() else []
    try:
        node_type = json.loads(meta.read_text(encoding="utf-8")).get("node_type")
    except (OSError, ValueError, AttributeError):
        return [folder]
    left: list[Path] = []
    for entry in folder.iterdir():
        if entry.name == "zarr.json":
            continue
        if node_type == "array" and entry.name == "c" and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)  # chunk keys: zarr's own files
        elif node_type == "group" and entry.is_dir():
            left += remove_zarr_tree(entry)
        else:
            left.append(entry)
    meta.unlink()
    _rmdir_if_empty(folder)
    return left
