"""Run a map stage through Ray Data: ``map_batches`` over an actor pool, streamed back to
the driver (``ray.engine: data``; ``ray.engine: pool`` is ``pool.run_batches``).

Each row of the dataset is one ``BatchTask`` (a shard's todo units under a batch name the
driver handed out), pickled; ``map_batches`` runs it with ``batch_size=1`` on actors of
``BatchActor``, which wrap a ``StageWorker``: read inputs, process, write the batch and its
commit object, return the outcomes pickled with the batch name. The driver records each
row as it streams in (``iter_rows``), while Ray Data keeps the actors fed (its own
backpressure).

Faults: Ray Data restarts an actor that died and retries the task it was running, with
the same row, so the same batch name (its defaults, ``max_restarts=-1`` and
``max_task_retries=-1``; the knobs to change them are deprecated). The actor therefore runs
each row with ``StageWorker.run_again``: a batch the dead writer had committed is answered
from its commit object, arrays it left uncommitted are removed before the batch is written
again. Units that failed transiently go out again in a next round under new names,
counted against ``max_retries`` (``BatchSchedule``'s rule). A row whose task raised
outside ``run`` (``DataContext.max_errored_blocks = -1`` drops it instead of failing the
dataset) is handled like a batch of a lost worker in the pool: recovered from its commit
object, else resubmitted. Unlike the pool, a unit that kills its worker every time is
retried without end.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext

from seglab.pipeline.base.errors import TransientError
from seglab.pipeline.core.ledger import BatchTask, LedgerEntry, Receipt
from seglab.stages.base import Resources, Unit
from seglab.workers.pool import StageWorker, WorkerSpec
from seglab.workers.raysession import quiet_logger
from seglab.workers.schedule import BatchSchedule, BatchStats


class BatchActor:
    """Ray Data's callable class: one ``StageWorker`` per actor, one batch task per row."""

    def __init__(self, spec: WorkerSpec, stage_name: str, read_paths: Sequence[str], worker: type = StageWorker):
        self.worker = worker(spec)
        self.stage_name, self.read_paths = stage_name, list(read_paths)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """rows: {"task": (n,) object array of pickled BatchTask} -> {"batch": (n,) batch
        names, "outcomes": (n,) pickled outcome lists, "peak_rss": (n,) int64 bytes}."""
        batches, outcomes = [], []
        for blob in rows["task"]:
            task: BatchTask = pickle.loads(blob)
            batches.append(task.batch)
            outcomes.append(pickle.dumps(self.worker.run_again(self.stage_name, task, self.read_paths)))
        peak = self.worker.peak_rss()
        return {
            "batch": np.array(batches, dtype=object),
            "outcomes": np.array(outcomes, dtype=object),
            "peak_rss": np.full(len(batches), peak, dtype=np.int64),
        }


def stream_batches(
    *,
    spec: WorkerSpec,
    resources: Resources,
    workers: int,
    stage_name: str,
    batches: Sequence[Sequence[Unit]],
    make_task: Callable[[Sequence[Unit]], BatchTask],
    read_paths: Sequence[str],
    max_retries: int,
    on_receipts: Callable[[list[LedgerEntry]], None],
    recover: Callable[[BatchTask], list[Receipt]] | None = None,
    worker: type = StageWorker,
) -> tuple[BatchStats, int | None]:
    """``pool.run_batches``'s contract on Ray Data: every unit of ``batches`` ends in exactly
    one final receipt or failure, passed to ``on_receipts`` as its batch streams in.
    -> (what had to be redone, the largest worker peak RSS in bytes, None when no row came back)."""
    schedule = BatchSchedule(batches, workers=workers, in_flight=1, max_retries=max_retries)
    stats, peak = schedule.stats, None
    while schedule.queue:
        tasks = {task.batch: task for task in (make_task(batch) for batch in _drain(schedule))}
        for row in _map_tasks(list(tasks.values()), spec, resources, workers, stage_name, read_paths, worker):
            task = tasks.pop(row["batch"])
            peak = max(peak or 0, int(row["peak_rss"]))
            on_receipts(schedule.settle(list(task.units), pickle.loads(row["outcomes"])))
        for task in tasks.values():  # rows dropped: their task raised outside StageWorker.run
            recovered: list[LedgerEntry] = list(recover(task)) if recover else []
            stats.recovered += len(recovered)
            finished = {r.unit for r in recovered}
            left = [u for u in task.units if u.id not in finished]
            on_receipts(recovered + schedule.resubmit_or_fail(left, TransientError("batch task lost")))
    return stats, peak


def _drain(schedule: BatchSchedule) -> list[list[Unit]]:
    """Every batch queued now (a round's worth), taken off the queue."""
    taken = list(schedule.queue)
    schedule.queue.clear()
    return taken


def _map_tasks(
    tasks: list[BatchTask],
    spec: WorkerSpec,
    resources: Resources,
    workers: int,
    stage_name: str,
    read_paths: Sequence[str],
    worker: type,
):
    """One round: the tasks through ``map_batches`` on ``workers`` actors; -> the rows that
    came back, as they come (a row whose task raised is dropped, not raised)."""
    context = DataContext.get_current()
    context.max_errored_blocks = -1
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = ray.data.from_items([{"task": pickle.dumps(task)} for task in tasks], override_num_blocks=len(tasks))
    mapped = items.map_batches(
        BatchActor,
        fn_constructor_args=(spec, stage_name, list(read_paths), worker),
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=min(workers, len(tasks))),
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
    )
    with quiet_logger("ray.data"):  # its per-dataset notices would break into the progress display
        yield from mapped.iter_rows()
