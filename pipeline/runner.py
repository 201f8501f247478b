"""Run the DAG: check signatures, work out what is left, fan it out, keep the ledger.

The driver never touches data arrays: it enumerates units, decides per stage which
units are still to do (no 'done' ledger line with the current signature and input
hash), hands them to a worker pool and appends each final receipt to the ledger.
Resume is therefore the default: a rerun does only what is missing or changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any

from seglab.pipeline.base.allocation import map_large_allocations, use_system_allocator
from seglab.pipeline.base.errors import StorageError, UsageError, os_error_cause
from seglab.pipeline.base.fingerprint import diff_signatures, digest
from seglab.pipeline.core.batcharrays import batch_id, read_commit
from seglab.pipeline.core.ledger import BatchTask, Failure, LedgerEntry, Receipt
from seglab.pipeline.core.stagerecords import failure_records
from seglab.pipeline.core.store import Store, store_exists
from seglab.pipeline.core.unitrecords import commit_receipts
from seglab.pipeline.dag import Dag
from seglab.pipeline.fitting import Fitted, current_fit, fitter_for
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.planning import PlacedUnits, Plan, Planner, place_units, spread, stage_inputs
from seglab.pipeline.records import NoProgress, Progress, RunOptions, RunReport, StageReport
from seglab.pipeline.storelock import LeaseLock, StoreBusy, StoreLock, run_lock
from seglab.pipeline.units import enumerate_units, held_out
from seglab.stages.base import Unit
from seglab.workers.pool import WorkerPool, WorkerSpec, run_batches
from seglab.workers.raysession import ensure_ray, pool_size, worker_resources

MAX_PASSES = 3
"""Passes over the stages per run: a pass that finds damaged stored inputs invalidates
them, and the next pass redoes them with everything that read them."""


def seglab_version() -> str:
    return package_version("seglab")


Pools = dict[tuple[float, float], WorkerPool]
"""A run's worker pools by resource shape (CPUs, GPUs per worker)."""


