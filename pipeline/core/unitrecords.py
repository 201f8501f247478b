"""Units' records as the features that read a store see them, and as workers write them:
the columns of a batch's commit object (pipeline/core/batcharrays.py) for its done units,
and the ``Receipt``/``Failure`` records (pipeline/core/ledger.py) read back from a stage's
rows and commit objects."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import pyarrow as pa

from seglab.pipeline.core.batcharrays import output_rows
from seglab.pipeline.core.ledger import ArrayRecord, BatchTask, Failure, LedgerEntry, Receipt
from seglab.pipeline.core.stagetable import DONE, FAILED
from seglab.pipeline.core.unitindex import DIGEST, UnitIndex, digests_to_numpy


class Where(NamedTuple):
    """Where one unit's array is: its ``batch`` sequence number and ``row`` (and the sha256
    a reader expects of it, when it knows one)."""

    unit: str
    batch: int
    row: int
    sha256: str | None = None


def done_columns(
    task: BatchTask,
    positions: Sequence[int],
    infos: Sequence[Mapping[str, Any]],
    seconds: float,
) -> pa.Table:
    """The caller's columns of a batch's commit object (``records_table`` adds rows, hashes,
    shapes and the digest of a unit's outputs): a DONE row per unit at ``positions`` of
    ``task`` with its ``infos``."""
    m = len(positions)

    def digests(values: Sequence[bytes]) -> pa.Array:
        return pa.array(list(values), DIGEST)

    return pa.table(
        {
            "uid": pa.array([task.uids[at] for at in positions], pa.int64()),
            "state": pa.array([DONE] * m, pa.int8()),
            "signature": digests([task.signature] * m),
            "fitted": digests([task.fitted] * m),
            **{f"from_{name}": digests([made[at] for at in positions]) for name, made in task.made_from.items()},
            "seconds": pa.array([seconds] * m, pa.float32()),
            "error": pa.array([None] * m, pa.string()),
            "info": pa.array([json.dumps(dict(info)) for info in infos], pa.string()),
        }
    )


def commit_receipts(table: pa.Table, seq: int, units: Sequence[str]) -> list[Receipt]:
    """The receipts of a batch's commit object ``table`` (batch ``seq``), whose rows are the
    ``units`` in order."""
    rows = CommitRows(table, seq)
    signatures = digests_to_numpy(table.column("signature"))
    seconds = table.column("seconds").to_numpy()
    out = []
    for at, unit in enumerate(units):
        receipt = rows.receipt(unit, at, signatures[at].tobytes().hex(), float(seconds[at]))
        if receipt is not None:
            out.append(receipt)
    return out


def unit_entries(table: pa.Table, index: UnitIndex, commit: Callable[[int], pa.Table | None]) -> dict[str, LedgerEntry]:
    """A stage's last rows (``StageState.table``) as one entry per unit id: a ``Receipt``
    locating its outputs in the commit object ``commit(batch)`` gives, or a ``Failure``
    with its message and image. Units whose commit object is gone are left out."""
    names = index.table.column("unit").to_pylist()
    images = index.table.column("image").to_pylist()
    uid = table.column("uid").to_numpy()
    state = table.column("state").to_numpy()
    batch = table.column("batch").to_numpy()
    row = table.column("row").to_numpy()
    signature = digests_to_numpy(table.column("signature"))
    seconds = table.column("seconds").to_numpy(zero_copy_only=False)
    errors = table.column("error").to_pylist()
    entries: dict[str, LedgerEntry] = {}
    located: dict[int, CommitRows] = {}
    for at in range(len(uid)):
        unit = names[uid[at]]
        if state[at] == FAILED:
            entries[unit] = Failure(unit, type="", message=errors[at] or "", source=images[uid[at]])
            continue
        if state[at] != DONE:
            continue
        seq = int(batch[at])
        if seq not in located:
            found = commit(seq)
            if found is None:
                continue
            located[seq] = CommitRows(found, seq)
        receipt = located[seq].receipt(unit, int(row[at]), signature[at].tobytes().hex(), float(seconds[at]))
        if receipt is not None:
            entries[unit] = receipt
    return entries


class CommitRows:
    """One commit object's rows, by row, turned into receipts."""

    def __init__(self, table: pa.Table, seq: int):
        self.seq = seq
        metadata = table.schema.metadata or {}
        self.outputs = sorted(k.decode()[len("dtype.") :] for k in metadata if k.startswith(b"dtype."))
        self.records = {name: output_rows(table, name) for name in self.outputs}
        rows = table.column("row").to_numpy()
        self.position = {int(r): at for at, r in enumerate(rows)}
        self.info = table.column("info").to_pylist() if "info" in table.column_names else [None] * len(rows)

    def receipt(self, unit: str, row: int, signature: str, seconds: float) -> Receipt | None:
        at = self.position.get(row)
        if at is None:
            return None
        outputs = {
            name: ArrayRecord(
                records.sha256[at].tobytes().hex(), tuple(records.shapes[at]), records.dtype, self.seq, row
            )
            for name, records in self.records.items()
        }
        text = self.info[at]
        info = json.loads(text) if isinstance(text, str) and text else {}
        return Receipt(unit, outputs, signature, info=info, seconds=round(seconds, 4))
