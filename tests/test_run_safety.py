"""Runs that notice what changed under them and write only when they must (issue 16: items
6, 8, 9, 10, 13 and status in 17), on a local Ray with the tiny synthetic dataset."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import record_failures

from seglab.pipeline.base.errors import StorageError
from seglab.pipeline.core.batcharrays import batch_id
from seglab.pipeline.core.ledger import done_units
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner, RunOptions
from seglab.pipeline.status import store_status

pytestmark = pytest.mark.usefixtures("ray_local")
UNITS = ["images__img00.png", "images__img01.png", "images__img02.png", "images__img03.png"]


def run(manifest: Path, **options):
    return Runner(load_manifest(manifest), RunOptions(**options)).run()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def status_of(manifest: Path) -> dict:
    return {s.stage: s for s in store_status(load_manifest(manifest))}


def test_a_batch_whose_arrays_are_gone_is_redone_by_the_stage_that_reads_it(tiny):
    assert run(tiny, only="ingest").ok
    store = Store(tiny.parent / "run.zarr")
    entries = store.entries("ingest")
    gone = entries[UNITS[1]].outputs["image"]
    in_batch = sum(e.outputs["image"].batch == gone.batch for e in entries.values())
    shutil.rmtree(tiny.parent / "run.zarr" / "ingest" / "image" / batch_id(gone.batch))
    report = {s.stage: s for s in run(tiny, only="embed").stages}
    assert not report["embed"].failures and {u for u, _ in report["embed"].invalidated} >= {UNITS[1]}
    again = {s.stage: s for s in run(tiny).stages}
    assert 1 <= in_batch < len(UNITS)
    assert again["ingest"].done_now == in_batch and again["embed"].done_now == in_batch  # that batch's units
    assert status_of(tiny)["embed"].complete


def test_status_counts_a_unit_done_only_when_its_upstream_unit_is(tiny):
    assert run(tiny, only="ingest").ok and run(tiny, only="embed").ok
    record_failures(Store(tiny.parent / "run.zarr"), "ingest", UNITS[1:])  # ingest lost 3 of 4 units
    rows = status_of(tiny)
    assert (rows["ingest"].done, rows["embed"].done, rows["embed"].blocked) == (1, 1, 3)
    assert not rows["embed"].complete


def test_a_damaged_commit_object_costs_its_batch_only_and_is_reported(tiny):
    assert run(tiny, only="ingest").ok
    root = tiny.parent / "run.zarr"
    first = sum(e.outputs["image"].batch == 0 for e in Store(root).entries("ingest").values())
    (root / "_records" / "ingest" / "b000000000000.parquet").write_bytes(b"PAR1 damaged")
    for part in (root / "_tables" / "ingest").iterdir():  # as if the driver had died before it folded
        part.unlink()
    report = run(tiny, only="ingest").stages[0]
    assert 1 <= first < len(UNITS) and report.already_done == len(UNITS) - first and report.done_now == first
    assert any("_records/ingest/b000000000000.parquet does not decode" in w for w in report.warnings)
    assert status_of(tiny)["ingest"].complete


def test_a_run_with_nothing_to_do_writes_nothing(tiny):
    assert run(tiny, only="ingest").ok
    before = snapshot(tiny.parent / "run.zarr")
    report = run(tiny, only="ingest")
    assert report.ok and report.work_done == 0
    assert snapshot(tiny.parent / "run.zarr") == before


def test_a_dry_run_writes_nothing_and_says_why(tiny):
    report = run(tiny, dry_run=True)
    assert not (tiny.parent / "run.zarr").exists()
    assert [s.why for s in report.stages[:2]] == [["4 new"], ["4 waiting on ingest"]]
    assert run(tiny, only="ingest").ok
    before = snapshot(tiny.parent / "run.zarr")
    report = run(tiny, dry_run=True, force=("ingest",))
    assert report.stages[0].todo == 4 and report.stages[0].why == ["4 forced"]
    assert report.stages[1].why == ["4 waiting on ingest"]
    assert snapshot(tiny.parent / "run.zarr") == before


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk (skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _store_on(manifest: Path, disk: Path) -> None:
    manifest.write_text(manifest.read_text().replace("path: run.zarr", f"path: {disk / 'run.zarr'}"))


def test_a_full_disk_stops_the_run_with_one_line_and_blames_no_unit(tiny, small_disk):
    _store_on(tiny, small_disk)
    assert run(tiny, only="ingest").ok
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "wb") as f:  # leave a few KiB: embed's first unit cannot be written
        f.write(b"\0" * (free - 8192))
    with pytest.raises(StorageError, match="no space left on the device; free some space"):
        run(tiny, only="embed")
    embed = Store(small_disk / "run.zarr").entries("embed")
    assert all(e.status == "done" for e in embed.values())  # ENOSPC is never a unit's failure
    (small_disk / "filler").unlink()
    report = run(tiny, only="embed")
    assert report.ok and report.stages[0].done_now + report.stages[0].already_done == 4


def test_a_read_only_store_runs_when_nothing_is_to_do_and_else_says_why_in_one_line(tiny, small_disk):
    _store_on(tiny, small_disk)
    assert run(tiny, only="ingest").ok
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert run(tiny, only="ingest").work_done == 0
    assert status_of(tiny)["ingest"].complete
    with pytest.raises(StorageError, match="cannot write here .*Read-only file system"):
        run(tiny, only="ingest", force=("ingest",))
    store = Store(small_disk / "run.zarr")
    assert done_units(store.entries("ingest"), store.stage_attrs("ingest")["signature_digest"]) == set(UNITS)


def test_force_names_each_file_it_kept_even_when_a_stage_is_cleared_through_two_names(tiny):
    assert run(tiny, only="ingest").ok
    (tiny.parent / "run.zarr" / "ingest" / "keep.txt").write_text("mine")
    report = run(tiny, only="ingest", force=("ingest", "ingest")).stages[0]
    assert report.done_now == 4 and (tiny.parent / "run.zarr" / "ingest" / "keep.txt").read_text() == "mine"
    assert any(w.startswith("--force kept 1 file(s) seglab did not write") and "keep.txt" in w for w in report.warnings)
