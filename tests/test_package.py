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
    installed = {m.name for m in pkgutil.walk_packages(pkg.__path__, f"seglab.{package}.")}
    in_tree = {
        f"seglab.{package}." + ".".join(p.relative_to(ROOT / package).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
        if p.relative_to(ROOT / package) != Path("__init__.py")
    }
    assert in_tree <= installed, f"modules missing from the installed seglab.{package}: {in_tree - installed}"
    for name in sorted(installed):
        importlib.import_module(name)


def test_demo_data_ships_and_console_script_exists():
    from importlib.resources import files

    assert (files(seglab.manifests) / "demo.yaml").is_file()
    assert (files(seglab.manifests) / "demo" / "points.json").is_file()
    assert shutil.which("seglab")
