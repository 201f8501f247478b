"""seglab bench scale / bench rerun on a few synthetic images (each run is a `seglab run` process)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.bench.scale import bench_scale
from seglab.pipeline.core.store import Store


def test_rerun_of_a_finished_run_encodes_nothing_and_is_timed(tmp_path):
    result = CliRunner().invoke(app, ["bench", "rerun", "--images", "4", "--folder", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["encoder_calls_in_rerun"] == 0
    assert set(figures["records_added_by_rerun"]) == {"ingest", "embed", "prompts", "select", "refine"}
    assert not any(figures["records_added_by_rerun"].values())
    assert 0 < figures["rerun_seconds"] < figures["first_seconds"]
    assert figures["rerun_share"] == round(figures["rerun_seconds"] / figures["first_seconds"], 4)
    again = CliRunner().invoke(app, ["bench", "rerun", "--images", "4", "--folder", str(tmp_path)])
    assert again.exit_code == 1 and "times a first run from nothing" in again.output


def test_scale_reports_every_run_with_stage_rates_and_peak_memory(tmp_path):
    result = bench_scale(tmp_path, images=(3, 5), workers=(2,), size=(48, 64))
    assert [(r["images"], r["workers"]) for r in result["runs"]] == [(3, 2), (5, 2)]
    for run in result["runs"]:
        stages = Store(tmp_path / f"scale-{run['images']}-w2.zarr").entries("refine")
        assert len(stages) == run["images"]
        assert run["driver_peak_rss"] > 50 * 2**20 and run["worker_peak_rss"] > 50 * 2**20
        assert run["objects"] == len(Store(run["store"]).objects.list("")) > 0
        assert run["objects_per_image"] == round(run["objects"] / run["images"], 3)
        for figures in run["stages"].values():  # wall time minus time inside process, per unit
            assert 0 <= figures["process_seconds"] < figures["seconds"] * 2
            expected = 1000 * (figures["seconds"] - figures["process_seconds"] / 2) / figures["computed"]
            assert figures["overhead_ms_per_unit"] == pytest.approx(expected, abs=1.0)  # inputs rounded
        started = {name: f["ray_start_seconds"] for name, f in run["stages"].items()}
        assert started["ingest"] > 0.5 and not any(v for name, v in started.items() if name != "ingest")
        assert run["ray_start_seconds"] == round(started["ingest"], 2)  # the run's first stage starts Ray, once
        assert run["seconds"] > run["map_seconds"] + run["ray_start_seconds"]  # kept apart, not counted twice
        embed = run["stages"]["embed"]
        assert embed["computed"] == run["images"] and embed["images_per_second"] == round(
            embed["computed"] / embed["seconds"], 3
        )
    assert result["driver_memory_ratio"] == round(
        result["runs"][1]["driver_peak_rss"] / result["runs"][0]["driver_peak_rss"], 3
    )
    assert "worker_speedup" not in result
