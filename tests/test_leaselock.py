"""The run lock on object storage: a lease taken and renewed with conditional writes on
the test S3 server; a live holder refuses a second run, an ended lease is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import LOCK_FILE
from seglab.pipeline.storelock import LeaseLock, StoreBusy


@pytest.fixture
def objects(s3_bucket) -> Objects:
    return Objects(s3_bucket + "/run.zarr")


def test_a_held_lease_refuses_a_second_run_and_is_free_once_released(objects):
    with LeaseLock(objects) as first:
        assert first.taken_over is None
        with pytest.raises(StoreBusy, match=rf"another seglab run is using this store \(pid {os.getpid()} on "):
            LeaseLock(objects).__enter__()
    with LeaseLock(objects) as second:
        assert second.taken_over is None, "a released lease is no takeover"


def test_renewal_keeps_the_lease_past_its_length(objects):
    with LeaseLock(objects, seconds=0.9) as holder:
        time.sleep(2.0)
        with pytest.raises(StoreBusy):
            LeaseLock(objects, seconds=0.9).__enter__()
        assert not holder.lost


def test_an_ended_lease_of_a_killed_run_is_taken_over_and_named(objects):
    dead = {
        "host": "node-7",
        "pid": 4242,
        "started": "2026-01-01T00:00:00+00:00",
        "lease": "x" * 32,
        "expires": time.time() - 1,
    }
    objects.put(LOCK_FILE, json.dumps(dead).encode())
    with LeaseLock(objects) as lock:
        assert lock.taken_over is not None and lock.taken_over["pid"] == 4242
        holder = json.loads(objects.get(LOCK_FILE) or b"{}")
        assert holder["lease"] == lock.lease_id and holder["pid"] == os.getpid()
    assert json.loads(objects.get(LOCK_FILE) or b"null") == {}, "released: an empty record"


def test_a_live_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(objects):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process of this machine that has ended
    holder = {"host": socket.gethostname(), "pid": pid, "lease": "x" * 32, "expires": time.time() + 60}
    objects.put(LOCK_FILE, json.dumps(holder).encode())
    with LeaseLock(objects) as lock:
        assert lock.taken_over is not None and lock.taken_over["pid"] == pid
    elsewhere = {**holder, "host": "another-node"}  # its process cannot be seen from here: wait it out
    objects.put(LOCK_FILE, json.dumps(elsewhere).encode())
    with pytest.raises(StoreBusy, match="its lease ends in"):
        LeaseLock(objects).__enter__()


def test_of_runs_racing_for_a_free_store_exactly_one_gets_it(objects):
    def take(_: int) -> LeaseLock | None:
        lock = LeaseLock(objects)
        try:
            return lock.__enter__()
        except StoreBusy:
            return None

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(take, range(6)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    winners[0].__exit__(None, None, None)


def test_a_holder_whose_lease_was_taken_knows_it_lost_it(objects):
    with LeaseLock(objects, seconds=0.6) as holder:
        objects.put(LOCK_FILE, b"{}")  # someone replaced the lock object behind its back
        deadline = time.time() + 3
        while not holder.lost and time.time() < deadline:
            time.sleep(0.05)
        assert holder.lost
