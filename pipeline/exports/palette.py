"""Class colours shared by exported palette PNGs and the report's overlays."""

from __future__ import annotations

import numpy as np


def palette(num: int = 256) -> list[int]:
    """A distinct colour per class id (PASCAL VOC's bit-interleaved palette): flat
    [r0, g0, b0, r1, ...] of ``3 * num`` ints in 0..255, as ``PIL.Image.putpalette`` takes."""
    colours = []
    for i in range(num):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def colour_of(class_id: int) -> tuple[int, int, int]:
    """(r, g, b) of one class id (ids above 255 wrap around the 256 colours)."""
    flat = palette()
    i = 3 * (int(class_id) % 256)
    return flat[i], flat[i + 1], flat[i + 2]


def colourize(labels: np.ndarray, ignore_id: int) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours; ``ignore_id`` pixels black."""
    table = np.asarray(palette(), np.uint8).reshape(256, 3)
    out = table[labels.astype(np.int64) % 256]
    out[labels == ignore_id] = 0
    return out
