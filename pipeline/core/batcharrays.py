"""A batch of units' outputs as one Zarr v3 array per output, and the commit object that
makes the batch visible.

Layout (keys under the store's location)::

    <stage>/<output>/<batch>/zarr.json     the array: (units in the batch, *max of each
    <stage>/<output>/<batch>/c/0/...        further dim over them), sharding codec: inner
                                            chunks of whole units, all in one object
    _records/<stage>/<batch>.parquet        the batch's commit object

An output whose array is at most INLINE_BYTES for every unit of the batch (prompt
coordinates, per-class scores, an image's frame) is no Zarr array: its units' raw bytes
are a column of the commit object, ``o.bytes`` (binary, C order, the recorded dtype and
shape), so small outputs cost no objects beyond the commit object.

A batch is written by one worker and never again: a unit redone goes into a new batch,
so there is one writer per object and nothing is overwritten in place. The commit object
is written last, create-only; a batch without one is invisible (a kill mid-write leaves
arrays nothing refers to). It holds a row per unit: its ``row`` in the arrays, ``outputs``
(the digest of all its outputs' hashes) and, per output ``o``, ``o.sha256``
(fixed_size_binary(32): ``array_sha256`` of the unit's unpadded array, dtype and shape
included: its identity, what its children record they were made from), ``o.crc32c``
(uint32: ``array_crc32c`` of the same bytes, what a read checks the unit by) and ``o.shape``
(list<int32>); further columns are the caller's. Inner chunks
hold as many units as fit in CHUNK_BYTES (one when a unit is larger). Units whose outputs
are smaller than the batch's largest are zero-padded: the recorded shape cuts them back out.
Each inner chunk carries a CRC32C checksum, so a torn or flipped chunk fails to decode;
each unit read is then cut to its recorded shape and checked against its own CRC32C, which
finds a chunk that decodes but holds other units or other bytes (a commit object written
before ``o.crc32c`` was recorded is read by re-hashing ``o.sha256`` instead). Re-hashing
with SHA-256 cost a reader about 0.62 ms per MiB, the CRC costs 0.044.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from seglab.pipeline.base.fingerprint import array_crc32c, array_sha256, digest
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.stagetable import parquet_bytes, parquet_table
from seglab.pipeline.core.unitindex import DIGEST, digests_to_numpy

RECORDS = "_records"
BATCH_ID = re.compile(r"b[0-9]{12}")
"""A batch's name: 'b' and a 12-digit sequence number the driver hands out per stage."""
ARRAY_KEY = re.compile(r"zarr\.json|c(/[0-9]+)+")
"""Keys zarr writes inside one array's folder."""
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5), Crc32cCodec())
"""Blosc LZ4 with byte shuffle (bit shuffle for 1-byte types), then a CRC32C per inner chunk.
On a batch of 128 weight-free embeddings (128 MiB raw) LZ4 encodes in about a quarter of
zstd level 3's time and decodes in half, for 1.3x the bytes (43 vs 33 MiB): the worker's
I/O, not the bytes stored, is what a stage's overhead is made of."""


def limit_codec_threads(threads: int) -> None:
    """Have zarr encode and decode chunks on at most ``threads`` threads in this process
    (its default, the CPU count + 4, oversubscribes a worker Ray gave one CPU). Takes effect
    for zarr's next read or write."""
    zarr.config.set({"threading.max_workers": max(1, threads)})


def batch_id(sequence: int) -> str:
    return f"b{sequence:012d}"


def records_key(stage: str, batch: str) -> str:
    return f"{RECORDS}/{stage}/{batch}.parquet"


def array_path(stage: str, output: str, batch: str) -> str:
    return f"{stage}/{output}/{batch}"