def _release(pools: Pools) -> None:
    for pool in pools.values():
        pool.shutdown()
    pools.clear()


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
        self.planner = Planner(manifest)
        self.dag, self.stages, self.context = self.planner.dag, self.planner.stages, self.planner.context
        check_stage_names(self.options, self.dag)
        self._lock: StoreLock | LeaseLock | None = None

    # -- planning ---------------------------------------------------------------------
    def open_store(self) -> Store:
        return Store(
            self.manifest.store_location,
            create=True,
            attrs={"seglab_version": seglab_version(), "created": datetime.now(UTC).isoformat()},
        )

    # -- planning a run ---------------------------------------------------------------
    def forced(self) -> frozenset[str]:
        """The stages ``--force`` clears: each named one and everything downstream of it."""
        return frozenset(c for name in self.options.force for c in (name, *self.dag.downstream(name)))

    def preview(self, store: Store | None, selected: Sequence[str], placed: PlacedUnits) -> list[StageReport]:
        """What a run would do, stage by stage, from the store as it is (``store`` None: no
        store yet), reading only: ``--force`` is planned as if its stages were cleared, a
        fitted stage with the fit it has stored for today's inputs. Each report's ``why``
        says what is left and why; a stage whose settings changed says so too."""
        cleared = self.forced()
        units = placed.units
        reports = []
        for name in selected:
            why: list[str] = []
            stored = store.stage_attrs(name).get("signature") if store and name not in cleared else None
            if stored is not None and digest(stored) != digest(self.planner.signatures[name]):
                why.append(
                    f"settings changed ({'; '.join(diff_signatures(stored, self.planner.signatures[name]))}): "
                    f"needs --force {name}"
                )
            fitted, refit = current_fit(self.planner, store, name, units, cleared)
            why += [refit] if refit else []
            plan = self.planner.plan(store, name, placed, fitted=digest(fitted) if fitted else None, cleared=cleared)
            report = StageReport(
                name, len(units), len(units) - plan.blocked - len(plan.todo), len(plan.todo), blocked=plan.blocked
            )
            report.why = why + plan.why()
            reports.append(report)
        return reports

    def _recorded_attrs(self, units: Sequence[Unit]) -> dict[str, Any]:
        """The root attributes a run records: what the store's readers (export, report) need."""
        classes = self.context.classes
        return {
            "manifest_hash": digest(self.manifest.model_dump(mode="json")),
            "manifest_path": self.manifest.path,
            "splits": held_out(self.manifest, units),
            "seglab_version": seglab_version(),
            "classes": [{"id": i, "name": n} for i, n in zip(classes.ids, classes.names)],
            "ignore_id": classes.ignore_id,
        }

    # -- running ----------------------------------------------------------------------
    def run(self) -> RunReport:
        """Run the selected stages. A dry run, or a run with nothing to do, writes nothing
        (so a read-only store is fine); any other run holds the store's lock throughout."""
        use_system_allocator()
        map_large_allocations()
        units = enumerate_units(self.manifest)
        selected = self.dag.select(start=self.options.start, only=self.options.only)
        location = self.manifest.store_location
        existing = Store(location) if store_exists(location) else None
        placed = place_units(existing, units, self.manifest.store.shard_size)
        preview = self.preview(existing, selected, placed)
        if existing is not None:
            for report in preview:
                report.warnings += existing.problems_of(report.stage)
        if self.options.dry_run:
            return RunReport(location, preview, dry_run=True)
        if existing is not None:
            self.planner.check_signatures(existing, [s for s in selected if s not in self.forced()])
            recorded = existing.attrs
            if (
                not placed.changed
                and not any(r.todo or r.blocked or r.why for r in preview)
                and all(recorded.get(k) == v for k, v in self._recorded_attrs(units).items())
            ):
                for report in preview:
                    self.progress.start(report.stage, report.total, report.already_done)
                    self.progress.finish(report.stage, report)
                return RunReport(location, preview)
        try:
            with run_lock(location) as lock:
                self._lock = lock
                store = self.open_store()
                reports = self._run_locked(store, selected, placed)
                if lock.taken_over and reports:
                    holder = lock.taken_over
                    reports[0].warnings.append(
                        f"took over the lock of an earlier run that is gone (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')})"
                    )
        except Exception as exc:
            if (cause := os_error_cause(exc)) is None:
                raise
            raise StorageError.from_os_error(cause, location) from None
        return RunReport(store.path, reports)

    def _run_locked(self, store: Store, selected: Sequence[str], placed: PlacedUnits) -> list[StageReport]:
        """The run proper, under the store's lock: record today's units in the index, clear
        what ``--force`` names, then pass over the stages until no pass finds damaged inputs
        (at most MAX_PASSES)."""
        if placed.changed:
            store.save_index(placed.index)
        kept = {
            cleared: store.clear_stage(cleared, self.stages[cleared].outputs(self.context)) for cleared in self.forced()
        }
        self.planner.check_signatures(store, selected)
        reports: dict[str, StageReport] = {}
        pools: Pools = {}
        try:
            for _ in range(MAX_PASSES):
                passed = self._run_pass(store, selected, placed, pools)
                damaged = any(r.invalidated for r in passed.values())
                for name, report in passed.items():
                    if name in reports:
                        report.absorb(reports[name])
                reports = passed
                if not damaged:
                    break
            recorded = self._recorded_attrs(placed.units)
            if any(store.attrs.get(k) != v for k, v in recorded.items()):
                store.set_root_attrs(**recorded)
        finally:
            _release(pools)
        for name, report in reports.items():
            left = kept.get(name)
            if left:
                report.warnings.append(f"--force kept {len(left)} file(s) seglab did not write, e.g. {left[0]}")
            report.warnings += store.problems_of(name)
        return list(reports.values())

    def _run_pass(
        self, store: Store, selected: Sequence[str], placed: PlacedUnits, pools: Pools
    ) -> dict[str, StageReport]:
        """Plan and run every selected stage once, in DAG order."""
        reports: dict[str, StageReport] = {}
        units = placed.units
        for name in selected:
            self._check_lease(store)
            fitted = self._fit(store, name, units, pools)
            planned_at = time.perf_counter()
            plan = self.planner.plan(store, name, placed, fitted=digest(fitted) if fitted else None)
            report = StageReport(
                name,
                len(units),
                len(units) - plan.blocked - len(plan.todo),
                len(plan.todo),
                blocked=plan.blocked,
                why=plan.why(),
            )
            if fitted and (warning := self.stages[name].fit_warning(fitted)):
                report.warnings.append(warning)
            reports[name] = report
            if not plan.todo:
                self.progress.start(name, len(units), report.already_done)
                self.progress.finish(name, report)
                continue
            store.set_stage_attrs(
                name,
                signature=self.planner.signatures[name],
                signature_digest=digest(self.planner.signatures[name]),
                inputs=stage_inputs(self.dag, name),
                outputs=list(self.stages[name].outputs(self.context)),
            )
            names = self._run_stage(store, name, plan, report, pools)
            del plan  # its maps over every unit go before the fold, a stage's largest moment
            self._finish_stage(store, name, names, report, planned_at)
            store.set_stage_attrs(
                name,
                summary={
                    "total": report.total,
                    "done": report.already_done + report.done_now,
                    "failed": len(report.failures),
                    "seconds": round(report.seconds, 3),
                    "ray_start_seconds": round(report.ray_start_seconds, 3),
                    "computed": report.done_now,
                    "worker_peak_rss": report.worker_peak_rss,
                },
            )
        return reports

    def _fit(self, store: Store, name: str, units: Sequence[Unit], pools: Pools) -> Fitted | None:
        """The stage's fit for today's inputs (None: the stage is not fitted): the stored one
        when it was made from them, else made anew by its fitter and stored as the stage's
        ``fitted`` attribute."""
        fitter = fitter_for(self.planner, name)
        if fitter is None:
            return None
        key, samples = fitter.key(store, units)
        fitted = fitter.stored(store, key)
        if fitted is None:
            fitted = fitter.fit(store, key, samples, units, _Host(self, pools))
            store.set_stage_attrs(name, fitted=fitted, fitted_from=key)
        return fitted

    def _connect(self) -> float:
        """Start or join Ray unless this process has; -> the seconds that took (0.0: it had)."""
        return ensure_ray(self.options.address or self.manifest.ray.address, num_cpus=self.manifest.ray.num_cpus)

    def _pool_for(self, name: str, pools: Pools) -> WorkerPool:
        """The pool for a stage's resource shape; consecutive stages with the same shape share
        it. Another shape's pool is shut down first so that it frees its CPUs/GPUs."""
        self._connect()
        resources = worker_resources(self.stages[name].resources, self.manifest.backend)
        key = (resources.cpus, resources.gpus)
        if key not in pools:
            _release(pools)
            pools[key] = WorkerPool(
                self._worker_spec(),
                resources,
                pool_size(resources, self.manifest.ray.workers),
                start_timeout=self.manifest.ray.worker_start_timeout,
            )
        return pools[key]

    def _worker_spec(self) -> WorkerSpec:
        return WorkerSpec(
            store_path=self.manifest.store_location,
            context=self.context,
            stage_configs={n: self.manifest.stage_config(n) for n in self.dag.order},
            backend_config=self.manifest.backend,
            tiling=self.manifest.embed.tiling,
        )

    def _run_stage(self, store: Store, name: str, plan: Plan, report: StageReport, pools: Pools) -> BatchNames:
        """Run the plan's batches on a pool of ``pools`` (or Ray Data's actors, with
        ``ray.engine: data``): workers commit what they finish; final failures
        are committed as failure batches by the driver. A unit whose input turned out damaged
        invalidates that input's unit in its producing stage (a failure row) for the next
        pass to redo. -> the stage's batch names, for ``_finish_stage``."""
        report.ray_start_seconds = self._connect()
        outputs = list(self.stages[name].outputs(self.context))
        names = BatchNames(store, name, outputs)
        todo = {u.id: u for u in plan.todo}
        self.progress.start(name, report.total, report.already_done)

        def record(outcomes: list[LedgerEntry]) -> None:
            self._check_lease(store)
            storage = next((o.storage for o in outcomes if isinstance(o, Failure) and o.storage), None)
            if storage:  # a full disk or an unwritable store is no unit's fault: stop, record nothing against it
                raise StorageError(storage.path, storage.problem)
            plain = [o for o in outcomes if isinstance(o, Failure) and not o.corrupt]
            if plain:
                commit_failures(store, name, plan.task([todo[f.unit] for f in plain], names.next()), plain)
            for outcome in outcomes:
                if isinstance(outcome, Receipt):
                    report.done_now += 1
                elif outcome.corrupt:
                    self._invalidate(store, plan.uid_of[outcome.unit], outcome.corrupt, outcome.message)
                    report.invalidated += [(outcome.unit, path) for path in outcome.corrupt]
                else:
                    report.failures.append((outcome.unit, outcome.message))
            self.progress.advance(name, len(outcomes))

        def recover(task: BatchTask) -> list[Receipt]:
            """Receipts of a lost worker's batch, when it committed it before it died."""
            table = read_commit(store.objects, name, task.batch)
            return [] if table is None else commit_receipts(table, int(task.batch[1:]), [u.id for u in task.units])

        def make_task(units: Sequence[Unit]) -> BatchTask:
            return plan.task(units, names.next())

        read_paths, retries = self.planner.read_paths(name), self.manifest.ray.max_retries
        if self.manifest.ray.engine == "data":
            _release(pools)  # Ray Data starts its own actors: free the CPUs/GPUs a pool holds
            resources = worker_resources(self.stages[name].resources, self.manifest.backend)
            workers = pool_size(resources, self.manifest.ray.workers)
            from seglab.workers.datastream import stream_batches  # noqa: PLC0415 (ray.data takes about 0.8 s to import)

            stats, report.worker_peak_rss = stream_batches(
                spec=self._worker_spec(),
                resources=resources,
                workers=workers,
                stage_name=name,
                batches=spread(plan.batches, workers),
                make_task=make_task,
                read_paths=read_paths,
                max_retries=retries,
                on_receipts=record,
                recover=recover,
            )
        else:
            pool = self._pool_for(name, pools)
            stats = run_batches(
                pool=pool,
                stage_name=name,
                batches=spread(plan.batches, pool.size),
                make_task=make_task,
                read_paths=read_paths,
                max_retries=retries,
                on_receipts=record,
                recover=recover,
                stall_timeout=self.manifest.ray.stall_timeout,
            )
            report.worker_peak_rss = pool.peak_rss()
        report.resubmitted += stats.resubmitted
        report.recovered += stats.recovered
        return names

    def _finish_stage(self, store: Store, name: str, names: BatchNames, report: StageReport, started: float) -> None:
        """Fold the stage's records and remove what nothing refers to any more (batches of
        killed writers, superseded batches). ``report.seconds``: from ``started`` (before the
        stage was planned) to the end of that, less the time Ray took to start when this
        stage was the first to need it (``ray_start_seconds``)."""
        names.tidy()
        store.refresh()
        report.seconds = time.perf_counter() - started - report.ray_start_seconds
        self.progress.finish(name, report)

    def _check_lease(self, store: Store) -> None:
        """Stop when this run's lease on an object-storage store lapsed: another run may hold
        the store now, and only one may write its records."""
        if getattr(self._lock, "lost", False):
            raise StoreBusy(
                f"{store.path}: this run's lease on the store lapsed (it could not be renewed in time) and "
                "another run may have taken it; stopped here: committed work is kept, run again to go on"
            )

    def _invalidate(self, store: Store, uid: int, paths: Sequence[str], message: str) -> None:
        """Record a failure row for ``uid`` in each stage whose output in ``paths`` is damaged."""
        for stage in dict.fromkeys(path.split("/", 1)[0] for path in paths):
            names = BatchNames(store, stage, list(self.stages[stage].outputs(self.context)), collect=False)
            store.shards.commit_failures(
                stage,
                names.next(),
                failure_records(
                    [uid], [f"CorruptOutput: {message}"], bytes(32), bytes(32), stage_inputs(self.dag, stage)
                ),
            )
        store.refresh()


