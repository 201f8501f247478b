"""The most important test: kill `seglab run` in several stages, rerun, and get a clean run's store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import committed_units, seglab_process, write_dataset, write_manifest

from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.store import Store

STAGES = ("ingest", "embed", "prompts", "select", "refine")
SIZES = [(60 + 4 * i, 90 - 3 * i) for i in range(10)]


def kill_when(proc: subprocess.Popen, store: Path, stage: str, done: int, timeout: float = 240) -> None:
    """SIGKILL the whole process group (driver and the Ray it started) once ``stage``
    has ``done`` units in its committed batches."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(committed_units(store, stage)) >= done or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, a clean run's store) over SIZES, run by the CLI."""
    folder = tmp_path_factory.mktemp("clean")
    write_dataset(folder / "data", SIZES)
    manifest = write_manifest(folder, store="clean.zarr", batch=1)
    out = seglab_process("run", str(manifest)).communicate(timeout=600)[0].decode()
    assert "Labels in " in out and "Next: seglab status" in out, out
    return manifest, folder / "clean.zarr"


@pytest.mark.parametrize(
    "stage,done",
    [
        # all slow: python -m pytest -m slow tests/test_resume.py. The default suite kills a
        # driver writing to a bucket (tests/test_s3_runs.py, the same check against a clean
        # run) and loses a node in embed (tests/test_cluster.py)
        pytest.param("select", 2, marks=pytest.mark.slow),
        pytest.param("refine", 4, marks=pytest.mark.slow),
        pytest.param("embed", 3, marks=pytest.mark.slow),
        pytest.param("prompts", 5, marks=pytest.mark.slow),
        pytest.param("embed", 8, marks=pytest.mark.slow),
    ],
)
def test_killed_run_resumes_to_the_same_store_without_redoing_work(clean, stage, done):
    clean_manifest, clean_store = clean
    resumed = clean_manifest.parent / f"resumed-{stage}.zarr"
    manifest = clean_manifest.parent / f"resumed-{stage}.yaml"
    manifest.write_text(clean_manifest.read_text().replace("clean.zarr", resumed.name))
    kill_when(seglab_process("run", str(manifest)), resumed, stage, done=done)
    before = {s: committed_units(resumed, s) for s in STAGES}
    assert done <= len(before[stage]) < len(SIZES), before

    proc = seglab_process("run", str(manifest))
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    resumed_store = Store(resumed)
    for name in STAGES:
        entries = resumed_store.entries(name)
        assert len(entries) == len(SIZES) and all(isinstance(e, Receipt) for e in entries.values())
        where = {u: next(iter(e.outputs.values())).batch for u, e in entries.items()}
        # finished work kept, not redone: every unit committed before the kill is still in its batch
        assert {u: where[u] for u in before[name]} == before[name], name
    a, b = Store(clean_store), Store(resumed)
    for name in STAGES:
        for unit in a.entries(name):
            paths = [f"{name}/{out}" for out in a.entries(name)[unit].outputs]
            for path, value in a.read_unit(paths, unit).items():
                np.testing.assert_array_equal(b.read_unit([path], unit)[path], value, err_msg=f"{path} of {unit}")
