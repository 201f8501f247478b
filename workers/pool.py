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
from pathlib import Path
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from seglab.pipeline.errors import InputError, SeglabError, StorageError, TransientError, os_error_cause
from seglab.pipeline.store import CorruptOutput
from seglab.stages.base import Context, Resources, StageConfig, Unit

TRANSIENT = (TransientError, TimeoutError, ConnectionError, MemoryError)


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


def _failure(unit: Unit, exc: BaseException) -> dict[str, Any]:
    """A failed unit's receipt. ``error.transient``: worth retrying; ``error.corrupt``: the
    damaged input arrays ('stage/output') whose producing stage must redo the unit;
    ``error.storage``: {path, problem} of a full disk or an unwritable file, which the
    driver stops on without recording anything against the unit."""
    transient = isinstance(exc, TRANSIENT) and not isinstance(exc, InputError)
    message = str(exc) if isinstance(exc, SeglabError) else f"{type(exc).__name__}: {exc}"
    error = {"type": type(exc).__name__, "message": message, "transient": transient,
             "detail": "".join(traceback.format_exception(exc))[-2000:]}
    if isinstance(exc, CorruptOutput):
        error["corrupt"] = exc.paths
    if (cause := os_error_cause(exc)) is not None:
        storage = StorageError.from_os_error(cause, "the store")
        error["storage"] = {"path": storage.path, "problem": storage.problem}
    return {"unit": unit.id, "status": "failed", "error": error}


class StageWorker:
    """Actor body (made remote by ``WorkerPool``)."""

    def __init__(self, spec: WorkerSpec):
        from seglab.pipeline.registry import stage_class
        from seglab.pipeline.store import Store

        self.spec = spec
        self.store = Store(spec.store_path)
        self.stage_class = stage_class
        self.stages: dict[str, Any] = {}
        self.context = spec.context

    def _stage(self, name: str):
        if name not in self.stages:
            stage = self.stage_class(name)(self.spec.stage_configs[name])
            if stage.resources.needs_backend and self.context.backend is None:
                from seglab.workers.backend import build_backend

                self.context.backend = build_backend(self.spec.backend_config, self.spec.tiling)
            self.stages[name] = stage
        return self.stages[name]

    def _load_segmenter(self, stage) -> None:
        """Put the stage's trained teacher into the context (``stages.retrain.SEGMENTER``),
        loaded once per checkpoint."""
        from seglab.stages.retrain import SEGMENTER
        from seglab.workers.segmenter import TeacherPredictor

        fitted = stage.fitted
        if fitted is None:
            raise RuntimeError(f"stage '{stage.name}' runs only after it was trained")
        if self.context.extras.get("segmenter_sha256") != fitted["sha256"]:
            self.context.extras[SEGMENTER] = TeacherPredictor(
                str(self.store.path / fitted["checkpoint"]), fitted["architecture"],
                len(self.context.classes.ids), tuple(fitted["input_size"]))
            self.context.extras["segmenter_sha256"] = fitted["sha256"]

    def pid(self) -> int:
        """The worker's process id (for operators and fault-injection tests)."""
        return os.getpid()

    def peak_rss(self) -> int:
        """The most resident memory this worker process has held, in bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def fit(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str], gold: Any) -> dict[str, Any]:
        """Fit a stage on its gold units: their inputs and gold masks -> the fitted parameters."""
        from seglab.pipeline.gold import read_gold
        from seglab.stages.base import GoldSample

        samples = []
        for unit in units:
            inputs = self.store.read_unit(read_paths, unit.id)
            hw = next(iter(inputs.values())).shape[-2:]
            index, valid = read_gold(gold, Path(unit.image), self.context.classes.ids, hw)
            samples.append(GoldSample(unit.id, inputs, index, valid))
        return self._stage(stage_name).fit(samples, self.context)

    def run(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str],
            tasks: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Run a batch; -> one receipt per unit. ``tasks[unit id]``: 'inputs' (input digest)
        and 'signature' (stage signature digest) for the commit record, 'expected': the
        sha256 of each read array as its producer recorded it."""
        stage = self._stage(stage_name)
        if stage.fits:
            stage.fitted = self.store.stage_attrs(stage_name).get("fitted")
        if stage.trains:
            self._load_segmenter(stage)
        receipts: list[dict[str, Any]] = []
        ready_units, inputs = [], []
        for unit in units:
            try:
                inputs.append(self.store.verify_reads(read_paths, unit.id, tasks[unit.id]["expected"]))
                ready_units.append(unit)
            except Exception as exc:
                receipts.append(_failure(unit, exc))
        started = time.perf_counter()
        results = stage.process_batch(ready_units, inputs, self.context) if ready_units else []
        seconds = (time.perf_counter() - started) / max(1, len(ready_units))
        for unit, result in zip(ready_units, results):
            if isinstance(result, BaseException):
                receipts.append(_failure(unit, result))
                continue
            try:
                receipt = {"unit": unit.id, "status": "done", "outputs": self.store.write_unit(stage_name, unit.id, result),
                           "info": stage.receipt_info(unit, result), "seconds": round(seconds, 4)}
                self.store.commit_unit(stage_name, unit.id, {**receipt, "inputs": tasks[unit.id]["inputs"],
                                                             "signature": tasks[unit.id]["signature"]})
            except Exception as exc:
                receipts.append(_failure(unit, exc))
                continue
            receipts.append(receipt)
        return receipts


