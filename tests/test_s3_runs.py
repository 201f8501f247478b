"""Runs whose store is a bucket on an S3 API server (moto's, on 127.0.0.1): a full run and
a rerun that writes nothing, status, exports and the report read from the bucket, a killed
driver and its resume, and a second run refused by the store's lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import committed_units, seglab_process
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.bench.s3server import new_bucket
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner
from seglab.pipeline.storelock import LeaseLock, StoreBusy

STAGES = ("ingest", "embed", "prompts", "select", "refine")
cli = CliRunner()


def output_hashes(store: Store, stage: str) -> dict[str, dict[str, str]]:
    """Per unit done in ``stage``: each output's recorded sha256 (a unit that failed is absent)."""
    return {
        unit: {name: record.sha256 for name, record in entry.outputs.items()}
        for unit, entry in store.entries(stage).items()
        if isinstance(entry, Receipt)
    }


def into(manifest, location: str):
    """The tiny manifest with its store at ``location``."""
    manifest.write_text(manifest.read_text().replace("path: run.zarr", f"path: {location}"))
    return manifest


def test_a_run_into_a_bucket_matches_a_local_run_and_every_reader_reads_the_bucket(tiny, tmp_path, s3_ray, request):
    local = tmp_path / "local.yaml"
    local.write_text(tiny.read_text().replace("path: run.zarr", f"path: {tmp_path / 'local.zarr'}"))
    location = new_bucket(s3_ray, request.node.name) + "/runs/tiny.zarr"
    manifest = load_manifest(into(tiny, location))
    assert Runner(load_manifest(local)).run().ok
    report = Runner(manifest).run()
    assert report.ok and [s.done_now for s in report.stages] == [4] * len(STAGES)
    store, reference = Store(location), Store(tmp_path / "local.zarr")
    for stage in STAGES:
        assert output_hashes(store, stage) == output_hashes(reference, stage), stage  # the same arrays, byte for byte
    keys = store.objects.list("")
    assert Runner(load_manifest(tiny)).run().work_done == 0
    assert Store(location).objects.list("") == keys  # the rerun wrote nothing

    status = cli.invoke(app, ["status", str(tiny), "--json"])
    assert status.exit_code == 0 and '"complete": true' in status.output, status.output
    exported = cli.invoke(app, ["export", location, "--out", str(tmp_path / "png")])
    assert exported.exit_code == 0, exported.output
    assert len(list((tmp_path / "png").rglob("*.png"))) >= 4
    html = cli.invoke(app, ["report", location, "--out", str(tmp_path / "report.html")])
    assert html.exit_code == 0 and (tmp_path / "report.html").stat().st_size > 10_000, html.output


def test_a_second_run_is_refused_while_another_holds_the_lease(tiny, s3_ray, request):
    location = new_bucket(s3_ray, request.node.name) + "/run.zarr"
    manifest = load_manifest(into(tiny, location))
    with LeaseLock(Objects(location)):
        with pytest.raises(StoreBusy, match="another seglab run is using this store"):
            Runner(manifest).run()
    assert not Objects(location).exists("zarr.json")  # refused before anything was written
    report = Runner(manifest).run()
    assert report.ok and report.stages[0].done_now == 4


