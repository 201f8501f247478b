"""The worker pool: a worker killed mid-stage is replaced and its units redone once."""

from __future__ import annotations

import itertools
import os
import signal
import sys

import numpy as np
import pytest
import ray
import zarr
from conftest import write_dataset, write_manifest
from ray import cloudpickle

from seglab.pipeline.core.batcharrays import batch_id
from seglab.pipeline.core.ledger import BatchTask, Receipt, UnitInputs
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.planning import place_units
from seglab.pipeline.runner import Runner, RunOptions
from seglab.pipeline.units import enumerate_units
from seglab.stages.base import Resources, Unit
from seglab.stages.parts.geometry import ImageFrame
from seglab.workers.pool import StageWorker, WorkerPool, WorkerSpec, read_inputs, run_batches

pytestmark = pytest.mark.usefixtures("ray_local")


def test_killed_worker_is_replaced_and_every_unit_finishes_once(tmp_path):
    write_dataset(tmp_path / "data", [(48 + 2 * i, 64) for i in range(8)])
    manifest = load_manifest(write_manifest(tmp_path, batch=1))
    runner = Runner(manifest, RunOptions(only="ingest"))
    runner.run()  # ingest everything, then run embed by hand with a kill in the middle
    store = Store(manifest.store_location)
    outputs = list(runner.stages["embed"].outputs(runner.context))
    store.set_stage_attrs("embed", inputs=["ingest"], outputs=outputs)
    spec = WorkerSpec(
        manifest.store_location,
        runner.context,
        {n: manifest.stage_config(n) for n in runner.dag.order},
        manifest.backend,
        manifest.embed.tiling,
    )
    pool = WorkerPool(spec, runner.stages["embed"].resources, size=2)
    victim = ray.get(pool.actors[0].pid.remote())
    receipts: list[dict] = []

    def record(batch: list) -> None:
        if not receipts and batch:
            os.kill(victim, signal.SIGKILL)  # one worker dies while it still has work in flight
        receipts.extend(batch)

    units = enumerate_units(manifest)
    plan = runner.planner.plan(store, "embed", place_units(store, units, manifest.store.shard_size))
    names = (batch_id(seq) for seq in itertools.count())
    stats = run_batches(
        pool=pool,
        stage_name="embed",
        batches=plan.batches,
        make_task=lambda batch: plan.task(batch, next(names)),
        read_paths=["ingest/image"],
        max_retries=2,
        on_receipts=record,
    )
    pool.shutdown()
    assert pool.replaced == stats.replaced == 1 and 1 <= stats.resubmitted <= 2  # its in-flight batches, no more
    assert sorted(r.unit for r in receipts) == sorted(u.id for u in units)  # each exactly once
    assert all(isinstance(r, Receipt) for r in receipts)
    store.refresh()
    for unit in units:
        read = store.read_unit(["embed/lab", "embed/frame"], unit.id)
        lab, frame = read["embed/lab"], ImageFrame.from_array(read["embed/frame"])
        assert lab.shape == (3, *frame.resized_hw) and max(lab.shape) == 256  # the resized image, unpadded
        assert np.isfinite(lab.astype(np.float32)).all()


def test_a_store_that_cannot_be_read_fails_the_units_it_was_read_for_transiently():
    class Unreachable:
        def read_many(self, path, located):
            raise ConnectionError("the endpoint is gone")

    units = (Unit("a", "/data/a.png"), Unit("b", "/data/b.png"))
    task = BatchTask(batch_id(0), units, (0, 1), bytes(32), bytes(32), {}, {"ingest": UnitInputs((0, 0), (0, 1))})
    failures: dict = {}
    inputs = read_inputs(Unreachable(), task, ["ingest/image"], failures)
    assert inputs == [{}, {}] and set(failures) == {"a", "b"}
    assert all(f.transient and "the endpoint is gone" in f.message for f in failures.values())


class CodecThreadsProbe(StageWorker):  # shipped to Ray workers by value: they cannot import this module
    def codec_threads(self) -> int:
        return zarr.config.get("threading.max_workers")


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_worker_runs_zarr_codecs_on_as_many_threads_as_it_has_cpus(tmp_path, cpus):
    """zarr's default (CPU count + 4 threads) oversubscribes a worker Ray gave fewer CPUs."""
    write_dataset(tmp_path / "data", [(48, 64)])
    manifest = load_manifest(write_manifest(tmp_path))
    runner = Runner(manifest, RunOptions(only="ingest"))
    runner.run()  # a worker opens the store
    spec = WorkerSpec(manifest.store_location, runner.context, {}, manifest.backend)
    pool = WorkerPool(spec, Resources(cpus=cpus), size=1, worker=CodecThreadsProbe)
    try:
        assert ray.get(pool.actors[0].codec_threads.remote()) == cpus
    finally:
        pool.shutdown()
