"""Ray actors that run map stages over batches of units, and the scheduler that feeds them.

One pool of actors serves every map stage with the same resources; an actor builds a
stage (and, when the stage needs one, the backend) once and keeps it. Batches go out
with at most ``in_flight`` per actor (``ray.wait`` backpressure). Each actor reads its
units' inputs from the store, runs the stage, writes the outputs itself and returns
only small receipts. A dead actor is replaced and its batch resubmitted; a unit that
failed transiently is retried up to ``max_retries``; a deterministic failure is final.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from seglab.pipeline.base.errors import SeglabError, TransientError
from seglab.pipeline.core.batcharrays import limit_codec_threads, read_commit
from seglab.pipeline.core.gold import read_gold
from seglab.pipeline.core.ledger import BatchTask, LedgerEntry, Receipt
from seglab.pipeline.core.registry import stage_class
from seglab.pipeline.core.store import CorruptOutput, Store
from seglab.pipeline.core.unitrecords import Where, commit_receipts, done_columns
from seglab.stages.base import Context, FitByTraining, GoldSample, Resources, StageConfig, Unit
from seglab.workers.backend import build_backend
from seglab.workers.raysession import assigned_cpus, capacity
from seglab.workers.schedule import BatchSchedule, BatchStats, failure_of


class StageFailed(SeglabError):
    """A stage could not make progress (its worker pool died or cannot be scheduled)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs to build stages; small and picklable."""

    store_path: str
    context: Context
    stage_configs: Mapping[str, StageConfig]
    backend_config: Any
    tiling: Any = None


class StageWorker:
    """Actor body (made remote by ``WorkerPool``)."""

    def __init__(self, spec: WorkerSpec):
        limit_codec_threads(assigned_cpus())
        self.spec = spec
        self.store = Store(spec.store_path)
        self.stage_class = stage_class
        self.stages: dict[str, Any] = {}
        self.context = spec.context
        self.segmenter_sha256: str | None = None  # of the checkpoint context.segmenter was loaded from

    def _stage(self, name: str):
        if name not in self.stages:
            stage = self.stage_class(name)(self.spec.stage_configs[name])
            if stage.resources.needs_backend and self.context.backend is None:
                self.context.backend = build_backend(self.spec.backend_config, self.spec.tiling)
            self.stages[name] = stage
        return self.stages[name]

    def _load_segmenter(self, stage) -> None:
        """Put the stage's trained teacher into the context (``Context.segmenter``), loaded
        once per checkpoint."""
        from seglab.workers.segmenter import TeacherPredictor  # noqa: PLC0415 (torch loads only in pools that predict with a segmenter)

        fitted = stage.fitted
        if fitted is None:
            raise RuntimeError(f"stage '{stage.name}' runs only after it was trained")
        if self.segmenter_sha256 != fitted["sha256"]:
            data = self.store.recorded_checkpoint(fitted["checkpoint"], fitted["sha256"])
            name = f"{self.store.path}/{fitted['checkpoint']}"
            if data is None:
                raise RuntimeError(f"{name}: missing, or not the checkpoint recorded when it was trained")
            self.context.segmenter = TeacherPredictor(
                name, fitted["architecture"], len(self.context.classes.ids), tuple(fitted["input_size"]), data=data
            )
            self.segmenter_sha256 = fitted["sha256"]

    def pid(self) -> int:
        """The worker's process id (for operators and fault-injection tests)."""
        return os.getpid()

    def peak_rss(self) -> int:
        """The most resident memory this worker process has held, in bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def fit(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str], gold: Any) -> dict[str, Any]:
        """Fit a stage on its gold units: their inputs and gold masks -> the fitted parameters."""
        samples = []
        for unit, inputs in zip(units, self.store.read_units(read_paths, [u.id for u in units])):
            hw = next(iter(inputs.values())).shape[-2:]
            index, valid = read_gold(gold, Path(unit.image), self.context.classes.ids, hw)
            samples.append(GoldSample(unit.id, inputs, index, valid))
        return self._stage(stage_name).fit(samples, self.context)

    def run_again(self, stage_name: str, task: BatchTask, read_paths: Sequence[str]) -> list[LedgerEntry]:
        """``run`` for a task that a worker now dead may have started: -> the receipts of its
        commit object when it got that far, else ``run`` after removing what it left."""
        table = read_commit(self.store.objects, stage_name, task.batch)
        if table is not None:
            return list(commit_receipts(table, int(task.batch[1:]), [u.id for u in task.units]))
        outputs = list(self._stage(stage_name).outputs(self.context))
        self.store.shards.discard_uncommitted(stage_name, task.batch, outputs)
        return self.run(stage_name, task, read_paths)

    def run(self, stage_name: str, task: BatchTask, read_paths: Sequence[str]) -> list[LedgerEntry]:
        """Run one batch and write it (its arrays, then its commit object); -> one receipt or
        failure per unit. A unit whose inputs are damaged fails naming them (``corrupt``)."""
        stage = self._stage(stage_name)
        if stage.fits:
            stage.fitted = self.store.stage_attrs(stage_name).get("fitted")
        if isinstance(stage.fitting, FitByTraining):
            self._load_segmenter(stage)
        failures: dict[str, LedgerEntry] = {}
        inputs = read_inputs(self.store, task, read_paths, failures)
        ready = [at for at, unit in enumerate(task.units) if unit.id not in failures]
        results: list[dict[str, Any] | BaseException] = []
        started = time.perf_counter()
        step = max(1, stage.config.batch_size)
        for first in range(0, len(ready), step):
            part = ready[first : first + step]
            results += stage.process_batch([task.units[at] for at in part], [inputs[at] for at in part], self.context)
        seconds = (time.perf_counter() - started) / max(1, len(ready))
        done: list[tuple[int, dict[str, Any]]] = []
        for at, result in zip(ready, results):
            if isinstance(result, BaseException):
                failures[task.units[at].id] = failure_of(task.units[at], result)
            else:
                done.append((at, result))
        receipts: list[LedgerEntry] = []
        if done:
            try:
                receipts = write_batch(self.store, stage_name, stage, task, done, seconds)
            except Exception as exc:
                receipts = [failure_of(task.units[at], exc) for at, _ in done]
        return receipts + list(failures.values())


def read_inputs(
    store: Store, task: BatchTask, read_paths: Sequence[str], failures: dict[str, LedgerEntry]
) -> list[dict[str, Any]]:
    """The task's units' inputs ('stage/output' -> array, per unit in task order), one read
    per parent batch; a unit whose input is missing or damaged gets a failure in
    ``failures`` naming the arrays (``corrupt``), the others are read one by one then. Any
    other error reading the store fails the units it was reading for (``failure_of`` tells
    a transient one or a full disk from the rest)."""
    inputs: list[dict[str, Any]] = [{} for _ in task.units]
    for path in read_paths:
        parent = path.split("/", 1)[0]
        where = task.reads[parent]
        wanted = [at for at, unit in enumerate(task.units) if unit.id not in failures]
        located = [Where(task.units[at].id, where.batches[at], where.rows[at]) for at in wanted]
        values: list[Any]
        try:
            values = list(store.read_many(path, located))
        except CorruptOutput:
            values = []
            for at, one in zip(wanted, located):
                try:
                    values.append(store.read_many(path, [one])[0])
                except CorruptOutput as exc:
                    failures[one.unit] = failure_of(task.units[at], exc)
                    values.append(None)
        except Exception as exc:  # the store could not be read (unreachable, full): each unit's failure says why
            for at in wanted:
                failures[task.units[at].id] = failure_of(task.units[at], exc)
            continue
        for at, value in zip(wanted, values):
            if value is not None:
                inputs[at][path] = value
    return inputs


def write_batch(
    store: Store,
    stage_name: str,
    stage: Any,
    task: BatchTask,
    done: Sequence[tuple[int, dict[str, Any]]],
    seconds: float,
) -> list[LedgerEntry]:
    """Write the done units (task position, outputs) as the task's batch; -> their receipts."""
    infos = [stage.receipt_info(task.units[at], result) for at, result in done]
    columns = done_columns(task, [at for at, _ in done], infos, seconds)
    table = store.shards.write_batch(stage_name, task.batch, [result for _, result in done], columns)
    seq = int(task.batch[1:])
    return list(commit_receipts(table, seq, [task.units[at].id for at, _ in done]))


