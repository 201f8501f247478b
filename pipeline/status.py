"""What a store holds for a manifest: per stage done / failed / total and signature state."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from seglab.pipeline.base.fingerprint import diff_signatures, digest
from seglab.pipeline.core.ledger import Failure
from seglab.pipeline.core.store import Store, store_exists
from seglab.pipeline.fitting import current_fit
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.planning import Planner, place_units
from seglab.pipeline.units import enumerate_units


@dataclass(frozen=True)
class StageStatus:
    """One stage of a store as a run would see it: ``done`` counts the units done from
    today's inputs with today's settings (a unit whose upstream unit is not done is not);
    ``blocked``:
    units waiting on an upstream stage; ``warnings``: problems found reading the store."""

    stage: str
    total: int
    done: int
    failed: int
    signature: str  # "current", "stale", "none"
    changes: tuple[str, ...]
    seconds: float | None
    failures: tuple[tuple[str, str], ...]
    fitted: dict[str, Any] | None = None  # what the stage was fitted with (calibrate: thresholds; retrain: model)
    fit_summary: str | None = None  # the stage's one-line description of ``fitted``
    blocked: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.signature == "current" and self.done == self.total

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def store_status(manifest: Manifest) -> list[StageStatus]:
    """Every stage of the manifest's DAG against its store (read only; no store yet: all to do)."""
    planner = Planner(manifest)
    units = enumerate_units(manifest)
    unit_ids = {u.id for u in units}
    store = Store(manifest.store_location) if store_exists(manifest.store_location) else None
    placed = place_units(store, units, manifest.store.shard_size)
    out = []
    for name in planner.dag.order:
        entries = store.entries(name) if store else {}
        attrs = store.stage_attrs(name) if store else {}
        stored = attrs.get("signature")
        expected = planner.signatures[name]
        state = "none" if stored is None else ("current" if digest(stored) == digest(expected) else "stale")
        stage = planner.stages[name]
        fitted = current_fit(planner, store, name, units)[0]
        plan = planner.plan(store, name, placed, fitted=digest(fitted) if fitted else None)
        failed = [(u, e.message) for u, e in entries.items() if u in unit_ids and isinstance(e, Failure)]
        out.append(
            StageStatus(
                stage=name,
                total=len(unit_ids),
                done=len(unit_ids) - len(plan.todo) - plan.blocked,
                failed=len(failed),
                signature=state,
                changes=tuple(diff_signatures(stored, expected)) if stored is not None and state == "stale" else (),
                seconds=(attrs.get("summary") or {}).get("seconds"),
                failures=tuple(sorted(failed)),
                fitted=attrs.get("fitted"),
                fit_summary=stage.describe_fit(attrs["fitted"]) if attrs.get("fitted") else None,
                blocked=plan.blocked,
                warnings=tuple(store.problems_of(name)) if store else (),
            )
        )
    return out
