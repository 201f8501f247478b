"""The sharded run store (layout 2), on a local folder or an object-storage prefix.

Layout (keys under the location; see batcharrays.py and stagerecords.py for the parts)::

    zarr.json                        root group; attrs: seglab_store = 2, the run's records
    _index/i<seq>.parquet            the unit index (unitindex.py); the newest one counts
    <stage>/<output>/b<seq>/...      a batch's arrays, one object each
    _records/<stage>/b<seq>.parquet  the batch's commit object
    _tables/<stage>/t<seq>.parquet   the stage's records folded
    _run.lock                        the run lock (storelock.py)

Every object is written whole, once, by one writer, except ``zarr.json`` and the lock,
which only the driver holding the lock rewrites. Removal is of keys this module's
patterns name inside a location whose ``zarr.json`` carries seglab's mark, and of
batches no unit's record refers to any more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from zarr.errors import ContainsArrayError

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.batcharrays import (
    BATCH_ID,
    RECORDS,
    batch_id,
    batch_keys,
    commit_batch,
    records_key,
    records_table,
    write_batch_arrays,
)
from seglab.pipeline.core.objects import Location, Objects
from seglab.pipeline.core.stagerecords import RECORD_NAME, StageState, fold_stage, load_stage, numbered_keys
from seglab.pipeline.core.stagetable import parquet_bytes, parquet_table
from seglab.pipeline.core.unitindex import UnitIndex

LAYOUT = 2
MARK = "seglab_store"
"""Root attribute of every store seglab makes; its value is the layout (1: earlier seglab,
one Zarr array per image and a JSON ledger, which this seglab does not read)."""
ROOT = "zarr.json"
LOCK = "_run.lock"
INDEX = "_index"
INDEX_NAME = re.compile(r"i([0-9]{12})\.parquet")


class ShardStoreError(SeglabError):
    pass


def _root_meta(objects: Objects) -> dict[str, Any] | None:
    data = objects.get(ROOT)
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def store_layout(objects: Objects) -> int | None:
    """The layout of the seglab store at ``objects`` (None: no seglab store there)."""
    meta = _root_meta(objects)
    attrs = meta.get("attributes") if meta else None
    if not isinstance(attrs, dict) or meta is None or meta.get("node_type") != "group":
        return None
    if MARK in attrs:
        return int(attrs[MARK]) if isinstance(attrs[MARK], int) else 1
    return 1 if "seglab_version" in attrs else None


class ShardStore:
    """A layout-2 store at ``location``.

    ``create``: make it when nothing is at the location (a local folder may exist empty, or
    hold only a run lock); anything else there that is not a seglab store is refused, and
    so is a store of layout 1, with one line saying what to do."""

    def __init__(self, location: Location | str, *, create: bool = False, attrs: Mapping[str, Any] | None = None):
        self.objects = Objects(location)
        layout = store_layout(self.objects)
        if layout == 1:
            raise ShardStoreError(
                f"{self.objects}: a store written by an earlier seglab (layout 1: one array per image and a "
                "JSON ledger), which this seglab does not read; run into a new store.path (and keep this one "
                "for as long as its labels are needed)"
            )
        if layout is not None and layout != LAYOUT:
            raise ShardStoreError(
                f"{self.objects}: a seglab store of layout {layout}; this seglab reads layout {LAYOUT}"
            )
        if layout is None:
            if not create:
                raise ShardStoreError(f"{self.objects}: no seglab store here (run `seglab run` first)")
            self._create(attrs or {})

    def _create(self, attrs: Mapping[str, Any]) -> None:
        others = [key for key in self.objects.list("") if key != LOCK]
        if others:
            raise ShardStoreError(
                f"{self.objects}: holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} and is not a "
                "seglab store; seglab creates a store only where nothing is"
            )
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {MARK: LAYOUT, **attrs}}
        if not self.objects.create(ROOT, json.dumps(meta).encode()):  # another run made it just now
            if store_layout(self.objects) != LAYOUT:
                raise ShardStoreError(f"{self.objects}: something else was created here meanwhile")

    # -- root attributes (driver) -----------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        meta = _root_meta(self.objects) or {}
        return dict(meta.get("attributes") or {})

    def set_attrs(self, **attrs: Any) -> None:
        meta = _root_meta(self.objects) or {}
        meta["attributes"] = {**(meta.get("attributes") or {}), **attrs, MARK: LAYOUT}
        self.objects.put(ROOT, json.dumps(meta).encode())

    # -- the unit index (driver) ------------------------------------------------------
    def index(self, shard_size: int) -> UnitIndex:
        """The stored index (the newest one), or an empty one of ``shard_size``. A stored index
        keeps the shard size it was made with."""
        parts = self._index_parts()
        if not parts:
            return UnitIndex.empty(shard_size)
        data = self.objects.get(parts[-1][1])
        if data is None:
            raise ShardStoreError(f"{self.objects}: {parts[-1][1]} vanished while it was read")
        table = parquet_table(data)
        stored = int((table.schema.metadata or {}).get(b"shard_size", b"0"))
        return UnitIndex(table.replace_schema_metadata(None), stored or shard_size)

    def save_index(self, index: UnitIndex) -> None:
        """Store ``index`` as the newest one, then remove the ones before it."""
        parts = self._index_parts()
        seq = parts[-1][0] + 1 if parts else 0
        table = index.table.replace_schema_metadata({b"shard_size": str(index.shard_size).encode()})
        if not self.objects.create(f"{INDEX}/i{seq:012d}.parquet", parquet_bytes(table)):
            raise ShardStoreError(f"{self.objects}: another writer saved a unit index meanwhile (is a second run on?)")
        self.objects.delete(key for _, key in parts)

    def _index_parts(self) -> list[tuple[int, str]]:
        return numbered_keys(self.objects, INDEX, INDEX_NAME)

    # -- batches (workers write, the driver folds) ------------------------------------
    def write_batch(
        self, stage: str, batch: str, outputs: Sequence[Mapping[str, np.ndarray]], columns: pa.Table
    ) -> pa.Table:
        """Write one batch's outputs (a mapping per unit, in ``columns`` row order), then its
        commit object; -> the commit object's table. ShardStoreError when the batch name was
        used before: committed, or holding arrays of a killed writer not yet collected."""
        if self.objects.exists(records_key(stage, batch)):
            raise ShardStoreError(f"{self.objects}: batch {stage}/{batch} was committed already")
        try:
            records = write_batch_arrays(self.objects, stage, batch, outputs)
        except ContainsArrayError:
            raise ShardStoreError(
                f"{self.objects}: batch {stage}/{batch} holds arrays of an earlier writer (collect garbage first)"
            ) from None
        table = records_table(records, columns)
        if not commit_batch(self.objects, stage, batch, table):
            raise ShardStoreError(f"{self.objects}: batch {stage}/{batch} was committed already")
        return table

    def discard_uncommitted(self, stage: str, batch: str, outputs: Sequence[str]) -> int:
        """Remove the arrays an earlier writer of ``batch`` left without committing it. Only
        for a retry of the same batch whose first writer is known dead (Ray retries an
        actor's task once the actor was restarted). -> objects removed (none when committed)."""
        if self.objects.exists(records_key(stage, batch)):
            return 0
        keys = list(batch_keys(self.objects, stage, outputs, batch))
        self.objects.delete(keys)
        return len(keys)

    def commit_failures(self, stage: str, batch: str, table: pa.Table) -> None:
        """Record a batch of failures (no arrays; ``stagerecords.failure_records``)."""
        if not commit_batch(self.objects, stage, batch, table):
            raise ShardStoreError(f"{self.objects}: batch {stage}/{batch} was committed already")

    def state(self, stage: str, inputs: Sequence[str], columns: Sequence[str] | None = None) -> StageState:
        return load_stage(self.objects, stage, inputs, columns)

    def fold(self, stage: str, inputs: Sequence[str]) -> StageState:
        return fold_stage(self.objects, stage, inputs)

    def collect_garbage(self, stage: str, outputs: Sequence[str], state: StageState) -> int:
        """Remove the stage's batches no unit's record refers to any more: folded commit
        objects every unit of which was redone since (with their arrays), and arrays of
        batches never committed (their writer was killed). Call it under the run lock with
        no batch in flight, before handing out batch names from ``state.next_batch``: a
        name an uncommitted batch held is free again once it is gone. -> batches removed."""
        referenced = set(np.unique(state.table.column("batch").to_numpy()).tolist())
        committed = {seq for seq, _ in numbered_keys(self.objects, f"{RECORDS}/{stage}", RECORD_NAME)}
        written: set[int] = set()
        for output in outputs:
            prefix = f"{stage}/{output}/"
            for key in self.objects.list(f"{stage}/{output}"):
                name = key[len(prefix) :].split("/", 1)[0]
                if BATCH_ID.fullmatch(name):
                    written.add(int(name[1:]))
        stale = {seq for seq in committed if seq <= state.folded and seq not in referenced}
        stale |= written - committed
        for seq in sorted(stale):
            self.objects.delete(batch_keys(self.objects, stage, outputs, batch_id(seq)))
        return len(stale)
