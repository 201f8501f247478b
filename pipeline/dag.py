"""The stage graph, derived only from what each stage declares it reads."""

from __future__ import annotations

from collections.abc import Mapping
from graphlib import CycleError, TopologicalSorter

from seglab.pipeline.base.errors import SeglabError
from seglab.stages.base import Stage


class DagError(SeglabError):
    pass


class Dag:
    """Dependencies between stages: stage A depends on B when A reads 'B' or 'B/...', or
    names it among its optional reads and B is one of ``stages``."""

    def __init__(self, stages: Mapping[str, type[Stage]]):
        self.stages = dict(stages)
        self.deps: dict[str, tuple[str, ...]] = {}
        self.reads: dict[str, tuple[str, ...]] = {}
        """Per stage, its reads and the optional reads of stages in ``stages``."""
        for name, stage in self.stages.items():
            deps = []
            optional = tuple(p for p in stage.optional_reads if p.split("/", 1)[0] in self.stages)
            self.reads[name] = (*stage.reads, *optional)
            for path in self.reads[name]:
                source = path.split("/", 1)[0]
                if source not in self.stages:
                    raise DagError(f"stage '{name}' reads '{path}', but no stage '{source}' exists")
                if source == name:
                    raise DagError(f"stage '{name}' reads its own output '{path}'")
                if source not in deps:
                    deps.append(source)
            self.deps[name] = tuple(deps)
        try:
            # stable: among ready stages keep the registry's order
            sorter = TopologicalSorter(self.deps)
            sorter.prepare()
            order: list[str] = []
            while sorter.is_active():
                ready = sorted(sorter.get_ready(), key=list(self.stages).index)
                order.extend(ready)
                sorter.done(*ready)
        except CycleError as exc:
            raise DagError(f"stages depend on each other in a cycle: {exc.args[1]}") from None
        self.order: tuple[str, ...] = tuple(order)

    def upstream(self, name: str) -> tuple[str, ...]:
        """Every stage ``name`` depends on, directly or not, in run order."""
        seen: set[str] = set()
        stack = list(self.deps[name])
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self.deps[dep])
        return tuple(s for s in self.order if s in seen)

    def downstream(self, name: str) -> tuple[str, ...]:
        """Every stage that depends on ``name``, directly or not, in run order."""
        return tuple(s for s in self.order if name in self.upstream(s))

    def select(self, *, start: str | None = None, only: str | None = None) -> tuple[str, ...]:
        """Stages a run executes: all, ``start`` and every stage after it, or ``only`` one."""
        for value in (start, only):
            if value is not None and value not in self.stages:
                raise DagError(f"unknown stage '{value}'; stages are: {', '.join(self.order)}")
        if only is not None:
            return (only,)
        if start is not None:
            return self.order[self.order.index(start) :]
        return self.order
