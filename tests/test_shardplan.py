"""Planning by shard over columnar stage tables (pipeline/shardplan.py), against the truth a
synthetic store was built with (pipeline/bench/plan.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from seglab.pipeline.bench.plan import FATES, plan_all, write_synthetic
from seglab.pipeline.core.stagetable import SOURCE
from seglab.pipeline.planning import spread
from seglab.stages.base import Unit


def test_every_stage_plans_exactly_the_units_its_records_leave_to_do(tmp_path):
    made = write_synthetic(tmp_path, 3000, shard_size=64, parts=3, rate=0.02, seed=1)
    timings, _ = plan_all(tmp_path)
    by_name = {s.name: s for s in made}
    not_done = {s.name: np.union1d(s.fates["failed"], s.fates["missing"]) for s in made}
    shards = pq.read_table(tmp_path / "index.parquet").column("shard").to_numpy()
    for stage, timing in zip(made, timings):
        assert timing.stage == stage.name
        blocked = np.unique(np.concatenate([not_done[p] for p in stage.inputs if p != SOURCE] or [[]]))
        todo = np.setdiff1d(
            np.concatenate([stage.fates[f] for f in ("failed", "missing", "other settings", "changed inputs")]),
            blocked,
        )
        assert timing.todo == len(todo) and timing.blocked == len(blocked), stage.name
        assert timing.shards == len(np.unique(shards[todo.astype(np.int64)])), stage.name
        assert sum(timing.reasons.values()) == len(todo)
        assert timing.reasons.get("failed before", 0) == len(np.setdiff1d(stage.fates["failed"], blocked))
        assert set(FATES) == set(by_name[stage.name].fates)
    assert any(t.blocked for t in timings) and all(t.todo for t in timings)


def test_bench_plan_times_every_stage_in_a_fresh_process(tmp_path):
    import json

    from typer.testing import CliRunner

    from seglab.cli.app import app
    from seglab.pipeline.core.registry import STAGES
    from seglab.pipeline.dag import Dag

    result = CliRunner().invoke(app, ["bench", "plan", "--units", "2000", "--folder", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["stage"] for s in report["stages"]] == list(Dag(STAGES).order)
    assert report["shards"] == 16 and report["peak_rss_bytes"] > 2**20
    total = report["index_seconds"] + sum(s["plan_seconds"] for s in report["stages"])
    assert abs(report["planning_seconds"] - total) < 0.01


def test_bench_plan_writes_only_into_a_folder_of_its_own(tmp_path):
    import pytest

    from seglab.pipeline.base.errors import SeglabError

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "index.parquet").write_text("a user's file")
    with pytest.raises(SeglabError, match="was not written by `seglab bench plan`"):
        write_synthetic(mine, 100)
    assert [p.name for p in mine.iterdir()] == ["index.parquet"]
    assert (mine / "index.parquet").read_text() == "a user's file"

    ours = tmp_path / "plan"
    write_synthetic(ours, 300, parts=4)
    write_synthetic(ours, 100, parts=2)  # a smaller rerun replaces the parts of the first
    assert len(list((ours / "embed").glob("part-*.parquet"))) == 3
    timings, _ = plan_all(ours)
    assert all(t.todo <= 100 for t in timings)


def test_spread_cuts_shards_finer_towards_the_end_and_keeps_the_order():
    def shard(first: int, n: int) -> list[Unit]:
        return [Unit(f"u{i}", f"/d/{i}.png") for i in range(first, first + n)]

    small = spread([shard(0, 128), shard(128, 72)], 2)  # 200 units, 2 workers, 2 batches ahead each
    assert [len(b) for b in small] == [50, 38, 28, 12, 18, 14, 10, 8, 8, 8, 6]
    assert [u.id for b in small for u in b] == [f"u{i}" for i in range(200)]
    large = [shard(128 * s, 128) for s in range(15)] + [shard(1920, 80)]  # 2,000 units
    cut = spread(large, 2)
    assert cut[:12] == large[:12]  # whole shards while a share, R / 4, is above 128 units
    assert [len(b) for b in cut[12:]] == [116, 12, 84, 44, 52, 39, 30, 7, 20, 15, 12, 9, 8, 8, 8]
    assert all(any(set(map(id, b)) <= set(map(id, s)) for s in large) for b in cut)  # none spans two shards
    assert [len(b) for b in spread([shard(0, 4)], 2)] == [1, 1, 1, 1]  # fewer units than slots: one each
    assert [len(b) for b in spread([shard(0, 5)], 2, in_flight=1)] == [3, 2]
    assert spread([], 2) == []
