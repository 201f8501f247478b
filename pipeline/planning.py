"""Planning a run without running it: the stages a manifest runs, their context and
signatures, and per stage what is left to do over a set of units.

A unit is done for a stage when its last row says done with the stage's current
signature and fit digests and the digests of its inputs (its parents' outputs, or its own
files' for the first stage) as they are now (pipeline/shardplan.py). ``Planner`` reads the
store and never writes it: the runner, ``seglab status`` and ``seglab evaluate`` all plan
through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seglab.pipeline.base.errors import SignatureMismatch
from seglab.pipeline.base.fingerprint import diff_signatures, digest, stage_signature
from seglab.pipeline.core.ledger import BatchTask, UnitInputs
from seglab.pipeline.core.registry import STAGES, round_stages
from seglab.pipeline.core.stagetable import PARENT_COLUMNS, SOURCE, DenseStage, own_columns
from seglab.pipeline.core.store import Store
from seglab.pipeline.core.unitindex import UnitIndex, digests_to_numpy
from seglab.pipeline.dag import Dag
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.shardplan import plan_stage
from seglab.pipeline.units import input_digests
from seglab.stages.base import ClassTable, Context, FitByTraining, FitOnGoldSet, MapStage, Unit
from seglab.workers.backend import backend_signature, feature_names


@dataclass(frozen=True)
class PlacedUnits:
    """Today's units in the store's unit index: ``units`` in enumeration order, ``uids``
    int64 [len(units)] their rows in ``index``; ``current`` bool [n]: the index rows
    enumerated today; ``position`` int64 [n]: each row's place in ``units`` (-1: not
    enumerated today); ``changed``: the index differs from the stored one."""

    units: list[Unit]
    index: UnitIndex
    uids: np.ndarray
    current: np.ndarray
    position: np.ndarray
    changed: bool


def place_units(store: Store | None, units: Sequence[Unit], shard_size: int) -> PlacedUnits:
    """Today's units placed in the store's index (``store`` None: a new one of
    ``shard_size``); new units go to new shards, nothing is written."""
    stored = store.index(shard_size) if store is not None else UnitIndex.empty(shard_size)
    sources = input_digests(units)
    ids = pa.array([u.id for u in units], pa.string())
    index, update = stored.update(ids, pa.array([u.image for u in units], pa.string()), sources)
    uids = pc.index_in(ids, value_set=index.table.column("unit")).to_numpy().astype(np.int64)
    position = np.full(len(index), -1, np.int64)
    position[uids] = np.arange(len(units))
    changed = bool(len(update.added) or len(update.changed))
    return PlacedUnits(list(units), index, uids, update.current, position, changed)


def spread(batches: Sequence[Sequence[Unit]], workers: int, in_flight: int = 2, smallest: int = 8) -> list[list[Unit]]:
    """``batches`` (shards) cut by guided self-scheduling (Polychronopoulos and Kuck, 1987),
    in order: each batch is at most ceil(R / (workers * in_flight)) units, R the units not
    yet handed out, and at least ``smallest`` (or that first share, when it is smaller);
    no batch spans two shards. A large run's shards stay whole until the last few, which
    are cut finer and finer so that the workers run out of work together (each is handed
    ``in_flight`` batches ahead); a run with fewer shards than workers keeps them all busy."""
    slots = max(1, workers * in_flight)
    remaining = sum(len(b) for b in batches)
    floor = min(smallest, -(-remaining // slots))
    cut: list[list[Unit]] = []
    for batch in batches:
        at = 0
        while at < len(batch):
            part = list(batch[at : at + max(floor, -(-remaining // slots))])
            cut.append(part)
            at += len(part)
            remaining -= len(part)
    return cut


@dataclass
class Plan:
    """A stage's remaining work: ``todo`` units in ``batches`` (one per shard), the count of
    units ``blocked`` on an upstream stage, and why: ``reasons`` counts the todo units by
    cause ('new', 'failed before', ...), ``waiting`` the blocked ones by the upstream stage
    they wait on. ``task`` makes a batch's worker task from what the plan was made of."""

    todo: list[Unit] = field(default_factory=list)
    batches: list[list[Unit]] = field(default_factory=list)
    blocked: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    signature: bytes = bytes(32)
    fitted: bytes = bytes(32)
    uid_of: dict[str, int] = field(default_factory=dict)
    made_from: dict[str, np.ndarray] = field(default_factory=dict)
    """Per input name: uint8 [n, 32], each index row's digest of that input."""
    located: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Per parent stage: (batch int64 [n], row int32 [n]) of each index row's outputs."""

    def why(self) -> list[str]:
        """The reasons as short phrases, e.g. ['3 new', '2 waiting on embed']."""
        return [f"{n} {reason}" for reason, n in self.reasons.items()] + [
            f"{n} waiting on {stage}" for stage, n in self.waiting.items()
        ]

    def task(self, units: Sequence[Unit], batch: str) -> BatchTask:
        """The worker task of ``units`` (of this plan's todo) as batch ``batch``."""
        uids = [self.uid_of[u.id] for u in units]
        return BatchTask(
            batch=batch,
            units=tuple(units),
            uids=tuple(uids),
            signature=self.signature,
            fitted=self.fitted,
            made_from={name: tuple(made[uid].tobytes() for uid in uids) for name, made in self.made_from.items()},
            reads={
                stage: UnitInputs(tuple(int(batches[uid]) for uid in uids), tuple(int(rows[uid]) for uid in uids))
                for stage, (batches, rows) in self.located.items()
            },
        )


def stage_inputs(dag: Dag, name: str) -> list[str]:
    """The input names a stage's rows record digests of: its parents, or the index's source."""
    return list(dag.deps[name]) or [SOURCE]


