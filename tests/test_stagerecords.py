"""A stage's state from batch commit objects and folded table parts: the last record of a
unit wins, folding changes nothing a planner sees, a kill mid-fold loses nothing, and
planning runs on what was loaded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from seglab.pipeline.core.batcharrays import batch_id, commit_batch, records_table, write_batch_arrays
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.stagerecords import TABLES, failure_records, fold_stage, last_rows, load_stage
from seglab.pipeline.core.stagetable import DONE, FAILED, PARENT_COLUMNS, SOURCE, own_columns, stage_schema
from seglab.pipeline.shardplan import plan_stage

SIGNATURE = bytes([5] * 32)
INPUTS = [SOURCE]


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path) -> Objects:
    if request.param == "local":
        return Objects(str(tmp_path / "store"))
    return Objects(request.getfixturevalue("s3_bucket") + "/store")


def _done(objects: Objects, seq: int, uids: list[int], source: int) -> None:
    """A committed batch of ``uids`` made from source digest bytes([source] * 32)."""
    units = [{"labels": np.full((4, 5), uid, np.uint8)} for uid in uids]
    records = write_batch_arrays(objects, "ingest", batch_id(seq), units)
    digest = pa.array([bytes([source] * 32)] * len(uids), pa.binary(32))
    columns = pa.table(
        {
            "uid": pa.array(uids, pa.int64()),
            "state": pa.array([DONE] * len(uids), pa.int8()),
            "signature": pa.array([SIGNATURE] * len(uids), pa.binary(32)),
            "fitted": pa.array([bytes(32)] * len(uids), pa.binary(32)),
            "from_source": digest,
            "seconds": pa.array([0.01] * len(uids), pa.float32()),
            "error": pa.array([None] * len(uids), pa.string()),
        }
    )
    assert commit_batch(objects, "ingest", batch_id(seq), records_table(records, columns))


def _fail(objects: Objects, seq: int, uids: list[int]) -> None:
    table = failure_records(uids, [f"unit {u} broke" for u in uids], SIGNATURE, bytes(32), INPUTS)
    assert commit_batch(objects, "ingest", batch_id(seq), table)


def test_the_last_record_of_a_unit_wins_and_locates_its_outputs(objects):
    _done(objects, 0, [0, 1, 2], source=1)
    _fail(objects, 1, [1, 3])
    _done(objects, 2, [3], source=1)
    state = load_stage(objects, "ingest", INPUTS)
    dense = state.dense(5)
    assert dense.state.tolist() == [DONE, FAILED, DONE, DONE, 0]
    assert dense.batch.tolist() == [0, 1, 0, 2, -1] and dense.row.tolist() == [0, -1, 2, 0, -1]
    assert state.table.column("error").to_pylist() == [None, "unit 1 broke", None, None]
    assert (state.folded, state.unfolded, state.next_batch) == (-1, 3, 3)


def test_folding_changes_nothing_a_reader_sees_and_reads_one_part_after(objects):
    _done(objects, 0, [0, 1], source=1)
    _fail(objects, 1, [0])
    before = load_stage(objects, "ingest", INPUTS)
    folded = fold_stage(objects, "ingest", INPUTS)
    assert (folded.folded, folded.unfolded) == (1, 0)
    after = load_stage(objects, "ingest", INPUTS)
    assert after.table.equals(before.table) and (after.folded, after.unfolded, after.next_batch) == (1, 0, 2)
    _done(objects, 2, [0], source=1)  # records after the fold count on top of the part
    fold_stage(objects, "ingest", INPUTS)
    assert [k.rsplit("/", 1)[1] for k in objects.list(f"{TABLES}/ingest")] == ["t000000000002.parquet"]
    again = load_stage(objects, "ingest", INPUTS)
    assert again.dense(3).state.tolist() == [DONE, DONE, 0] and again.dense(3).batch.tolist() == [2, 0, -1]


def test_a_kill_between_writing_a_part_and_removing_the_old_one_reads_the_same(objects):
    _done(objects, 0, [0, 1], source=1)
    fold_stage(objects, "ingest", INPUTS)
    old_part = objects.get(f"{TABLES}/ingest/t000000000000.parquet")
    _fail(objects, 1, [1])
    fold_stage(objects, "ingest", INPUTS)
    objects.put(f"{TABLES}/ingest/t000000000000.parquet", old_part or b"")  # as if the removal never ran
    state = load_stage(objects, "ingest", INPUTS)
    assert state.dense(2).state.tolist() == [DONE, FAILED] and state.folded == 1


def test_a_stage_plans_from_its_loaded_records(objects):
    _done(objects, 0, [0, 1, 2, 3], source=1)
    _fail(objects, 1, [2])
    state = load_stage(objects, "ingest", INPUTS)
    sources = np.ones((6, 32), np.uint8)
    sources[1] = 9  # unit 1's file changed since
    plan = plan_stage(
        state.dense(6),
        {SOURCE: sources},
        current=np.ones(6, bool),
        shards=np.array([0, 0, 1, 1, 2, 2], np.int32),
        signature=SIGNATURE,
    )
    assert plan.todo.tolist() == [1, 2, 4, 5] and plan.shards.tolist() == [0, 1, 2]
    assert plan.reasons == {"new": 2, "failed before": 1, "with changed inputs": 1}


def test_a_plan_reads_only_the_columns_it_compares_and_a_folded_part_is_not_copied(objects):
    _done(objects, 0, [0, 1, 2], source=1)
    _fail(objects, 1, [1])
    fold_stage(objects, "ingest", INPUTS)
    parent = load_stage(objects, "ingest", INPUTS, PARENT_COLUMNS)
    assert parent.table.column_names == ["uid", "state", "outputs", "batch", "row"]
    dense = parent.dense(3)
    assert dense.state.tolist() == [DONE, FAILED, DONE] and dense.column("outputs").shape == (3, 32)
    assert dense.batch.tolist() == [0, 1, 0] and dense.signature is None and dense.inputs == {}
    with pytest.raises(ValueError, match="without their 'signature' column"):
        dense.column("signature")
    with pytest.raises(ValueError, match="without their 'from_source' column"):
        dense.made_from(SOURCE)
    own = load_stage(objects, "ingest", INPUTS, own_columns(INPUTS))
    assert own.table.column_names == ["uid", "state", "signature", "fitted", "from_source", "batch", "row"]
    assert own.dense(3).made_from(SOURCE)[:, 0].tolist() == [1, 0, 1]  # a failure records zeros
    with pytest.raises(ValueError, match="no column"):
        load_stage(objects, "ingest", INPUTS, ["from_embed"])


def _part(uids: list[int], batch: int) -> pa.Table:
    return (
        pa.table({"uid": pa.array(uids, pa.int64()), "state": pa.array([DONE] * len(uids), pa.int8())})
        .append_column("batch", pa.array([batch] * len(uids), pa.int64()))
        .append_column("row", pa.array(range(len(uids)), pa.int32()))
    )


def _same_buffer(a: pa.Array, b: pa.Array) -> bool:
    """Whether two arrays' values are the same memory (not a copy)."""
    return a.buffers()[1].address == b.buffers()[1].address


