"""The persistent unit index: stable uids and shards as images come, change and go."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from seglab.pipeline.core.unitindex import UnitIndex, digests_to_numpy, numpy_to_digests

RNG = np.random.default_rng(0)


def enumerate_(names, sources):
    ids = pa.array(names)
    return ids, ids, sources


def test_new_images_go_to_new_shards_and_nothing_known_moves():
    first = RNG.integers(0, 256, (7, 32), dtype=np.uint8)
    index, update = UnitIndex.empty(3).update(*enumerate_([f"u{i}" for i in range(7)], first))
    assert index.table.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert index.table.column("slot").to_pylist() == [0, 1, 2, 0, 1, 2, 0]
    assert update.added.tolist() == list(range(7)) and update.changed.tolist() == []

    changed = first[[2, 0]].copy()
    changed[0, 5] ^= 1  # u2's image was replaced
    today = np.concatenate([RNG.integers(0, 256, (1, 32), dtype=np.uint8), changed])
    later, update = index.update(*enumerate_(["u9", "u2", "u0"], today))
    rows = later.table.to_pylist()
    assert [(r["unit"], r["uid"], r["shard"], r["slot"]) for r in rows[:7]] == [
        (r["unit"], r["uid"], r["shard"], r["slot"]) for r in index.table.to_pylist()
    ]
    assert (rows[7]["unit"], rows[7]["shard"], rows[7]["slot"]) == ("u9", 3, 0)  # shard 2 is not topped up
    assert update.added.tolist() == [7] and update.changed.tolist() == [2]
    assert update.current.tolist() == [True, False, True, False, False, False, False, True]
    assert (digests_to_numpy(later.table.column("source"))[2] == changed[0]).all()


def test_digest_columns_round_trip_through_arrow():
    digests = RNG.integers(0, 256, (5, 32), dtype=np.uint8)
    column = numpy_to_digests(digests)
    assert (digests_to_numpy(column.slice(1, 3)) == digests[1:4]).all()
    with pytest.raises(ValueError, match=r"uint8 \[n, 32\]"):
        numpy_to_digests(digests[:, :16])
