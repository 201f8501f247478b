"""The records that cross runner, pool and store, and the ledger that keeps them.

A worker is handed a ``Task`` per unit (what to check its inputs against and what to
record beside its outputs) and answers with a ``Receipt`` (done) or a ``Failure``. The
driver appends each final one to the stage's ``Ledger``; a worker's commit record is a
``Receipt`` too. Frozen dataclasses in memory; JSON in the store, in the form every
seglab store has used, so stores written before these records existed read unchanged:

- done: ``{"unit", "status": "done", "outputs": {name: {"sha256", "shape", "dtype"}},
  "info", "seconds", "inputs", "signature", "time"[, "adopted"]}``
- failed: ``{"unit", "status": "failed", "error": {"type", "message", "transient",
  "detail"[, "corrupt"][, "storage"]}[, "inputs", "signature", "info": {"source"}], "time"}``
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class ArrayRecord:
    """What the writer of one stored array recorded of it: the sha256 of its C-order
    bytes, its shape and its numpy dtype string (e.g. '|u1', '<f4')."""

    sha256: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ArrayRecord:
        return cls(str(record["sha256"]), tuple(int(n) for n in record["shape"]), str(record["dtype"]))


@dataclass(frozen=True)
class Task:
    """What a worker needs besides the unit: the digest of the unit's inputs and of the
    stage's signature (recorded with its outputs), and ``expected``: 'stage/output' ->
    the sha256 its producer recorded, checked when the worker reads it."""

    inputs: str
    signature: str
    expected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Receipt:
    """A unit done: its outputs' records, small facts about it (``info``, JSON-able), the
    seconds its ``process`` took, and the task digests it was made from. ``adopted``: a
    killed driver's unit taken from its commit record; ``time``: when it was ledgered
    (Unix seconds; None until then)."""

    status: ClassVar[str] = "done"
    unit: str
    outputs: Mapping[str, ArrayRecord]
    inputs: str
    signature: str
    info: Mapping[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    adopted: bool = False
    time: float | None = None

    @property
    def source(self) -> str | None:
        """The image file the unit was made from, where the stage recorded it (ingest)."""
        source = self.info.get("source")
        return source if isinstance(source, str) else None

    def made_as(self, task: Task) -> bool:
        """Whether the unit was made from the task's inputs with its stage signature."""
        return self.inputs == task.inputs and self.signature == task.signature

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "unit": self.unit,
            "status": self.status,
            "outputs": {name: record.to_json() for name, record in self.outputs.items()},
            "info": dict(self.info),
            "seconds": self.seconds,
            "inputs": self.inputs,
            "signature": self.signature,
        }
        if self.adopted:
            entry["adopted"] = True
        if self.time is not None:
            entry["time"] = self.time
        return entry


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
    the driver stops on, and once ledgered the task digests and the unit's image file."""

    status: ClassVar[str] = "failed"
    unit: str
    type: str
    message: str
    transient: bool = False
    detail: str = ""
    corrupt: tuple[str, ...] = ()
    storage: StorageProblem | None = None
    inputs: str | None = None
    signature: str | None = None
    source: str | None = None
    time: float | None = None

    def for_task(self, task: Task, source: str) -> Failure:
        """This failure as the ledger keeps it: with the task it failed on and its image."""
        return replace(self, inputs=task.inputs, signature=task.signature, source=source)

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message, "transient": self.transient}
        if self.detail:
            error["detail"] = self.detail
        if self.corrupt:
            error["corrupt"] = list(self.corrupt)
        if self.storage is not None:
            error["storage"] = {"path": self.storage.path, "problem": self.storage.problem}
        entry: dict[str, Any] = {"unit": self.unit, "status": self.status, "error": error}
        if self.inputs is not None:
            entry["inputs"] = self.inputs
        if self.signature is not None:
            entry["signature"] = self.signature
        if self.source is not None:
            entry["info"] = {"source": self.source}
        if self.time is not None:
            entry["time"] = self.time
        return entry


LedgerEntry = Receipt | Failure