def commit_failures(store: Store, stage: str, task: BatchTask, failures: Sequence[Failure]) -> None:
    """Commit the final failures of ``task``'s units (in task order) as the task's batch."""
    message = {f.unit: f.message for f in failures}
    table = failure_records(
        list(task.uids), [message[u.id] for u in task.units], task.signature, task.fitted, task.made_from
    )
    store.shards.commit_failures(stage, task.batch, table)


class BatchNames:
    """Hands out a stage's batch names (b<seq>), after removing what no record refers to
    (so the names of batches a killed writer left uncommitted are free again); ``tidy``
    folds the stage's records and collects garbage again once its batches are in."""

    def __init__(self, store: Store, stage: str, outputs: Sequence[str], *, collect: bool = True):
        self.store, self.stage, self.outputs = store, stage, outputs
        state = store.state(stage, columns=())  # the batches its rows refer to, and the next name
        if collect:
            store.shards.collect_garbage(stage, outputs, state)
        self.seq = state.next_batch

    def next(self) -> str:
        self.seq += 1
        return batch_id(self.seq - 1)

    def tidy(self) -> None:
        inputs = self.store.stage_inputs(self.stage)
        state = self.store.shards.fold(self.stage, inputs)
        self.store.shards.collect_garbage(self.stage, self.outputs, state)


class _Host:
    """What a fitter borrows from a run (``fitting.FitHost``): its pools and Ray session."""

    def __init__(self, runner: Runner, pools: Pools):
        self.runner, self.pools, self.progress = runner, pools, runner.progress

    def pool_for(self, name: str) -> WorkerPool:
        return self.runner._pool_for(name, self.pools)

    def release_pools(self) -> None:
        _release(self.pools)

    def connect(self) -> None:
        self.runner._connect()
