import pytest

from seglab.pipeline.core.registry import STAGES
from seglab.pipeline.dag import Dag, DagError
from seglab.stages.base import MapStage


def fake(name: str, reads: tuple[str, ...]):
    return type(name.title(), (MapStage,), {"name": name, "reads": reads, "outputs": lambda s, c: (), "process": None})


def test_pipeline_order_comes_from_reads():
    dag = Dag(STAGES)
    assert dag.order == ("ingest", "embed", "prompts", "select", "calibrate", "refine", "retrain")
    assert set(dag.deps["select"]) == {"embed", "prompts", "ingest"}
    assert dag.deps["calibrate"] == ("select",)
    assert set(dag.deps["refine"]) == {"select", "embed", "ingest", "calibrate"}
    assert set(dag.deps["retrain"]) == {"ingest", "refine"}
    assert dag.downstream("embed") == ("select", "calibrate", "refine", "retrain")
    assert dag.downstream("ingest") == ("embed", "prompts", "select", "calibrate", "refine", "retrain")
    assert dag.upstream("calibrate") == ("ingest", "embed", "prompts", "select")


def test_optional_reads_follow_the_stages_a_manifest_runs():
    without = Dag({n: s for n, s in STAGES.items() if n != "calibrate"})
    assert without.order == ("ingest", "embed", "prompts", "select", "refine", "retrain")
    assert "calibrate" not in without.deps["refine"] and "calibrate/labels" not in without.reads["refine"]
    assert "calibrate/labels" in Dag(STAGES).reads["refine"]


def test_order_follows_dependencies_not_registry_order():
    stages = {"c": fake("c", ("b/x",)), "b": fake("b", ("a",)), "a": fake("a", ())}
    assert Dag(stages).order == ("a", "b", "c")


def test_cycles_and_unknown_reads_are_errors():
    with pytest.raises(DagError, match="cycle"):
        Dag({"a": fake("a", ("b",)), "b": fake("b", ("a",))})
    with pytest.raises(DagError, match="no stage 'zz'"):
        Dag({"a": fake("a", ("zz/x",))})


def test_selecting_stages():
    dag = Dag(STAGES)
    assert dag.select(only="prompts") == ("prompts",)
    assert dag.select(start="prompts") == ("prompts", "select", "calibrate", "refine", "retrain")
    with pytest.raises(DagError, match="unknown stage 'nope'"):
        dag.select(start="nope")
