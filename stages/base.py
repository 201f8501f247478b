"""What a stage is: a name, a config model, what it reads and writes, and its work.

A map stage's ``process`` is a pure function of arrays and config: the runner reads the
unit's inputs from the store, calls it (inside a Ray worker), writes the outputs and
records a receipt. Stages never touch zarr, Ray or devices; a model, when a stage needs
one, arrives as ``ctx.backend``, built by workers/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base of every stage's manifest section: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = 4
    """Units passed to one ``process_batch`` call. A worker's task is the units of one shard
    (``store.shard_size``) still to do; it processes them in batches of this size."""


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; workers/ turns this into Ray options."""

    cpus: float = 1.0
    gpus: float = 0.0
    needs_backend: bool = False


@dataclass(frozen=True, slots=True)
class Unit:
    """One image and its weak label, as enumerated from the manifest by the driver.

    id: stable key (the image path relative to the data root, '/' replaced by '__').
    image: absolute path of the image file, or the URL of its object (s3://, gs://).
    weak_map: absolute path (or object URL) of a scribble/coarse label map, if the weak kind has one.
    weak_rows: this image's rows of a table-kind weak label: (x, y, class) for points,
        (x0, y0, x1, y1, class) for boxes.
    """

    id: str
    image: str
    weak_map: str | None = None
    weak_rows: tuple[tuple[float, ...], ...] = ()
    weak_source: str | None = None


@dataclass(frozen=True)
class ClassTable:
    """The manifest's classes: ids, names, and the ignore id written for 'no label'."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    ignore_id: int

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if max(*self.ids, self.ignore_id) <= 255 else np.uint16)


@dataclass
class Context:
    """What a stage may use besides its inputs. Built inside the worker."""

    classes: ClassTable
    weak_kind: str
    seed: int
    backend: Any = None
    """A workers.promptable.PromptableBackend, for stages with ``Resources.needs_backend``."""
    unlabelled: int | None = None
    """The value of a weak label map (scribbles, coarse masks) that means 'no label'."""
    background: int | None = None
    """Boxes: the class of everything no box covers (``data.weak.background``), or None."""
    feature_names: tuple[str, ...] = ()
    """Names of the arrays the backend's encoder caches (what ``embed`` writes)."""
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None
    """The trained teacher, for stages that predict with it (``retrain``): image HxWx3 uint8
    -> float32 [C, h, w] class probabilities."""


@dataclass(frozen=True)
class FitOnGoldSet:
    """The stage is fitted on the manifest's gold set ``gold_set`` ('calibration': its images
    and gold masks) by ``MapStage.fit`` before it maps, and runs only when the manifest names
    that set."""

    gold_set: str


@dataclass(frozen=True)
class FitByTraining:
    """The stage is fitted by training a model (workers/trainer.py) on the run's training
    units before it maps, learning from the store paths ``labels`` (HxW class ids) and
    ``uncertainty`` (HxW float in [0, 1]); it runs only in the ``rounds`` a manifest asks for."""

    labels: str
    uncertainty: str


ROUND_SEPARATOR = "."


