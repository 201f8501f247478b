"""Gold masks of a manifest's gold sets (calibration, evaluation): finding and reading them.

A gold mask is ``<masks>/<image stem>.<ext>`` for the first existing ext of .png, .bmp,
.tif, .tiff, holding per pixel a class id or a value of the gold set's ``ignore``. Under a
URL data root ``masks`` is the URL of a prefix, and a mask the URL of an object under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from seglab.pipeline.base.errors import InputError
from seglab.pipeline.base.objecturl import head_object, is_object_url, join_key
from seglab.pipeline.core.metrics import class_index
from seglab.stages.parts.imageio import open_checked

GOLD_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


class GoldSet(Protocol):
    """What a gold set of the manifest (``data.calibration``, ``data.evaluation``) tells a reader."""

    @property
    def masks(self) -> Path | str: ...

    @property
    def ignore(self) -> Sequence[int]: ...


def read_mask(path: Path | str) -> np.ndarray:
    """A single-channel class-id mask -> HxW int64."""
    image, _ = open_checked(path, max_pixels=1 << 28)
    if image.mode not in ("L", "P", "I;16", "I", "1"):
        raise InputError(path, f"a mask must hold one class id per pixel, got mode {image.mode}")
    return np.asarray(image).astype(np.int64)


def gold_mask_path(gold: GoldSet, image: Path | str) -> Path | str:
    """The gold mask of ``image`` (a path, or the URL of a mask object when ``gold.masks`` is
    a URL); InputError naming the candidates when there is none."""
    if is_object_url(gold.masks):
        return mask_under_prefix(str(gold.masks), PurePosixPath(str(image)).name)
    return mask_in_folder(Path(gold.masks), Path(image))


def mask_in_folder(folder: Path, image: Path) -> Path:
    """``folder``/<image stem><first existing suffix>; InputError when there is none."""
    for suffix in GOLD_SUFFIXES:
        path = folder / f"{image.stem}{suffix}"
        if path.is_file():
            return path
    raise InputError(folder, f"no gold mask for {image} (looked for {image.stem}{{{','.join(GOLD_SUFFIXES)}}})")


def mask_under_prefix(prefix: str, image_name: str) -> str:
    """The URL ``prefix``/<stem of image_name><first existing suffix>; InputError naming the
    prefix when there is none, or when the object store cannot be asked."""
    stem = PurePosixPath(image_name).stem
    for suffix in GOLD_SUFFIXES:
        url = join_key(prefix, f"{stem}{suffix}")
        try:
            found = head_object(url) is not None
        except OSError as exc:
            raise InputError(url, f"cannot look for a gold mask: {exc.strerror}") from None
        if found:
            return url
    raise InputError(prefix, f"no gold mask for {image_name} (looked for {stem}{{{','.join(GOLD_SUFFIXES)}}})")


def read_gold(
    gold: GoldSet, image: Path | str, class_ids: tuple[int, ...], expected_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """-> (HxW int64 position of the gold class in ``class_ids``, HxW bool valid).

    Ignored values are invalid pixels; any other value that is not a class id, or a mask
    whose size is not ``expected_hw``, is an InputError naming the mask file."""
    return read_gold_file(gold_mask_path(gold, image), gold.ignore, class_ids, expected_hw)


def read_gold_file(
    path: Path | str, ignore: Sequence[int], class_ids: tuple[int, ...], expected_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``read_gold`` for a known mask file and its ignored values."""
    mask = read_mask(path)
    if mask.shape != tuple(expected_hw):
        raise InputError(
            path, f"gold mask is {mask.shape[1]}x{mask.shape[0]}, the image {expected_hw[1]}x{expected_hw[0]}"
        )
    return gold_indices(mask, path, ignore, class_ids)


def gold_indices(
    mask: np.ndarray, path: Path | str, ignore: Sequence[int], class_ids: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """A read gold mask (HxW values) -> (HxW int64 position of the class in ``class_ids``,
    HxW bool valid); a value neither a class id nor in ``ignore`` is an InputError naming ``path``."""
    index, is_class = class_index(mask, class_ids)
    unknown = ~is_class & ~np.isin(mask, np.asarray(ignore, np.int64))
    if unknown.any():
        raise InputError(
            path,
            f"gold values {np.unique(mask[unknown]).tolist()} are neither class ids "
            f"{list(class_ids)} nor ignored {list(ignore)}",
        )
    return index.astype(np.int64), is_class
