"""The run store as the rest of seglab sees it: stages, their attributes, their units'
records and arrays, over the sharded layout of pipeline/core/shardstore.py.

Layout (keys under the store's location: a local folder, ``file://``, ``s3://`` or ``gs://``)::

    zarr.json                        root group; attrs: seglab_store = 2, the run's records
    _index/i<seq>.parquet            the unit index: every unit's uid and shard
    <stage>/zarr.json                the stage's group; attrs: signature, inputs, outputs, summary
    <stage>/<output>/b<seq>/         one batch's output: one Zarr array, rows = its units
    _records/<stage>/b<seq>.parquet  the batch's commit object: a row per unit
    _tables/<stage>/t<seq>.parquet   the stage's rows folded (last row per unit)
    _checkpoints/<stage>/            a trained stage's checkpoint files (local stores)
    _run.lock                        the run lock (pipeline/storelock.py)

Only this module and the core modules it builds on import zarr. Data arrays are written
by workers (one batch = one writer); the stage and root attributes, the index, failure
records and folded tables only by the driver holding the lock. A unit is done when a
committed batch holds it, never because an array exists.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.fingerprint import bytes_sha256
from seglab.pipeline.core.batcharrays import (
    ARRAY_KEY,
    BATCH_ID,
    RECORDS,
    BatchDamaged,
    batch_id,
    output_rows,
    read_commit,
    read_rows,
)
from seglab.pipeline.core.ledger import ArrayRecord, BatchTask, LedgerEntry, Receipt
from seglab.pipeline.core.objects import Location, Objects
from seglab.pipeline.core.shardstore import INDEX, INDEX_NAME, LAYOUT, LOCK, ShardStore, ShardStoreError, store_layout
from seglab.pipeline.core.stagerecords import TABLES, StageState
from seglab.pipeline.core.stagetable import SOURCE, parquet_rows
from seglab.pipeline.core.unitindex import UnitIndex
from seglab.pipeline.core.unitrecords import Where, commit_receipts, done_columns, unit_entries
from seglab.stages.base import Unit

CHECKPOINT_DIR = "_checkpoints"
LOCK_FILE = LOCK
DEFAULT_SHARD_SIZE = 128
"""Units per shard of a new store's index (``store.shard_size`` in a manifest)."""


class StoreError(SeglabError):
    pass


class CorruptOutput(StoreError):
    """Stored arrays of a unit that are missing, do not decode or do not match their
    producer's checksum; ``paths``: the 'stage/output' paths at fault. The producing stage must
    redo the unit."""

    def __init__(self, store: Path | str, unit: str, paths: Sequence[str]):
        self.store, self.unit, self.paths = str(store), unit, list(paths)
        super().__init__(
            f"{store}: stored {', '.join(f'{p} of {unit}' for p in paths)} is damaged or missing "
            "(does not decode or differs from the checksum recorded when it was written)"
        )

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (type(self), (self.store, self.unit, self.paths))


STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[0-9]+)?")
"""What a stage's name (= its store group) looks like: 'select', 'refine.2'."""
CHECKPOINT_KEY = re.compile(r"[0-9a-f]{16}")
"""Folders of one training input's checkpoints, named by the key's first 16 hex digits."""
CHECKPOINT_FILE = re.compile(r"epoch-[0-9]{4,}\.pt(#[0-9]+)?|\.epoch-[0-9]{4,}\.pt\.[0-9]+\.tmp")
"""Files workers/trainer.py writes into a checkpoint folder: epoch-NNNN.pt, and the staging
file of one a killed writer left (obstore's in a folder, 'epoch-NNNN.pt#N'; an earlier
seglab's temporary name)."""
RAY_TRAIN_DIR = "_ray"
"""Where an earlier seglab had Ray Train keep its own files, beside a stage's checkpoint folders."""
GROUP = "zarr.json"