def round_name(stage: str, r: int) -> str:
    """Name (= store group) of ``stage`` in round ``r``: 'refine', 'refine.1', ..."""
    return stage if r == 0 else f"{stage}{ROUND_SEPARATOR}{r}"


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]]
    reads: ClassVar[tuple[str, ...]] = ()
    """Store paths 'stage/array', or 'stage' for every array that stage writes."""
    optional_reads: ClassVar[tuple[str, ...]] = ()
    """Like ``reads``, for stages a manifest may not run (``calibrate`` without a calibration
    set): read when that stage runs, absent from ``inputs`` otherwise."""
    resources: ClassVar[Resources] = Resources()
    writes_class_map: ClassVar[bool] = False
    """True when the stage's ``labels`` output is a dense HxW class map (what evaluate scores)."""
    gold_reads: ClassVar[tuple[str, ...]] = ()
    """Store paths ('stage/array') that ``gold_measures`` needs; none: it measures nothing."""
    fitting: ClassVar[FitOnGoldSet | FitByTraining | None] = None
    """How the stage is fitted before it maps, if it is (the engine runs one strategy per kind)."""

    def __init__(self, config: StageConfig):
        self.config = config

    @classmethod
    def in_round(cls, r: int) -> type[Self]:
        """The stage as it runs in round ``r`` (its store group ``round_name(name, r)``);
        round 0 is the stage itself, only stages that repeat per round have others."""
        if r == 0:
            return cls
        raise ValueError(f"stage '{cls.name}' does not repeat in rounds")

    def signature_config(self) -> dict[str, Any]:
        """The config settings that decide the stage's outputs (its signature's config part);
        default: all of them but ``batch_size``."""
        return self.config.model_dump(mode="json", exclude={"batch_size"})

    @property
    def fits(self) -> bool:
        """Whether the stage is fitted (on a gold set, or by training) before it maps."""
        return self.fitting is not None

    @abstractmethod
    def outputs(self, ctx: Context) -> tuple[str, ...]:
        """Names of the arrays written per unit under this stage's group."""

    def describe_fit(self, fitted: dict[str, Any]) -> str:
        """One line for the operator about the stored fit (``seglab status``); for fitted stages."""
        raise NotImplementedError(f"stage '{self.name}' is not fitted")

    def fit_warning(self, fitted: dict[str, Any]) -> str | None:
        """A sentence for the operator when the fit could not keep its promise (default none)."""
        return None


@dataclass(frozen=True)
class GoldSample:
    """One gold-labelled unit for ``MapStage.fit``.

    inputs: the stage's reads for the unit ('stage/array' -> array).
    gold_index: HxW int64, the gold class's position in the manifest's class order.
    valid: HxW bool, False where the gold mask holds an ignored value.
    """

    unit: str
    inputs: Mapping[str, np.ndarray]
    gold_index: np.ndarray
    valid: np.ndarray


class MapStage(Stage):
    """Independent per unit: the runner fans units out to workers in batches.

    A stage fitted on a gold set (``FitOnGoldSet``) is first fitted: ``fit`` runs once (in a worker) on the
    gold set's units and returns JSON-able parameters; the runner stores them as the
    stage's ``fitted`` attribute and hands them to every worker as ``self.fitted``.
    """

    fitted: dict[str, Any] | None = None

    def fit(self, samples: Sequence[GoldSample], ctx: Context) -> dict[str, Any]:
        """Parameters fitted on the gold samples (JSON-able); only for stages fitted on a gold set."""
        raise NotImplementedError(f"stage '{self.name}' has no gold set to fit on")

    def gold_measures(
        self, inputs: Mapping[str, np.ndarray], gold_index: np.ndarray, valid: np.ndarray, ctx: Context
    ) -> dict[str, float]:
        """Per-image measures of this stage against a gold mask beyond its class map (which
        ``seglab evaluate`` scores anyway), averaged over images by evaluate; default none.
        inputs: the image's arrays named in ``gold_reads``; gold_index, valid: as in ``GoldSample``."""
        return {}

    @abstractmethod
    def process(self, unit: Unit, inputs: Mapping[str, np.ndarray], ctx: Context) -> dict[str, np.ndarray]:
        """inputs: 'stage/array' -> array for this unit; returns output name -> array."""

    def receipt_info(self, unit: Unit, outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Small JSON-able facts about a finished unit, kept in the ledger (default none)."""
        return {}

    def process_batch(
        self, units: Sequence[Unit], inputs: Sequence[Mapping[str, np.ndarray]], ctx: Context
    ) -> list[dict[str, np.ndarray] | BaseException]:
        """Default: one unit at a time, a failure recorded per unit. Stages whose model
        gains from batching (embed) override this."""
        results: list[dict[str, np.ndarray] | BaseException] = []
        for unit, unit_inputs in zip(units, inputs):
            try:
                results.append(self.process(unit, unit_inputs, ctx))
            except Exception as exc:  # recorded per unit by the worker, never fatal to the batch
                results.append(exc)
        return results
