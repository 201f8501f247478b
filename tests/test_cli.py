"""The command line through typer's runner."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app

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

    tiny.write_text(tiny.read_text().replace("select: {batch_size: 2}", "select: {batch_size: 2, min_probability: 0.6}"))
    result = runner.invoke(app, ["run", str(tiny)])
    assert result.exit_code == 1 and "min_probability: 0.5 -> 0.6" in result.output and "--force select" in result.output
    status = json.loads(runner.invoke(app, ["status", str(tiny), "--json"]).output)
    assert status[-1]["signature"] == "stale" and status[0]["signature"] == "current"
