"""Planning a run without running it: the stages a manifest runs, their context and
signatures, and per stage what is left to do over a set of units.

A unit is done for a stage when its ledger line says done with the stage's current
signature digest and the digest of its inputs (its parents' output hashes, or its own
files' for the first stage). ``Planner`` reads the store and never writes it: the runner,
``seglab status`` and ``seglab evaluate`` all plan through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

from seglab.pipeline.base.errors import SignatureMismatch
from seglab.pipeline.base.fingerprint import diff_signatures, digest, stage_signature
from seglab.pipeline.core.ledger import LedgerEntry, Receipt, Task
from seglab.pipeline.core.registry import STAGES, round_stages
from seglab.pipeline.core.store import Store
from seglab.pipeline.dag import Dag
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.units import unit_input_digest
from seglab.stages.base import ClassTable, Context, FitByTraining, FitOnGoldSet, MapStage, Unit
from seglab.workers.backend import backend_signature, feature_names


@dataclass
class Plan:
    """A stage's remaining work: ``todo`` units with their worker ``tasks`` (input digest,
    signature digest, expected input hashes), ledger entries of ``adopted`` units, the
    count of units ``blocked`` on an upstream stage, and why: ``reasons`` counts the todo
    units by cause ('new', 'failed before', ...), ``waiting`` the blocked ones by the
    upstream stage they wait on; ``missing``: done units whose arrays are gone."""

    todo: list[Unit] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    adopted: list[Receipt] = field(default_factory=list)
    blocked: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def why(self) -> list[str]:
        """The reasons as short phrases, e.g. ['3 new', '2 waiting on embed']."""
        return [f"{n} {reason}" for reason, n in self.reasons.items()] + [
            f"{n} waiting on {stage}" for stage, n in self.waiting.items()
        ]


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _todo_reason(entry: LedgerEntry | None, task: Task) -> str:
    """Why a unit with ledger line ``entry`` is not done as ``task`` asks."""
    if entry is None:
        return "new"
    if not isinstance(entry, Receipt):
        return "failed before"
    if entry.signature != task.signature:
        return "made with other settings"
    return "with changed inputs"


def _adoptable(store: Store | None, name: str, unit: str, task: Task, cleared: frozenset[str]) -> Receipt | None:
    """The receipt of a unit a killed run committed but did not ledger, when its commit
    record is whole, made as ``task`` asks, and its arrays are all there; else None."""
    if store is None or name in cleared:
        return None
    record = store.committed(name, unit)
    if not done_as(record, task) or store.missing_outputs(name, unit, record.outputs):
        return None
    return replace(record, adopted=True, time=None)


def done_as(entry: LedgerEntry | None, task: Task) -> TypeGuard[Receipt]:
    """Whether a ledger line or commit record says the unit was done from the task's
    ``inputs`` digest with its stage ``signature`` digest (else it must be computed)."""
    return isinstance(entry, Receipt) and entry.made_as(task)


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
        units: Sequence[Unit],
        fitted: str | None = None,
        cleared: frozenset[str] = frozenset(),
    ) -> Plan:
        """What is left of stage ``name`` over ``units`` (``store`` None: no store yet).

        ``fitted``: digest of the parameters the stage was fitted with; part of every
        unit's input digest, so a refit that changes them recomputes the units. A unit
        without a ledger line but with a commit record made from the same inputs and
        signature (its driver was killed before appending the line) is adopted, not redone.
        A done unit whose arrays are gone from the store is redone. ``cleared``: stages to
        plan as if their records were removed (what ``--force`` does before a run)."""

        def ledger(stage: str) -> dict[str, LedgerEntry]:
            return {} if store is None or stage in cleared else store.ledger(stage).load()

        entries = ledger(name)
        parents = {dep: ledger(dep) for dep in self.dag.deps[name]}
        sig = digest(self.signatures[name])
        plan = Plan()
        for unit in units:
            expected: dict[str, str] = {}
            if parents:
                upstream = {d: parents[d].get(unit.id) for d in parents}
                done = {d: e for d, e in upstream.items() if isinstance(e, Receipt)}
                waiting = next((d for d in upstream if d not in done), None)
                if waiting is not None:
                    plan.blocked += 1
                    _count(plan.waiting, waiting)
                    continue
                inputs = digest(
                    [{k: v.sha256 for k, v in e.outputs.items()} for e in done.values()] + ([fitted] if fitted else [])
                )
                expected = {f"{d}/{k}": v.sha256 for d, e in done.items() for k, v in e.outputs.items()}
            else:
                inputs = unit_input_digest(unit)
            task = Task(inputs, sig, expected)
            entry = entries.get(unit.id)
            if done_as(entry, task):
                if store is None or not store.missing_outputs(name, unit.id, entry.outputs):
                    continue
                plan.missing.append(unit.id)
                _count(plan.reasons, "with missing arrays")
            elif (record := _adoptable(store, name, unit.id, task, cleared)) is not None:
                plan.adopted.append(record)
                continue
            else:
                _count(plan.reasons, "forced" if name in cleared else _todo_reason(entry, task))
            plan.todo.append(unit)
            plan.tasks[unit.id] = task
        return plan
