"""The sharded store: made only where nothing is, earlier layouts refused in one line, the
unit index kept, batches written, read back and collected once nothing refers to them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from seglab.pipeline.core.batcharrays import (
    BatchDamaged,
    batch_id,
    output_rows,
    read_commit,
    read_rows,
    write_batch_arrays,
)
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.shardstore import ShardStore, ShardStoreError, store_layout
from seglab.pipeline.core.stagerecords import failure_records
from seglab.pipeline.core.stagetable import DONE, FAILED, SOURCE
from seglab.pipeline.core.unitindex import digests_to_numpy

SIGNATURE = bytes([3] * 32)


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run.zarr")
    return request.getfixturevalue("s3_bucket") + "/run.zarr"


def _columns(uids: list[int]) -> pa.Table:
    n = len(uids)
    return pa.table(
        {
            "uid": pa.array(uids, pa.int64()),
            "state": pa.array([DONE] * n, pa.int8()),
            "signature": pa.array([SIGNATURE] * n, pa.binary(32)),
            "fitted": pa.array([bytes(32)] * n, pa.binary(32)),
            "from_source": pa.array([bytes(32)] * n, pa.binary(32)),
            "seconds": pa.array([0.0] * n, pa.float32()),
            "error": pa.array([None] * n, pa.string()),
        }
    )


def test_a_store_is_made_only_where_nothing_is(location, tmp_path):
    store = ShardStore(location, create=True, attrs={"seglab_version": "x"})
    assert store.attrs["seglab_store"] == 2 and store_layout(store.objects) == 2
    assert ShardStore(location).attrs["seglab_version"] == "x", "reopened, not made again"
    occupied = Objects(location.replace("run.zarr", "user-data"))
    occupied.put("photos/a.jpg", b"mine")
    with pytest.raises(ShardStoreError, match=r"holds photos/a.jpg and is not a seglab store"):
        ShardStore(str(occupied), create=True)
    assert occupied.get("photos/a.jpg") == b"mine" and occupied.list("") == ["photos/a.jpg"]
    with pytest.raises(ShardStoreError, match="no seglab store here"):
        ShardStore(location.replace("run.zarr", "nothing"))


def test_a_store_of_the_earlier_layout_is_refused_in_one_line(location):
    objects = Objects(location)
    earlier = {"zarr_format": 3, "node_type": "group", "attributes": {"seglab_store": 1, "seglab_version": "0.9"}}
    objects.put("zarr.json", json.dumps(earlier).encode())
    for create in (False, True):
        with pytest.raises(ShardStoreError, match=r"earlier seglab \(layout 1.*run into a new store.path") as raised:
            ShardStore(location, create=create)
        assert "\n" not in str(raised.value)
    assert json.loads(objects.get("zarr.json") or b"") == earlier, "left as it was"


def test_the_unit_index_is_kept_with_its_shard_size(location):
    store = ShardStore(location, create=True)
    index, _ = store.index(shard_size=2).update(
        pa.array(["a", "b", "c"]), pa.array(["a.png", "b.png", "c.png"]), np.zeros((3, 32), np.uint8)
    )
    store.save_index(index)
    again, update = store.index(shard_size=64).update(
        pa.array(["c", "d"]), pa.array(["c.png", "d.png"]), np.ones((2, 32), np.uint8)
    )
    assert again.shard_size == 2, "the stored shard size holds"
    assert update.added.tolist() == [3] and update.changed.tolist() == [2]
    store.save_index(again)
    reread = store.index(shard_size=64)
    assert reread.table.column("unit").to_pylist() == ["a", "b", "c", "d"]
    assert reread.shards.tolist() == [0, 0, 1, 2]
    sources = digests_to_numpy(reread.table.column("source"))
    assert sources[:, 0].tolist() == [0, 0, 1, 1], "c's changed source recorded, d's kept"
    assert len(store.objects.list("_index")) == 1, "older index parts removed"


def test_batches_read_back_and_go_once_nothing_refers_to_them(location):
    store = ShardStore(location, create=True)
    outputs = ["labels"]
    first = [{"labels": np.full((30, 40), u, np.uint8)} for u in (0, 1)]
    store.write_batch("refine", batch_id(0), first, _columns([0, 1]))
    with pytest.raises(ShardStoreError, match="committed already"):
        store.write_batch("refine", batch_id(0), first, _columns([0, 1]))
    store.commit_failures("refine", batch_id(1), failure_records([1], ["broke"], SIGNATURE, bytes(32), [SOURCE]))
    write_batch_arrays(store.objects, "refine", batch_id(2), first)  # a writer killed before its commit
    with pytest.raises(ShardStoreError, match="holds arrays of an earlier writer"):
        store.write_batch("refine", batch_id(2), first, _columns([0, 1]))
    state = store.fold("refine", [SOURCE])
    assert state.dense(2).state.tolist() == [DONE, FAILED]
    assert [a.tolist() for a in read(store, "refine", "labels", 0, [0])] == [np.zeros((30, 40)).tolist()]
    assert store.collect_garbage("refine", outputs, state) == 1, "only the uncommitted batch goes"
    assert not store.objects.list("refine/labels/b000000000002")
    store.write_batch("refine", batch_id(2), [{"labels": np.full((30, 40), 9, np.uint8)}] * 2, _columns([0, 1]))
    state = store.fold("refine", [SOURCE])
    assert store.collect_garbage("refine", outputs, state) == 2, "batch 0 and the failure batch 1 are superseded"
    assert store.objects.list("_records/refine") == ["_records/refine/b000000000002.parquet"]
    assert not store.objects.list("refine/labels/b000000000000")
    assert read(store, "refine", "labels", 2, [1])[0].max() == 9


def test_a_damaged_batch_is_named_when_read(location):
    store = ShardStore(location, create=True)
    store.write_batch(
        "select", batch_id(0), [{"labels": np.arange(1200, dtype=np.int32).reshape(30, 40)}], _columns([0])
    )
    chunk = next(k for k in store.objects.list("select/labels/b000000000000") if "/c/" in k)
    data = bytearray(store.objects.get(chunk) or b"")
    data[4] ^= 0x55
    store.objects.put(chunk, bytes(data))
    with pytest.raises(BatchDamaged, match=r"select/labels/b000000000000: rows \[0\]"):
        read(store, "select", "labels", 0, [0])


def read(store: ShardStore, stage: str, output: str, batch: int, rows: list[int]) -> list[np.ndarray]:
    """The units at ``rows`` of a committed batch's output, checked against its commit object."""
    name = batch_id(batch)
    table = read_commit(store.objects, stage, name)
    if table is None:
        raise ShardStoreError(f"batch {stage}/{name} has no commit object")
    return read_rows(store.objects, stage, output, name, rows, output_rows(table, output))
