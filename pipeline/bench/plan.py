"""``seglab bench plan``: planning every stage of the DAG over a synthetic store of N units.

No images: a unit index of N units and, per stage of the registry's DAG, a table of
records written as Parquet parts, as a long-running store would hold them. Most units are
done; per stage a few are failed, never recorded, recorded with other settings, recorded
from inputs that have since changed, or failed in an early part and redone in a later one
(the last row wins). The timed part runs in a fresh process, as a driver starting a run
would: read the index and every stage's parts, plan each stage in DAG order; it reports
seconds per stage and the process's peak resident memory.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.registry import STAGES
from seglab.pipeline.core.stagetable import DONE, FAILED, SOURCE, DenseStage, stage_schema
from seglab.pipeline.core.unitindex import UnitIndex, digests_to_numpy, numpy_to_digests
from seglab.pipeline.dag import Dag
from seglab.pipeline.shardplan import plan_stage

SIGNATURE, OLD_SIGNATURE = bytes([1] * 32), bytes([2] * 32)
MARKER = "seglab-bench-plan.json"
"""The file ``write_synthetic`` puts first into a folder it makes, proving later that the
folder's index and parts are its own to replace."""
PART = re.compile(r"part-[0-9]{5}\.parquet")
FATES = ("failed", "missing", "other settings", "changed inputs", "redone")
"""What happens to a stage's units besides being done, each to ``rate`` of them."""


@dataclass(frozen=True)
class SyntheticStage:
    """What the generator did to one stage: uid arrays per fate (``FATES``), and its inputs."""

    name: str
    inputs: tuple[str, ...]
    fates: dict[str, np.ndarray]


def stage_inputs(dag: Dag, name: str) -> tuple[str, ...]:
    return tuple(dag.deps[name]) or (SOURCE,)


def write_synthetic(
    folder: Path, units: int, *, shard_size: int = 128, parts: int = 8, rate: float = 0.002, seed: int = 0
) -> list[SyntheticStage]:
    """Write ``folder``/index.parquet and ``folder``/<stage>/part-<k>.parquet for every stage
    of the registry's DAG, into a new or empty folder or one an earlier call wrote (its parts
    are replaced); SeglabError naming any other folder. -> what was done to each stage."""
    _claim(folder)
    rng = np.random.default_rng(seed)
    ids = pa.array([f"images__img{i:08d}.png" for i in range(units)])
    index, _ = UnitIndex.empty(shard_size).update(ids, ids, rng.integers(0, 256, (units, 32), dtype=np.uint8))
    pq.write_table(index.table, folder / "index.parquet")
    dag = Dag(STAGES)
    outputs = {SOURCE: digests_to_numpy(index.table.column("source"))}
    made = []
    for name in dag.order:
        inputs = stage_inputs(dag, name)
        fate_of = rng.choice(len(FATES) + 1, size=units, p=[*([rate] * len(FATES)), 1 - rate * len(FATES)])
        fates = {fate: np.flatnonzero(fate_of == k) for k, fate in enumerate(FATES)}
        state = np.full(units, DONE, np.int8)
        state[fates["failed"]] = FAILED
        signature = np.tile(np.frombuffer(SIGNATURE, np.uint8), (units, 1))
        signature[fates["other settings"]] = np.frombuffer(OLD_SIGNATURE, np.uint8)
        own = rng.integers(0, 256, (units, 32), dtype=np.uint8)
        recorded = {p: outputs[p].copy() for p in inputs}
        recorded[inputs[0]][fates["changed inputs"]] ^= 0xFF
        rows = np.setdiff1d(np.arange(units), fates["missing"])
        chunks = [np.sort(chunk) for chunk in np.array_split(rng.permutation(rows), parts)]
        stage_folder = folder / name
        stage_folder.mkdir(exist_ok=True)
        redone = fates["redone"]
        for k, chunk in enumerate(chunks):
            part_state = state[chunk].copy()
            part_state[np.isin(chunk, redone)] = FAILED  # failed at first: the last part redoes them
            _write_part(stage_folder / f"part-{k:05d}.parquet", inputs, chunk, part_state, signature, own, recorded)
        _write_part(stage_folder / f"part-{parts:05d}.parquet", inputs, redone, state[redone], signature, own, recorded)
        outputs[name] = own
        made.append(SyntheticStage(name, inputs, fates))
    return made


