"""The store as seglab's features see it: stages, attributes, units' records and arrays."""

import json

import numpy as np
import pytest

from seglab.pipeline.base.fingerprint import array_sha256, diff_signatures, stage_signature
from seglab.pipeline.core.ledger import Failure, Receipt
from seglab.pipeline.core.store import CorruptOutput, Store, StoreError, store_exists


def test_units_of_different_shapes_round_trip(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True, attrs={"seglab_version": "x"})
    arrays = {
        "a": {"image": np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3), "pts": np.zeros((0, 4), np.float32)},
        "b": {"image": np.ones((33, 17, 3), np.uint8), "pts": np.ones((5, 4), np.float32)},
    }
    receipts = {r.unit: r for r in store.put_units("ingest", list(arrays), list(arrays.values()))}
    again = Store(tmp_path / "s.zarr")
    for unit, outs in arrays.items():
        got = again.read_unit(["ingest/image", "ingest/pts"], unit)
        for name, value in outs.items():
            np.testing.assert_array_equal(got[f"ingest/{name}"], value)
            assert got[f"ingest/{name}"].dtype == value.dtype
            assert receipts[unit].outputs[name].sha256 == array_sha256(value)
    assert again.stages() == ["ingest"] and again.attrs["seglab_version"] == "x"
    entries = again.entries("ingest")
    assert set(entries) == {"a", "b"} and all(isinstance(e, Receipt) for e in entries.values())
    assert entries["b"].outputs["image"].shape == (33, 17, 3)


def test_units_not_done_are_named_and_damaged_arrays_are_corrupt(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    (receipt,) = store.put_units("select", ["u1"], [{"labels": np.zeros((40, 40), np.uint8)}])
    with pytest.raises(StoreError, match="'select/labels' of u2 is missing"):
        store.read_unit(["select/labels"], "u2")
    record = receipt.outputs["labels"]
    chunk = next(p for p in (tmp_path / "s.zarr" / "select" / "labels").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"\0\0\0")  # a flipped tail fails the chunk's CRC32C
    with pytest.raises(CorruptOutput, match="select/labels of u1"):
        Store(tmp_path / "s.zarr").read_recorded("select/labels", "u1", record)


def test_a_record_that_differs_from_the_commit_object_is_corrupt(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    (receipt,) = store.put_units("select", ["u1"], [{"labels": np.ones((4, 4), np.uint8)}])
    forged = type(receipt.outputs["labels"])("0" * 64, (4, 4), "|u1", receipt.outputs["labels"].batch, 0)
    with pytest.raises(CorruptOutput):
        store.read_recorded("select/labels", "u1", forged)


def test_opening_a_location_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no seglab store here"):
        Store(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a seglab store"):
        Store(tmp_path, create=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert store_exists(tmp_path / "nothing-here") is False


def test_a_store_of_the_earlier_layout_is_refused_in_one_line(tmp_path):
    old = tmp_path / "old.zarr"
    old.mkdir()
    (old / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"seglab_store": 1}})
    )
    for opening in (lambda: Store(old), lambda: Store(old, create=True), lambda: store_exists(old)):
        with pytest.raises(StoreError, match="earlier seglab.*run into a new store.path") as info:
            opening()
        assert "\n" not in str(info.value)


def test_clear_stage_removes_what_seglab_wrote_and_keeps_the_rest(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.put_units("embed", ["a"], [{"f": np.ones((40, 40))}])
    store.put_units("ingest", ["a"], [{"image": np.ones((2, 2, 3), np.uint8)}])
    store.set_stage_attrs("embed", signature={"v": 1})
    mine = tmp_path / "s.zarr" / "embed" / "f" / "notes.txt"
    mine.write_text("a user's file")
    left = store.clear_stage("embed", ["f"])
    assert left == ["embed/f/notes.txt"] and mine.read_text() == "a user's file"
    assert store.stages() == ["ingest"] and store.entries("embed") == {} and store.stage_attrs("embed") == {}
    assert not [k for k in store.objects.list("") if k.startswith("_records/embed")]
    assert set(store.entries("ingest")) == {"a"}


def test_checkpoint_files_go_with_their_stage_and_nothing_else_in_their_folder_does(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    prefix = store.checkpoint_prefix("retrain")
    old, new = "0123456789abcdef", "fedcba9876543210"
    written = [f"{old}/epoch-0001.pt", f"{new}/epoch-0002.pt"]
    foreign = [f"{new}/notes.txt", "not-a-key/epoch-0001.pt", "epoch-0009.pt"]
    for rest in written + foreign:
        store.objects.put(f"{prefix}/{rest}", b"x")
    staged = tmp_path / "s.zarr" / prefix / new / "epoch-0003.pt#4"  # what a writer killed mid-put leaves
    staged.write_bytes(b"x")
    assert store.checkpoint_location("retrain", new) == str(tmp_path / "s.zarr" / prefix / new)
    store.remove_other_checkpoints("retrain", keep=new)
    assert not (tmp_path / "s.zarr" / prefix / old).exists()  # its folder went with its only file
    assert store.objects.exists(f"{prefix}/{new}/epoch-0002.pt")
    left = store.clear_stage("retrain", [])
    assert sorted(left) == sorted(f"{prefix}/{rest}" for rest in foreign)
    assert sorted(store.objects.list(prefix)) == sorted(f"{prefix}/{rest}" for rest in foreign)
    assert not staged.exists()


def test_removing_a_store_leaves_only_files_it_did_not_write(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.put_units("ingest", ["a", "b"], [{"image": np.ones((2, 2, 3), np.uint8)}] * 2)
    (tmp_path / "s.zarr" / "README").write_text("keep me")
    assert store.remove() == []
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir()) == ["README"]


def test_failures_read_back_with_their_message_and_image(tmp_path):
    from seglab.pipeline.core.batcharrays import batch_id
    from seglab.pipeline.core.stagerecords import failure_records

    store = Store(tmp_path / "s.zarr", create=True)
    store.put_units("ingest", ["a", "b"], [{"image": np.ones((2, 2, 3), np.uint8)}] * 2)
    store.shards.commit_failures(
        "ingest",
        batch_id(store.state("ingest").next_batch),
        failure_records([1], ["b broke"], bytes(32), bytes(32), ["source"]),
    )
    store.refresh()
    entries = store.entries("ingest")
    assert isinstance(entries["a"], Receipt)
    assert isinstance(entries["b"], Failure) and entries["b"].message == "b broke" and entries["b"].source == "b"


def test_signature_diff_names_the_changed_key():
    old = stage_signature(version=1, config={"tau": 0.3, "n": 5}, model={"checkpoint": "aa"}, upstream={"embed": "1"})
    new = stage_signature(version=2, config={"tau": 0.4, "n": 5}, model={"checkpoint": "bb"}, upstream={"embed": "2"})
    changes = diff_signatures(old, new)
    assert "config.tau: 0.3 -> 0.4" in changes
    assert "version: 1 -> 2" in changes
    assert "model.checkpoint: 'aa' -> 'bb'" in changes
    assert any(c.startswith("upstream stage embed") for c in changes)
    assert diff_signatures(old, old) == []
