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
import time
from pathlib import Path
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from seglab.pipeline.errors import InputError, SeglabError, TransientError
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
    transient = isinstance(exc, TRANSIENT) and not isinstance(exc, InputError)
    message = str(exc) if isinstance(exc, SeglabError) else f"{type(exc).__name__}: {exc}"
    return {
        "unit": unit.id,
        "status": "failed",
        "error": {"type": type(exc).__name__, "message": message, "transient": transient,
                  "detail": "".join(traceback.format_exception(exc))[-2000:]},
    }


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

    def run(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str]) -> list[dict[str, Any]]:
        stage = self._stage(stage_name)
        if stage.fits:
            stage.fitted = self.store.stage_attrs(stage_name).get("fitted")
        if stage.trains:
            self._load_segmenter(stage)
        receipts: list[dict[str, Any]] = []
        ready_units, inputs = [], []
        for unit in units:
            try:
                inputs.append(self.store.read_unit(read_paths, unit.id))
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
                outputs = self.store.write_unit(stage_name, unit.id, result)
                info = stage.receipt_info(unit, result)
            except Exception as exc:
                receipts.append(_failure(unit, exc))
                continue
            receipts.append({"unit": unit.id, "status": "done", "outputs": outputs, "info": info,
                             "seconds": round(seconds, 4)})
        return receipts


class WorkerPool:
    """A set of ``StageWorker`` actors with the same resources."""

    def __init__(self, spec: WorkerSpec, resources: Resources, size: int):
        self.spec = spec
        self.resources = resources
        self.size = size
        self.replaced = 0
        self._cls = ray.remote(StageWorker).options(
            num_cpus=resources.cpus, num_gpus=resources.gpus, max_restarts=0, max_task_retries=0
        )
        self.actors = [self._cls.remote(spec) for _ in range(size)]

    def fit(self, stage_name: str, units: Sequence[Unit], read_paths: Sequence[str], gold: Any) -> dict[str, Any]:
        """Run ``StageWorker.fit`` on one actor; a failure names the stage."""
        try:
            return ray.get(self.actors[0].fit.remote(stage_name, units, read_paths, gold))
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            cause = cause if isinstance(cause, SeglabError) else exc
            raise StageFailed(f"{stage_name}: fitting on the gold set failed: {cause}") from None

    def replace(self, index: int) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._cls.remote(self.spec)
        self.replaced += 1

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_batches(
    *,
    pool: WorkerPool,
    stage_name: str,
    units: Sequence[Unit],
    read_paths: Sequence[str],
    batch_size: int,
    max_retries: int,
    on_receipts: Callable[[list[dict[str, Any]]], None],
    in_flight: int = 2,
    replace_limit: int | None = None,
) -> None:
    """Run ``stage_name`` over ``units``; every unit ends in exactly one final receipt
    passed to ``on_receipts`` (done, or failed with its reason)."""
    attempts: dict[str, int] = {u.id: 0 for u in units}
    queue: deque[list[Unit]] = deque(list(units[i : i + batch_size]) for i in range(0, len(units), batch_size))
    pending: dict[Any, tuple[int, list[Unit]]] = {}
    load = [0] * pool.size
    limit = replace_limit if replace_limit is not None else 3 * pool.size + max_retries

    def retry_or_fail(batch: list[Unit], error: BaseException) -> list[dict[str, Any]]:
        final = []
        for unit in batch:
            attempts[unit.id] += 1
            if attempts[unit.id] <= max_retries:
                queue.append([unit])
            else:
                final.append(_failure(unit, TransientError(f"{error} (after {attempts[unit.id]} attempts)")))
        return final

    while queue or pending:
        while queue:
            idle = min(range(pool.size), key=load.__getitem__)
            if load[idle] >= in_flight:
                break
            batch = queue.popleft()
            pending[pool.actors[idle].run.remote(stage_name, batch, list(read_paths))] = (idle, batch)
            load[idle] += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
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
                        on_receipts(retry_or_fail(other_batch, exc))
                pool.replace(index)
                on_receipts(retry_or_fail(batch, TransientError(f"worker lost: {type(exc).__name__}")))
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