def _claim(folder: Path) -> None:
    """Make ``folder`` this benchmark's (new or empty: mark it), or check that it is (its mark
    is there: remove the parts an earlier call wrote); SeglabError when it holds anything else."""
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise SeglabError(f"{folder}: exists and was not written by `seglab bench plan`; choose another --folder")
    if folder.exists() and not folder.is_dir():
        raise SeglabError(f"{folder}: exists and is not a folder; choose another --folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"written_by": "seglab bench plan"}))
    for name in STAGES:
        if (folder / name).is_symlink():
            raise SeglabError(f"{folder / name}: is a link, which `seglab bench plan` never makes; remove it")
        for part in (folder / name).glob("part-*.parquet"):
            if PART.fullmatch(part.name) and part.is_file() and not part.is_symlink():
                part.unlink()


def _write_part(
    path: Path,
    inputs: Sequence[str],
    uid: np.ndarray,
    state: np.ndarray,
    signature: np.ndarray,
    outputs: np.ndarray,
    recorded: dict[str, np.ndarray],
) -> None:
    """One part: the rows of ``uid`` (ascending) with their ``state`` (aligned with uid); the
    other columns are taken at those uids from the stage's full arrays."""
    table = pa.table(
        {
            "uid": pa.array(uid.astype(np.int64)),
            "state": pa.array(state.astype(np.int8)),
            "signature": numpy_to_digests(signature[uid]),
            "fitted": numpy_to_digests(np.zeros((len(uid), 32), np.uint8)),
            "outputs": numpy_to_digests(outputs[uid]),
            **{f"from_{p}": numpy_to_digests(recorded[p][uid]) for p in inputs},
            "seconds": pa.array(np.full(len(uid), 0.01, np.float32)),
            "error": pa.array(["synthetic failure" if s == FAILED else None for s in state.tolist()], pa.string()),
        },
        schema=stage_schema(inputs),
    )
    pq.write_table(table, path)


@dataclass(frozen=True)
class StagePlanTiming:
    stage: str
    seconds: float
    todo: int
    shards: int
    blocked: int
    reasons: dict[str, int]


def plan_all(folder: Path) -> tuple[list[StagePlanTiming], float]:
    """Read the index and every stage's parts from ``folder`` and plan each stage in DAG order
    (the driver's work before a run); -> per stage its timing and counts, and the seconds
    spent reading the index."""
    started = time.perf_counter()
    index = pq.read_table(folder / "index.parquet")
    n = index.num_rows
    shards = index.column("shard").to_numpy()
    current = np.ones(n, bool)
    loaded: dict[str, DenseStage | np.ndarray] = {SOURCE: digests_to_numpy(index.column("source"))}
    index_seconds = time.perf_counter() - started
    dag = Dag(STAGES)
    timings = []
    for name in dag.order:
        started = time.perf_counter()
        inputs = stage_inputs(dag, name)
        parts = [pq.read_table(p) for p in sorted((folder / name).glob("part-*.parquet"))]
        stage = DenseStage.from_parts(parts, n, inputs)
        del parts
        plan = plan_stage(stage, {p: loaded[p] for p in inputs}, current=current, shards=shards, signature=SIGNATURE)
        # later stages read only a parent's state and outputs
        loaded[name] = DenseStage(stage.state, None, None, stage.outputs, {}, stage.batch, stage.row)
        del stage
        timings.append(
            StagePlanTiming(
                name, time.perf_counter() - started, len(plan.todo), len(plan.shards), plan.blocked, plan.reasons
            )
        )
    return timings, index_seconds


def _child(folder: str, queue: Any) -> None:
    timings, index_seconds = plan_all(Path(folder))
    queue.put((timings, index_seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def bench_plan(folder: Path, *, units: int, shard_size: int = 128, parts: int = 8) -> dict:
    """Write a synthetic store of ``units`` units into ``folder``, then plan every stage in a
    fresh process; -> the figures ``seglab bench plan`` prints."""
    started = time.perf_counter()
    write_synthetic(folder, units, shard_size=shard_size, parts=parts)
    written = time.perf_counter() - started
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(str(folder), queue))
    started = time.perf_counter()
    child.start()
    timings, index_seconds, peak = queue.get()
    child.join()
    wall = time.perf_counter() - started
    return {
        "units": units,
        "shards": -(-units // shard_size),
        "parts_per_stage": parts + 1,
        "synthetic_store_seconds": round(written, 2),
        "index_seconds": round(index_seconds, 3),
        "stages": [
            {
                "stage": t.stage,
                "plan_seconds": round(t.seconds, 3),
                "todo": t.todo,
                "shards_to_do": t.shards,
                "blocked": t.blocked,
                "reasons": t.reasons,
            }
            for t in timings
        ],
        "planning_seconds": round(index_seconds + sum(t.seconds for t in timings), 3),
        "process_seconds": round(wall, 3),
        "peak_rss_bytes": peak,
    }
