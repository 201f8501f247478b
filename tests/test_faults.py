"""Faults inside one machine: committed batches survive a killed driver, damaged chunks are
found and redone, torn writes are never accepted, and each error class is handled as such."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset, write_manifest
from ray import cloudpickle

from seglab.pipeline.base.errors import InputError, TransientError
from seglab.pipeline.core.batcharrays import RECORDS, batch_id
from seglab.pipeline.core.ledger import BatchTask, Failure, Receipt
from seglab.pipeline.core.store import CorruptOutput, Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner, RunOptions
from seglab.stages.base import Resources, Unit
from seglab.workers.pool import StageFailed, WorkerPool, run_batches
from seglab.workers.schedule import failure_of

pytestmark = pytest.mark.usefixtures("ray_local")
SIZES = [(48 + 4 * i, 64) for i in range(6)]
STAGES = ("ingest", "embed", "prompts", "select", "refine")


def stored_equal(a: Store, b: Store, stages=STAGES) -> None:
    for stage in stages:
        for unit, entry in a.entries(stage).items():
            paths = [f"{stage}/{name}" for name in entry.outputs]
            for path, value in a.read_unit(paths, unit).items():
                np.testing.assert_array_equal(b.read_unit([path], unit)[path], value, err_msg=f"{path} of {unit}")


@pytest.fixture
def clean(tmp_path):
    """A finished clean run over 6 images -> (manifest path of a second store, the clean Store)."""
    write_dataset(tmp_path / "data", SIZES)
    path = write_manifest(tmp_path, store="clean.zarr", batch=1)
    assert Runner(load_manifest(path)).run().ok
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("clean.zarr", "other.zarr"))
    return other, Store(tmp_path / "clean.zarr")


def test_batches_committed_before_the_driver_folded_them_are_done_not_recomputed(clean):
    path, reference = clean
    assert Runner(load_manifest(path), RunOptions(only="ingest")).run().ok
    assert Runner(load_manifest(path), RunOptions(only="embed")).run().ok
    store = Store(load_manifest(path).store_location)
    parts = store.objects.list("_tables/embed")
    assert parts
    store.objects.delete(parts)  # the driver died after the workers committed, before it folded
    report = Runner(load_manifest(path)).run()
    embed = next(s for s in report.stages if s.stage == "embed")
    assert report.ok and embed.done_now == 0 and embed.already_done == len(SIZES)  # no image encoded again
    stored_equal(reference, store)


def chunk_of(store: Store, stage: str, output: str, unit: str) -> Path:
    """The local file holding the unit's chunk of ``stage/output`` (the store is local)."""
    record = store.entries(stage)[unit].outputs[output]
    assert store.local is not None
    folder = store.local / stage / output / batch_id(record.batch)
    return next(p for p in folder.rglob("*") if p.is_file() and "c" in p.relative_to(folder).parts)


@pytest.mark.parametrize("damage", ["truncate", pytest.param("flip", marks=pytest.mark.slow)])
def test_a_damaged_chunk_is_found_by_its_reader_and_redone_with_what_read_it(clean, damage):
    path, reference = clean
    manifest = load_manifest(path)
    assert Runner(manifest).run().ok
    store = Store(manifest.store_location)
    unit = sorted(store.entries("embed"))[1]
    record = store.entries("embed")[unit].outputs["lab"]
    chunk = chunk_of(store, "embed", "lab", unit)
    data = bytearray(chunk.read_bytes())
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptOutput, match=f"embed/lab of {unit}"):
        store.read_recorded("embed/lab", unit, record)

    report = Runner(manifest, RunOptions(force=("select",))).run()  # select reads embed again
    by_stage = {s.stage: s for s in report.stages}
    assert report.ok, [(s.stage, s.failures, s.blocked) for s in report.stages]
    assert by_stage["select"].invalidated == [(unit, "embed/lab")]
    assert by_stage["embed"].done_now == 1 and by_stage["select"].done_now == len(SIZES)
    stored_equal(reference, Store(manifest.store_location))
    assert Runner(manifest).run().work_done == 0


WRITER = """
import sys, numpy as np
from seglab.pipeline.core.store import Store
store = Store(sys.argv[1])
store.shards.collect_garbage("embed", ["lab", "edges"], store.state("embed"))  # what the driver does first
start = int(sys.argv[2])
rng = np.random.default_rng(start)
for k in range(start, start + 1000, 8):  # batches of 8: most of a batch's time is its arrays' writes
    units = [f"u{k + i:05d}" for i in range(8)]
    store.put_units("embed", units, [{"lab": rng.random((3, 256, 256)).astype(np.float32),
                                      "edges": rng.random((256, 256)).astype(np.float16)} for _ in units])
"""


def _committed(root: Path) -> set[str]:
    records = root / RECORDS / "embed"
    return {p.name.split(".")[0] for p in records.iterdir()} if records.exists() else set()


