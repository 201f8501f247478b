"""The records that cross runner, pool and store about units.

The driver hands a worker one ``BatchTask`` per batch: the units of one shard still to do,
with what their outputs are to be recorded as made from and where their inputs are. The
worker answers per unit with a ``Receipt`` (done: its outputs are in the batch it
committed) or a ``Failure``. In the store, both are rows of the stage's tables
(pipeline/core/stagerecords.py); ``Store.ledger`` turns a stage's rows back into these
records for the features that read a store (exports, report, evaluate, status).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from seglab.stages.base import Unit


@dataclass(frozen=True)
class ArrayRecord:
    """What the writer of one unit's stored array recorded of it: the sha256 of its C-order
    bytes, its shape and its numpy dtype string (e.g. '|u1', '<f4'); where it is: the
    ``batch`` (sequence number) and the unit's ``row`` in that batch's array (-1: not
    stored in a batch)."""

    sha256: str
    shape: tuple[int, ...]
    dtype: str
    batch: int = -1
    row: int = -1

    def to_json(self) -> dict[str, Any]:
        """What identifies the content (not where it is stored)."""
        return {"sha256": self.sha256, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class UnitInputs:
    """Where one parent stage's outputs of a batch's units are: per unit (in the task's
    order) the parent's batch sequence number and row."""

    batches: tuple[int, ...]
    rows: tuple[int, ...]


@dataclass(frozen=True)
class BatchTask:
    """One worker call: ``units`` (and their index ``uids``) of one shard, to be written as
    batch ``batch`` of the stage. ``signature`` and ``fitted``: 32-byte digests of the stage
    settings and fit they run with; ``made_from``: per input name (a parent stage, or
    'source') each unit's 32-byte digest of that input, recorded with its outputs;
    ``reads``: per parent stage where each unit's outputs are."""

    batch: str
    units: tuple[Unit, ...]
    uids: tuple[int, ...]
    signature: bytes
    fitted: bytes
    made_from: Mapping[str, tuple[bytes, ...]]
    reads: Mapping[str, UnitInputs] = field(default_factory=dict)


@dataclass(frozen=True)
class Receipt:
    """A unit done: its outputs' records, small facts about it (``info``, JSON-able), the
    seconds its ``process`` took, and the hex digest of the stage signature it ran with."""

    status: ClassVar[str] = "done"
    unit: str
    outputs: Mapping[str, ArrayRecord]
    signature: str
    info: Mapping[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def source(self) -> str | None:
        """The image file the unit was made from, where the stage recorded it (ingest)."""
        source = self.info.get("source")
        return source if isinstance(source, str) else None


@dataclass(frozen=True)
class StorageProblem:
    """A full disk or an unwritable file met while writing: no unit's fault."""

    path: str
    problem: str


@dataclass(frozen=True)
class Failure:
    """A unit not done: the exception's type name and message (``detail``: the end of its
    traceback), whether it is worth retrying (``transient``), the 'stage/output' inputs
    found damaged (``corrupt``: their producer must redo the unit), a ``storage`` problem
    the driver stops on, and, read back from a store, the unit's image file."""

    status: ClassVar[str] = "failed"
    unit: str
    type: str
    message: str
    transient: bool = False
    detail: str = ""
    corrupt: tuple[str, ...] = ()
    storage: StorageProblem | None = None
    source: str | None = None


LedgerEntry = Receipt | Failure


def done_receipts(entries: Mapping[str, LedgerEntry], signature: str) -> dict[str, Receipt]:
    """Of loaded entries, the receipts of the units done with the stage ``signature`` digest."""
    return {u: e for u, e in entries.items() if isinstance(e, Receipt) and e.signature == signature}


def done_units(entries: Mapping[str, LedgerEntry], signature: str) -> set[str]:
    """Of loaded entries, the units done with the stage ``signature`` digest."""
    return set(done_receipts(entries, signature))