def test_a_killed_driver_resumes_from_the_bucket_to_a_clean_runs_arrays_without_redoing_committed_batches(
    tiny, tmp_path, s3_ray, request
):
    local = tmp_path / "clean.yaml"
    local.write_text(tiny.read_text().replace("path: run.zarr", f"path: {tmp_path / 'clean.zarr'}"))
    assert Runner(load_manifest(local)).run().ok
    location = new_bucket(s3_ray, request.node.name) + "/run.zarr"
    into(tiny, location)
    proc = seglab_process("run", str(tiny))
    deadline = time.time() + 240
    while time.time() < deadline and len(committed_units(location, "prompts")) < 2 and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {stage: committed_units(location, stage) for stage in STAGES}
    assert len(before["prompts"]) >= 2 and len(before["refine"]) < 4, before  # killed with work left
    resumed = subprocess.run(
        [sys.executable, "-m", "seglab.cli.app", "run", str(tiny)], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    store = Store(location)
    for stage in STAGES:
        entries = store.entries(stage)
        assert len(entries) == 4 and all(isinstance(e, Receipt) for e in entries.values()), stage
        where = {u: next(iter(e.outputs.values())).batch for u, e in entries.items()}
        assert {u: where[u] for u in before[stage]} == before[stage], stage  # committed work kept
        assert output_hashes(store, stage) == output_hashes(Store(tmp_path / "clean.zarr"), stage), (
            stage
        )  # as never killed
    labels = store.read_unit(["refine/labels"], sorted(store.entries("refine"))[0])["refine/labels"]
    assert labels.ndim == 2 and np.isin(labels, [0, 1, 2, 255]).all()


def test_a_run_whose_lease_lapsed_stops_before_it_records_more(tiny, s3_ray, request):
    location = new_bucket(s3_ray, request.node.name) + "/run.zarr"
    runner = Runner(load_manifest(into(tiny, location)))
    objects = Objects(location)
    with LeaseLock(objects, seconds=0.6) as lease:
        objects.put("_run.lock", b'{"lease": "another run", "expires": 1e12}')  # taken over meanwhile
        time.sleep(0.5)  # the holder's next renewal finds the lock object changed
        assert lease.lost
        runner._lock = lease
        with pytest.raises(StoreBusy, match="lease on the store lapsed"):
            runner._check_lease(Store(location, create=True))


def test_training_checkpoints_are_whole_objects_of_the_bucket_and_a_torn_newest_falls_back(s3_ray, request):
    from seglab.workers.trainer import checkpoint_files, latest_checkpoint, save_checkpoint  # noqa: PLC0415 (torch)

    folder = Objects(new_bucket(s3_ray, request.node.name) + "/run.zarr/_checkpoints/retrain/0123456789abcdef")
    for epoch in range(3):
        save_checkpoint(folder, epoch, {"epoch": epoch, "w": torch.full((2,), float(epoch))})
    assert checkpoint_files(folder) == ["epoch-0001.pt", "epoch-0002.pt"]  # the newest two
    newest = folder.get("epoch-0002.pt")
    assert newest is not None
    folder.put("epoch-0002.pt", newest[:100])  # torn
    key, state = latest_checkpoint(folder)
    assert key == "epoch-0001.pt" and state["epoch"] == 1 and state["w"].tolist() == [1.0, 1.0]


@pytest.mark.slow  # about 60 s: five stages, Ray Train, refine.1 and a rerun; checkpoints in a bucket are tested above
def test_a_round_of_retraining_keeps_its_checkpoints_in_the_bucket_and_a_rerun_reuses_them(tiny, s3_ray, request):
    location = new_bucket(s3_ray, request.node.name) + "/run.zarr"
    manifest = into(tiny, location)
    manifest.write_text(
        manifest.read_text() + "rounds: 1\nretrain: {epochs: 3, input_size: [32, 48], train_batch: 2, batch_size: 2}\n"
    )
    assert Runner(load_manifest(manifest)).run().ok
    store = Store(location)
    fitted = store.stage_attrs("retrain")["fitted"]
    checkpoints = store.objects.list(store.checkpoint_prefix("retrain"))
    assert fitted["checkpoint"] == checkpoints[-1] and len(checkpoints) == 2  # the newest two epochs are kept
    assert store.objects.get(fitted["checkpoint"]) is not None
    assert [h["epoch"] for h in fitted["history"]] == [0, 1, 2]
    assert "refine.1" in store.stages() and output_hashes(store, "refine.1")
    # the stored fit's checkpoint is read back from the bucket: nothing to do
    assert Runner(load_manifest(manifest)).run().work_done == 0