class WorkerPool:
    """A set of ``StageWorker`` actors with the same resources, one per slot.

    A slot whose actor died is refilled while the cluster has room for it, else retired
    (``None``). A refilled slot takes work only once its actor answers; one that does not
    answer within ``start_timeout`` seconds (its resources left with a lost node, say) is
    retired too, so a lost node shrinks the pool instead of leaving work waiting forever."""

    def __init__(
        self,
        spec: WorkerSpec,
        resources: Resources,
        size: int,
        worker: type = StageWorker,
        start_timeout: float = 120.0,
    ):
        """worker: the actor body (``StageWorker``, or one with the same ``run``/``fit``/``pid``)."""
        self.spec = spec
        self.resources = resources
        self.size = size
        self.start_timeout = start_timeout
        self.replaced = 0
        self._cls: Any = ray.remote(worker).options(
            num_cpus=resources.cpus, num_gpus=resources.gpus, max_restarts=0, max_task_retries=0
        )
        self.actors: list[Any] = [self._cls.remote(spec) for _ in range(size)]
        self.starting: dict[int, tuple[Any, float]] = {}
        """Refilled slots not yet answering: slot -> (the actor's ``pid`` call, deadline)."""

    @property
    def live(self) -> list[int]:
        """Slots whose actor may take work (refilled slots once they answer)."""
        return [i for i, actor in enumerate(self.actors) if actor is not None and i not in self.starting]

    def fit(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str], gold: Any) -> dict[str, Any]:
        """Run ``StageWorker.fit`` on one actor; a failure names the stage."""
        try:
            return ray.get(self.actors[self.live[0]].fit.remote(stage_name, units, read_paths, gold))
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            cause = cause if isinstance(cause, SeglabError) else exc
            raise StageFailed(f"{stage_name}: fitting on the gold set failed: {cause}") from None

    def replace(self, index: int) -> bool:
        """Refill a slot whose actor died; -> False when the cluster has no room for another
        actor (the slot is retired)."""
        ray.kill(self.actors[index], no_restart=True)
        others = sum(actor is not None for actor in self.actors) - 1
        if capacity(self.resources) <= others:
            self.actors[index] = None
            return False
        self.actors[index] = self._cls.remote(self.spec)
        self.starting[index] = (self.actors[index].pid.remote(), time.monotonic() + self.start_timeout)
        self.replaced += 1
        return True

    def check_starting(self, answered: Sequence[Any]) -> int:
        """Promote refilled slots whose ``pid`` call is among ``answered``; retire those that
        died starting or passed their deadline. -> slots retired."""
        retired = 0
        for index, (ref, deadline) in list(self.starting.items()):
            if ref in answered:
                del self.starting[index]
                try:
                    ray.get(ref)
                    continue
                except RayActorError:
                    pass
            elif time.monotonic() < deadline:
                continue
            self.starting.pop(index, None)
            ray.kill(self.actors[index], no_restart=True)
            self.actors[index] = None
            retired += 1
        return retired

    def next_deadline(self) -> float | None:
        """Seconds until the earliest refilled slot must have answered (None: none starting)."""
        if not self.starting:
            return None
        return max(0.0, min(deadline for _, deadline in self.starting.values()) - time.monotonic())

    def peak_rss(self) -> int | None:
        """The largest peak resident memory of the pool's live workers, in bytes (None when
        none answers within 30 s)."""
        try:
            peaks = ray.get([self.actors[i].peak_rss.remote() for i in self.live], timeout=30)
        except (RayActorError, GetTimeoutError):
            return None
        return max(peaks, default=None)

    def shutdown(self) -> None:
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)


