"""Faults inside one machine: committed work survives a killed driver, damaged chunks are
found and redone, torn writes are never accepted, and each error class is handled as such."""

from __future__ import annotations

import json
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
from seglab.pipeline.core.ledger import Failure, Receipt, Task
from seglab.pipeline.core.store import COMMIT_DIR, CorruptOutput, Store
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
        for unit, entry in a.ledger(stage).load().items():
            paths = [f"{stage}/{name}" for name in entry.outputs]
            for path, value in a.read_unit(paths, unit).items():
                np.testing.assert_array_equal(b.read_unit([path], unit)[path], value, err_msg=f"{path}/{unit}")


@pytest.fixture
def clean(tmp_path):
    """A finished clean run over 6 images -> (manifest path of a second store, the clean Store)."""
    write_dataset(tmp_path / "data", SIZES)
    path = write_manifest(tmp_path, store="clean.zarr", batch=1)
    assert Runner(load_manifest(path)).run().ok
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("clean.zarr", "other.zarr"))
    return other, Store(tmp_path / "clean.zarr")


def test_units_committed_before_the_driver_died_are_adopted_not_recomputed(clean):
    path, reference = clean
    assert Runner(load_manifest(path), RunOptions(only="ingest")).run().ok
    assert Runner(load_manifest(path), RunOptions(only="embed")).run().ok
    store = Store(load_manifest(path).store_path)
    ledger = store.path / "_ledger" / "embed.jsonl"
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(lines[:2]) + "\n")  # the driver died before appending the other lines
    lost = {json.loads(line)["unit"] for line in lines[2:]}
    report = Runner(load_manifest(path)).run()
    embed = next(s for s in report.stages if s.stage == "embed")
    assert report.ok and embed.adopted == len(lost) == 4 and embed.done_now == 0  # no image encoded again
    entries = store.ledger("embed").load()
    assert {u for u, e in entries.items() if isinstance(e, Receipt) and e.adopted} == lost
    stored_equal(reference, store)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_chunk_is_found_by_its_reader_and_redone_with_what_read_it(clean, damage):
    path, reference = clean
    manifest = load_manifest(path)
    assert Runner(manifest).run().ok
    store = Store(manifest.store_path)
    unit = sorted(store.ledger("embed").load())[1]
    chunk = next(p for p in (store.path / "embed" / "lab" / unit).rglob("*") if p.is_file() and "c" in p.parts)
    data = bytearray(chunk.read_bytes())
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptOutput, match=f"embed/lab/{unit}"):
        store.verify_reads(["embed/lab"], unit, {"embed/lab": store.ledger("embed").load()[unit].outputs["lab"].sha256})

    report = Runner(manifest, RunOptions(force=("select",))).run()  # select reads embed again
    by_stage = {s.stage: s for s in report.stages}
    assert report.ok, [(s.stage, s.failures, s.blocked) for s in report.stages]
    assert by_stage["select"].invalidated == [(unit, "embed/lab")]
    assert by_stage["embed"].done_now == 1 and by_stage["select"].done_now == len(SIZES)
    stored_equal(reference, store)
    assert Runner(manifest).run().work_done == 0


WRITER = """
import sys, time, numpy as np
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.store import Store
store = Store(sys.argv[1])
start = int(sys.argv[2])
rng = np.random.default_rng(start)
for k in range(start, start + 1000):
    unit = f"u{k:05d}"
    outputs = store.write_unit("embed", unit, {"lab": rng.random((3, 256, 256)).astype(np.float32),
                                               "edges": rng.random((256, 256)).astype(np.float16)})
    store.commit_unit("embed", Receipt(unit=unit, outputs=outputs, inputs="-", signature="-"))
"""


def test_writers_killed_mid_write_leave_no_torn_unit_a_resume_would_accept(tmp_path):
    store = Store(tmp_path / "run.zarr", create=True)
    store.prepare_stage("embed", ["lab", "edges"])
    rng = np.random.default_rng(0)
    for kill in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(kill * 1000)])
        time.sleep(1.5 + rng.random())  # start-up, then a few units, then a kill at a random point of a write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = sorted(p.stem for p in (store.path / COMMIT_DIR / "embed").glob("*.json"))
    written = {p.name for p in (store.path / "embed" / "lab").iterdir() if p.is_dir()}
    assert len(committed) >= 8 and len(written - set(committed)) >= 1  # some kills hit before a commit
    for unit in committed:  # every committed unit reads back whole and equal to what its writer hashed
        record = store.committed("embed", unit)
        expected = {f"embed/{k}": v.sha256 for k, v in record.outputs.items()}
        store.verify_reads(expected, unit, expected)


class FlakyWorker:  # shipped to Ray workers by value (see below): they cannot import this test module
    """Actor body for run_batches: 'transient*' units always fail transiently, 'bad*' units
    fail deterministically, 'die*' units kill the worker; each call is counted in a file."""

    def __init__(self, spec):
        self.log = Path(spec)

    def pid(self) -> int:
        return os.getpid()

    def run(self, stage_name, units, read_paths, tasks):
        receipts = []
        for unit in units:
            with open(self.log, "a") as f:
                f.write(unit.id + "\n")
            if unit.id.startswith("die"):
                os._exit(1)
            if unit.id.startswith("transient"):
                receipts.append(failure_of(unit, TransientError("storage hiccup")))
            elif unit.id.startswith("bad"):
                receipts.append(failure_of(unit, InputError(unit.image, "cannot identify image file")))
            else:
                receipts.append(Receipt(unit=unit.id, outputs={}, inputs="-", signature="-"))
        return receipts


cloudpickle.register_pickle_by_value(sys.modules[__name__])


ONE_CPU = Resources(cpus=1)


def run_flaky(tmp_path, ids, *, size=2, resources=ONE_CPU, **options):
    log = tmp_path / "calls.log"
    pool = WorkerPool(str(log), resources, size=size, worker=FlakyWorker)
    units = [Unit(id=i, image=f"/data/{i}.png") for i in ids]
    receipts = []
    try:
        run_batches(
            pool=pool,
            stage_name="ingest",
            units=units,
            read_paths=[],
            batch_size=1,
            max_retries=2,
            on_receipts=receipts.extend,
            tasks={u.id: Task("-", "-") for u in units},
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
