"""What is left of a stage, decided column against column over the whole unit index.

A unit of today's run is done for a stage when the stage's last row for it says DONE with
today's signature and fit digests, and each of its inputs digests equals what that input
holds now (a parent stage's ``outputs``, or the index's ``source``). A unit whose parent
has not finished it is blocked. Work goes out by shard: a shard is to do when any of its
units is. Nothing here loops over units in Python, so a million units plan in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from seglab.pipeline.core.stagetable import DONE, FAILED, SOURCE, DenseStage


@dataclass(frozen=True)
class ShardPlan:
    """todo: uids to compute (int64, ascending); shards: the shards holding them (int32,
    ascending); blocked: units waiting on a parent; waiting: parent -> units waiting on it
    first; reasons: why the todo units are to do ('new', 'failed before', 'made with other
    settings', 'with changed inputs') -> count."""

    todo: np.ndarray
    shards: np.ndarray
    blocked: int
    waiting: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)


def plan_stage(
    stage: DenseStage,
    inputs: Mapping[str, DenseStage | np.ndarray],
    *,
    current: np.ndarray,
    shards: np.ndarray,
    signature: bytes,
    fitted: bytes = bytes(32),
) -> ShardPlan:
    """Plan one stage over the index's n units.

    stage: the stage's own rows; inputs: per input name (as in the stage table) the parent
    stage's rows, or for ``SOURCE`` the index's uint8 [n, 32] source digests, in the order a
    blocked unit is attributed to them; current: bool [n], the units today's run enumerates;
    shards: int32 [n], each unit's shard; signature, fitted: today's 32-byte digests."""
    ready = current.copy()
    waiting: dict[str, int] = {}
    recorded_match = np.ones(len(current), bool)
    for name, source in inputs.items():
        if isinstance(source, DenseStage):
            finished = source.state == DONE
            holds = source.column("outputs")
        else:
            if name != SOURCE:
                raise ValueError(f"input '{name}' is given as digests but is not the index's {SOURCE}")
            finished = np.ones(len(current), bool)
            holds = source
        stuck = ready & ~finished
        if stuck.any():
            waiting[name] = int(stuck.sum())
        ready &= finished
        recorded_match &= (stage.made_from(name) == holds).all(axis=1)

    settings_match = (stage.column("signature") == np.frombuffer(signature, np.uint8)).all(axis=1) & (
        stage.column("fitted") == np.frombuffer(fitted, np.uint8)
    ).all(axis=1)
    done = (stage.state == DONE) & settings_match & recorded_match
    todo = ready & ~done
    reasons = {
        "new": int((todo & (stage.state == 0)).sum()),
        "failed before": int((todo & (stage.state == FAILED)).sum()),
        "made with other settings": int((todo & (stage.state == DONE) & ~settings_match).sum()),
        "with changed inputs": int((todo & (stage.state == DONE) & settings_match & ~recorded_match).sum()),
    }
    todo_uids = np.flatnonzero(todo).astype(np.int64)
    return ShardPlan(
        todo=todo_uids,
        shards=np.unique(shards[todo_uids]).astype(np.int32),
        blocked=int((current & ~ready).sum()),
        waiting=waiting,
        reasons={k: v for k, v in reasons.items() if v},
    )
