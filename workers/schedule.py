"""The scheduling state of one map stage over a pool of workers, kept apart from Ray so it
can be tested without it: batches queued, batches in flight per worker, attempts per unit.

``run_batches`` (workers/pool.py) is the Ray loop around it: it asks ``dispatch`` where the
next batch goes, reports each batch back with ``settle`` (its receipts and failures) or, when the worker
died, ``lose_worker`` and ``resubmit_or_fail``. The retry rule lives here once: a unit is
retried while it has had at most ``max_retries`` failed attempts, then its failure is final.
"""

from __future__ import annotations

import traceback
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from seglab.pipeline.base.errors import InputError, SeglabError, StorageError, TransientError, os_error_cause
from seglab.pipeline.core.ledger import Failure, LedgerEntry, StorageProblem
from seglab.pipeline.core.store import CorruptOutput
from seglab.stages.base import Unit

TRANSIENT = (TransientError, TimeoutError, ConnectionError, MemoryError)
"""Exceptions worth retrying (an InputError never is: the same input fails the same way)."""

Batch = list[Unit]


def failure_of(unit: Unit, exc: BaseException) -> Failure:
    """A unit's failure from the exception it raised: ``transient`` when worth retrying,
    ``corrupt`` the damaged input arrays ('stage/output') whose producing stage must redo
    the unit, ``storage`` the path and problem of a full disk or an unwritable file, which
    the driver stops on without recording anything against the unit."""
    cause = os_error_cause(exc)
    storage = StorageError.from_os_error(cause, "the store") if cause is not None else None
    return Failure(
        unit=unit.id,
        type=type(exc).__name__,
        message=str(exc) if isinstance(exc, SeglabError) else f"{type(exc).__name__}: {exc}",
        transient=isinstance(exc, TRANSIENT) and not isinstance(exc, InputError),
        detail="".join(traceback.format_exception(exc))[-2000:],
        corrupt=tuple(exc.paths) if isinstance(exc, CorruptOutput) else (),
        storage=StorageProblem(storage.path, storage.problem) if storage is not None else None,
    )


@dataclass
class BatchStats:
    """What ``run_batches`` had to redo: units resubmitted after their worker was lost,
    units recovered from commit records instead, workers replaced and slots retired."""

    resubmitted: int = 0
    recovered: int = 0
    replaced: int = 0
    retired: int = 0


class BatchSchedule:
    """``batches`` of units, in order; at most ``in_flight`` batches per worker (workers are
    slots 0..workers-1); transiently failed units are queued again, together, until each
    has failed ``max_retries`` + 1 times."""

    def __init__(self, batches: Sequence[Sequence[Unit]], *, workers: int, in_flight: int, max_retries: int):
        self.queue: deque[Batch] = deque(list(batch) for batch in batches if batch)
        self.pending: dict[Hashable, tuple[int, Batch]] = {}
        """In flight: a token the caller chose (a Ray object ref) -> (worker, batch)."""
        self.load = [0] * workers
        self.attempts = {u.id: 0 for batch in self.queue for u in batch}
        self.in_flight, self.max_retries = in_flight, max_retries
        self.stats = BatchStats()

    @property
    def active(self) -> bool:
        """Whether any batch is still queued or in flight."""
        return bool(self.queue or self.pending)

    def dispatch(self, live: Sequence[int]) -> tuple[int, Batch] | None:
        """Take the next queued batch for the least loaded of the ``live`` workers; None when
        nothing is queued, no worker is live, or the least loaded one is full."""
        if not self.queue or not live:
            return None
        worker = min(live, key=self.load.__getitem__)
        if self.load[worker] >= self.in_flight:
            return None
        return worker, self.queue.popleft()

    def sent(self, token: Hashable, worker: int, batch: Batch) -> None:
        """``batch`` (from ``dispatch``) is now running on ``worker`` under ``token``."""
        self.pending[token] = (worker, batch)
        self.load[worker] += 1

    def returned(self, token: Hashable) -> tuple[int, Batch]:
        """The batch of ``token`` came back (with receipts or with its worker's death)."""
        worker, batch = self.pending.pop(token)
        self.load[worker] -= 1
        return worker, batch

    def lose_worker(self, worker: int) -> list[tuple[Hashable, Batch]]:
        """The other batches in flight on a worker that died, with their tokens: taken out of flight."""
        lost = [token for token, (owner, _) in self.pending.items() if owner == worker]
        return [(token, self.returned(token)[1]) for token in lost]

    def _retry(self, unit_id: str) -> bool:
        """Count a failed attempt of the unit; True when it may run again."""
        self.attempts[unit_id] += 1
        return self.attempts[unit_id] <= self.max_retries

    def settle(self, batch: Batch, outcomes: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        """A batch's receipts and failures -> the final ones; a transient failure with
        attempts left is queued again instead."""
        final: list[LedgerEntry] = []
        again: set[str] = set()
        for outcome in outcomes:
            if isinstance(outcome, Failure) and outcome.transient and self._retry(outcome.unit):
                again.add(outcome.unit)
                continue
            final.append(outcome)
        if again:
            self.queue.append([u for u in batch if u.id in again])
        return final

    def resubmit_or_fail(self, units: Sequence[Unit], error: BaseException) -> list[LedgerEntry]:
        """Units whose worker died before they were committed: each is queued again while it
        has attempts left (counted as resubmitted), else gets a final transient failure."""
        final: list[LedgerEntry] = []
        again: Batch = []
        for unit in units:
            if self._retry(unit.id):
                again.append(unit)
                self.stats.resubmitted += 1
            else:
                final.append(failure_of(unit, TransientError(f"{error} (after {self.attempts[unit.id]} attempts)")))
        if again:
            self.queue.append(again)
        return final

    def waiting(self) -> list[str]:
        """Ids of the units in flight, or else of those queued (for a stall message)."""
        in_flight = [u.id for _, batch in self.pending.values() for u in batch]
        return in_flight or [u.id for batch in self.queue for u in batch]
