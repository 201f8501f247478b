"""The export formats, by name, and the options an export takes.

A format is a module of this package with a ``write(folder, items, meta, options) ->
counts`` function and one entry here: ``seglab export --format`` checks against this table
and shows it in its help, and the export runs the module's ``write``. Kept free of heavy
imports (pyarrow, pycocotools), which the modules load only when an export runs, so the
command line can read it at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seglab.pipeline.base.errors import SeglabError

UNCERTAINTY_FORMATS = ("png", "npy")
"""How the png format writes uncertainty: 8-bit PNG or float16 .npy."""


@dataclass(frozen=True)
class ExportFormat:
    """name: what ``--format`` takes; summary: one line for the help; module: the module of
    seglab.pipeline.exports that writes it."""

    name: str
    summary: str
    module: str

    def writer(self) -> Callable[..., dict[str, Any]]:
        """The module's ``write(folder, items, meta, options)``."""
        return importlib.import_module(f"seglab.pipeline.exports.{self.module}").write


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("png", "class-map PNGs, uncertainty maps, a palette and an index", "png"),
        ExportFormat("coco", "COCO JSON with an RLE mask per connected region of each class", "coco"),
        ExportFormat("parquet", "one Parquet table, a row per image, label and uncertainty as PNG bytes", "parquet"),
    )
}


def format_help() -> str:
    """The ``--format`` help: every format with its summary."""
    return "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()) + "."


@dataclass(frozen=True)
class ExportOptions:
    """format: a name in FORMATS; stage / round: the label source (default: the last round's
    refine); split: 'training', 'calibration' or 'evaluation' only; max_uncertain: drop
    images whose share of pixels with uncertainty >= uncertain_above exceeds it;
    ignore_value: what unlabelled pixels hold in the export; uncertainty_format: 'png' or
    'npy' (png format); embed_images: image file bytes in the rows (parquet format);
    overwrite: replace ``out`` if it is a seglab export; skip_damaged: export the images
    whose stored arrays are sound and list the others, instead of refusing."""

    format: str = "png"
    stage: str | None = None
    round: int | None = None
    split: str | None = None
    max_uncertain: float | None = None
    uncertain_above: float = 0.5
    ignore_value: int = 255
    uncertainty_format: str = "png"
    embed_images: bool = False
    overwrite: bool = False
    skip_damaged: bool = False

    def check(self, class_ids: list[int]) -> None:
        if self.format not in FORMATS:
            raise SeglabError(f"unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}")
        if self.uncertainty_format not in UNCERTAINTY_FORMATS:
            raise SeglabError(f"unknown uncertainty format '{self.uncertainty_format}'; choose png or npy")
        if not 0 <= self.ignore_value <= 65535:
            raise SeglabError(f"--ignore-value {self.ignore_value} is outside 0..65535")
        if self.ignore_value in class_ids:
            raise SeglabError(f"--ignore-value {self.ignore_value} is a class id; pick a value no class uses")
        for name in ("max_uncertain", "uncertain_above"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SeglabError(f"--{name.replace('_', '-')} {value} is outside [0, 1]")
