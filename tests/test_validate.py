"""`seglab validate` and `seglab run` on missing weak labels (issue 16, item 14)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import ManifestError
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.units import enumerate_units

cli = CliRunner()


def _points_manifest(tiny, rows_for: list[str]):
    """Switch ``tiny`` to a points table with one point per image named in ``rows_for``."""
    lines = ["image,x,y,class", *(f"{name},5,5,1" for name in rows_for)]
    (tiny.parent / "points.csv").write_text("\n".join(lines) + "\n")
    tiny.write_text(
        tiny.read_text().replace("{kind: scribbles, path: data/scribbles}", "{kind: points, path: points.csv}")
    )


def _weak_path_problem(tiny) -> str:
    with pytest.raises(ManifestError) as info:
        enumerate_units(load_manifest(tiny))
    problems = dict(info.value.problems)
    assert list(problems) == ["data.weak.path"], info.value.problems
    return problems["data.weak.path"]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_missing_scribbles_folder_is_one_manifest_error_up_front(tiny, command):
    shutil.rmtree(tiny.parent / "data" / "scribbles")
    folder = (tiny.parent / "data" / "scribbles").resolve()
    assert _weak_path_problem(tiny) == f"{folder} does not exist"
    result = cli.invoke(app, [command, str(tiny)])
    assert result.exit_code == 2, result.output
    assert "data.weak.path" in result.output and str(folder) in result.output and "images)" not in result.output
    assert not (tiny.parent / "run.zarr").exists()  # refused before anything ran


def test_a_missing_points_file_is_a_manifest_error_at_its_key(tiny):
    _points_manifest(tiny, ["img00.png"])
    (tiny.parent / "points.csv").unlink()
    assert _weak_path_problem(tiny) == f"{(tiny.parent / 'points.csv').resolve()} does not exist"
    result = cli.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 2 and "data.weak.path" in result.output, result.output


def test_the_weak_label_path_must_be_the_right_kind_of_entry(tiny):
    original = tiny.read_text()
    (tiny.parent / "points.csv").mkdir()
    tiny.write_text(original.replace("{kind: scribbles, path: data/scribbles}", "{kind: points, path: points.csv}"))
    assert "is a folder; points are one table file" in _weak_path_problem(tiny)
    (tiny.parent / "file.png").write_bytes(b"")
    tiny.write_text(original.replace("path: data/scribbles", "path: file.png"))
    assert "is a file; scribbles are a folder of <image stem>.png label maps" in _weak_path_problem(tiny)


def test_an_unreadable_weak_label_folder_is_named(tiny, monkeypatch):
    folder = (tiny.parent / "data" / "scribbles").resolve()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)  # as if chmod 0 (root reads anyway)
    assert _weak_path_problem(tiny) == f"{folder} is not readable (permission denied)"


def test_validate_warns_with_a_count_and_examples_of_images_without_weak_labels(tiny):
    (tiny.parent / "data" / "scribbles" / "img01.png").unlink()
    (tiny.parent / "data" / "scribbles" / "img03.png").unlink()
    result = cli.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "4 images" in result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert len(warning) == 1, result.output
    assert "2 of 4 images have no weak label" in warning[0]
    assert "images/img01.png, images/img03.png" in warning[0] and "scribbles" in warning[0]


def test_validate_counts_images_without_rows_in_a_points_table(tiny):
    _points_manifest(tiny, ["img00.png", "img02.png"])
    result = cli.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "2 of 4 images have no weak label" in result.output and "no row in" in result.output
    assert "images/img01.png, images/img03.png" in result.output


def test_validate_says_nothing_more_when_every_image_has_a_weak_label(tiny):
    result = cli.invoke(app, ["validate", str(tiny)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
