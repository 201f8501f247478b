"""What a run is asked and what it reports: the run's options, the per-stage and whole-run
reports, and the progress callbacks a front end implements. Plain records with no Ray in
reach, so the command line can show them without loading the engine's workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    def start(self, stage: str, total: int, done: int) -> None: ...
    def advance(self, stage: str, count: int) -> None: ...
    def finish(self, stage: str, report: StageReport) -> None: ...
    def note(self, stage: str, text: str) -> None: ...


class NoProgress:
    def start(self, stage: str, total: int, done: int) -> None: ...
    def advance(self, stage: str, count: int) -> None: ...
    def finish(self, stage: str, report: StageReport) -> None: ...
    def note(self, stage: str, text: str) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    start: str | None = None
    only: str | None = None
    force: tuple[str, ...] = ()
    dry_run: bool = False
    address: str | None = None


@dataclass
class StageReport:
    stage: str
    total: int
    already_done: int
    todo: int
    done_now: int = 0
    blocked: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    """From planning the stage to its folded records, Ray's start (``ray_start_seconds``) left out."""
    ray_start_seconds: float = 0.0
    """Starting (or joining) Ray, when this stage was the run's first to need it."""
    warnings: list[str] = field(default_factory=list)
    resubmitted: int = 0
    """Units run again because the worker running them was lost."""
    recovered: int = 0
    """Units a lost worker had committed before it died: kept, not run again."""
    invalidated: list[tuple[str, str]] = field(default_factory=list)
    """(unit, 'stage/output') of inputs found damaged; their producer redid them."""
    worker_peak_rss: int | None = None
    """Largest peak resident memory of a worker of the stage's pool so far, bytes."""
    why: list[str] = field(default_factory=list)
    """Why the stage has work left or is blocked, one short phrase each (e.g. 'forced',
    '3 waiting on ingest'); what a dry run shows beside its counts."""

    def absorb(self, earlier: StageReport) -> None:
        """Fold an earlier pass over the same stage into this one (this run's totals)."""
        self.done_now += earlier.done_now
        self.already_done -= earlier.done_now
        self.todo = earlier.todo
        self.seconds += earlier.seconds
        self.ray_start_seconds += earlier.ray_start_seconds
        self.resubmitted += earlier.resubmitted
        self.recovered += earlier.recovered
        self.invalidated = earlier.invalidated + self.invalidated
        self.worker_peak_rss = max((p for p in (self.worker_peak_rss, earlier.worker_peak_rss) if p), default=None)


@dataclass
class RunReport:
    store: str
    stages: list[StageReport]
    dry_run: bool = False

    @property
    def work_done(self) -> int:
        return sum(s.done_now + len(s.failures) for s in self.stages)

    @property
    def ok(self) -> bool:
        return all(not s.failures and not s.blocked for s in self.stages)
