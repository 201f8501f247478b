"""The persistent unit index: every image a store has seen, its stable number and its shard.

A columnar table (Arrow in memory, Parquet in the store), one row per unit:

    uid     int64                dense, 0..n-1 in order of first sight; never reused
    unit    string               the unit id (image path under the data root, '/' -> '__')
    image   string               where the image was read from
    shard   int32                the shard the unit belongs to, for good
    slot    int32                its position in the shard, 0..shard_size-1
    source  fixed_size_binary(32) sha256 digest of what the unit was made from (its files)

Shards hold ``shard_size`` consecutive uids. Images first seen in a later run go to new
shards (a partly filled last shard is never topped up), so a shard's membership never
changes once written; an image whose source changed keeps its uid, shard and slot (its
shard redoes that unit); an image no longer enumerated keeps its row (its outputs stay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST = pa.binary(32)
SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("unit", pa.string()),
        ("image", pa.string()),
        ("shard", pa.int32()),
        ("slot", pa.int32()),
        ("source", DIGEST),
    ]
)


@dataclass(frozen=True)
class IndexUpdate:
    """What enumerating today's units changed: ``added`` and ``changed`` uids (int64 arrays),
    ``current``: bool per index row, True for the units enumerated today."""

    added: np.ndarray
    changed: np.ndarray
    current: np.ndarray


@dataclass(frozen=True)
class UnitIndex:
    """The index table (``SCHEMA``) and the shard size it was built with."""

    table: pa.Table
    shard_size: int

    @classmethod
    def empty(cls, shard_size: int) -> UnitIndex:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, not {shard_size}")
        return cls(SCHEMA.empty_table(), shard_size)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def shards(self) -> np.ndarray:
        """int32 [n]: each uid's shard (uids are row numbers)."""
        return self.table.column("shard").to_numpy()

    @property
    def shard_count(self) -> int:
        return int(self.shards.max()) + 1 if len(self) else 0

    def update(self, units: pa.Array, images: pa.Array, sources: np.ndarray) -> tuple[UnitIndex, IndexUpdate]:
        """Today's enumeration -> (the index with the new units appended in new shards and
        changed sources recorded, what changed). units, images: string arrays [m], ids unique;
        sources: uint8 [m, 32], each unit's source digest."""
        if not (len(units) == len(images) == len(sources)):
            raise ValueError("units, images and sources must have one entry per unit")
        found = pc.index_in(units, value_set=self.table.column("unit"))
        is_new = pc.is_null(found).to_numpy(zero_copy_only=False)
        old_rows = pc.drop_null(found).to_numpy().astype(np.int64)
        known_sources = digests_to_numpy(self.table.column("source"))
        today_old = sources[~is_new]
        differs = (known_sources[old_rows] != today_old).any(axis=1)
        changed = old_rows[differs]
        table = self.table
        if len(changed):
            known_sources[changed] = today_old[differs]
            table = table.set_column(5, "source", numpy_to_digests(known_sources))

        first, new_count = len(self), int(is_new.sum())
        offsets = np.arange(new_count, dtype=np.int64)
        keep_new = pa.array(is_new)
        appended = pa.table(
            {
                "uid": pa.array(first + offsets),
                "unit": units.filter(keep_new),
                "image": images.filter(keep_new),
                "shard": pa.array((self.shard_count + offsets // self.shard_size).astype(np.int32)),
                "slot": pa.array((offsets % self.shard_size).astype(np.int32)),
                "source": numpy_to_digests(sources[is_new]),
            },
            schema=SCHEMA,
        )
        table = pa.concat_tables([table, appended]).combine_chunks()
        current = np.zeros(table.num_rows, bool)
        current[old_rows] = True
        current[first:] = True
        added = np.arange(first, first + new_count, dtype=np.int64)
        return UnitIndex(table, self.shard_size), IndexUpdate(added, np.sort(changed), current)


def digests_to_numpy(column: pa.Array | pa.ChunkedArray, *, copy: bool = True) -> np.ndarray:
    """A fixed_size_binary(32) column -> uint8 [n, 32] (no nulls allowed): a copy, or with
    ``copy`` False a read-only view of the column's buffer when it is one chunk."""
    array = column
    if isinstance(column, pa.ChunkedArray):
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if array.null_count:
        raise ValueError("a digest column holds nulls")
    data = np.frombuffer(array.buffers()[1], np.uint8)
    start = array.offset * 32
    view = data[start : start + 32 * len(array)].reshape(len(array), 32)
    return view.copy() if copy else view


def numpy_to_digests(digests: np.ndarray) -> pa.Array:
    """uint8 [n, 32] -> a fixed_size_binary(32) array (no copy beyond making it contiguous)."""
    data = np.ascontiguousarray(digests, np.uint8)
    if data.ndim != 2 or data.shape[1] != 32:
        raise ValueError(f"digests must be uint8 [n, 32], not {data.shape}")
    return pa.FixedSizeBinaryArray.from_buffers(DIGEST, len(data), [None, pa.py_buffer(data)])
