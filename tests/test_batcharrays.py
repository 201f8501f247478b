"""Batches of outputs as one sharded Zarr array per output: padding cut back out on
read, one object per array, commit objects that make a batch visible, and damage found."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import zarr

from seglab.pipeline.base import fingerprint
from seglab.pipeline.core.batcharrays import (
    BatchDamaged,
    array_path,
    batch_id,
    batch_keys,
    commit_batch,
    output_rows,
    read_commit,
    read_rows,
    records_key,
    records_table,
    stack_padded,
    units_per_chunk,
    write_batch_arrays,
)
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import Store


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path) -> Objects:
    if request.param == "local":
        return Objects(str(tmp_path / "store"))
    return Objects(request.getfixturevalue("s3_bucket") + "/store")


def _units(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = [(60, 80), (72, 64), (50, 90)]
    return [
        {
            "labels": rng.integers(0, 3, hw, dtype=np.uint8),
            "probabilities": rng.random((3, *hw), dtype=np.float32),
            "coords": rng.random((k, 2)).astype(np.float32),
        }
        for hw, k in zip(shapes, (4, 0, 7))
    ]


def _commit(objects: Objects, stage: str, batch: str, records, uids: list[int]) -> bool:
    """Commit a written batch whose only own column is ``uid``."""
    return commit_batch(objects, stage, batch, records_table(records, pa.table({"uid": pa.array(uids, pa.int64())})))


def test_a_batch_reads_back_exactly_with_its_padding_cut_away(objects):
    units = _units()
    batch = batch_id(7)
    assert _commit(objects, "select", batch, write_batch_arrays(objects, "select", batch, units), [10, 11, 12])
    committed = read_commit(objects, "select", batch)
    assert committed is not None and committed.column("uid").to_pylist() == [10, 11, 12]
    for name in ("labels", "probabilities", "coords"):
        rows = output_rows(committed, name)
        assert rows.shapes == tuple(u[name].shape for u in units)
        for row in ([0, 1, 2], [1], [2, 0]):
            values = read_rows(objects, "select", name, batch, row, rows)
            for got, r in zip(values, row):
                np.testing.assert_array_equal(got, units[r][name])
                assert got.dtype == units[r][name].dtype
    array = zarr.open_array(objects.zarr_store(read_only=True), path=array_path("select", "labels", batch), mode="r")
    assert array.shape == (3, 72, 90), "padded to the largest unit of the batch"
    keys = batch_keys(objects, "select", ["labels", "probabilities", "coords"], batch)
    chunk_objects = [k for k in keys if "/c/" in k]
    assert len(chunk_objects) == 2, f"one object per output array: {chunk_objects}"
    assert not any("/coords/" in k for k in keys) and "coords.bytes" in committed.column_names  # small: inline


def test_a_read_checks_each_unit_by_its_recorded_crc32c_and_hashes_nothing(objects, monkeypatch):
    """Re-hashing every unit read with SHA-256 was most of a reader's own cost: a read checks
    the CRC32C its commit object records, and a unit whose bytes differ from it is found."""
    units = _units()
    batch = batch_id(2)
    assert _commit(objects, "select", batch, write_batch_arrays(objects, "select", batch, units), [0, 1, 2])
    committed = read_commit(objects, "select", batch)
    for name in ("labels", "probabilities", "coords"):
        assert committed.column(f"{name}.crc32c").to_pylist() == [fingerprint.array_crc32c(u[name]) for u in units]
    rows = {name: output_rows(committed, name) for name in ("labels", "probabilities", "coords")}
    monkeypatch.setattr(fingerprint.hashlib, "sha256", lambda *a: pytest.fail("a read re-hashed a unit with SHA-256"))
    for name, records in rows.items():
        for got, unit in zip(read_rows(objects, "select", name, batch, [0, 1, 2], records), units):
            np.testing.assert_array_equal(got, unit[name])
    # the array's chunk decodes (its own CRC holds) but unit 1's bytes are not those recorded
    labels = zarr.open_array(objects.zarr_store(), path=array_path("select", "labels", batch), mode="r+")
    labels[1, 0, 0] = (units[1]["labels"][0, 0] + 1) % 3
    with pytest.raises(BatchDamaged, match="differs from the checksum") as raised:
        read_rows(objects, "select", "labels", batch, [0, 1, 2], rows["labels"])
    assert raised.value.rows == [1]


def test_a_commit_object_without_crc32c_columns_is_checked_by_sha256(objects):
    """A batch an earlier seglab committed records no CRC32C: its units are re-hashed."""
    units = _units()
    batch = batch_id(3)
    records = write_batch_arrays(objects, "select", batch, units)
    table = records_table(records, pa.table({"uid": pa.array([0, 1, 2], pa.int64())}))
    older = table.drop_columns([c for c in table.column_names if c.endswith(".crc32c")])
    assert commit_batch(objects, "select", batch, older)
    rows = output_rows(read_commit(objects, "select", batch), "probabilities")
    assert rows.crc32c is None
    got = read_rows(objects, "select", "probabilities", batch, [2], rows)
    np.testing.assert_array_equal(got[0], units[2]["probabilities"])
    other = replace(rows, sha256=np.roll(rows.sha256, 1, axis=0))  # each row's hash is another unit's
    with pytest.raises(BatchDamaged, match="differs from the checksum") as raised:
        read_rows(objects, "select", "probabilities", batch, [0, 2], other)
    assert raised.value.rows == [0, 2]


def test_a_small_output_lives_in_the_commit_object_and_a_changed_byte_is_found(objects):
    units = [{"coords": np.arange(6, dtype=np.float32).reshape(3, 2) + k} for k in range(3)] + [
        {"coords": np.zeros((0, 2), np.float32)}
    ]
    batch = batch_id(4)
    assert _commit(objects, "prompts", batch, write_batch_arrays(objects, "prompts", batch, units), [0, 1, 2, 3])
    assert batch_keys(objects, "prompts", ["coords"], batch) == [records_key("prompts", batch)]
    rows = output_rows(read_commit(objects, "prompts", batch), "coords")
    got = read_rows(objects, "prompts", "coords", batch, [3, 1], rows)
    assert got[0].shape == (0, 2) and got[1].dtype == np.float32
    np.testing.assert_array_equal(got[1], units[1]["coords"])
    flipped = bytearray(rows.inline[1])
    flipped[0] ^= 0x01
    damaged = replace(rows, inline=(rows.inline[0], bytes(flipped), *rows.inline[2:]))
    with pytest.raises(BatchDamaged) as raised:
        read_rows(objects, "prompts", "coords", batch, [0, 1, 2], damaged)
    assert raised.value.rows == [1]
    cut = replace(rows, inline=(rows.inline[0][:-1], *rows.inline[1:]))
    with pytest.raises(BatchDamaged, match="differs from the checksum"):
        read_rows(objects, "prompts", "coords", batch, [0], cut)


def test_a_second_commit_of_a_batch_is_refused_and_changes_nothing(objects):
    units = _units()
    batch = batch_id(1)
    records = write_batch_arrays(objects, "prompts", batch, units)
    assert _commit(objects, "prompts", batch, records, [0, 1, 2])
    assert not _commit(objects, "prompts", batch, records, [5, 6, 7])
    committed = read_commit(objects, "prompts", batch)
    assert committed is not None and committed.column("uid").to_pylist() == [0, 1, 2]


def test_an_uncommitted_batch_is_invisible(objects):
    write_batch_arrays(objects, "ingest", batch_id(3), _units())
    assert read_commit(objects, "ingest", batch_id(3)) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damage_to_a_stored_batch_is_found_per_row(objects, damage):
    units = _units(1)
    batch = batch_id(2)
    records = write_batch_arrays(objects, "refine", batch, units)
    rows = records["labels"]
    chunk = next(k for k in batch_keys(objects, "refine", ["labels"], batch) if "/c/" in k)
    data = bytearray(objects.get(chunk) or b"")
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
        objects.put(chunk, bytes(data))
    elif damage == "truncate":
        objects.put(chunk, bytes(data[: len(data) // 2]))
    else:  # another batch's valid array in its place: decodes, but is not what was recorded
        other = _units(2)
        write_batch_arrays(objects, "refine", batch_id(9), other)
        other_chunk = next(k for k in batch_keys(objects, "refine", ["labels"], batch_id(9)) if "/c/" in k)
        objects.put(chunk, objects.get(other_chunk) or b"")
    with pytest.raises(BatchDamaged) as raised:
        read_rows(objects, "refine", "labels", batch, [0, 1, 2], rows)
    assert raised.value.rows, "the rows at fault are named"


def test_stacking_refuses_units_that_disagree_on_an_outputs_kind():
    with pytest.raises(ValueError, match="output 'labels' differs"):
        stack_padded([np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.int32)], "labels")
    padded = stack_padded([np.ones((1, 3), np.int16), np.ones((2, 1), np.int16)], "x")
    assert padded.shape == (2, 2, 3) and padded.sum() == 5


def test_inner_chunks_hold_whole_units_up_to_a_size_and_read_back(objects):
    small = np.zeros((5, 96, 128), np.uint8)
    large = np.zeros((5, 3, 640, 640), np.float32)  # 4.9 MB per unit
    assert units_per_chunk(small) == 5 and units_per_chunk(large) == 1
    assert units_per_chunk(np.zeros((400, 1024, 1024), np.uint8)) == 4
    rng = np.random.default_rng(3)
    units = [{"big": rng.random((2, 700, 800), dtype=np.float32)} for _ in range(3)]
    records = write_batch_arrays(objects, "embed", batch_id(0), units)
    array = zarr.open_array(objects.zarr_store(read_only=True), path=array_path("embed", "big", batch_id(0)), mode="r")
    assert array.metadata.codecs[0].chunk_shape == (1, 2, 700, 800)
    got = read_rows(objects, "embed", "big", batch_id(0), [2], records["big"])
    np.testing.assert_array_equal(got[0], units[2]["big"])


def test_writing_a_batch_hashes_each_output_array_once(tmp_path, monkeypatch):
    """The commit object's per-output sha256 and each unit's ``outputs`` digest come from
    one pass over the arrays: hashing is a large part of a worker's own cost per unit."""
    hashed = []
    sha256 = hashlib.sha256

    class CountingSha256:
        def __init__(self, data=b""):
            self._h = sha256(data)
            hashed.append(memoryview(data).nbytes)

        def update(self, data):
            hashed.append(memoryview(data).nbytes)
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(fingerprint.hashlib, "sha256", CountingSha256)
    units = _units()
    store = Store(str(tmp_path / "store"), create=True)
    store.put_units("select", ["a", "b", "c"], units)
    array_bytes = sum(a.nbytes for unit in units for a in unit.values())
    assert array_bytes <= sum(hashed) < array_bytes + 4096
    monkeypatch.undo()
    recorded = store.entries("select")["b"].outputs
    assert {name: record.sha256 for name, record in recorded.items()} == {
        name: fingerprint.array_sha256(array) for name, array in units[1].items()
    }


def test_a_commit_table_refuses_rows_that_do_not_match_and_an_outputs_column_of_its_own(objects):
    records = write_batch_arrays(objects, "select", batch_id(5), _units())
    for uids in ([0, 1], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match=f"output 'labels' has 3 rows, the batch {len(uids)}"):
            records_table(records, pa.table({"uid": pa.array(uids, pa.int64())}))
    given = pa.table({"uid": pa.array([0, 1, 2], pa.int64()), "outputs": pa.array([bytes(32)] * 3, pa.binary(32))})
    with pytest.raises(ValueError, match="'outputs' column is made from its arrays' hashes"):
        records_table(records, given)