def run_batches(
    *,
    pool: WorkerPool,
    stage_name: str,
    batches: Sequence[Sequence[Unit]],
    make_task: Callable[[Sequence[Unit]], BatchTask],
    read_paths: Sequence[str],
    max_retries: int,
    on_receipts: Callable[[list[LedgerEntry]], None],
    recover: Callable[[BatchTask], list[Receipt]] | None = None,
    stall_timeout: float = 1800.0,
    in_flight: int = 2,
    replace_limit: int | None = None,
) -> BatchStats:
    """Run ``stage_name`` over ``batches`` of units; every unit ends in exactly one final
    receipt or failure, passed to ``on_receipts``.

    make_task: the ``BatchTask`` of units about to go out (each under a new batch name). A
    worker lost with batches in flight: ``recover`` gives the receipts of a batch it had
    committed before it died, its other units are resubmitted (a transient failure,
    counted against ``max_retries``). StageFailed, naming the stage and a unit, when the
    pool is exhausted (more than ``replace_limit`` replacements, or no slot left) or when
    no batch finishes for ``stall_timeout`` seconds (hung or unschedulable workers)."""
    schedule = BatchSchedule(batches, workers=pool.size, in_flight=in_flight, max_retries=max_retries)
    limit = replace_limit if replace_limit is not None else 3 * pool.size + max_retries
    stats = schedule.stats
    tasks: dict[Any, BatchTask] = {}

    def lost(ref: Any, batch: list[Unit], error: BaseException) -> None:
        task = tasks.pop(ref)
        recovered: list[LedgerEntry] = list(recover(task)) if recover else []
        stats.recovered += len(recovered)
        finished = {r.unit for r in recovered}
        on_receipts(recovered + schedule.resubmit_or_fail([u for u in batch if u.id not in finished], error))

    last_progress = time.monotonic()
    while schedule.active:
        while (next_batch := schedule.dispatch(pool.live)) is not None:
            worker, batch = next_batch
            task = make_task(batch)
            ref = pool.actors[worker].run.remote(stage_name, task, list(read_paths))
            tasks[ref] = task
            schedule.sent(ref, worker, batch)
        if not schedule.pending and not pool.starting:
            raise StageFailed(
                f"stage '{stage_name}': no worker left to run unit '{schedule.queue[0][0].id}' "
                f"({stats.retired} lost with their nodes, none can be replaced)"
            )
        starting = [ref for ref, _ in pool.starting.values()]
        waits = [t for t in (pool.next_deadline(), stall_timeout - (time.monotonic() - last_progress)) if t is not None]
        ready, _ = ray.wait(list(schedule.pending) + starting, num_returns=1, timeout=max(0.0, min(waits)))
        stats.retired += pool.check_starting(ready)
        ready = [ref for ref in ready if ref in schedule.pending]
        if ready:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress >= stall_timeout:
            waiting = schedule.waiting()
            raise StageFailed(
                f"stage '{stage_name}': no unit finished in {stall_timeout:.0f}s (workers hung or "
                f"cannot be scheduled); {len(waiting)} units waiting, first '{waiting[0]}'"
            )
        for ref in ready:
            worker, batch = schedule.returned(ref)
            try:
                receipts = ray.get(ref)
            except RayActorError as exc:
                if pool.replaced >= limit:
                    raise StageFailed(
                        f"stage '{stage_name}': worker pool exhausted after {pool.replaced} replacements; "
                        f"last lost batch started at unit '{batch[0].id}': {exc}"
                    ) from None
                for token, other in schedule.lose_worker(worker):  # its other batches died with it
                    lost(token, other, exc)
                if pool.replace(worker):
                    stats.replaced += 1
                else:
                    stats.retired += 1
                lost(ref, batch, TransientError(f"worker lost: {type(exc).__name__}"))
                continue
            except (RayTaskError, GetTimeoutError) as exc:
                receipts = [failure_of(unit, exc) for unit in batch]
            tasks.pop(ref, None)
            on_receipts(schedule.settle(batch, receipts))
    return stats
