"""``ray.engine: data``: map stages through Ray Data's map_batches write what the pool
writes, and a worker killed between its arrays and its commit object is retried by Ray
Data under the same batch name without a duplicate or a leftover."""

from __future__ import annotations

import itertools
import os
import sys

import pytest
from conftest import write_dataset, write_manifest
from ray import cloudpickle

from seglab.pipeline.core import shardstore
from seglab.pipeline.core.batcharrays import batch_id
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.planning import place_units, stage_inputs
from seglab.pipeline.runner import Runner, RunOptions
from seglab.pipeline.units import enumerate_units
from seglab.workers.datastream import stream_batches
from seglab.workers.pool import StageWorker, WorkerSpec

pytestmark = pytest.mark.usefixtures("ray_local")


def digests(location: str) -> dict[str, dict[str, dict]]:
    """stage -> unit -> output -> the sha256 its record holds."""
    store = Store(location)
    return {
        stage: {unit: {o: r.sha256 for o, r in e.outputs.items()} for unit, e in store.entries(stage).items()}
        for stage in store.stages()
    }


@pytest.mark.slow  # two whole runs (Ray Data starts an actor pool per stage); one stage through it stays below
def test_ray_data_engine_writes_what_the_pool_writes_and_a_rerun_does_nothing(tmp_path):
    write_dataset(tmp_path / "data", [(60, 80), (72, 64), (50, 90), (64, 64)])
    pool = load_manifest(write_manifest(tmp_path, store="pool.zarr"))
    path = write_manifest(tmp_path, store="data.zarr")
    path.write_text(path.read_text().replace("  workers: 2\n", "  workers: 2\n  engine: data\n"))
    data = load_manifest(path)
    assert data.ray.engine == "data"
    Runner(pool).run()
    report = Runner(data).run()
    assert all(r.done_now == 4 and not r.failures for r in report.stages)
    assert all(r.worker_peak_rss and r.worker_peak_rss > 0 for r in report.stages)
    written = digests(data.store_location)
    assert written == digests(pool.store_location)
    assert set(written) == {"ingest", "embed", "prompts", "select", "refine"}
    again = Runner(data).run()
    assert all(r.todo == 0 for r in again.stages) and digests(data.store_location) == written


class DiesBeforeCommit(StageWorker):  # shipped to Ray workers by value: they cannot import this module
    """Its first batch (of all its incarnations: a marker file beside the store tells) writes
    its arrays, then the process dies before the commit object."""

    def run(self, stage_name, task, read_paths):
        assert self.store.local is not None
        marker = self.store.local.parent / "died"
        if not marker.exists():
            marker.write_text(task.batch)
            shardstore.commit_batch = lambda *args: os._exit(1)
        return super().run(stage_name, task, read_paths)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_worker_killed_before_its_commit_is_retried_under_the_same_name_without_leftovers(tmp_path):
    write_dataset(tmp_path / "data", [(48 + 2 * i, 64) for i in range(6)])
    manifest = load_manifest(write_manifest(tmp_path, batch=2))
    runner = Runner(manifest, RunOptions(only="ingest"))
    runner.run()
    store = Store(manifest.store_location)
    outputs = list(runner.stages["prompts"].outputs(runner.context))
    store.set_stage_attrs("prompts", inputs=stage_inputs(runner.dag, "prompts"), outputs=outputs)
    units = enumerate_units(manifest)
    plan = runner.planner.plan(store, "prompts", place_units(store, units, manifest.store.shard_size))
    names = (batch_id(seq) for seq in itertools.count())
    receipts: list = []
    stats, peak = stream_batches(
        spec=WorkerSpec(
            manifest.store_location,
            runner.context,
            {n: manifest.stage_config(n) for n in runner.dag.order},
            manifest.backend,
        ),
        resources=runner.stages["prompts"].resources,
        workers=2,
        stage_name="prompts",
        batches=plan.batches,
        make_task=lambda batch: plan.task(batch, next(names)),
        read_paths=runner.planner.read_paths("prompts"),
        max_retries=0,  # no round of retries: the dead writer's batch came back from Ray Data's own retry
        on_receipts=receipts.extend,
        worker=DiesBeforeCommit,
    )
    killed = (tmp_path / "died").read_text()
    assert sorted(r.unit for r in receipts) == sorted(u.id for u in units)  # each exactly once
    assert all(isinstance(r, Receipt) for r in receipts) and stats.resubmitted == 0 and peak
    rewritten = [r.unit for r in receipts if next(iter(r.outputs.values())).batch == int(killed[1:])]
    assert rewritten  # the dead writer's batch name, written by Ray Data's retry
    store.refresh()
    written = store.entries("prompts")
    for unit in units:  # every unit reads back whole and equal to what its writer hashed
        for name, record in written[unit.id].outputs.items():
            store.read_recorded(f"prompts/{name}", unit.id, record)


def test_run_again_answers_a_committed_batch_from_its_commit_object(tmp_path, monkeypatch):
    write_dataset(tmp_path / "data", [(48, 64), (50, 64)])
    manifest = load_manifest(write_manifest(tmp_path, batch=2))
    runner = Runner(manifest, RunOptions(only="ingest"))
    runner.run()
    store = Store(manifest.store_location)
    units = enumerate_units(manifest)
    plan = runner.planner.plan(store, "prompts", place_units(store, units, manifest.store.shard_size))
    task = plan.task(plan.batches[0], batch_id(0))
    worker = StageWorker(
        WorkerSpec(
            manifest.store_location, runner.context, {n: manifest.stage_config(n) for n in runner.dag.order}, None
        )
    )
    first = worker.run("prompts", task, runner.planner.read_paths("prompts"))
    monkeypatch.setattr(StageWorker, "run", lambda *args: pytest.fail("a committed batch is written again"))
    again = worker.run_again("prompts", task, runner.planner.read_paths("prompts"))
    assert [(r.unit, r.outputs) for r in again] == [(r.unit, r.outputs) for r in first]
