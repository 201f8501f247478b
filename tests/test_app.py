"""The command line through typer's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.cli.render import Rerun, next_steps
from seglab.pipeline.runner import RunReport, StageReport

runner = CliRunner()


def test_validate_good_and_bad(tiny):
    result = runner.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 0 and "4 images" in result.output
    tiny.write_text(tiny.read_text() + "colour: red\n")
    result = runner.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 2
    assert "colour" in result.output and "Extra inputs are not permitted" in result.output
    assert "Traceback" not in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "no seglab store here" in result.output and "Traceback" not in result.output


@pytest.mark.usefixtures("ray_local")
def test_run_status_export(tiny, tmp_path):
    status = json.loads(runner.invoke(app, ["status", str(tiny), "--json"]).output)
    assert [s["done"] for s in status] == [0, 0, 0, 0, 0] and not any(s["complete"] for s in status)

    result = runner.invoke(app, ["run", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "select" in result.output and "4/4" in result.output
    assert (
        f"Labels in {tmp_path / 'run.zarr'}. Next: seglab status {tiny} · seglab export {tmp_path / 'run.zarr'} "
        "--format png --out labels · seglab report" in " ".join(result.output.split())
    )
    status = json.loads(runner.invoke(app, ["status", str(tiny), "--json"]).output)
    assert [(s["stage"], s["done"], s["total"], s["complete"]) for s in status] == [
        (name, 4, 4, True) for name in ("ingest", "embed", "prompts", "select", "refine")
    ]
    result = runner.invoke(app, ["run", str(tiny)])
    assert result.exit_code == 0 and "Nothing to do" in result.output

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "--format", "png", "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert len(index["images"]) == 4 and index["ignore_value"] == 255
    assert json.loads((out / "export.json").read_text())["stage"] == "refine"
    for entry in index["images"]:
        label = Image.open(out / entry["label"])
        assert label.mode == "P" and label.size == Image.open(entry["image"]).size
        assert set(np.unique(np.asarray(label))) <= {0, 1, 2, 255}
    assert (out / "index.csv").read_text().splitlines()[0] == "image,label,uncertainty"
    result = runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output

    tiny.write_text(tiny.read_text().replace("select: {batch_size: 2}", "select: {batch_size: 2, tau: [0.3, 0.6]}"))
    result = runner.invoke(app, ["run", str(tiny)])
    assert (
        result.exit_code == 1 and "tau: [0.3, 0.7] -> [0.3, 0.6]" in result.output and "--force select" in result.output
    )
    status = json.loads(runner.invoke(app, ["status", str(tiny), "--json"]).output)
    assert status[-1]["signature"] == "stale" and status[0]["signature"] == "current"


def test_a_dry_run_prints_the_plan_without_progress_bars_and_exits_0(tiny):
    result = runner.invoke(app, ["run", str(tiny), "--dry-run"])
    assert result.exit_code == 0, result.output  # work is blocked on ingest: still a plan, not a failure
    header = " ".join(next(line for line in result.output.splitlines() if "stage" in line).replace("┃", " ").split())
    assert header == "stage total done to do blocked why"
    assert "done in" not in result.output and "eta" not in result.output
    assert "nothing was written" in result.output
    forced = runner.invoke(app, ["run", str(tiny), "--dry-run", "--only", "ingest", "--force", "ingest"])
    assert forced.exit_code == 0 and f"To run it: seglab run {tiny} --only ingest --force ingest" in forced.output


def test_after_failures_the_next_step_is_to_fix_and_rerun():
    failed = RunReport("runs/x.zarr", [StageReport("ingest", 4, 3, 1, failures=[("a.png", "truncated")])])
    text = next_steps(failed, Rerun("my manifest.yaml", Path("other.zarr")))
    assert "1 unit(s) failed" in text and "fix them" in text
    assert "seglab run 'my manifest.yaml' --store other.zarr" in text  # what the user typed, shell-quoted
    assert "seglab status 'my manifest.yaml' --store other.zarr --json lists the failures" in text
    assert "export" not in text


def test_a_local_ray_started_by_seglab_prints_no_token_notice():
    code = (
        "import ray; from seglab.workers.raysession import ensure_ray; "
        "ensure_ray(None, num_cpus=1); print(ray.is_initialized())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.strip() == "True", result.stderr
    assert "Token authentication" not in result.stderr + result.stdout, result.stderr
