"""Fitting a stage before it maps, one strategy per kind of fit a stage declares
(``Stage.fitting``):

- ``GoldSetFit`` (``FitOnGoldSet``): ``MapStage.fit`` in one worker on the gold set's units,
  their upstream outputs and gold masks (``calibrate``: conformal calibration).
- ``Training`` (``FitByTraining``): a segmenter trained on Ray Train on the run's training
  units (``retrain``), resuming from an interrupted run's checkpoints.

Every fit is keyed by a digest of what it is made from (``key``); a stored fit with the
same key is used as it is (``stored``), so a rerun never refits. The reading half (key,
stored, ``current_fit``) serves ``seglab status`` and dry runs; ``fit`` needs a
``FitHost``: the runner, which lends worker pools and the Ray session.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.fingerprint import bytes_sha256, digest
from seglab.pipeline.core.gold import gold_mask_path
from seglab.pipeline.core.ledger import LedgerEntry, Receipt
from seglab.pipeline.core.store import Store
from seglab.pipeline.planning import Planner
from seglab.pipeline.records import Progress
from seglab.pipeline.units import file_stat, gold_units, training_units
from seglab.stages.base import FitByTraining, FitOnGoldSet, Unit
from seglab.workers.pool import WorkerPool
from seglab.workers.raysession import wants_gpu

Fitted = dict[str, Any]
"""A fit as the store keeps it (the stage's ``fitted`` attribute): JSON-able."""


class FitHost(Protocol):
    """What a fit borrows from the run that needs it."""

    progress: Progress

    def pool_for(self, name: str) -> WorkerPool:
        """The worker pool for stage ``name``'s resources (started when needed)."""

    def release_pools(self) -> None:
        """Shut every worker pool down (a trainer needs their CPUs/GPUs)."""

    def connect(self) -> None:
        """Join or start the Ray session the run uses."""


class Fitter(Protocol):
    anew: str
    """Why a stage with no current fit has work left, as ``seglab status`` says it."""

    def key(self, store: Store | None, units: Sequence[Unit]) -> tuple[str, list[Unit]]:
        """(digest of what the fit would be made from now, the units it is made from);
        SeglabError when it cannot be made yet."""

    def stored(self, store: Store | None, key: str) -> Fitted | None:
        """The stored fit when it was made from ``key`` (and is still whole), else None."""

    def fit(self, store: Store, key: str, samples: list[Unit], units: Sequence[Unit], host: FitHost) -> Fitted:
        """Make the fit from ``samples`` (``units``: the run's)."""


class _Upstream:
    """The ledgers of a stage's parents, read once: which units are done, and their outputs."""

    def __init__(self, planner: Planner, store: Store | None, name: str):
        self.names = planner.dag.deps[name]
        self.entries: dict[str, dict[str, LedgerEntry]] = {
            dep: store.entries(dep) if store else {} for dep in self.names
        }

    def finished(self, unit: Unit) -> bool:
        return all(isinstance(self.entries[d].get(unit.id), Receipt) for d in self.names)

    def outputs(self, samples: Sequence[Unit]) -> list[Any]:
        """Per sample its id and its upstream outputs' records as JSON (what a key digests)."""
        return [[u.id, {d: self._outputs_json(d, u) for d in self.names}] for u in samples]

    def _outputs_json(self, stage: str, unit: Unit) -> dict[str, Any]:
        entry = self.entries[stage][unit.id]
        assert isinstance(entry, Receipt)  # callers check ``finished`` first
        return {name: record.to_json() for name, record in entry.outputs.items()}


def _stored_attrs(store: Store | None, name: str, key: str) -> Fitted | None:
    attrs = store.stage_attrs(name) if store else {}
    fitted = attrs.get("fitted")
    return fitted if attrs.get("fitted_from") == key and fitted else None


class GoldSetFit:
    """``MapStage.fit`` on the gold set's units in one worker; keyed by the stage's signature,
    the samples' upstream outputs and their gold masks' size and time."""

    anew = "to be fitted anew"

    def __init__(self, planner: Planner, name: str, kind: FitOnGoldSet):
        self.planner, self.name, self.kind = planner, name, kind
        gold = getattr(planner.manifest.data, kind.gold_set)
        assert gold is not None  # the stage is active only when the manifest names its gold set
        self.gold = gold

    def key(self, store: Store | None, units: Sequence[Unit]) -> tuple[str, list[Unit]]:
        upstream = _Upstream(self.planner, store, self.name)
        samples = gold_units(self.planner.manifest, self.kind.gold_set, list(units))
        missing = [u.id for u in samples if not upstream.finished(u)]
        if missing:
            raise SeglabError(
                f"{self.name}: cannot fit, {len(missing)} {self.kind.gold_set} image(s) have no "
                f"finished {'/'.join(upstream.names)} output (first: {missing[0]})"
            )
        masks = [gold_mask_path(self.gold, Path(u.image)) for u in samples]
        key = digest([self.planner.signatures[self.name], upstream.outputs(samples), [file_stat(m) for m in masks]])
        return key, samples

    def stored(self, store: Store | None, key: str) -> Fitted | None:
        return _stored_attrs(store, self.name, key)

    def fit(self, store: Store, key: str, samples: list[Unit], units: Sequence[Unit], host: FitHost) -> Fitted:
        return host.pool_for(self.name).fit(self.name, samples, self.planner.read_paths(self.name), self.gold)


class Training:
    """A segmenter trained on Ray Train on the training units whose upstream outputs are done
    (workers/trainer.py), resuming from the checkpoints of an interrupted run with the same
    key; keyed by the stage's signature and those units' upstream outputs. Checkpoints are
    objects of the store (a folder's files, a bucket's objects). A stored fit counts only
    while its checkpoint holds the bytes it recorded (sha256)."""

    anew = "to be trained anew"

    def __init__(self, planner: Planner, name: str, kind: FitByTraining):
        self.planner, self.name, self.kind = planner, name, kind

    def key(self, store: Store | None, units: Sequence[Unit]) -> tuple[str, list[Unit]]:
        upstream = _Upstream(self.planner, store, self.name)
        training = [u for u in training_units(self.planner.manifest, list(units)) if upstream.finished(u)]
        if not training:
            raise SeglabError(
                f"{self.name}: nothing to train on: no image outside the calibration and evaluation "
                f"sets has finished {'/'.join(upstream.names)} outputs"
            )
        return digest([self.planner.signatures[self.name], upstream.outputs(training)]), training

    def stored(self, store: Store | None, key: str) -> Fitted | None:
        fitted = _stored_attrs(store, self.name, key)
        if fitted is None or store is None:
            return None
        return fitted if store.recorded_checkpoint(fitted["checkpoint"], fitted["sha256"]) is not None else None

    def fit(self, store: Store, key: str, samples: list[Unit], units: Sequence[Unit], host: FitHost) -> Fitted:
        from seglab.workers.trainer import TrainingJob, train  # noqa: PLC0415 (torch loads only when a stage trains)

        manifest = self.planner.manifest
        host.release_pools()
        host.connect()
        config = manifest.stage_config(self.name)
        job = TrainingJob(
            store_path=store.path,
            units=tuple(u.id for u in samples),
            class_ids=self.planner.context.classes.ids,
            labels=self.kind.labels,
            uncertainty=self.kind.uncertainty,
            checkpoints=store.checkpoint_location(self.name, key[:16]),
            settings=config.model_dump(mode="json"),
            seed=manifest.run.seed,
        )
        host.progress.note(
            self.name,
            f"training {config.architecture} on {len(samples)} images for {config.epochs} epochs "
            f"({config.workers} Ray Train worker(s))",
        )
        started = time.perf_counter()
        name, state = train(
            job, num_workers=config.workers, use_gpu=wants_gpu(config.use_gpu), max_failures=manifest.ray.max_retries
        )
        seconds = time.perf_counter() - started
        host.progress.note(self.name, f"trained in {seconds:.0f}s, final loss {state['history'][-1]['loss']:.4f}")
        store.remove_other_checkpoints(self.name, keep=key[:16])
        checkpoint = store.checkpoint_key(self.name, key[:16], name)
        data = store.objects.get(checkpoint)
        if data is None:
            raise SeglabError(f"{store.path}: {checkpoint} is gone right after training wrote it")
        return {
            "architecture": config.architecture,
            "checkpoint": checkpoint,
            "sha256": bytes_sha256(data),
            "epochs": len(state["history"]),
            "units": len(samples),
            "skipped": len(training_units(manifest, list(units))) - len(samples),
            "input_size": list(config.input_size),
            "trained_on": [u.id for u in samples],
            "seconds": round(seconds, 1),
            "history": state["history"],
        }


def fitter_for(planner: Planner, name: str) -> Fitter | None:
    """The strategy that fits stage ``name`` (None: the stage is not fitted)."""
    kind = planner.stages[name].fitting
    if isinstance(kind, FitOnGoldSet):
        return GoldSetFit(planner, name, kind)
    if isinstance(kind, FitByTraining):
        return Training(planner, name, kind)
    return None


def current_fit(
    planner: Planner, store: Store | None, name: str, units: Sequence[Unit], cleared: frozenset[str] = frozenset()
) -> tuple[Fitted | None, str | None]:
    """Read only: (the stored fit stage ``name`` would use for today's inputs, None when it
    must be fitted first or is not fitted; why it must, or None). ``cleared``: stages planned
    as if ``--force`` had removed their records."""
    fitter = fitter_for(planner, name)
    if fitter is None:
        return None, None
    try:
        key, _ = fitter.key(store, units)
    except SeglabError:
        return None, "fitted once its inputs are done"
    fitted = None if name in cleared else fitter.stored(store, key)
    return (fitted, None) if fitted is not None else (None, fitter.anew)
