"""A stage's records as a columnar table: one row per unit the stage finished or failed.

Rows are appended in parts (one Parquet file each, written whole, never changed); a unit's
last row wins. Columns (``stage_schema``):

    uid        int64                  the unit (``UnitIndex`` row)
    state      int8                   DONE or FAILED
    signature  fixed_size_binary(32)  the stage signature digest it ran with
    fitted     fixed_size_binary(32)  digest of the fit it used (zeros: not a fitted stage)
    outputs    fixed_size_binary(32)  digest of its output arrays' hashes (zeros when failed)
    from_<p>   fixed_size_binary(32)  per input p: the digest it was made from (a parent
                                      stage's ``outputs``, or ``source`` of the unit index)
    seconds    float32                time in the stage's ``process``
    error      string                 the failure message (null when done)

Parts folded from batch commit objects (pipeline/core/stagerecords.py) also carry where a
unit's outputs are: ``batch`` int64 (the batch's sequence number) and ``row`` int32.

Planning never loads a row per unit into Python objects: ``DenseStage`` scatters the last
rows into numpy arrays over the whole index, compared column against column.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seglab.pipeline.core.unitindex import DIGEST, digests_to_numpy

DONE, FAILED = 1, 2
SOURCE = "source"
"""The input name of a stage without parents: the unit index's source digest."""


def stage_schema(inputs: Sequence[str]) -> pa.Schema:
    """The table of a stage whose inputs (parent stages, or ``SOURCE``) are ``inputs``."""
    return pa.schema(
        [
            ("uid", pa.int64()),
            ("state", pa.int8()),
            ("signature", DIGEST),
            ("fitted", DIGEST),
            ("outputs", DIGEST),
            *((f"from_{name}", DIGEST) for name in inputs),
            ("seconds", pa.float32()),
            ("error", pa.string()),
        ]
    )


PARENT_COLUMNS = ("uid", "state", "outputs")
"""What a stage's plan reads of a parent's records: which units it finished, what they hold."""


def own_columns(inputs: Sequence[str]) -> list[str]:
    """What a stage's plan reads of its own records: state, the digests it ran with and what
    each unit was made from (``inputs``: its parents, or ``SOURCE``)."""
    return ["uid", "state", "signature", "fitted", *(f"from_{name}" for name in inputs)]


@dataclass(frozen=True)
class DenseStage:
    """A stage's last row per unit, over the ``n`` units of the index (row = uid).

    state: int8 [n] (0: no row); signature, fitted, outputs: uint8 [n, 32], None when the
    rows were read without that column; inputs: input name -> uint8 [n, 32] (the inputs
    whose ``from_`` column was read). Rows of units without a row are zeros. batch: int64
    [n], row: int32 [n]: where the unit's outputs are (-1: nowhere; parts without those
    columns)."""

    state: np.ndarray
    signature: np.ndarray | None
    fitted: np.ndarray | None
    outputs: np.ndarray | None
    inputs: dict[str, np.ndarray]
    batch: np.ndarray
    row: np.ndarray

    @classmethod
    def from_parts(cls, parts: Sequence[pa.Table], n: int, inputs: Sequence[str]) -> DenseStage:
        """The parts in the order they were written, each holding the columns the first one
        holds (no parts: every column, all zeros); a uid outside 0..n-1 is an error."""
        held = set(parts[0].column_names) if parts else set(stage_schema(inputs).names)
        state = np.zeros(n, np.int8)
        columns = {name: np.zeros((n, 32), np.uint8) for name in ("signature", "fitted", "outputs") if name in held}
        from_columns = {name: np.zeros((n, 32), np.uint8) for name in inputs if f"from_{name}" in held}
        batch, row = np.full(n, -1, np.int64), np.full(n, -1, np.int32)
        for part in parts:  # later parts overwrite earlier ones: the last row wins
            uid = part.column("uid").to_numpy()
            if len(uid) and (uid.min() < 0 or uid.max() >= n):
                raise ValueError(f"a stage table row names uid {int(uid.max())}, beyond the {n} units of the index")
            order = None if strictly_ascending(uid) else last_occurrence(uid)  # None: already one row per uid
            rows = _taken(uid, order)
            state[rows] = _taken(part.column("state").to_numpy(), order)
            for name, dense in columns.items():
                dense[rows] = _taken(digests_to_numpy(part.column(name), copy=False), order)
            for name, dense in from_columns.items():
                dense[rows] = _taken(digests_to_numpy(part.column(f"from_{name}"), copy=False), order)
            located = "batch" in part.column_names and "row" in part.column_names
            batch[rows] = _taken(part.column("batch").to_numpy(), order) if located else -1
            row[rows] = _taken(part.column("row").to_numpy(), order) if located else -1
        return cls(
            state,
            columns.get("signature"),
            columns.get("fitted"),
            columns.get("outputs"),
            from_columns,
            batch,
            row,
        )

    def column(self, name: str) -> np.ndarray:
        """signature, fitted or outputs; ValueError when the rows were read without it."""
        values = getattr(self, name)
        if values is None:
            raise ValueError(f"the stage's rows were read without their '{name}' column")
        return values

    def made_from(self, name: str) -> np.ndarray:
        """uint8 [n, 32]: what each unit was made from of input ``name``; ValueError when
        the rows were read without it."""
        if name not in self.inputs:
            raise ValueError(f"the stage's rows were read without their 'from_{name}' column")
        return self.inputs[name]


def _taken(values: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``values`` at the positions ``order`` (None: all of them, as they are, uncopied)."""
    return values if order is None else values[order]


def strictly_ascending(uid: np.ndarray) -> bool:
    """Whether ``uid`` is strictly ascending (a folded part: one row per uid, in uid order)."""
    return bool(len(uid) < 2 or (uid[1:] > uid[:-1]).all())


def last_occurrence(uid: np.ndarray) -> np.ndarray:
    """Row positions of each uid's last row in ``uid`` (int64 [m]), in ascending uid order."""
    reversed_first = np.unique(uid[::-1], return_index=True)[1]
    return len(uid) - 1 - reversed_first


REPEATING = ("state", "signature", "fitted", "error", "shard")
"""Columns whose values repeat from row to row (a stage's settings digests, a shard number):
the ones worth dictionary-encoding. Digests of data and unit names are unique per row, and
trying a dictionary for them too made the driver's write of a 20,000-unit index take 18 to
20 MiB of resident memory instead of 10 to 14."""


def parquet_bytes(table: pa.Table) -> memoryview:
    """``table`` as one Parquet file's bytes (an object is written whole; a view of the
    buffer written into, not a copy of it), its ``REPEATING`` columns dictionary-encoded."""
    sink = io.BytesIO()
    pq.write_table(table, sink, use_dictionary=[name for name in table.column_names if name in REPEATING])
    return sink.getbuffer()


def parquet_table(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file's bytes -> its table (only ``columns``, when given). Read as one file:
    ``pq.read_table`` would import pyarrow.dataset (and pandas), 0.3 s a process."""
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=None if columns is None else list(columns))


def parquet_rows(data: bytes) -> int:
    """The number of rows of a Parquet file's bytes, from its footer."""
    return pq.read_metadata(pa.BufferReader(data)).num_rows
