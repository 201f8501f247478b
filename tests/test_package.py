"""The installed package: every module imports under its seglab.* name, data ships."""
from __future__ import annotations

import importlib
import pkgutil
import shutil
from pathlib import Path

import pytest

import seglab.manifests

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "workers", "cli", "manifests")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_source_module_imports_from_the_installed_package(package):
    pkg = importlib.import_module(f"seglab.{package}")
    installed = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    in_tree = {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    assert in_tree <= installed, f"modules missing from the installed seglab.{package}: {in_tree - installed}"
    for name in sorted(installed):
        importlib.import_module(f"seglab.{package}.{name}")


def test_demo_data_ships_and_console_script_exists():
    from importlib.resources import files

    assert (files(seglab.manifests) / "demo.yaml").is_file()
    assert (files(seglab.manifests) / "demo" / "points.json").is_file()
    assert shutil.which("seglab")


def test_stages_never_import_zarr_ray_or_rich():
    for path in (ROOT / "stages").glob("*.py"):
        text = path.read_text()
        for banned in ("import zarr", "import ray", "from ray", "import rich", "from rich", "import torch"):
            assert banned not in text, f"{path.name} imports {banned.split()[-1]}"
    for folder in ("pipeline", "stages", "workers"):
        for path in (ROOT / folder).glob("*.py"):
            assert "rich" not in path.read_text().replace("enrich", ""), f"{path} uses rich (only cli/ may)"
