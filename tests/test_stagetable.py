"""A stage's record table: parts appended over time, the last row of a unit wins."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seglab.pipeline.core.stagetable import DONE, FAILED, DenseStage, parquet_bytes, parquet_table, stage_schema
from seglab.pipeline.core.unitindex import numpy_to_digests


def test_a_units_last_row_wins_across_parts():
    schema = stage_schema(["source"])

    def part(uid, state, fill):
        n = len(uid)
        digest = numpy_to_digests(np.full((n, 32), fill, np.uint8))
        return pa.table(
            {
                "uid": pa.array(uid, pa.int64()),
                "state": pa.array(state, pa.int8()),
                "signature": digest,
                "fitted": digest,
                "outputs": digest,
                "from_source": digest,
                "seconds": pa.array([0.0] * n, pa.float32()),
                "error": pa.array([None] * n, pa.string()),
            },
            schema=schema,
        )

    parts = [part([0, 2, 1, 1], [FAILED, DONE, DONE, FAILED], 1), part([0], [DONE], 7)]
    dense = DenseStage.from_parts(parts, 4, ["source"])
    assert dense.state.tolist() == [DONE, FAILED, DONE, 0]  # within a part too, the later row wins
    assert dense.outputs[:, 0].tolist() == [7, 1, 1, 0]
    with pytest.raises(ValueError, match="beyond the 2 units"):
        DenseStage.from_parts([part([0, 2], [DONE, DONE], 1)], 2, ["source"])


def test_only_columns_that_repeat_are_dictionary_encoded():
    """Settings digests repeat on every row; data digests never do, and a dictionary tried
    for them costs the writer memory for nothing."""
    n = 300
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "uid": pa.array(np.arange(n), pa.int64()),
            "state": pa.array([DONE] * n, pa.int8()),
            "signature": numpy_to_digests(np.full((n, 32), 5, np.uint8)),
            "outputs": numpy_to_digests(rng.integers(0, 256, (n, 32), dtype=np.uint8)),
        }
    )
    data = parquet_bytes(table)
    assert isinstance(data, memoryview)  # the buffer written into, not a copy of it
    assert parquet_table(data).equals(table)
    chunks = pq.read_metadata(pa.BufferReader(data)).row_group(0)
    encodings = {chunks.column(i).path_in_schema: chunks.column(i).encodings for i in range(chunks.num_columns)}
    assert "RLE_DICTIONARY" in encodings["signature"] and "RLE_DICTIONARY" in encodings["state"]
    assert "RLE_DICTIONARY" not in encodings["outputs"] and "RLE_DICTIONARY" not in encodings["uid"]