def build_context(manifest: Manifest) -> Context:
    data = manifest.data

    return Context(
        classes=ClassTable(tuple(c.id for c in data.classes), tuple(c.name for c in data.classes), data.ignore_id),
        weak_kind=data.weak.kind,
        seed=manifest.run.seed,
        unlabelled=data.weak.unlabelled,
        background=data.weak.background,
        feature_names=tuple(feature_names(manifest.backend, manifest.embed.tiling)),
    )


def active_stages(manifest: Manifest) -> dict[str, type[MapStage]]:
    """The stages this manifest runs: a stage fitted on a gold set runs only when the
    manifest names that set; trained stages, and the refinements that use their teachers,
    only in the ``rounds`` it asks for."""

    def runs(stage: type[MapStage]) -> bool:
        kind = stage.fitting
        if isinstance(kind, FitOnGoldSet):
            return getattr(manifest.data, kind.gold_set) is not None
        return not isinstance(kind, FitByTraining)  # trained stages come with the rounds

    return {**{n: s for n, s in STAGES.items() if runs(s)}, **round_stages(manifest.rounds)}


def signatures(manifest: Manifest, dag: Dag, ctx: Context) -> dict[str, dict[str, Any]]:
    """Signature of every stage, in DAG order (each includes its parents' digests)."""
    shared = {
        "classes": list(zip(ctx.classes.ids, ctx.classes.names)),
        "ignore_id": ctx.classes.ignore_id,
        "weak_kind": ctx.weak_kind,
        "weak_unlabelled": ctx.unlabelled,
        "seed": ctx.seed,
    }
    if ctx.background is not None:  # only when set: stores made before the key existed stay current
        shared["weak_background"] = ctx.background
    model = backend_signature(manifest.backend, manifest.embed.tiling)
    sigs: dict[str, dict[str, Any]] = {}
    for name in dag.order:
        stage = dag.stages[name](manifest.stage_config(name))
        sigs[name] = stage_signature(
            version=stage.version,
            config={**stage.signature_config(), "_data": shared},
            model=model if stage.resources.needs_backend else None,
            upstream={dep: digest(sigs[dep]) for dep in dag.deps[name]},
        )
    return sigs


class Planner:
    """A manifest's DAG with its stages built from their settings, its context and every
    stage's signature; what is left of each stage in a store."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        active = active_stages(manifest)
        self.dag = Dag(active)
        self.context = build_context(manifest)
        self.signatures = signatures(manifest, self.dag, self.context)
        self.stages: dict[str, MapStage] = {n: active[n](manifest.stage_config(n)) for n in self.dag.order}

    def check_signatures(self, store: Store, selected: Sequence[str]) -> None:
        for name in selected:
            stored = store.stage_attrs(name).get("signature")
            if stored is not None and digest(stored) != digest(self.signatures[name]):
                raise SignatureMismatch(name, diff_signatures(stored, self.signatures[name]))

    def read_paths(self, name: str) -> list[str]:
        """Resolve a stage's reads (and its optional reads of stages this run has) to explicit
        'stage/output' paths."""
        paths: list[str] = []
        for path in self.dag.reads[name]:
            if "/" in path:
                paths.append(path)
            else:
                paths.extend(f"{path}/{out}" for out in self.stages[path].outputs(self.context))
        return paths

    def plan(
        self,
        store: Store | None,
        name: str,
        placed: PlacedUnits,
        fitted: str | None = None,
        cleared: frozenset[str] = frozenset(),
    ) -> Plan:
        """What is left of stage ``name`` over today's ``placed`` units (``store`` None: no
        store yet), column against column (shardplan.plan_stage).

        ``fitted``: digest of the parameters the stage was fitted with; a refit that changes
        them recomputes the units. ``cleared``: stages to plan as if their records were
        removed (what ``--force`` does before a run)."""
        n = len(placed.index)

        def dense(stage: str, columns: Sequence[str]) -> DenseStage:
            inputs = stage_inputs(self.dag, stage)
            if store is None or stage in cleared:
                return DenseStage.from_parts([], n, inputs)
            return store.state(stage, inputs, columns).dense(n)

        parents = {dep: dense(dep, PARENT_COLUMNS) for dep in self.dag.deps[name]}
        sources = digests_to_numpy(placed.index.table.column("source"))
        inputs: dict[str, DenseStage | np.ndarray] = dict(parents) if parents else {SOURCE: sources}
        signature = bytes.fromhex(digest(self.signatures[name]))
        fit = bytes.fromhex(fitted) if fitted else bytes(32)
        shards = placed.index.shards
        own = dense(name, own_columns(stage_inputs(self.dag, name)))
        planned = plan_stage(own, inputs, current=placed.current, shards=shards, signature=signature, fitted=fit)
        del own  # its n-row arrays are done with; a parent's outputs and places go on into the plan
        plan = Plan(
            blocked=planned.blocked,
            waiting=planned.waiting,
            reasons={"forced": len(planned.todo)} if name in cleared and len(planned.todo) else planned.reasons,
            signature=signature,
            fitted=fit,
            made_from={dep: state.column("outputs") for dep, state in parents.items()} or {SOURCE: sources},
            located={dep: (state.batch, state.row) for dep, state in parents.items()},
        )
        todo = planned.todo
        plan.todo = [placed.units[at] for at in placed.position[todo]]
        plan.uid_of = {unit.id: int(uid) for unit, uid in zip(plan.todo, todo)}
        cuts = np.flatnonzero(np.diff(shards[todo])) + 1
        plan.batches = [
            [placed.units[at] for at in placed.position[part]] for part in np.split(todo, cuts) if len(part)
        ]
        return plan