def _once_a_batch_is_half_written(root: Path, before: set[str], timeout: float = 60.0) -> None:
    """Return as soon as, after a commit of its own (a writer collects what a killed one
    left before it commits), a writer's batch of embed has arrays but no commit object;
    ``before``: the batches committed before it started."""
    arrays = root / "embed" / "lab"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        committed = _committed(root)
        if committed - before and arrays.exists() and {p.name for p in arrays.iterdir()} - committed:
            return
        time.sleep(0.001)
    raise AssertionError("no batch was ever seen half-written")


def test_writers_killed_mid_write_leave_no_torn_batch_a_resume_would_accept(tmp_path):
    store = Store(tmp_path / "run.zarr", create=True)
    rng = np.random.default_rng(0)
    uncommitted = 0
    for kill in range(5):
        before = _committed(tmp_path / "run.zarr")
        proc = subprocess.Popen([sys.executable, "-c", WRITER, store.path, str(kill * 1000)])
        if kill % 2:  # start-up, then a few batches, then a kill at a random point of a write
            time.sleep(1.5 + rng.random())
        else:  # a kill between a batch's arrays and its commit object, wherever the random ones land
            _once_a_batch_is_half_written(tmp_path / "run.zarr", before)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = Store(tmp_path / "run.zarr").state("embed")
        written = {p.name for p in (tmp_path / "run.zarr" / "embed" / "lab").iterdir() if p.is_dir()}
        uncommitted += len(written - {batch_id(seq) for seq in range(state.next_batch)})
    store = Store(tmp_path / "run.zarr")
    entries = store.entries("embed")
    assert len(entries) >= 16 and uncommitted >= 1  # some kills hit before a commit
    for unit, receipt in entries.items():  # every committed unit reads back whole and equal to what its writer hashed
        for name, record in receipt.outputs.items():
            store.read_recorded(f"embed/{name}", unit, record)


class FlakyWorker:  # shipped to Ray workers by value (see below): they cannot import this test module
    """Actor body for run_batches: 'transient*' units always fail transiently, 'bad*' units
    fail deterministically, 'die*' units kill the worker; each call is counted in a file."""

    def __init__(self, spec):
        self.log = Path(spec)

    def pid(self) -> int:
        return os.getpid()

    def run(self, stage_name, task, read_paths):
        receipts = []
        for unit in task.units:
            with open(self.log, "a") as f:
                f.write(unit.id + "\n")
            if unit.id.startswith("die"):
                os._exit(1)
            if unit.id.startswith("transient"):
                receipts.append(failure_of(unit, TransientError("storage hiccup")))
            elif unit.id.startswith("bad"):
                receipts.append(failure_of(unit, InputError(unit.image, "cannot identify image file")))
            else:
                receipts.append(Receipt(unit=unit.id, outputs={}, signature="-"))
        return receipts


cloudpickle.register_pickle_by_value(sys.modules[__name__])


ONE_CPU = Resources(cpus=1)


def run_flaky(tmp_path, ids, *, size=2, resources=ONE_CPU, **options):
    log = tmp_path / "calls.log"
    pool = WorkerPool(str(log), resources, size=size, worker=FlakyWorker)
    units = [Unit(id=i, image=f"/data/{i}.png") for i in ids]
    names = (batch_id(seq) for seq in itertools.count())

    def task(batch):
        return BatchTask(next(names), tuple(batch), tuple(range(len(batch))), bytes(32), bytes(32), {})

    receipts = []
    try:
        run_batches(
            pool=pool,
            stage_name="ingest",
            batches=[[u] for u in units],
            make_task=task,
            read_paths=[],
            max_retries=2,
            on_receipts=receipts.extend,
            **options,
        )
    finally:
        pool.shutdown()
    calls = log.read_text().split() if log.exists() else []
    return {r.unit: r for r in receipts}, {i: calls.count(i) for i in ids}


def test_transient_errors_are_retried_to_the_limit_and_deterministic_ones_never(tmp_path):
    receipts, calls = run_flaky(tmp_path, ["ok1", "transient1", "bad1", "ok2"])
    assert calls == {"ok1": 1, "transient1": 3, "bad1": 1, "ok2": 1}  # max_retries = 2
    assert receipts["ok1"].status == receipts["ok2"].status == "done"
    flaky, bad = receipts["transient1"], receipts["bad1"]
    assert isinstance(flaky, Failure) and flaky.transient and "storage hiccup" in flaky.message
    assert isinstance(bad, Failure) and not bad.transient
    assert bad.message == "/data/bad1.png: cannot identify image file"


def test_a_pool_that_keeps_dying_fails_the_stage_naming_it_and_a_unit(tmp_path):
    started = time.time()
    with pytest.raises(
        StageFailed,
        match=r"stage 'ingest': worker pool exhausted after \d+ replacements; "
        r"last lost batch started at unit 'die\d'",
    ):
        run_flaky(tmp_path, ["die1", "die2", "die3"], replace_limit=2)
    assert time.time() - started < 60


def test_workers_that_cannot_be_scheduled_fail_the_stage_instead_of_hanging(tmp_path):
    started = time.time()
    with pytest.raises(StageFailed, match=r"stage 'ingest': no unit finished in 3s .* first 'ok1'"):
        run_flaky(tmp_path, ["ok1", "ok2"], size=1, resources=Resources(cpus=64), stall_timeout=3)
    assert time.time() - started < 30
