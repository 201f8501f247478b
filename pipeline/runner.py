"""Run the DAG: check signatures, work out what is left, fan it out, keep the ledger.

The driver never touches data arrays: it enumerates units, decides per stage which
units are still to do (no 'done' ledger line with the current signature and input
hash), hands them to a worker pool and appends each final receipt to the ledger.
Resume is therefore the default: a rerun does only what is missing or changed.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol

from seglab.pipeline.dag import Dag
from seglab.pipeline.errors import SeglabError, SignatureMismatch
from seglab.pipeline.fingerprint import diff_signatures, digest, stage_signature
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.registry import STAGES, round_stages
from seglab.pipeline.store import Store
from seglab.pipeline.units import enumerate_units, file_stat, gold_units, held_out, training_units, unit_input_digest
from seglab.stages.base import ClassTable, Context, Stage, Unit


class Progress(Protocol):
    def start(self, stage: str, total: int, done: int) -> None: ...
    def advance(self, stage: str, count: int) -> None: ...
    def finish(self, stage: str, report: "StageReport") -> None: ...
    def note(self, stage: str, text: str) -> None: ...


class NoProgress:
    def start(self, stage: str, total: int, done: int) -> None: ...
    def advance(self, stage: str, count: int) -> None: ...
    def finish(self, stage: str, report: "StageReport") -> None: ...
    def note(self, stage: str, text: str) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    start: str | None = None
    only: str | None = None
    force: tuple[str, ...] = ()
    dry_run: bool = False
    address: str | None = None


@dataclass
class StageReport:
    stage: str
    total: int
    already_done: int
    todo: int
    done_now: int = 0
    blocked: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    adopted: int = 0
    """Units a killed run had computed and committed but not ledgered: taken, not recomputed."""
    resubmitted: int = 0
    """Units run again because the worker running them was lost."""
    recovered: int = 0
    """Units a lost worker had committed before it died: kept, not run again."""
    invalidated: list[tuple[str, str]] = field(default_factory=list)
    """(unit, 'stage/output') of inputs found damaged; their producer redid them."""
    worker_peak_rss: int | None = None
    """Largest peak resident memory of a worker of the stage's pool so far, bytes."""

    def absorb(self, earlier: "StageReport") -> None:
        """Fold an earlier pass over the same stage into this one (this run's totals)."""
        self.done_now += earlier.done_now
        self.adopted += earlier.adopted
        self.already_done -= earlier.done_now + earlier.adopted
        self.todo = earlier.todo
        self.seconds += earlier.seconds
        self.resubmitted += earlier.resubmitted
        self.recovered += earlier.recovered
        self.invalidated = earlier.invalidated + self.invalidated
        self.worker_peak_rss = max((p for p in (self.worker_peak_rss, earlier.worker_peak_rss) if p), default=None)


@dataclass
class RunReport:
    store: str
    stages: list[StageReport]
    dry_run: bool = False

    @property
    def work_done(self) -> int:
        return sum(s.done_now + s.adopted + len(s.failures) for s in self.stages)

    @property
    def ok(self) -> bool:
        return all(not s.failures and not s.blocked for s in self.stages)


@dataclass
class Plan:
    """A stage's remaining work: ``todo`` units with their worker ``tasks`` (input digest,
    signature digest, expected input hashes), ledger entries of ``adopted`` units, and the
    count of units ``blocked`` on an upstream stage."""

    todo: list[Unit] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    adopted: list[dict[str, Any]] = field(default_factory=list)
    blocked: int = 0


def done_as(entry: dict[str, Any] | None, task: dict[str, Any]) -> bool:
    """Whether a ledger line or commit record says the unit was done from the task's
    ``inputs`` digest with its stage ``signature`` digest (else it must be computed)."""
    return bool(entry) and entry.get("status") == "done" and entry.get("inputs") == task["inputs"] \
        and entry.get("signature") == task["signature"]


MAX_PASSES = 3
"""Passes over the stages per run: a pass that finds damaged stored inputs invalidates
them, and the next pass redoes them with everything that read them."""


