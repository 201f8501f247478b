"""The most important test: kill `seglab run` mid-stage, rerun, and get a clean run's store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from seglab.pipeline.store import Store

from conftest import write_dataset, write_manifest

STAGES = ("ingest", "embed", "prompts", "select")
SIZES = [(60 + 4 * i, 90 - 3 * i) for i in range(10)]


def seglab(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "seglab.cli.app", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs,
    )


def ledger_units(store_path: Path, stage: str) -> list[tuple[str, str]]:
    path = store_path / "_ledger" / f"{stage}.jsonl"
    if not path.exists():
        return []
    import json

    return [(e["unit"], e["status"]) for e in map(json.loads, path.read_text().splitlines())]


def kill_when(proc: subprocess.Popen, store: Path, stage: str, done: int, timeout: float = 240) -> None:
    """SIGKILL the whole process group (driver and the Ray it started) once ``stage``
    has ``done`` finished units in its ledger."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(ledger_units(store, stage)) >= done or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_run_resumes_to_the_same_store_without_redoing_work(tmp_path):
    write_dataset(tmp_path / "data", SIZES)
    clean = write_manifest(tmp_path, store="clean.zarr", batch=1)
    out = seglab("run", str(clean)).communicate(timeout=600)[0].decode()
    assert "Done." in out, out

    resumed = tmp_path / "resumed.zarr"
    manifest = tmp_path / "resumed.yaml"
    manifest.write_text(clean.read_text().replace("clean.zarr", "resumed.zarr"))
    kill_when(seglab("run", str(manifest)), resumed, "embed", done=3)
    before = {s: ledger_units(resumed, s) for s in STAGES}
    assert len(before["ingest"]) == len(SIZES) and 3 <= len(before["embed"]) < len(SIZES), before
    assert before["select"] == []

    proc = seglab("run", str(manifest))
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    after = {s: ledger_units(resumed, s) for s in STAGES}
    for stage in STAGES:
        units = [u for u, status in after[stage] if status == "done"]
        assert sorted(units) == sorted(set(units)), f"{stage}: a unit was done twice"
        assert len(units) == len(SIZES)
        assert after[stage][: len(before[stage])] == before[stage]  # finished work kept, not redone

    a, b = Store(tmp_path / "clean.zarr"), Store(resumed)
    for stage in STAGES:
        for unit in a.ledger(stage).load():
            paths = [f"{stage}/{name}" for name in a.ledger(stage).load()[unit]["outputs"]]
            for path, value in a.read_unit(paths, unit).items():
                np.testing.assert_array_equal(b.read_unit([path], unit)[path], value, err_msg=f"{path}/{unit}")