def entry_problem(entry: Any) -> str | None:
    """Why a parsed ledger line (or commit record) is not a valid entry, or None when it
    is one: a mapping with a non-empty string ``unit`` and ``status`` 'done' (``outputs``:
    name -> {sha256, shape, dtype}; ``inputs`` and ``signature`` strings) or 'failed'
    (``error`` with a string ``message``)."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("unit"), str) or not entry["unit"]:
        return "'unit' is not a non-empty string"
    if entry.get("status") == "failed":
        error = entry.get("error")
        return (
            None
            if isinstance(error, dict) and isinstance(error.get("message"), str)
            else "a failed line without an 'error' message"
        )
    if entry.get("status") != "done":
        return f"'status' is {entry.get('status')!r}, not 'done' or 'failed'"
    for key in ("inputs", "signature"):
        if not isinstance(entry.get(key), str):
            return f"'{key}' is not a string"
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict) or not all(
        isinstance(name, str)
        and isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("shape"), list)
        and all(isinstance(n, int) and n >= 0 for n in record["shape"])
        and isinstance(record.get("dtype"), str)
        for name, record in outputs.items()
    ):
        return "'outputs' is not a mapping of output name -> {sha256, shape, dtype}"
    if not isinstance(entry.get("info") or {}, dict):
        return "'info' is not a JSON object"
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def entry_from_json(entry: Mapping[str, Any]) -> LedgerEntry:
    """The record a valid line holds (``entry_problem`` None); keys it does not know are dropped."""
    if entry["status"] == "done":
        return Receipt(
            unit=entry["unit"],
            outputs={name: ArrayRecord.from_json(record) for name, record in entry["outputs"].items()},
            inputs=entry["inputs"],
            signature=entry["signature"],
            info=dict(entry.get("info") or {}),
            seconds=_number(entry.get("seconds")),
            adopted=entry.get("adopted") is True,
            time=_number(entry.get("time")),
        )
    error = entry["error"]
    storage = error.get("storage")
    info = entry.get("info")
    source = info.get("source") if isinstance(info, dict) else None
    return Failure(
        unit=entry["unit"],
        type=str(error.get("type", "")),
        message=error["message"],
        transient=error.get("transient") is True,
        detail=str(error.get("detail", "")),
        corrupt=tuple(str(p) for p in error.get("corrupt") or ()),
        storage=StorageProblem(str(storage.get("path")), str(storage.get("problem")))
        if isinstance(storage, dict)
        else None,
        inputs=entry.get("inputs") if isinstance(entry.get("inputs"), str) else None,
        signature=entry.get("signature") if isinstance(entry.get("signature"), str) else None,
        source=source if isinstance(source, str) else None,
        time=_number(entry.get("time")),
    )


def parse_entry(text: str | bytes) -> LedgerEntry | None:
    """A commit record's or ledger line's text -> its record; None when it is not valid."""
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return None if entry_problem(entry) else entry_from_json(entry)


def done_receipts(entries: Mapping[str, LedgerEntry], signature: str) -> dict[str, Receipt]:
    """Of loaded ledger entries, the receipts of the units done with the stage ``signature`` digest."""
    return {u: e for u, e in entries.items() if isinstance(e, Receipt) and e.signature == signature}


def done_units(entries: Mapping[str, LedgerEntry], signature: str) -> set[str]:
    """Of loaded ledger entries, the units done with the stage ``signature`` digest."""
    return set(done_receipts(entries, signature))


class Ledger:
    """Append-only JSON lines, one ``Receipt`` or ``Failure`` each (the module docstring
    gives their form); the last line for a unit wins. A line that is not a valid entry (a
    torn last line of a killed driver, a damaged byte, a hand edit) counts as absent, so
    its unit is redone; each is reported once in ``problems`` (file and line number), but
    for a line that is only cut short, which a driver killed mid-append leaves."""

    def __init__(self, path: Path, problems: dict[str, str] | None = None):
        self.path = path
        self.problems = problems if problems is not None else {}
        """Where problems go: message -> the ledger's stage."""

    def load(self) -> dict[str, LedgerEntry]:
        """unit id -> its last valid line's record."""
        entries: dict[str, LedgerEntry] = {}
        if not self.path.exists():
            return entries
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            torn = False
            text = ""
            try:
                text = raw.decode("utf-8")
                entry = json.loads(text)
                problem = entry_problem(entry)
            except UnicodeDecodeError:
                problem = "not UTF-8"
            except ValueError as exc:  # a line cut short where it ends is a killed driver's append, not damage
                torn = isinstance(exc, json.JSONDecodeError) and (
                    exc.pos >= len(text.rstrip()) or exc.msg == "Unterminated string starting at"
                )
                problem = "not valid JSON"
            except RecursionError:
                problem = "nested too deeply"
            if problem is None:
                entries[entry["unit"]] = entry_from_json(entry)
            elif not torn:
                self.problems[f"{self.path}: line {number}: {problem}; the line is ignored"] = self.path.stem
        return entries

    def done(self, signature: str) -> set[str]:
        """Units whose last line says done with the stage ``signature`` digest."""
        return done_units(self.load(), signature)

    def append(self, entries: Sequence[LedgerEntry]) -> None:
        """Append the entries, each stamped with the time now unless it has one, and fsync."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        text = "".join(
            json.dumps({**e.to_json(), "time": e.time if e.time is not None else now}, separators=(",", ":")) + "\n"
            for e in entries
        )
        with open(self.path, "a+b") as f:
            if f.tell() and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n":
                text = "\n" + text  # close a torn line left by a killed driver
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