def seglab_version() -> str:
    return package_version("seglab")


def build_context(manifest: Manifest) -> Context:
    data = manifest.data
    from seglab.workers.backend import feature_names

    return Context(
        classes=ClassTable(tuple(c.id for c in data.classes), tuple(c.name for c in data.classes), data.ignore_id),
        weak_kind=data.weak.kind,
        seed=manifest.run.seed,
        extras={"unlabelled": data.weak.unlabelled, "feature_names": feature_names(manifest.backend, manifest.embed.tiling)},
    )


def active_stages(manifest: Manifest) -> dict[str, type[Stage]]:
    """The stages this manifest runs: a stage fitted on a gold set runs only when the
    manifest names that set; trained stages, and the refinements that use their teachers,
    only in the ``rounds`` it asks for."""
    return {**{n: s for n, s in STAGES.items()
               if (s.gold_set is None or getattr(manifest.data, s.gold_set) is not None) and not s.trains},
            **round_stages(manifest.rounds)}


def signatures(manifest: Manifest, dag: Dag, ctx: Context) -> dict[str, dict[str, Any]]:
    """Signature of every stage, in DAG order (each includes its parents' digests)."""
    from seglab.workers.backend import backend_signature

    shared = {"classes": list(zip(ctx.classes.ids, ctx.classes.names)), "ignore_id": ctx.classes.ignore_id,
              "weak_kind": ctx.weak_kind, "weak_unlabelled": ctx.extras["unlabelled"], "seed": ctx.seed}
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