class BatchDamaged(Exception):
    """A batch's array (``path``) or one unit's row in it does not decode or differs from
    its record; ``rows``: the rows at fault."""

    def __init__(self, path: str, rows: Sequence[int], reason: str):
        self.path, self.rows, self.reason = path, list(rows), reason
        super().__init__(f"{path}: rows {self.rows}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.rows, self.reason))


@dataclass(frozen=True)
class OutputRows:
    """One output's records over a batch's units, in row order: sha256 uint8 [n, 32],
    shapes (one tuple per unit), dtype (numpy str, e.g. '<f4'); ``inline``: each unit's raw
    bytes when the output is kept in the commit object (None: in its Zarr array);
    ``crc32c``: uint32 [n], each unit's ``array_crc32c`` (None: a commit object that does
    not record it, whose units are checked by their sha256)."""

    sha256: np.ndarray
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    inline: tuple[bytes, ...] | None = None
    crc32c: np.ndarray | None = None


INLINE_BYTES = 1024
"""The most raw bytes a unit's array may have for its output to be kept in the commit
object (at most 128 KiB a shard of 128): a Zarr array costs two objects (zarr.json and
its shard) and zarr's per-array work, however small its content."""

CHUNK_BYTES = 4 << 20
"""Target size of an inner chunk before compression. zarr spends about 0.3 ms on each
chunk it encodes, so per-unit chunks of small outputs (a 96 x 128 label map) cost more
than their content; per-unit chunks of large ones (a SAM embedding, 4 MiB) cost nothing
extra, and a reader of one unit decodes at most this much more than it asked for."""


def units_per_chunk(stacked: np.ndarray) -> int:
    """How many units (rows of ``stacked``) go into one inner chunk: as many as fit in
    CHUNK_BYTES, at least one, at most all."""
    unit_bytes = max(1, stacked[0].nbytes if len(stacked) else 1)
    return max(1, min(len(stacked), CHUNK_BYTES // unit_bytes))


def _region(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of an array of ``shape`` at the origin of a larger (padded) one."""
    return tuple(slice(0, s) for s in shape)


def check_alike(values: Sequence[np.ndarray], output: str) -> None:
    """ValueError naming ``output`` when the units' arrays differ in ndim or dtype."""
    if any(v.ndim != values[0].ndim or v.dtype != values[0].dtype for v in values):
        kinds = sorted({f"{v.ndim}-d {v.dtype}" for v in values})
        raise ValueError(f"output '{output}' differs between units of one batch ({', '.join(kinds)})")


def stack_padded(values: Sequence[np.ndarray], output: str) -> np.ndarray:
    """Arrays of one ndim and dtype -> (len(values), *max dims) with zeros where a unit's
    array is smaller. ValueError naming ``output`` when ndims or dtypes differ."""
    check_alike(values, output)
    first = values[0]
    dims = tuple(max(v.shape[axis] for v in values) for axis in range(first.ndim))
    stacked = np.zeros((len(values), *dims), first.dtype)
    for row, value in enumerate(values):
        stacked[row][_region(value.shape)] = value
    return stacked


def write_batch_arrays(
    objects: Objects, stage: str, batch: str, outputs: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, OutputRows]:
    """Write the batch's outputs (one mapping name -> array per unit, rows in order); ->
    per output its records. Each array is one write of one object (plus its zarr.json);
    outputs of at most INLINE_BYTES in every unit are only returned (``OutputRows.inline``)
    for the commit object to hold."""
    if not BATCH_ID.fullmatch(batch):
        raise ValueError(f"'{batch}' is not a batch name")
    store = objects.zarr_store()
    names = list(outputs[0]) if outputs else []
    records: dict[str, OutputRows] = {}
    for name in names:
        values = [np.ascontiguousarray(unit[name]) for unit in outputs]
        sha = np.array([np.frombuffer(bytes.fromhex(array_sha256(v)), np.uint8) for v in values])
        crc = np.array([array_crc32c(v) for v in values], np.uint32)
        shapes = tuple(tuple(v.shape) for v in values)
        if max((v.nbytes for v in values), default=0) <= INLINE_BYTES:
            check_alike(values, name)
            records[name] = OutputRows(sha, shapes, values[0].dtype.str, tuple(v.tobytes() for v in values), crc)
            continue
        stacked = stack_padded(values, name)
        dims = tuple(max(1, d) for d in stacked.shape[1:])
        per_chunk = units_per_chunk(stacked)
        inner = (per_chunk, *dims)
        whole = -(-max(1, len(values)) // per_chunk) * per_chunk  # one shard covering every row
        array = zarr.create_array(
            store,
            name=array_path(stage, name, batch),
            shape=stacked.shape,
            dtype=stacked.dtype,
            chunks=inner,
            shards=(whole, *dims),
            compressors=COMPRESSORS,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if stacked.size:
            array[...] = stacked
        records[name] = OutputRows(sha, shapes, stacked.dtype.str, crc32c=crc)
    return records


def outputs_digest(hashes: Mapping[str, str]) -> bytes:
    """A unit's outputs as one 32-byte digest (what its children record they were made from):
    output name -> sha256 hex."""
    return bytes.fromhex(digest(dict(hashes)))


def records_table(outputs: Mapping[str, OutputRows], columns: pa.Table) -> pa.Table:
    """The commit object's table: the caller's ``columns`` (one row per unit, in row order)
    with ``outputs`` (each unit's ``outputs_digest``, from the hashes ``write_batch_arrays``
    took: the arrays are hashed once), ``row`` and each output's sha256, CRC32C and shape
    appended; output dtypes in its metadata."""
    if "outputs" in columns.column_names:
        raise ValueError("the commit object's 'outputs' column is made from its arrays' hashes, not given")
    n = columns.num_rows
    for name, rows in outputs.items():
        if len(rows.shapes) != n:
            raise ValueError(f"output '{name}' has {len(rows.shapes)} rows, the batch {n}")
    hexes = {name: [bytes(h).hex() for h in rows.sha256] for name, rows in outputs.items()}
    combined = [outputs_digest({name: hexes[name][at] for name in outputs}) for at in range(n)]
    table = columns.append_column("outputs", pa.array(combined, DIGEST))
    table = table.append_column("row", pa.array(np.arange(n, dtype=np.int32)))
    for name, rows in outputs.items():
        table = table.append_column(
            f"{name}.sha256",
            pa.FixedSizeBinaryArray.from_buffers(
                DIGEST, n, [None, pa.py_buffer(np.ascontiguousarray(rows.sha256, np.uint8))]
            ),
        )
        if rows.crc32c is not None:
            table = table.append_column(f"{name}.crc32c", pa.array(rows.crc32c, pa.uint32()))
        table = table.append_column(f"{name}.shape", pa.array([list(s) for s in rows.shapes], pa.list_(pa.int32())))
        if rows.inline is not None:
            table = table.append_column(f"{name}.bytes", pa.array(rows.inline, pa.binary()))
    dtypes = {f"dtype.{name}": rows.dtype for name, rows in outputs.items()}
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in dtypes.items()}}
    )


def commit_batch(objects: Objects, stage: str, batch: str, table: pa.Table) -> bool:
    """Make the batch visible: write its commit object, create-only (after every array of
    the batch is written). -> False when the batch already had one (nothing written)."""
    return objects.create(records_key(stage, batch), parquet_bytes(table))


def read_commit(objects: Objects, stage: str, batch: str) -> pa.Table | None:
    """The batch's commit object (None: the batch was never committed)."""
    data = objects.get(records_key(stage, batch))
    return None if data is None else parquet_table(data)


def output_rows(table: pa.Table, output: str) -> OutputRows:
    """One output's records from a commit object's table."""
    metadata = table.schema.metadata or {}
    dtype = metadata.get(f"dtype.{output}".encode())
    if dtype is None:
        raise KeyError(output)
    shapes = tuple(tuple(s) for s in table.column(f"{output}.shape").to_pylist())
    inline, crc = f"{output}.bytes", f"{output}.crc32c"
    data = tuple(table.column(inline).to_pylist()) if inline in table.column_names else None
    crc32c = table.column(crc).to_numpy() if crc in table.column_names else None
    return OutputRows(digests_to_numpy(table.column(f"{output}.sha256")), shapes, dtype.decode(), data, crc32c)


def read_rows(
    objects: Objects, stage: str, output: str, batch: str, rows: Sequence[int], records: OutputRows
) -> list[np.ndarray]:
    """The units at ``rows`` of a batch's output array, each cut back to its recorded shape
    and checked against its recorded CRC32C (or sha256, ``_checked``). One read covers rows
    min..max. BatchDamaged naming the rows when the array's metadata, a chunk or a checksum
    is not as recorded."""
    path = array_path(stage, output, batch)
    if records.inline is not None:
        return _checked(path, rows, [_from_bytes(records, row) for row in rows], records)
    try:
        array = zarr.open_array(objects.zarr_store(read_only=True), path=path, mode="r")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise BatchDamaged(path, rows, f"its metadata does not decode ({type(exc).__name__})") from None
    expected_dims = len(records.shapes[0]) + 1 if records.shapes else array.ndim
    if (
        np.dtype(array.dtype).str != records.dtype
        or array.ndim != expected_dims
        or array.shape[0] != len(records.shapes)
    ):
        raise BatchDamaged(path, rows, "its metadata differs from the batch's record")
    if not rows:
        return []
    low, high = min(rows), max(rows)
    region = tuple(slice(0, max(s[axis] for s in (records.shapes[r] for r in rows))) for axis in range(array.ndim - 1))
    try:
        block = np.asarray(array[(slice(low, high + 1), *region)])
    except Exception as exc:  # a torn or flipped chunk fails its checksum or decompression
        raise BatchDamaged(path, rows, f"a chunk does not decode ({type(exc).__name__})") from None
    return _checked(
        path, rows, [np.ascontiguousarray(block[row - low][_region(records.shapes[row])]) for row in rows], records
    )


def _from_bytes(records: OutputRows, row: int) -> np.ndarray | None:
    """A unit's array from the commit object's bytes (None: they do not fill its shape)."""
    assert records.inline is not None
    dtype, shape = np.dtype(records.dtype), records.shapes[row]
    data = records.inline[row]
    if data is None or len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        return None
    return np.frombuffer(data, dtype).reshape(shape).copy()


def _checked(
    path: str, rows: Sequence[int], values: Sequence[np.ndarray | None], records: OutputRows
) -> list[np.ndarray]:
    """``values`` (one per row) when each matches its recorded CRC32C (its sha256 when the
    commit object records no CRC32C); else BatchDamaged naming the rows."""
    crc32c, sha256 = records.crc32c, records.sha256

    def intact(row: int, value: np.ndarray) -> bool:
        if crc32c is not None:
            return array_crc32c(value) == crc32c[row]
        return array_sha256(value) == sha256[row].tobytes().hex()

    bad = [row for row, value in zip(rows, values) if value is None or not intact(row, value)]
    if bad:
        raise BatchDamaged(path, bad, "differs from the checksum recorded when it was written")
    return [value for value in values if value is not None]


def batch_keys(objects: Objects, stage: str, outputs: Sequence[str], batch: str) -> list[str]:
    """The keys one batch holds: its arrays' (only keys zarr writes) and its commit object."""
    keys = []
    for output in outputs:
        folder = array_path(stage, output, batch)
        keys += [k for k in objects.list(folder) if ARRAY_KEY.fullmatch(k[len(folder) + 1 :])]
    record = records_key(stage, batch)
    return keys + ([record] if objects.exists(record) else [])
