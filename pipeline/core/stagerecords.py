"""A stage's records in a store: batch commit objects, folded by the driver into table parts.

Keys (under the store's location)::

    _records/<stage>/b<seq>.parquet   a batch's commit object (pipeline/core/batcharrays.py):
                                      rows of ``stage_schema`` plus ``row`` and per-output
                                      hashes and shapes; a batch of failures has no arrays
    _tables/<stage>/t<seq>.parquet    the stage's last row per unit over every record up to
                                      batch <seq>, with ``batch`` and ``row`` columns

A stage's state is its newest table part plus the commit objects after it, in sequence
order, the last row of a unit winning (``DenseStage.from_parts``). Folding writes a new
part, then removes the older parts (create-only writes and deletes, no appends, no
renames: a kill at any point leaves a readable state). Commit objects stay: they hold the
hashes and shapes readers check arrays against.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from seglab.pipeline.core.batcharrays import RECORDS
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.stagetable import (
    FAILED,
    DenseStage,
    last_occurrence,
    parquet_bytes,
    parquet_table,
    stage_schema,
    strictly_ascending,
)

TABLES = "_tables"
RECORD_NAME = re.compile(r"b([0-9]{12})\.parquet")
PART_NAME = re.compile(r"t([0-9]{12})\.parquet")


def numbered_keys(objects: Objects, folder: str, pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    """(sequence number, key) of the objects in ``folder`` named by ``pattern``, ascending."""
    found = []
    for key in objects.list(folder):
        match = pattern.fullmatch(key[len(folder) + 1 :])
        if match:
            found.append((int(match.group(1)), key))
    return sorted(found)


def _read(objects: Objects, key: str, columns: Sequence[str], damaged: list[str]) -> pa.Table | None:
    """The object's table (only ``columns``); None when it is gone, or does not decode as
    such a table (its key is added to ``damaged``)."""
    data = objects.get(key)
    if data is None:
        return None
    try:
        return parquet_table(data, columns)
    except (pa.ArrowException, ValueError):
        damaged.append(key)
        return None


@dataclass(frozen=True)
class StageState:
    """A stage's records: ``table``: the last row per unit that has one, in uid order (the
    columns read of ``stage_schema(inputs)``, plus batch and row); ``folded``: sequence
    number of the newest table part (-1: none), ``unfolded``: commit objects after it;
    ``next_batch``: the first sequence number not yet used; ``damaged``: keys of records
    that do not decode (ignored: their units count as not done)."""

    table: pa.Table
    inputs: tuple[str, ...]
    folded: int
    unfolded: int
    next_batch: int
    damaged: tuple[str, ...] = ()

    def dense(self, n: int) -> DenseStage:
        """The rows scattered over the index's ``n`` units (row = uid), the columns read only."""
        return DenseStage.from_parts([self.table], n, self.inputs)


def load_stage(objects: Objects, stage: str, inputs: Sequence[str], columns: Sequence[str] | None = None) -> StageState:
    """The stage's records, whose inputs (parents, or ``SOURCE``) are ``inputs``: the
    columns ``columns`` of its ``stage_schema`` (default: all; uid always) with batch and
    row. Reads one table part and the commit objects after it."""
    schema = stage_schema(inputs)
    wanted = set(schema.names if columns is None else ["uid", *columns])
    unknown = wanted - set(schema.names)
    if unknown:
        raise ValueError(f"{stage} records have no column(s) {', '.join(sorted(unknown))}")
    schema = pa.schema([field for field in schema if field.name in wanted])
    parts = numbered_keys(objects, f"{TABLES}/{stage}", PART_NAME)
    records = numbered_keys(objects, f"{RECORDS}/{stage}", RECORD_NAME)
    folded = parts[-1][0] if parts else -1
    tables: list[pa.Table] = []
    damaged: list[str] = []
    if parts and (table := _read(objects, parts[-1][1], [*schema.names, "batch", "row"], damaged)) is not None:
        tables.append(table)
    elif parts:  # a damaged part: rebuild from every commit object
        folded = -1
    for seq, key in records:
        if seq > folded and (table := _read(objects, key, [*schema.names, "row"], damaged)) is not None:
            tables.append(table.append_column("batch", pa.array(np.full(table.num_rows, seq, np.int64))))
    unfolded = sum(seq > folded for seq, _ in records)
    used = max([parts[-1][0] if parts else -1, *(seq for seq, _ in records)])
    return StageState(last_rows(tables, schema), tuple(inputs), folded, unfolded, used + 1, tuple(damaged))


def last_rows(tables: Sequence[pa.Table], schema: pa.Schema) -> pa.Table:
    """The tables in order, concatenated, keeping each uid's last row (rows by uid). Tables
    whose uids are strictly ascending end to end (a folded part; the batches of a first run,
    numbered as they were handed out) come back concatenated as they are, with no copy."""
    full = pa.schema([*schema, pa.field("batch", pa.int64()), pa.field("row", pa.int32())])
    if not tables:
        return full.empty_table()
    table = pa.concat_tables([t.select(full.names).cast(full) for t in tables])
    uid = table.column("uid").to_numpy()
    if strictly_ascending(uid):
        return table
    return table.take(pa.array(last_occurrence(uid)))  # one copy, in uid order


def fold_stage(objects: Objects, stage: str, inputs: Sequence[str]) -> StageState:
    """Fold the stage's commit objects into a new table part (when any are unfolded) and
    remove the parts it supersedes; -> the state, as ``load_stage`` gives it."""
    state = load_stage(objects, stage, inputs)
    if not state.unfolded:
        return state
    through = state.next_batch - 1
    objects.put(f"{TABLES}/{stage}/t{through:012d}.parquet", parquet_bytes(state.table))
    older = [key for seq, key in numbered_keys(objects, f"{TABLES}/{stage}", PART_NAME) if seq < through]
    objects.delete(older)
    return StageState(state.table, state.inputs, through, 0, state.next_batch, state.damaged)


def failure_records(
    uids: Sequence[int],
    errors: Sequence[str],
    signature: bytes,
    fitted: bytes,
    inputs: Sequence[str] | Mapping[str, Sequence[bytes]],
) -> pa.Table:
    """A batch of failures (no arrays): FAILED rows of ``stage_schema`` plus ``row`` -1.
    inputs: the stage's input names (made-from digests recorded as zeros), or per input
    name each unit's made-from digest."""
    m = len(uids)
    zeros = [bytes(32)] * m
    made = dict(inputs) if isinstance(inputs, Mapping) else {name: zeros for name in inputs}
    return pa.table(
        {
            "uid": pa.array(uids, pa.int64()),
            "state": pa.array([FAILED] * m, pa.int8()),
            "signature": pa.array([signature] * m, pa.binary(32)),
            "fitted": pa.array([fitted] * m, pa.binary(32)),
            "outputs": pa.array(zeros, pa.binary(32)),
            **{f"from_{name}": pa.array(list(digests), pa.binary(32)) for name, digests in made.items()},
            "seconds": pa.array([0.0] * m, pa.float32()),
            "error": pa.array(list(errors), pa.string()),
            "row": pa.array([-1] * m, pa.int32()),
        }
    )
