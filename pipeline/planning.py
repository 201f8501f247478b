"""Planning a run without running it: the stages a manifest runs, their context and
signatures, and per stage what is left to do over a set of units.

A unit is done for a stage when its ledger line says done with the stage's current
signature digest and the digest of its inputs (its parents' output hashes, or its own
files' for the first stage). ``Planner`` reads the store and never writes it: the runner,
``seglab status`` and ``seglab evaluate`` all plan through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglab.pipeline.base.errors import SeglabError, SignatureMismatch
from seglab.pipeline.base.fingerprint import diff_signatures, digest, file_sha256, stage_signature
from seglab.pipeline.core.gold import gold_mask_path
from seglab.pipeline.core.registry import STAGES, round_stages
from seglab.pipeline.core.store import Store, entry_problem
from seglab.pipeline.dag import Dag
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.units import file_stat, gold_units, training_units, unit_input_digest
from seglab.stages.base import ClassTable, Context, Stage, Unit
from seglab.workers.backend import backend_signature, feature_names


@dataclass
class Plan:
    """A stage's remaining work: ``todo`` units with their worker ``tasks`` (input digest,
    signature digest, expected input hashes), ledger entries of ``adopted`` units, the
    count of units ``blocked`` on an upstream stage, and why: ``reasons`` counts the todo
    units by cause ('new', 'failed before', ...), ``waiting`` the blocked ones by the
    upstream stage they wait on; ``missing``: done units whose arrays are gone."""

    todo: list[Unit] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    adopted: list[dict[str, Any]] = field(default_factory=list)
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


def _todo_reason(entry: dict[str, Any] | None, task: dict[str, Any]) -> str:
    """Why a unit with ledger line ``entry`` is not done as ``task`` asks."""
    if entry is None:
        return "new"
    if entry.get("status") != "done":
        return "failed before"
    if entry.get("signature") != task["signature"]:
        return "made with other settings"
    return "with changed inputs"


def _adoptable(store: Store | None, name: str, unit: str, task: dict[str, Any], cleared: frozenset[str]) -> dict | None:
    """The ledger entry of a unit a killed run committed but did not ledger, when its
    commit record is whole, made as ``task`` asks, and its arrays are all there; else None."""
    if store is None or name in cleared:
        return None
    record = store.committed(name, unit)
    if not done_as(record, task) or entry_problem(record) or store.missing_outputs(name, unit, record["outputs"]):
        return None
    return {**record, "adopted": True}


def done_as(entry: dict[str, Any] | None, task: dict[str, Any]) -> bool:
    """Whether a ledger line or commit record says the unit was done from the task's
    ``inputs`` digest with its stage ``signature`` digest (else it must be computed)."""
    return (
        bool(entry)
        and entry.get("status") == "done"
        and entry.get("inputs") == task["inputs"]
        and entry.get("signature") == task["signature"]
    )


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


def active_stages(manifest: Manifest) -> dict[str, type[Stage]]:
    """The stages this manifest runs: a stage fitted on a gold set runs only when the
    manifest names that set; trained stages, and the refinements that use their teachers,
    only in the ``rounds`` it asks for."""
    return {
        **{
            n: s
            for n, s in STAGES.items()
            if (s.gold_set is None or getattr(manifest.data, s.gold_set) is not None) and not s.trains
        },
        **round_stages(manifest.rounds),
    }


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
        self.dag = Dag(active_stages(manifest))
        self.context = build_context(manifest)
        self.signatures = signatures(manifest, self.dag, self.context)
        self.stages: dict[str, Stage] = {n: self.dag.stages[n](manifest.stage_config(n)) for n in self.dag.order}

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

        def ledger(stage: str) -> dict[str, dict[str, Any]]:
            return {} if store is None or stage in cleared else store.ledger(stage).load()

        entries = ledger(name)
        parents = {dep: ledger(dep) for dep in self.dag.deps[name]}
        sig = digest(self.signatures[name])
        plan = Plan()
        for unit in units:
            expected: dict[str, str] = {}
            if parents:
                upstream = {d: parents[d].get(unit.id) for d in parents}
                waiting = next((d for d, e in upstream.items() if e is None or e.get("status") != "done"), None)
                if waiting is not None:
                    plan.blocked += 1
                    _count(plan.waiting, waiting)
                    continue
                inputs = digest(
                    [{k: v["sha256"] for k, v in e["outputs"].items()} for e in upstream.values()]
                    + ([fitted] if fitted else [])
                )
                expected = {f"{d}/{k}": v["sha256"] for d, e in upstream.items() for k, v in e["outputs"].items()}
            else:
                inputs = unit_input_digest(unit)
            task = {"inputs": inputs, "signature": sig, "expected": expected}
            entry = entries.get(unit.id)
            if done_as(entry, task):
                if not store.missing_outputs(name, unit.id, entry["outputs"]):
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

    # -- fits -------------------------------------------------------------------------
    def fit_key(self, store: Store | None, name: str, units: Sequence[Unit]) -> tuple[str, list[Unit]]:
        """What a fitted or trained stage would be fitted on now: (a digest of its signature,
        its samples' upstream outputs (and gold masks), those samples). The samples are the
        gold set's units for a fitted stage, the training units whose upstream outputs are
        done for a trained one. SeglabError when it cannot be fitted yet."""
        stage = self.stages[name]
        parents = {dep: store.ledger(dep).load() if store else {} for dep in self.dag.deps[name]}

        def finished(unit: Unit) -> bool:
            return all(parents[d].get(unit.id, {}).get("status") == "done" for d in parents)

        def outputs(samples: list[Unit]) -> list:
            return [[u.id, {d: parents[d][u.id]["outputs"] for d in parents}] for u in samples]

        if stage.trains:
            training = [u for u in training_units(self.manifest, list(units)) if finished(u)]
            if not training:
                raise SeglabError(
                    f"{name}: nothing to train on: no image outside the calibration and evaluation "
                    f"sets has finished {'/'.join(parents)} outputs"
                )
            return digest([self.signatures[name], outputs(training)]), training
        gold = getattr(self.manifest.data, stage.gold_set)
        samples = gold_units(self.manifest, stage.gold_set, units)
        missing = [u.id for u in samples if not finished(u)]
        if missing:
            raise SeglabError(
                f"{name}: cannot fit, {len(missing)} {stage.gold_set} image(s) have no "
                f"finished {'/'.join(parents)} output (first: {missing[0]})"
            )
        masks = [gold_mask_path(gold, Path(u.image)) for u in samples]
        return digest([self.signatures[name], outputs(samples), [file_stat(m) for m in masks]]), samples

    def stored_fit(self, store: Store | None, name: str, key: str) -> dict[str, Any] | None:
        """The stage's stored fit when it was made from ``key`` (and, for a trained stage,
        its checkpoint is still the file it recorded), else None."""
        attrs = store.stage_attrs(name) if store else {}
        fitted = attrs.get("fitted")
        if attrs.get("fitted_from") != key or not fitted:
            return None
        if self.stages[name].trains:
            checkpoint = store.path / fitted["checkpoint"]
            if not checkpoint.is_file() or file_sha256(checkpoint) != fitted["sha256"]:
                return None
        return fitted

    def current_fit(
        self, store: Store | None, name: str, units: Sequence[Unit], cleared: frozenset[str] = frozenset()
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Read only: (the stored fit a fitted or trained stage would use for today's inputs,
        None when it must be fitted first; why it must, or None). ``cleared``: as in ``plan``."""
        try:
            key, _ = self.fit_key(store, name, units)
        except SeglabError:
            return None, "fitted once its inputs are done"
        fitted = None if name in cleared else self.stored_fit(store, name, key)
        if fitted is None:
            return None, "to be trained anew" if self.stages[name].trains else "to be fitted anew"
        return fitted, None