class Runner:
    def __init__(self, manifest: Manifest, options: RunOptions | None = None, progress: Progress | None = None):
        self.manifest = manifest
        self.options = options or RunOptions()
        self.progress = progress or NoProgress()
        self.dag = Dag(active_stages(manifest))
        self.context = build_context(manifest)
        self.signatures = signatures(manifest, self.dag, self.context)
        self.stages: dict[str, Stage] = {n: self.dag.stages[n](manifest.stage_config(n)) for n in self.dag.order}

    # -- planning ---------------------------------------------------------------------
    def open_store(self) -> Store:
        return Store(
            self.manifest.store_path,
            create=True,
            attrs={"seglab_version": seglab_version(), "created": datetime.now(timezone.utc).isoformat()},
        )

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

    def plan(self, store: Store, name: str, units: Sequence[Unit], fitted: str | None = None) -> "Plan":
        """What is left of stage ``name`` over ``units``.

        ``fitted``: digest of the parameters the stage was fitted with; part of every
        unit's input digest, so a refit that changes them recomputes the units. A unit
        without a ledger line but with a commit record made from the same inputs and
        signature (its driver was killed before appending the line) is adopted, not redone."""
        ledger = store.ledger(name).load()
        parents = {dep: store.ledger(dep).load() for dep in self.dag.deps[name]}
        sig = digest(self.signatures[name])
        plan = Plan()
        for unit in units:
            expected: dict[str, str] = {}
            if parents:
                upstream = {d: parents[d].get(unit.id) for d in parents}
                if any(e is None or e.get("status") != "done" for e in upstream.values()):
                    plan.blocked += 1
                    continue
                inputs = digest([{k: v["sha256"] for k, v in e["outputs"].items()} for e in upstream.values()]
                                + ([fitted] if fitted else []))
                expected = {f"{d}/{k}": v["sha256"] for d, e in upstream.items() for k, v in e["outputs"].items()}
            else:
                inputs = unit_input_digest(unit)
            task = {"inputs": inputs, "signature": sig, "expected": expected}
            if done_as(ledger.get(unit.id), task):
                continue
            record = store.committed(name, unit.id)
            if done_as(record, task):
                plan.adopted.append({**record, "adopted": True})
                continue
            plan.todo.append(unit)
            plan.tasks[unit.id] = task
        return plan

    # -- running ----------------------------------------------------------------------
    def run(self) -> RunReport:
        units = enumerate_units(self.manifest)
        selected = self.dag.select(start=self.options.start, only=self.options.only)
        store = self.open_store()
        store_manifest_hash = digest(self.manifest.model_dump(mode="json"))
        if not self.options.dry_run:
            for name in self.options.force:
                for cleared in (name, *self.dag.downstream(name)):
                    store.clear_stage(cleared)
        self.check_signatures(store, selected)
        reports: dict[str, StageReport] = {}
        pools: dict[tuple[float, float], Any] = {}
        try:
            for _ in range(MAX_PASSES):
                passed = self._run_pass(store, selected, units, pools)
                damaged = any(r.invalidated for r in passed.values())
                for name, report in passed.items():
                    if name in reports:
                        report.absorb(reports[name])
                reports = passed
                if self.options.dry_run or not damaged:
                    break
            if not self.options.dry_run:
                classes = self.context.classes
                store.set_root_attrs(manifest_hash=store_manifest_hash, manifest_path=self.manifest.path,
                                     splits=held_out(self.manifest, units), seglab_version=seglab_version(),
                                     classes=[{"id": i, "name": n} for i, n in zip(classes.ids, classes.names)],
                                     ignore_id=classes.ignore_id)
        finally:
            for pool in pools.values():
                pool.shutdown()
        return RunReport(str(store.path), list(reports.values()), dry_run=self.options.dry_run)

    def _run_pass(self, store: Store, selected: Sequence[str], units: Sequence[Unit], pools: dict) -> dict[str, StageReport]:
        """Plan and run every selected stage once, in DAG order."""
        reports: dict[str, StageReport] = {}
        for name in selected:
            fitted = None
            if self.stages[name].fits:  # a dry run plans with the stored fit
                fit = self._trained if self.stages[name].trains else self._fitted
                fitted = store.stage_attrs(name).get("fitted") if self.options.dry_run else fit(store, name, units, pools)
            plan = self.plan(store, name, units, fitted=fitted and digest(fitted))
            report = StageReport(name, len(units), len(units) - plan.blocked - len(plan.todo), len(plan.todo),
                                 blocked=plan.blocked)
            if fitted and (warning := self.stages[name].fit_warning(fitted)):
                report.warnings.append(warning)
            reports[name] = report
            if plan.adopted and not self.options.dry_run:
                store.ledger(name).append(plan.adopted)
                report.adopted, report.already_done = len(plan.adopted), report.already_done - len(plan.adopted)
            if self.options.dry_run or not plan.todo:
                self.progress.start(name, len(units), report.already_done + report.adopted)
                self.progress.finish(name, report)
                continue
            pool = self._pool_for(name, pools)
            store.prepare_stage(name, self.stages[name].outputs(self.context))
            store.set_stage_attrs(name, signature=self.signatures[name], signature_digest=digest(self.signatures[name]))
            self._run_stage(store, name, plan, report, pool)
            store.set_stage_attrs(name, summary={"total": report.total,
                                                 "done": report.already_done + report.adopted + report.done_now,
                                                 "failed": len(report.failures), "seconds": round(report.seconds, 3),
                                                 "computed": report.done_now,
                                                 "worker_peak_rss": report.worker_peak_rss})
        return reports

    def _fitted(self, store: Store, name: str, units: Sequence[Unit], pools: dict) -> dict[str, Any]:
        """The stage's parameters fitted on its gold set: reused from the store when the
        gold units' upstream outputs, their gold masks and the signature are unchanged,
        else fitted anew in a worker and stored as the stage's ``fitted`` attribute."""
        from seglab.pipeline.gold import gold_mask_path

        gold = getattr(self.manifest.data, self.stages[name].gold_set)
        samples = gold_units(self.manifest, self.stages[name].gold_set, units)
        parents = {dep: store.ledger(dep).load() for dep in self.dag.deps[name]}
        missing = [u.id for u in samples if any(parents[d].get(u.id, {}).get("status") != "done" for d in parents)]
        if missing:
            raise SeglabError(f"{name}: cannot fit, {len(missing)} {self.stages[name].gold_set} image(s) have no "
                              f"finished {'/'.join(parents)} output (first: {missing[0]})")
        masks = [gold_mask_path(gold, Path(u.image)) for u in samples]
        key = digest([self.signatures[name], [[u.id, {d: parents[d][u.id]["outputs"] for d in parents}] for u in samples],
                      [file_stat(m) for m in masks]])
        attrs = store.stage_attrs(name)
        if attrs.get("fitted_from") == key and "fitted" in attrs:
            return attrs["fitted"]
        pool = self._pool_for(name, pools)
        fitted = pool.fit(name, samples, self.read_paths(name), gold)
        store.set_stage_attrs(name, fitted=fitted, fitted_from=key)
        return fitted

    def _trained(self, store: Store, name: str, units: Sequence[Unit], pools: dict) -> dict[str, Any]:
        """The stage's model trained on the run's training units (those whose upstream
        outputs are done): reused while those outputs and the signature are unchanged,
        else trained on Ray Train (resuming from the checkpoints of an interrupted run with
        the same inputs) and described in the stage's ``fitted`` attribute."""
        from seglab.pipeline.fingerprint import file_sha256
        from seglab.workers.raysession import ensure_ray
        from seglab.workers.trainer import TrainingJob, train

        parents = {dep: store.ledger(dep).load() for dep in self.dag.deps[name]}
        candidates = training_units(self.manifest, list(units))
        training = [u for u in candidates if all(parents[d].get(u.id, {}).get("status") == "done" for d in parents)]
        if not training:
            raise SeglabError(f"{name}: nothing to train on: no image outside the calibration and evaluation sets "
                              f"has finished {'/'.join(parents)} outputs")
        key = digest([self.signatures[name], [[u.id, {d: parents[d][u.id]["outputs"] for d in parents}] for u in training]])
        attrs = store.stage_attrs(name)
        fitted = attrs.get("fitted")
        if attrs.get("fitted_from") == key and fitted and (store.path / fitted["checkpoint"]).is_file() \
                and file_sha256(store.path / fitted["checkpoint"]) == fitted["sha256"]:
            return fitted
        for pool in pools.values():  # the trainer's workers need the CPUs/GPUs
            pool.shutdown()
        pools.clear()
        config = self.manifest.stage_config(name)
        labels, uncertainty = self.stages[name].training_targets
        ensure_ray(self.options.address or self.manifest.ray.address, num_cpus=self.manifest.ray.num_cpus)
        job = TrainingJob(
            store_path=str(store.path), units=tuple(u.id for u in training), class_ids=self.context.classes.ids,
            labels=labels, uncertainty=uncertainty,
            checkpoint_dir=str(store.checkpoint_dir(name) / key[:16]), settings=config.model_dump(mode="json"),
            seed=self.manifest.run.seed,
        )
        self.progress.note(name, f"training {config.architecture} on {len(training)} images for {config.epochs} epochs "
                                 f"({config.workers} Ray Train worker(s))")
        started = time.perf_counter()
        path, state = train(job, num_workers=config.workers, use_gpu=_wants_gpu(config.use_gpu),
                            max_failures=self.manifest.ray.max_retries)
        seconds = time.perf_counter() - started
        self.progress.note(name, f"trained in {seconds:.0f}s, "
                                 f"final loss {state['history'][-1]['loss']:.4f}")
        fitted = {"architecture": config.architecture, "checkpoint": str(path.relative_to(store.path)),
                  "sha256": file_sha256(path), "epochs": len(state["history"]), "units": len(training),
                  "skipped": len(candidates) - len(training), "input_size": list(config.input_size),
                  "trained_on": [u.id for u in training], "seconds": round(seconds, 1),
                  "history": state["history"]}
        store.set_stage_attrs(name, fitted=fitted, fitted_from=key)
        for old in store.checkpoint_dir(name).iterdir():  # checkpoints of other training inputs
            if old.name not in (key[:16], "_ray"):
                shutil.rmtree(old, ignore_errors=True)
        return fitted

    def _pool_for(self, name: str, pools: dict) -> Any:
        """The pool for a stage's resource shape; consecutive stages with the same shape share
        it. Another shape's pool is shut down first so that it frees its CPUs/GPUs."""
        from seglab.workers.pool import WorkerPool, WorkerSpec
        from seglab.workers.raysession import ensure_ray, pool_size, worker_resources

        ensure_ray(self.options.address or self.manifest.ray.address, num_cpus=self.manifest.ray.num_cpus)
        resources = worker_resources(self.stages[name].resources, self.manifest.backend)
        key = (resources.cpus, resources.gpus)
        if key not in pools:
            for old in pools.values():
                old.shutdown()
            pools.clear()
            spec = WorkerSpec(
                store_path=str(self.manifest.store_path),
                context=self.context,
                stage_configs={n: self.manifest.stage_config(n) for n in self.dag.order},
                backend_config=self.manifest.backend,
                tiling=self.manifest.embed.tiling,
            )
            pools[key] = WorkerPool(spec, resources, pool_size(resources, self.manifest.ray.workers),
                                    start_timeout=self.manifest.ray.worker_start_timeout)
        return pools[key]

    def _run_stage(self, store: Store, name: str, plan: Plan, report: StageReport, pool) -> None:
        """Run the plan's units on ``pool``; every final receipt is appended to the ledger.
        A unit whose input turned out damaged invalidates that input's unit in its producing
        stage (a failed ledger line, its commit record dropped) for the next pass to redo."""
        from seglab.workers.pool import run_batches

        ledger = store.ledger(name)
        self.progress.start(name, report.total, report.already_done + report.adopted)
        started = time.perf_counter()

        def record(receipts: list[dict[str, Any]]) -> None:
            ledger.append([{**r, "inputs": plan.tasks[r["unit"]]["inputs"],
                            "signature": plan.tasks[r["unit"]]["signature"]} for r in receipts])
            for r in receipts:
                if r["status"] == "done":
                    report.done_now += 1
                elif r["error"].get("corrupt"):
                    self._invalidate(store, r["unit"], r["error"]["corrupt"], r["error"]["message"])
                    report.invalidated += [(r["unit"], path) for path in r["error"]["corrupt"]]
                else:
                    report.failures.append((r["unit"], r["error"]["message"]))
            self.progress.advance(name, len(receipts))

        def recover(units: Sequence[Unit]) -> list[dict[str, Any]]:
            """Receipts of the units a lost worker had committed before it died."""
            records = {u.id: store.committed(name, u.id) for u in units}
            return [{k: v for k, v in r.items() if k not in ("inputs", "signature")} for u, r in records.items()
                    if done_as(r, plan.tasks[u])]

        stats = run_batches(
            pool=pool,
            stage_name=name,
            units=plan.todo,
            read_paths=self.read_paths(name),
            batch_size=self.manifest.stage_config(name).batch_size,
            max_retries=self.manifest.ray.max_retries,
            on_receipts=record,
            tasks=plan.tasks,
            recover=recover,
            stall_timeout=self.manifest.ray.stall_timeout,
        )
        report.resubmitted += stats.resubmitted
        report.recovered += stats.recovered
        report.seconds = time.perf_counter() - started
        report.worker_peak_rss = pool.peak_rss()
        self.progress.finish(name, report)

    def _invalidate(self, store: Store, unit: str, paths: Sequence[str], message: str) -> None:
        for stage in dict.fromkeys(path.split("/", 1)[0] for path in paths):
            store.forget_commit(stage, unit)
            store.ledger(stage).append([{"unit": unit, "status": "failed", "error": {
                "type": "CorruptOutput", "message": message, "transient": False}}])


def _wants_gpu(setting: str) -> bool:
    """'yes' / 'no', or 'auto': whether the Ray cluster this driver joined has GPUs."""
    if setting != "auto":
        return setting == "yes"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
