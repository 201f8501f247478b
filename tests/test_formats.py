"""The export format table (pipeline/exports/formats.py) is what the export runs and what the CLI shows."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.exports.formats import FORMATS, ExportOptions


def test_every_format_has_a_writer_taking_the_export_options():
    assert list(FORMATS) == ["png", "coco", "parquet"]
    for fmt in FORMATS.values():
        assert list(inspect.signature(fmt.writer()).parameters) == ["folder", "items", "meta", "options"], fmt.name


def test_the_command_line_offers_every_format_and_refuses_others():
    shown = " ".join(CliRunner().invoke(app, ["export", "--help"], terminal_width=200).output.split())
    for name in FORMATS:
        assert f"{name}: " in shown
    with pytest.raises(SeglabError, match="choose one of png, coco, parquet"):
        ExportOptions(format="tiff").check([0, 1])
