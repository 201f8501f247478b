"""Run the DAG: check signatures, work out what is left, fan it out, keep the ledger.

The driver never touches data arrays: it enumerates units, decides per stage which
units are still to do (no 'done' ledger line with the current signature and input
hash), hands them to a worker pool and appends each final receipt to the ledger.
Resume is therefore the default: a rerun does only what is missing or changed.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol

from seglab.pipeline.dag import Dag
from seglab.pipeline.errors import SeglabError, SignatureMismatch, StorageError, UsageError, os_error_cause
from seglab.pipeline.fingerprint import diff_signatures, digest, stage_signature
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.registry import STAGES, round_stages
from seglab.pipeline.store import Store, check_store_path, entry_problem
from seglab.pipeline.storelock import StoreLock
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
    why: list[str] = field(default_factory=list)
    """Why the stage has work left or is blocked, one short phrase each (e.g. 'forced',
    '3 waiting on ingest'); what a dry run shows beside its counts."""

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
        return [f"{n} {reason}" for reason, n in self.reasons.items()] + \
               [f"{n} waiting on {stage}" for stage, n in self.waiting.items()]


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
        extras={"unlabelled": data.weak.unlabelled, "background": data.weak.background,
                "feature_names": feature_names(manifest.backend, manifest.embed.tiling)},
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
    if ctx.extras.get("background") is not None:  # only when set: stores made before the key existed stay current
        shared["weak_background"] = ctx.extras["background"]
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


def check_stage_names(options: RunOptions, dag: Dag) -> None:
    """``--from``, ``--only`` and ``--force`` name stages of this manifest's DAG; UsageError
    listing them otherwise (a name is never turned into a path before this check)."""
    given = [("--from", options.start), ("--only", options.only), *(("--force", f) for f in options.force)]
    for flag, name in given:
        if name is not None and name not in dag.order:
            raise UsageError(f"{flag} {name!r} is not a stage of this manifest; its stages are: {', '.join(dag.order)}")


class Runner:
    def __init__(self, manifest: Manifest, options: RunOptions | None = None, progress: Progress | None = None):
        self.manifest = manifest
        self.options = options or RunOptions()
        self.progress = progress or NoProgress()
        self.dag = Dag(active_stages(manifest))
        check_stage_names(self.options, self.dag)
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

    def plan(self, store: Store | None, name: str, units: Sequence[Unit], fitted: str | None = None,
             cleared: frozenset[str] = frozenset()) -> "Plan":
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
                inputs = digest([{k: v["sha256"] for k, v in e["outputs"].items()} for e in upstream.values()]
                                + ([fitted] if fitted else []))
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
        from seglab.pipeline.gold import gold_mask_path

        stage = self.stages[name]
        parents = {dep: store.ledger(dep).load() if store else {} for dep in self.dag.deps[name]}

        def finished(unit: Unit) -> bool:
            return all(parents[d].get(unit.id, {}).get("status") == "done" for d in parents)

        def outputs(samples: list[Unit]) -> list:
            return [[u.id, {d: parents[d][u.id]["outputs"] for d in parents}] for u in samples]

        if stage.trains:
            training = [u for u in training_units(self.manifest, list(units)) if finished(u)]
            if not training:
                raise SeglabError(f"{name}: nothing to train on: no image outside the calibration and evaluation "
                                  f"sets has finished {'/'.join(parents)} outputs")
            return digest([self.signatures[name], outputs(training)]), training
        gold = getattr(self.manifest.data, stage.gold_set)
        samples = gold_units(self.manifest, stage.gold_set, units)
        missing = [u.id for u in samples if not finished(u)]
        if missing:
            raise SeglabError(f"{name}: cannot fit, {len(missing)} {stage.gold_set} image(s) have no "
                              f"finished {'/'.join(parents)} output (first: {missing[0]})")
        masks = [gold_mask_path(gold, Path(u.image)) for u in samples]
        return digest([self.signatures[name], outputs(samples), [file_stat(m) for m in masks]]), samples

    def stored_fit(self, store: Store | None, name: str, key: str) -> dict[str, Any] | None:
        """The stage's stored fit when it was made from ``key`` (and, for a trained stage,
        its checkpoint is still the file it recorded), else None."""
        from seglab.pipeline.fingerprint import file_sha256

        attrs = store.stage_attrs(name) if store else {}
        fitted = attrs.get("fitted")
        if attrs.get("fitted_from") != key or not fitted:
            return None
        if self.stages[name].trains:
            checkpoint = store.path / fitted["checkpoint"]
            if not checkpoint.is_file() or file_sha256(checkpoint) != fitted["sha256"]:
                return None
        return fitted

    def current_fit(self, store: Store | None, name: str, units: Sequence[Unit],
                    cleared: frozenset[str] = frozenset()) -> tuple[dict[str, Any] | None, str | None]:
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

    # -- planning a run ---------------------------------------------------------------
    def forced(self) -> frozenset[str]:
        """The stages ``--force`` clears: each named one and everything downstream of it."""
        return frozenset(c for name in self.options.force for c in (name, *self.dag.downstream(name)))

    def preview(self, store: Store | None, selected: Sequence[str], units: Sequence[Unit]) -> list[StageReport]:
        """What a run would do, stage by stage, from the store as it is (``store`` None: no
        store yet), reading only: ``--force`` is planned as if its stages were cleared, a
        fitted stage with the fit it has stored for today's inputs. Each report's ``why``
        says what is left and why; a stage whose settings changed says so too."""
        cleared = self.forced()
        reports = []
        for name in selected:
            why: list[str] = []
            stored = store.stage_attrs(name).get("signature") if store and name not in cleared else None
            if stored is not None and digest(stored) != digest(self.signatures[name]):
                why.append(f"settings changed ({'; '.join(diff_signatures(stored, self.signatures[name]))}): "
                           f"needs --force {name}")
            fitted = None
            if self.stages[name].fits:
                fitted, refit = self.current_fit(store, name, units, cleared)
                why += [refit] if refit else []
            plan = self.plan(store, name, units, fitted=fitted and digest(fitted), cleared=cleared)
            report = StageReport(name, len(units), len(units) - plan.blocked - len(plan.todo) - len(plan.adopted),
                                 len(plan.todo), blocked=plan.blocked, adopted=len(plan.adopted))
            report.why = why + plan.why() + ([f"{len(plan.adopted)} committed by an interrupted run, to adopt"]
                                             if plan.adopted else [])
            reports.append(report)
        return reports

    def _recorded_attrs(self, units: Sequence[Unit]) -> dict[str, Any]:
        """The root attributes a run records: what the store's readers (export, report) need."""
        classes = self.context.classes
        return {"manifest_hash": digest(self.manifest.model_dump(mode="json")), "manifest_path": self.manifest.path,
                "splits": held_out(self.manifest, units), "seglab_version": seglab_version(),
                "classes": [{"id": i, "name": n} for i, n in zip(classes.ids, classes.names)],
                "ignore_id": classes.ignore_id}

    # -- running ----------------------------------------------------------------------
    def run(self) -> RunReport:
        """Run the selected stages. A dry run, or a run with nothing to do, writes nothing
        (so a read-only store is fine); any other run holds the store's lock throughout."""
        units = enumerate_units(self.manifest)
        selected = self.dag.select(start=self.options.start, only=self.options.only)
        path = self.manifest.store_path
        existing = Store(path) if check_store_path(path) else None
        preview = self.preview(existing, selected, units)
        if existing is not None:
            for report in preview:
                report.warnings += existing.problems_of(report.stage)
        if self.options.dry_run:
            return RunReport(str(path), preview, dry_run=True)
        if existing is not None:
            self.check_signatures(existing, [s for s in selected if s not in self.forced()])
            recorded = existing.attrs
            if not any(r.todo or r.adopted or r.blocked or r.why for r in preview) \
                    and all(recorded.get(k) == v for k, v in self._recorded_attrs(units).items()):
                for report in preview:
                    self.progress.start(report.stage, report.total, report.already_done)
                    self.progress.finish(report.stage, report)
                return RunReport(str(path), preview)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with StoreLock(path) as lock:
                store = self.open_store()
                reports = self._run_locked(store, selected, units)
                if lock.taken_over and reports:
                    holder = lock.taken_over
                    reports[0].warnings.append(f"took over the lock of an earlier run that is gone (pid "
                                               f"{holder.get('pid')} on {holder.get('host')}, started "
                                               f"{holder.get('started')})")
        except Exception as exc:
            if (cause := os_error_cause(exc)) is None:
                raise
            raise StorageError.from_os_error(cause, path) from None
        return RunReport(str(store.path), reports)

    def _run_locked(self, store: Store, selected: Sequence[str], units: Sequence[Unit]) -> list[StageReport]:
        """The run proper, under the store's lock: clear what ``--force`` names, then pass
        over the stages until no pass finds damaged inputs (at most MAX_PASSES)."""
        kept = {cleared: store.clear_stage(cleared) for cleared in self.forced()}
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
                if not damaged:
                    break
            recorded = self._recorded_attrs(units)
            if any(store.attrs.get(k) != v for k, v in recorded.items()):
                store.set_root_attrs(**recorded)
        finally:
            for pool in pools.values():
                pool.shutdown()
        for name, report in reports.items():
            left = kept.get(name)
            if left:
                report.warnings.append(f"--force kept {len(left)} file(s) seglab did not write, e.g. {left[0]}")
            report.warnings += store.problems_of(name)
        return list(reports.values())

    def _run_pass(self, store: Store, selected: Sequence[str], units: Sequence[Unit], pools: dict) -> dict[str, StageReport]:
        """Plan and run every selected stage once, in DAG order."""
        reports: dict[str, StageReport] = {}
        for name in selected:
            fitted = None
            if self.stages[name].fits:
                fitted = self._fit(store, name, units, pools)
            plan = self.plan(store, name, units, fitted=fitted and digest(fitted))
            report = StageReport(name, len(units), len(units) - plan.blocked - len(plan.todo), len(plan.todo),
                                 blocked=plan.blocked, why=plan.why())
            if fitted and (warning := self.stages[name].fit_warning(fitted)):
                report.warnings.append(warning)
            if plan.missing:
                report.warnings.append(f"{len(plan.missing)} finished unit(s) had arrays missing from the store "
                                       f"(first: {plan.missing[0]}); they are computed again")
            reports[name] = report
            if plan.adopted:
                store.ledger(name).append(plan.adopted)
                report.adopted, report.already_done = len(plan.adopted), report.already_done - len(plan.adopted)
            if not plan.todo:
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

    def _fit(self, store: Store, name: str, units: Sequence[Unit], pools: dict) -> dict[str, Any]:
        """The stage's fit for today's inputs (``fit_key``): the stored one when it was made
        from them, else fitted anew (``_fit_gold``) or trained anew (``_train``) and stored
        as the stage's ``fitted`` attribute."""
        key, samples = self.fit_key(store, name, units)
        fitted = self.stored_fit(store, name, key)
        if fitted is None:
            fitted = (self._train if self.stages[name].trains else self._fit_gold)(store, name, key, samples, units, pools)
            store.set_stage_attrs(name, fitted=fitted, fitted_from=key)
        return fitted

    def _fit_gold(self, store: Store, name: str, key: str, samples: list[Unit], units: Sequence[Unit],
                  pools: dict) -> dict[str, Any]:
        """Fit the stage on its gold set's ``samples`` in a worker."""
        pool = self._pool_for(name, pools)
        return pool.fit(name, samples, self.read_paths(name), getattr(self.manifest.data, self.stages[name].gold_set))

    def _train(self, store: Store, name: str, key: str, training: list[Unit], units: Sequence[Unit],
               pools: dict) -> dict[str, Any]:
        """Train the stage's model on ``training`` on Ray Train, resuming from the
        checkpoints of an interrupted run with the same inputs (``key``); -> its description."""
        from seglab.pipeline.fingerprint import file_sha256
        from seglab.workers.raysession import ensure_ray
        from seglab.workers.trainer import TrainingJob, train

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
        store.remove_other_checkpoints(name, keep=key[:16])
        return {"architecture": config.architecture, "checkpoint": str(path.relative_to(store.path)),
                "sha256": file_sha256(path), "epochs": len(state["history"]), "units": len(training),
                "skipped": len(training_units(self.manifest, list(units))) - len(training),
                "input_size": list(config.input_size), "trained_on": [u.id for u in training],
                "seconds": round(seconds, 1), "history": state["history"]}

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
        images = {u.id: u.image for u in plan.todo}  # a failed line names its image, as a done ingest line does
        self.progress.start(name, report.total, report.already_done + report.adopted)
        started = time.perf_counter()

        def record(receipts: list[dict[str, Any]]) -> None:
            storage = next((r["error"]["storage"] for r in receipts if r["status"] == "failed"
                            and r["error"].get("storage")), None)
            receipts = [r for r in receipts if r["status"] == "done" or not r["error"].get("storage")]
            ledger.append([{**r, "inputs": plan.tasks[r["unit"]]["inputs"], "signature": plan.tasks[r["unit"]]["signature"],
                            **({} if r["status"] == "done" else {"info": {"source": images[r["unit"]]}})}
                           for r in receipts])
            if storage:  # a full disk or an unwritable store is no unit's fault: stop, record nothing against it
                raise StorageError(storage["path"], storage["problem"])
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