def test_parts_in_uid_order_are_their_own_last_rows_and_others_are_reordered():
    """A folded part, and a first run's batches (numbered as handed out), hold one row per uid
    in uid order end to end: taking their last rows would copy them all. Parts that repeat a
    uid or go back keep each uid's last row, in uid order."""
    short = pa.schema([stage_schema(INPUTS).field("uid"), stage_schema(INPUTS).field("state")])
    folded, first, second = _part([0, 2, 5], 0), _part([6, 7], 1), _part([9], 2)
    kept = last_rows([folded], short)
    assert _same_buffer(kept.column("uid").chunk(0), folded.column("uid").chunk(0))
    batches = last_rows([folded, first, second], short)
    assert batches.column("uid").to_pylist() == [0, 2, 5, 6, 7, 9]
    for got, given in zip(batches.column("uid").chunks, [folded, first, second]):
        assert _same_buffer(got, given.column("uid").chunk(0))
    redone = last_rows([folded, first, _part([2, 6], 3)], short)
    assert redone.column("uid").to_pylist() == [0, 2, 5, 6, 7]
    assert redone.column("batch").to_pylist() == [0, 3, 0, 3, 1]
    repeated = pa.concat_tables([folded, folded.slice(0, 1)])
    assert last_rows([repeated], short).column("uid").to_pylist() == [0, 2, 5]