def store_exists(location: str | Path) -> bool:
    """Whether a store may be used or made at ``location``: True when a seglab store is there
    (StoreError for one of an earlier layout), False when nothing is; StoreError naming the
    location when something else is, which seglab must not write into."""
    parsed = Location.parse(str(location))
    if parsed.local is not None and parsed.local.exists() and not parsed.local.is_dir():
        raise StoreError(f"{location}: exists and is not a folder; choose another store path")
    objects = Objects(parsed)
    layout = store_layout(objects)
    if layout is not None:
        try:
            ShardStore(parsed)  # refuses another layout in one line
        except ShardStoreError as exc:
            raise StoreError(str(exc)) from None
        return True
    others = [key for key in objects.list("")[:4] if key != LOCK]
    if others and store_layout(objects) == LAYOUT:  # made between the two looks
        return True
    if others:
        raise StoreError(
            f"{location}: exists and is not a seglab store (it holds {', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''}); seglab creates a store only where nothing is"
        )
    return False


class Store:
    """A run store at ``location`` (a path or a URL).

    ``create``: make the store when nothing is there (an empty folder, or one holding only a
    run lock, counts as nothing); anything else is refused, and so is a store of an earlier
    layout, each in one line. Without ``create`` the store must exist."""

    def __init__(self, location: Path | str, *, create: bool = False, attrs: Mapping[str, Any] | None = None):
        text = str(location)
        if create:
            store_exists(text)
        try:
            self.shards = ShardStore(text, create=create, attrs=attrs)
        except ShardStoreError as exc:
            raise StoreError(str(exc)) from None
        self.objects = self.shards.objects
        self.location = self.objects.location
        self.path = str(self.location)
        """The location as text, for messages."""
        self.problems: dict[str, str] = {}
        """Problems found while reading the store (damaged records), each once, in order:
        message -> the stage it concerns."""
        self._commits: dict[tuple[str, int], pa.Table | None] = {}
        self._entries: dict[str, dict[str, LedgerEntry]] = {}
        self._index: UnitIndex | None = None

    @property
    def local(self) -> Path | None:
        """The store's folder when it is on the local file system (else None)."""
        return self.location.local

    # -- metadata (driver) --------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return self.shards.attrs

    def set_root_attrs(self, **attrs: Any) -> None:
        self.shards.set_attrs(**attrs)

    def stages(self) -> list[str]:
        """Names of the stages the store holds, sorted."""
        return sorted(name for name in self.attrs.get("stages") or () if isinstance(name, str))

    def stage_attrs(self, stage: str) -> dict[str, Any]:
        data = self.objects.get(f"{stage}/{GROUP}") if STAGE_NAME.fullmatch(stage) else None
        try:
            meta = json.loads(data) if data else {}
        except ValueError:
            self.problems.setdefault(f"{self.path}: {stage}/{GROUP} does not decode; ignored", stage)
            meta = {}
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        return dict(attrs) if isinstance(attrs, dict) else {}

    def set_stage_attrs(self, stage: str, **attrs: Any) -> None:
        if not STAGE_NAME.fullmatch(stage):
            raise StoreError(f"{self.path}: '{stage}' is not a stage name")
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {**self.stage_attrs(stage), **attrs}}
        self.objects.put(f"{stage}/{GROUP}", json.dumps(meta).encode())
        if stage not in self.stages():
            self.set_root_attrs(stages=sorted({*self.stages(), stage}))

    # -- the unit index (driver) --------------------------------------------------------
    def index(self, shard_size: int = DEFAULT_SHARD_SIZE) -> UnitIndex:
        """The stored unit index (an empty one of ``shard_size`` when none is stored)."""
        if self._index is None:
            self._index = self.shards.index(shard_size)
        return self._index

    def save_index(self, index: UnitIndex) -> None:
        self.shards.save_index(index)
        self._index = index

    # -- stage records ------------------------------------------------------------------
    def stage_inputs(self, stage: str) -> list[str]:
        """The input names the stage's rows record digests of (its parents, or 'source')."""
        return [str(name) for name in self.stage_attrs(stage).get("inputs") or ()]

    def state(
        self, stage: str, inputs: Sequence[str] | None = None, columns: Sequence[str] | None = None
    ) -> StageState:
        """The stage's records (only ``columns`` of them, when given: ``load_stage``);
        ``inputs``: its input names (default: as its attributes record them)."""
        names = self.stage_inputs(stage) if inputs is None else list(inputs)
        state = self.shards.state(stage, names, columns)
        for key in state.damaged:
            self.problems.setdefault(f"{self.path}: {key} does not decode; its units are redone", stage)
        return state

    def commit(self, stage: str, seq: int) -> pa.Table | None:
        """A batch's commit object (cached: commit objects never change)."""
        key = (stage, seq)
        if key not in self._commits:
            try:
                self._commits[key] = read_commit(self.objects, stage, batch_id(seq))
            except (pa.ArrowInvalid, ValueError):
                self.problems.setdefault(f"{self.path}: {RECORDS}/{stage}/{batch_id(seq)} does not decode", stage)
                self._commits[key] = None
        return self._commits[key]

    def entries(self, stage: str) -> dict[str, LedgerEntry]:
        """The stage's records as one entry per unit id (its last row wins): a ``Receipt``
        locating its outputs, or a ``Failure`` with its message. Kept until ``refresh``."""
        if stage not in self._entries:
            self._entries[stage] = self._load_entries(stage)
        return self._entries[stage]

    def _load_entries(self, stage: str) -> dict[str, LedgerEntry]:
        """``entries`` read anew: the stage's last rows, done ones located in their commit objects."""
        index = self.index()
        if not len(index) or not self.objects.exists(f"{stage}/{GROUP}"):
            return {}
        return unit_entries(self.state(stage).table, index, lambda seq: self.commit(stage, seq))

    def committed_rows(self, stage: str) -> int:
        """Unit records over every commit object of ``stage`` (failures included)."""
        return sum(
            parquet_rows(data)
            for key in self.objects.list(f"{RECORDS}/{stage}")
            if (data := self.objects.get(key)) is not None
        )

    def refresh(self) -> None:
        """Forget what was read of the stages' records (after batches were committed)."""
        self._entries.clear()

    def problems_of(self, stage: str) -> list[str]:
        """The problems found so far in what the store holds for ``stage``."""
        return [message for message, where in self.problems.items() if where == stage]

    def put_units(self, stage: str, units: Sequence[str], outputs: Sequence[Mapping[str, np.ndarray]]) -> list[Receipt]:
        """Write units' outputs as one committed batch of ``stage`` outside a run (benchmarks,
        tests), indexing units not yet in the index; -> their receipts."""
        ids = pa.array(list(units), pa.string())
        index, update = self.index().update(ids, ids, np.zeros((len(units), 32), np.uint8))
        if len(update.added):
            self.save_index(index)
        uids = pc.index_in(ids, value_set=index.table.column("unit")).to_numpy()
        self.set_stage_attrs(stage, inputs=[SOURCE], outputs=sorted(outputs[0]) if outputs else [])
        seq = self.state(stage, columns=()).next_batch
        zeros = [bytes(32)] * len(units)
        task = BatchTask(
            batch=batch_id(seq),
            units=tuple(Unit(u, "") for u in units),
            uids=tuple(int(u) for u in uids),
            signature=bytes(32),
            fitted=bytes(32),
            made_from={SOURCE: tuple(zeros)},
        )
        columns = done_columns(task, range(len(units)), [{}] * len(units), 0.0)
        table = self.shards.write_batch(stage, task.batch, outputs, columns)
        self.refresh()
        return commit_receipts(table, seq, list(units))

    # -- reading arrays ------------------------------------------------------------------
    def read_recorded(self, path: str, unit: str, record: ArrayRecord) -> np.ndarray:
        """One 'stage/output' array of one unit, as ``record`` (from ``ledger``) locates it,
        checked against the hash its writer recorded. CorruptOutput when it is missing,
        does not decode or differs."""
        return self.read_many(path, [Where(unit, record.batch, record.row, record.sha256)])[0]

    def read_many(self, path: str, located: Sequence[Where]) -> list[np.ndarray]:
        """'stage/output' arrays of several units, one read per batch they are in, each
        checked against its batch's commit object (and the hash ``Where`` gives, if any);
        CorruptOutput naming the first unit at fault."""
        stage, output = path.split("/", 1)
        values: list[np.ndarray | None] = [None] * len(located)
        by_batch: dict[int, list[int]] = {}
        for at, where in enumerate(located):
            by_batch.setdefault(where.batch, []).append(at)
        for seq, positions in by_batch.items():
            rows = [located[at].row for at in positions]
            table = self.commit(stage, seq) if seq >= 0 else None
            try:
                if table is None:
                    raise FileNotFoundError(f"{stage}/{batch_id(seq)}")
                committed = output_rows(table, output)
                bad = {
                    located[at].row
                    for at in positions
                    if located[at].sha256 is not None
                    and committed.sha256[located[at].row].tobytes().hex() != located[at].sha256
                }
                if bad:
                    raise BatchDamaged(path, sorted(bad), "differs from the record it was read by")
                found = read_rows(self.objects, stage, output, batch_id(seq), rows, committed)
            except (BatchDamaged, FileNotFoundError, KeyError, IndexError) as exc:
                bad = set(exc.rows) if isinstance(exc, BatchDamaged) else set(rows)
                first = next((located[at].unit for at in positions if located[at].row in bad), located[0].unit)
                raise CorruptOutput(self.path, first, [path]) from None
            for at, value in zip(positions, found):
                values[at] = value
        return [v for v in values if v is not None]

    def read_units(self, paths: Iterable[str], units: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """'stage/output' arrays of done units -> per unit {'stage/output': array}; each
        stage's records are loaded once. StoreError when a unit is not done in a stage read,
        CorruptOutput when an array is damaged."""
        paths = list(paths)
        out: list[dict[str, np.ndarray]] = [{} for _ in units]
        entries = {stage: self.entries(stage) for stage in dict.fromkeys(p.split("/", 1)[0] for p in paths)}
        for path in paths:
            stage, output = path.split("/", 1)
            located = []
            for unit in units:
                entry = entries[stage].get(unit)
                if not isinstance(entry, Receipt) or output not in entry.outputs:
                    raise StoreError(f"{self.path}: '{path}' of {unit} is missing (upstream stage not done for it?)")
                located.append((unit, entry.outputs[output]))
            for at, value in enumerate(self.read_many(path, [Where(u, r.batch, r.row, r.sha256) for u, r in located])):
                out[at][path] = value
        return out

    def read_unit(self, paths: Iterable[str], unit: str) -> dict[str, np.ndarray]:
        """'stage/output' arrays of one done unit -> {'stage/output': array} (``read_units``)."""
        return self.read_units(paths, [unit])[0]

    def read_array(self, path: str, unit: str) -> np.ndarray:
        """One 'stage/output' array of one done unit."""
        return self.read_unit([path], unit)[path]

    # -- removing (driver) ----------------------------------------------------------------
    def clear_stage(self, stage: str, outputs: Sequence[str] | None = None) -> list[str]:
        """Remove what seglab wrote for a stage: its batches' arrays (of ``outputs``; default:
        the outputs its attributes record), commit objects, folded tables, attributes and
        checkpoints. Any other key found among them (a file a user put there) stays; -> those keys."""
        if not STAGE_NAME.fullmatch(stage):
            raise StoreError(f"{self.path}: '{stage}' is not a stage name")
        if outputs is None:
            outputs = [str(o) for o in self.stage_attrs(stage).get("outputs") or ()]
        doomed: list[str] = []
        left: list[str] = []
        for key in self.objects.list(stage):
            rest = key[len(stage) + 1 :]
            parts = rest.split("/", 2)
            ours = (
                rest == GROUP
                or (len(parts) == 2 and parts[0] in outputs and parts[1] == GROUP)  # zarr's group of the output
                or (
                    len(parts) == 3
                    and parts[0] in outputs
                    and BATCH_ID.fullmatch(parts[1]) is not None
                    and ARRAY_KEY.fullmatch(parts[2]) is not None
                )
            )
            (doomed if ours else left).append(key)
        for folder, pattern in ((RECORDS, r"b[0-9]{12}\.parquet"), (TABLES, r"t[0-9]{12}\.parquet")):
            for key in self.objects.list(f"{folder}/{stage}"):
                (doomed if re.fullmatch(pattern, key.rsplit("/", 1)[-1]) else left).append(key)
        self.objects.delete(doomed)
        self._commits = {k: v for k, v in self._commits.items() if k[0] != stage}
        self.refresh()
        if stage in self.stages():
            self.set_root_attrs(stages=[s for s in self.stages() if s != stage])
        return left + [str(p) for p in self._clear_checkpoints(stage)]

    def remove(self) -> list[str]:
        """Remove the whole store, key by key of what seglab wrote (stages, index, root, lock);
        -> the keys left (files a user put there)."""
        left: list[str] = []
        for stage in self.stages():
            left += self.clear_stage(stage)
        self.objects.delete(key for key in self.objects.list(INDEX) if INDEX_NAME.fullmatch(key.rsplit("/", 1)[-1]))
        self.objects.delete([GROUP, LOCK])
        return left

    def _clear_checkpoints(self, stage: str) -> list[str]:
        """Remove the stage's checkpoint files (keys the trainer writes, in folders of training
        keys); -> the other keys under its checkpoint folder, left in place."""
        prefix = self.checkpoint_prefix(stage)
        doomed: list[str] = []
        left: list[str] = []
        for key in self.objects.list(prefix):
            (doomed if _is_checkpoint_key(key[len(prefix) + 1 :]) else left).append(key)
        if self.local is not None:
            for staged in (self.local / prefix).glob("*/epoch-*.pt#*"):  # obstore lists no staging file
                if _is_checkpoint_key(f"{staged.parent.name}/{staged.name}") and staged.is_file():
                    staged.unlink()
            ray_train = self.local / prefix / RAY_TRAIN_DIR
            if ray_train.is_dir():
                shutil.rmtree(ray_train)  # Ray Train's own files, where an earlier seglab had it keep them
                left = [key for key in left if not key.startswith(f"{prefix}/{RAY_TRAIN_DIR}/")]
        self.objects.delete(doomed)  # last: it removes the folders it empties
        return left

    def checkpoint_prefix(self, stage: str) -> str:
        """The key folder of a trained stage's checkpoints: ``<prefix>/<training key>/epoch-NNNN.pt``."""
        return f"{CHECKPOINT_DIR}/{stage}"

    def checkpoint_key(self, stage: str, key: str, name: str = "") -> str:
        """The key of checkpoint ``name`` of one training key (``name`` empty: their folder)."""
        return f"{self.checkpoint_prefix(stage)}/{key}" + (f"/{name}" if name else "")

    def checkpoint_location(self, stage: str, key: str) -> str:
        """The location (path or URL) of the checkpoint folder of one training key."""
        folder = self.checkpoint_key(stage, key)
        return str(self.local / folder) if self.local is not None else f"{self.location.url}/{folder}"

    def recorded_checkpoint(self, key: str, sha256: str) -> bytes | None:
        """The checkpoint object at ``key`` when its bytes hash to the ``sha256`` recorded for
        it; None when it is missing or differs."""
        data = self.objects.get(key)
        return data if data is not None and bytes_sha256(data) == sha256 else None

    def remove_other_checkpoints(self, stage: str, keep: str) -> None:
        """Remove a trained stage's checkpoint files of other training inputs than ``keep``
        (a 16-hex-digit key): only keys the trainer writes."""
        prefix = self.checkpoint_prefix(stage)
        self.objects.delete(
            key
            for key in self.objects.list(prefix)
            if _is_checkpoint_key(rest := key[len(prefix) + 1 :]) and not rest.startswith(f"{keep}/")
        )


def _is_checkpoint_key(rest: str) -> bool:
    """Whether ``rest`` (a key below a stage's checkpoint folder) is a file the trainer writes."""
    parts = rest.split("/")
    return (
        len(parts) == 2
        and CHECKPOINT_KEY.fullmatch(parts[0]) is not None
        and CHECKPOINT_FILE.fullmatch(parts[1]) is not None
    )
