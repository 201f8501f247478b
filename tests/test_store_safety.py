"""What a store may touch (issue 16: items 1, 2, 5, 8): stage names only, its own files only,
one run at a time, and a damaged ledger line costs one unit, not the store. No Ray here."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import UsageError
from seglab.pipeline.core.store import Store, StoreError
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner, RunOptions
from seglab.pipeline.storelock import StoreBusy, StoreLock

cli = CliRunner()


@pytest.mark.parametrize(
    "flag, value", [("--force", ""), ("--force", "refin"), ("--from", "nope"), ("--only", "select/labels")]
)
def test_only_stage_names_of_the_dag_are_taken(tiny, flag, value):
    result = cli.invoke(app, ["run", str(tiny), flag, value])
    assert result.exit_code == 2, result.output
    assert "ingest, embed, prompts, select, refine" in result.output and "Traceback" not in result.output


def test_force_with_a_path_deletes_nothing(tiny, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    (tmp_path / "victim.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="is not a stage of this manifest"):
        Runner(load_manifest(tiny), RunOptions(force=(str(victim),)))
    assert (victim / "thesis.tex").read_text() == "years of work" and (tmp_path / "victim.jsonl").exists()


def test_a_folder_that_is_not_a_store_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "mine"
    (folder / "_ledger").mkdir(parents=True)
    (folder / "_ledger" / "select.jsonl").write_text("my notes\n")
    (folder / "select").mkdir()
    (folder / "select" / "keep.txt").write_text("keep")
    with pytest.raises(
        StoreError, match=r"mine: exists and is not a seglab store \(it holds _ledger/select.jsonl, select/keep.txt\)"
    ):
        Store(folder, create=True)
    assert (folder / "_ledger" / "select.jsonl").read_text() == "my notes\n"
    assert sorted(p.name for p in folder.iterdir()) == ["_ledger", "select"]
    with pytest.raises(StoreError, match="no seglab store here"):
        Store(folder)
    (tmp_path / "empty").mkdir()
    Store(tmp_path / "empty", create=True)  # an empty folder is fine
    assert Store(tmp_path / "empty").attrs["seglab_store"] == 2


def test_run_into_a_user_folder_is_refused_naming_it(tiny, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    result = cli.invoke(app, ["run", str(tiny), "--store", str(folder)])
    assert result.exit_code == 1 and "results: exists and is not a seglab store" in result.output
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_clearing_a_stage_removes_only_what_seglab_wrote(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.put_units("select", ["a"], [{"labels": np.ones((40, 40), np.uint8)}])
    root = tmp_path / "s.zarr"
    (root / "select" / "keep.txt").write_text("mine")
    (root / "select" / "labels" / "notes").mkdir()
    (root / "select" / "labels" / "notes" / "n.txt").write_text("mine")
    (root / "select" / "labels" / "b000000000000" / "extra").write_text("mine")  # in a batch, not zarr's
    (root / "_records" / "select" / "README").write_text("mine too")
    (root / "_records" / "select" / "b1.parquet").write_text("not a batch's name")
    left = store.clear_stage("select", ["labels"])
    assert sorted(left) == [
        "_records/select/README",
        "_records/select/b1.parquet",
        "select/keep.txt",
        "select/labels/b000000000000/extra",
        "select/labels/notes/n.txt",
    ]
    assert (root / "select" / "keep.txt").read_text() == "mine"
    assert not (root / "select" / "zarr.json").exists() and not (root / "select" / "labels" / "zarr.json").exists()
    assert not list((root / "select" / "labels" / "b000000000000").rglob("c"))
    assert store.entries("select") == {} and store.stages() == []
    for name in ("", "..", "/etc", "_records", "select/labels"):
        with pytest.raises(StoreError, match="is not a stage name"):
            store.clear_stage(name, ["labels"])


HOLDER = """
import sys, time
from seglab.pipeline.storelock import StoreLock
with StoreLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tiny, tmp_path):
    store = Store(tmp_path / "run.zarr", create=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusy, match=rf"another seglab run is using this store \(pid {holder.pid} on "):
            Runner(load_manifest(tiny)).run()  # work is left, so it needs the lock: refused before Ray starts
        assert store.objects.list("") == ["_run.lock", "zarr.json"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with StoreLock(store.path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.taken_over["pid"] == holder.pid
    with StoreLock(store.path) as lock:
        assert lock.taken_over is None  # released cleanly last time


def test_status_reports_a_damaged_commit_object_instead_of_crashing(tiny):
    path = tiny.parent / "run.zarr"
    store = Store(path, create=True)
    store.put_units("ingest", ["images__img00.png"], [{"image": np.ones((2, 2, 3), np.uint8)}])
    (path / "_records" / "ingest" / "b000000000001.parquet").write_bytes(b"PAR1 torn")
    result = cli.invoke(app, ["status", str(tiny)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "_records/ingest/b000000000001.parquet does not decode" in result.output


def test_the_lock_file_is_no_stage_and_is_emptied_on_release(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    with StoreLock(store.path):
        assert json.loads((tmp_path / "s.zarr" / "_run.lock").read_text())["pid"] == os.getpid()
        assert Store(store.path).stages() == []
    assert (tmp_path / "s.zarr" / "_run.lock").read_text() == ""


def _raised(make):
    try:
        make()
    except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
        return exc
    raise AssertionError("nothing raised")


def test_an_unreadable_image_is_its_units_failure_and_a_full_disk_the_stores():
    from seglab.pipeline.base.errors import InputError, os_error_cause
    from seglab.stages.base import Unit
    from seglab.workers.schedule import failure_of

    def unreadable():
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/data/a.png")
        except PermissionError:
            raise InputError("/data/a.png", "permission denied: the file is not readable by this user") from None

    def full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/store/embed/lab/u/c/0")
        except OSError as exc:
            raise RuntimeError("codec pipeline failed") from exc

    image, disk = (
        failure_of(Unit("a", "/data/a.png"), _raised(unreadable)),
        failure_of(Unit("u", "/x.png"), _raised(full)),
    )
    assert image.storage is None and image.message.startswith("/data/a.png: permission denied")
    assert disk.storage is not None and disk.storage.path == "/store/embed/lab/u/c/0"
    assert os_error_cause(_raised(full)).errno == errno.ENOSPC


@pytest.mark.parametrize("meta", ["[1]", '"group"', '{"node_type": "group", "attributes": []}', "\xff"])
def test_a_folder_whose_zarr_json_is_not_seglabs_is_refused_without_a_crash(tmp_path, meta):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "zarr.json").write_bytes(meta.encode("latin-1"))
    with pytest.raises(StoreError, match="f: exists and is not a seglab store"):
        Store(folder, create=True)
    assert (folder / "zarr.json").read_bytes() == meta.encode("latin-1")
