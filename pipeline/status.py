"""What a store holds for a manifest: per stage done / failed / total and signature state."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from seglab.pipeline.fingerprint import diff_signatures, digest
from seglab.pipeline.manifest import Manifest
from seglab.pipeline.store import Store, done_units
from seglab.pipeline.units import enumerate_units


@dataclass(frozen=True)
class StageStatus:
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

    @property
    def complete(self) -> bool:
        return self.signature == "current" and self.done == self.total

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def store_status(manifest: Manifest) -> list[StageStatus]:
    from seglab.pipeline.runner import Runner

    runner = Runner(manifest)
    unit_ids = {u.id for u in enumerate_units(manifest)}
    path = manifest.store_path
    store = Store(path) if (path / "zarr.json").exists() else None
    out = []
    for name in runner.dag.order:
        entries = store.ledger(name).load() if store else {}
        attrs = store.stage_attrs(name) if store else {}
        stored = attrs.get("signature")
        expected = runner.signatures[name]
        state = "none" if stored is None else ("current" if digest(stored) == digest(expected) else "stale")
        sig = digest(expected)
        done = done_units(entries, sig) & unit_ids
        failed = [(u, e["error"]["message"]) for u, e in entries.items() if u in unit_ids and e.get("status") == "failed"]
        out.append(StageStatus(
            stage=name, total=len(unit_ids), done=len(done), failed=len(failed), signature=state,
            changes=tuple(diff_signatures(stored, expected)) if state == "stale" else (),
            seconds=(attrs.get("summary") or {}).get("seconds"), failures=tuple(sorted(failed)),
            fitted=attrs.get("fitted"),
            fit_summary=runner.stages[name].describe_fit(attrs["fitted"]) if attrs.get("fitted") else None,
        ))
    return out