class WorkerPool:
    """A set of ``StageWorker`` actors with the same resources, one per slot.

    A slot whose actor died is refilled while the cluster has room for it, else retired
    (``None``). A refilled slot takes work only once its actor answers; one that does not
    answer within ``start_timeout`` seconds (its resources left with a lost node, say) is
    retired too, so a lost node shrinks the pool instead of leaving work waiting forever."""

    def __init__(self, spec: WorkerSpec, resources: Resources, size: int, worker: type = StageWorker,
                 start_timeout: float = 120.0):
        """worker: the actor body (``StageWorker``, or one with the same ``run``/``fit``/``pid``)."""
        self.spec = spec
        self.resources = resources
        self.size = size
        self.start_timeout = start_timeout
        self.replaced = 0
        self._cls = ray.remote(worker).options(
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
        from seglab.workers.raysession import capacity

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


@dataclass
class BatchStats:
    """What ``run_batches`` had to redo: units resubmitted after their worker was lost,
    units recovered from commit records instead, workers replaced and slots retired."""

    resubmitted: int = 0
    recovered: int = 0
    replaced: int = 0
    retired: int = 0


def run_batches(
    *,
    pool: WorkerPool,
    stage_name: str,
    units: Sequence[Unit],
    read_paths: Sequence[str],
    batch_size: int,
    max_retries: int,
    on_receipts: Callable[[list[dict[str, Any]]], None],
    tasks: Mapping[str, Mapping[str, Any]],
    recover: Callable[[Sequence[Unit]], list[dict[str, Any]]] | None = None,
    stall_timeout: float = 1800.0,
    in_flight: int = 2,
    replace_limit: int | None = None,
) -> BatchStats:
    """Run ``stage_name`` over ``units``; every unit ends in exactly one final receipt
    passed to ``on_receipts`` (done, or failed with its reason).

    tasks: per unit id what ``StageWorker.run`` needs besides the unit. A worker lost with
    batches in flight: ``recover`` turns the units it had already committed into done
    receipts, the others are resubmitted (a transient failure, counted against
    ``max_retries``). StageFailed, naming the stage and a unit, when the pool is exhausted
    (more than ``replace_limit`` replacements, or no slot left) or when no batch finishes
    for ``stall_timeout`` seconds (hung or unschedulable workers)."""
    attempts: dict[str, int] = {u.id: 0 for u in units}
    queue: deque[list[Unit]] = deque(list(units[i : i + batch_size]) for i in range(0, len(units), batch_size))
    pending: dict[Any, tuple[int, list[Unit]]] = {}
    load = [0] * pool.size
    limit = replace_limit if replace_limit is not None else 3 * pool.size + max_retries
    stats = BatchStats()

    def retry_or_fail(batch: list[Unit], error: BaseException) -> list[dict[str, Any]]:
        final = []
        for unit in batch:
            attempts[unit.id] += 1
            if attempts[unit.id] <= max_retries:
                queue.append([unit])
                stats.resubmitted += 1
            else:
                final.append(_failure(unit, TransientError(f"{error} (after {attempts[unit.id]} attempts)")))
        return final

    def lost(batch: list[Unit], error: BaseException) -> None:
        recovered = recover(batch) if recover else []
        stats.recovered += len(recovered)
        finished = {r["unit"] for r in recovered}
        on_receipts(recovered + retry_or_fail([u for u in batch if u.id not in finished], error))

    last_progress = time.monotonic()
    while queue or pending:
        while queue and pool.live:
            idle = min(pool.live, key=load.__getitem__)
            if load[idle] >= in_flight:
                break
            batch = queue.popleft()
            ref = pool.actors[idle].run.remote(stage_name, batch, list(read_paths), {u.id: tasks[u.id] for u in batch})
            pending[ref] = (idle, batch)
            load[idle] += 1
        if not pending and not pool.starting:
            raise StageFailed(f"stage '{stage_name}': no worker left to run unit '{queue[0][0].id}' "
                              f"({stats.retired} lost with their nodes, none can be replaced)")
        starting = [ref for ref, _ in pool.starting.values()]
        waits = [t for t in (pool.next_deadline(), stall_timeout - (time.monotonic() - last_progress)) if t is not None]
        ready, _ = ray.wait(list(pending) + starting, num_returns=1, timeout=max(0.0, min(waits)))
        stats.retired += pool.check_starting(ready)
        ready = [ref for ref in ready if ref in pending]
        if ready:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress >= stall_timeout:
            waiting = [u.id for _, batch in pending.values() for u in batch] or [u.id for batch in queue for u in batch]
            raise StageFailed(f"stage '{stage_name}': no unit finished in {stall_timeout:.0f}s (workers hung or "
                              f"cannot be scheduled); {len(waiting)} units waiting, first '{waiting[0]}'")
        for ref in ready:
            index, batch = pending.pop(ref)
            load[index] -= 1
            try:
                receipts = ray.get(ref)
            except RayActorError as exc:
                if pool.replaced >= limit:
                    raise StageFailed(
                        f"stage '{stage_name}': worker pool exhausted after {pool.replaced} replacements; "
                        f"last lost batch started at unit '{batch[0].id}': {exc}"
                    ) from None
                for other_ref, (other_index, other_batch) in list(pending.items()):
                    if other_index == index:  # its other batches died with it
                        del pending[other_ref]
                        load[index] -= 1
                        lost(other_batch, exc)
                if pool.replace(index):
                    stats.replaced += 1
                else:
                    stats.retired += 1
                lost(batch, TransientError(f"worker lost: {type(exc).__name__}"))
                continue
            except (RayTaskError, GetTimeoutError) as exc:
                receipts = [_failure(unit, exc) for unit in batch]
            final = []
            for receipt in receipts:
                if receipt["status"] == "failed" and receipt["error"]["transient"]:
                    attempts[receipt["unit"]] += 1
                    if attempts[receipt["unit"]] <= max_retries:
                        queue.append([u for u in batch if u.id == receipt["unit"]])
                        continue
                final.append(receipt)
            on_receipts(final)
    return stats
