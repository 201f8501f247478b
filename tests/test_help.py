"""Every command's --help: an example, flags shown as flags, no typer type placeholders."""

from __future__ import annotations

import re

from typer.main import get_command
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.core.registry import STAGES, round_stages

PLACEHOLDER = re.compile(r"<[a-z]+(\[[A-Za-z]+\]| range)?>")
"""What typer shows for a parameter without a metavar: <bool>, <str>, <path>, <list[str]>, <int range>."""


def command_paths(command, path=()) -> list[tuple[str, ...]]:
    """The command line of every command and group under ``command``, itself included."""
    below = getattr(command, "commands", {})
    return [path] + [p for name, sub in below.items() for p in command_paths(sub, (*path, name))]


def test_every_help_has_an_example_and_no_type_placeholders():
    runner = CliRunner()
    paths = command_paths(get_command(app))
    assert ("run",) in paths and ("bench", "quality") in paths and len(paths) > 15
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
        assert result.exit_code == 0, (path, result.output)
        assert "Examples:" in result.output and f"seglab {' '.join(path)}".strip() in result.output, path
        assert not PLACEHOLDER.search(result.output), (path, PLACEHOLDER.findall(result.output))


def test_stage_options_list_the_stage_names_of_the_registry():
    output = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "100"}).output
    output = " ".join(re.sub("[│─╭╮╰╯]", " ", output).split())  # the text without rich's panel borders
    names = [*STAGES, *round_stages(2)]
    for option in ("--from", "--only", "--force"):
        assert option in output
    assert output.count(", ".join(dict.fromkeys(names))) == 3, output
