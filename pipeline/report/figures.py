"""The report's pictures as encoded image bytes: charts drawn with matplotlib (a
``Figure`` per chart on its own Agg canvas, never pyplot's global state) and overlay panels composed with numpy
and encoded with PIL.

Panels are downscaled to at most ``MAX_WIDTH`` pixels wide: photographs (the image, and
the weak label drawn over it) as JPEG, class maps and uncertainty maps as PNG (class maps
by nearest neighbour, so no colour is invented; uncertainty by area averaging, as a
palette PNG of 256 levels of ``CMAP``).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.morphology import dilation

from seglab.pipeline.exports.palette import colour_of, colourize

MAX_WIDTH = 320
"""Widest panel, in pixels."""
CMAP = "magma"
"""Colour map of uncertainty (dark = certain)."""
DIM = 0.4
"""Brightness of the photograph under the weak label."""
JPEG_QUALITY = 85
NO_LABEL = (255, 255, 255)
"""Colour of unlabelled pixels in class maps: white, which the class palette never uses
(its class 0 is black)."""
MARKER_SHARE = 1 / 56
"""Radius of a point marker in the weak-label panel, as a share of the panel's width (at
least 3 pixels): 6 pixels on a 320-pixel panel."""


def data_uri(data: bytes, mime: str) -> str:
    """Encoded image bytes -> a ``data:<mime>;base64,...`` URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# -- panels ----------------------------------------------------------------------------
def panel_size(height: int, width: int, max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """(height, width) of a panel of an HxW image: no wider than ``max_width``, never enlarged."""
    scale = min(1.0, max_width / max(width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _encode(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        return buffer.getvalue(), "image/jpeg"
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), "image/png"


def _shrink(rgb: np.ndarray, max_width: int, resample: int) -> Image.Image:
    height, width = rgb.shape[:2]
    h, w = panel_size(height, width, max_width)
    image = Image.fromarray(rgb)
    return image if (h, w) == rgb.shape[:2] else image.resize((w, h), resample)


def photo_panel(image: np.ndarray, max_width: int = MAX_WIDTH) -> tuple[bytes, str]:
    """HxWx3 uint8 RGB -> (JPEG bytes, mime)."""
    return _encode(_shrink(image, max_width, Image.Resampling.BOX), "JPEG")


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever stands out more against ``colour``."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (255, 255, 255)


def small_components(weak: np.ndarray, ignore_id: int, size: float) -> list[tuple[float, float, int]]:
    """(x, y, class): the centre of every weak-label component (8-connected, per class)
    narrower and shorter than ``size`` pixels, such as a point, in image pixels."""
    found = []
    for cls in np.unique(weak[weak != ignore_id]):
        components, _ = ndimage.label(weak == cls, structure=np.ones((3, 3), bool))
        for rows, cols in ndimage.find_objects(components):
            if rows.stop - rows.start < size and cols.stop - cols.start < size:
                found.append(((cols.start + cols.stop) / 2, (rows.start + rows.stop) / 2, int(cls)))
    return found


def _draw_markers(panel: Image.Image, points: Sequence[tuple[float, float, int]], scale: float, radius: int) -> None:
    """A filled circle in the class colour with a contrasting outline at each (x, y, class)."""
    draw = ImageDraw.Draw(panel)
    for x, y, cls in points:
        fill = colour_of(cls)
        cx, cy = x * scale, y * scale
        draw.ellipse(
            [cx - radius, cy - radius, cx + radius, cy + radius],
            fill=fill,
            outline=_contrast(fill),
            width=max(1, radius // 3),
        )


def weak_panel(
    image: np.ndarray, weak: np.ndarray, ignore_id: int, boxes: np.ndarray | None = None, max_width: int = MAX_WIDTH
) -> tuple[bytes, str]:
    """The weak label in class colours over the dimmed photograph -> (JPEG bytes, mime).

    image: HxWx3 uint8; weak: HxW class ids, ``ignore_id`` unlabelled; boxes: float32 [B, 5]
    (x0, y0, x1, y1, class) in image pixels, drawn as outlines. Strokes are thickened so
    that they stay visible after downscaling; components smaller than a marker (points)
    are drawn as markers, a circle of ``MARKER_SHARE`` of the panel's width."""
    h, w = weak.shape
    _, panel_w = panel_size(h, w, max_width)
    radius = max(1, math.ceil(w / panel_w))
    marker = max(3, round(panel_w * MARKER_SHARE))
    points = small_components(weak, ignore_id, 2 * marker * w / panel_w)
    shifted = np.where(weak == ignore_id, 0, weak.astype(np.int64) + 1)  # 0: unlabelled
    if shifted.any():
        shifted = dilation(shifted, np.ones((2 * radius + 1, 2 * radius + 1), bool))
    labelled = shifted > 0
    out = (image.astype(np.float32) * DIM).astype(np.uint8)
    out[labelled] = colourize(shifted[labelled] - 1, ignore_id=-1)
    panel = _shrink(out, max_width, Image.Resampling.BOX)
    scale = panel.width / w
    _draw_markers(panel, points, scale, marker)
    if boxes is not None and len(boxes):
        draw = ImageDraw.Draw(panel)
        for x0, y0, x1, y1, cls in np.asarray(boxes, np.float64):
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=colour_of(int(cls)), width=2)
    return _encode(panel, "JPEG")


def label_panel(labels: np.ndarray, ignore_id: int, max_width: int = MAX_WIDTH) -> tuple[bytes, str]:
    """HxW class ids -> (PNG bytes, mime) in class colours, ``ignore_id`` in ``NO_LABEL``."""
    rgb = colourize(labels, ignore_id)
    rgb[labels == ignore_id] = NO_LABEL
    return _encode(_shrink(rgb, max_width, Image.Resampling.NEAREST), "PNG")


def _cmap_palette() -> list[int]:
    return (np.asarray(colormaps[CMAP](np.linspace(0, 1, 256))[:, :3]) * 255).round().astype(int).ravel().tolist()


def uncertainty_panel(uncertainty: np.ndarray, max_width: int = MAX_WIDTH) -> tuple[bytes, str]:
    """HxW float in [0, 1] (0 = certain) -> (palette PNG bytes, mime) in ``CMAP``."""
    u = np.nan_to_num(np.clip(uncertainty.astype(np.float32), 0, 1), nan=1.0)
    height, width = u.shape
    h, w = panel_size(height, width, max_width)
    small = Image.fromarray(u, mode="F")
    if (h, w) != u.shape:
        small = small.resize((w, h), Image.Resampling.BOX)
    levels = np.clip(np.round(np.asarray(small) * 255), 0, 255).astype(np.uint8)
    image = Image.fromarray(levels, mode="P")
    image.putpalette(_cmap_palette())
    return _encode(image, "PNG")


# -- charts ----------------------------------------------------------------------------
def _literal(text: str) -> str:
    """Text matplotlib shows as is (a '$' would start mathtext)."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    """Render and release a figure -> PNG bytes."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", metadata={"Software": None})
    finally:
        figure.clear()
    return buffer.getvalue()


def colour_bar(label: str) -> bytes:
    """A horizontal colour bar of ``CMAP`` over [0, 1] -> PNG bytes."""
    figure = _figure(4.0, 0.75)
    axis = figure.add_subplot()
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormaps[CMAP]), cax=axis, orientation="horizontal")
    bar.set_label(label, fontsize=8)
    axis.tick_params(labelsize=8)
    return _png(figure)


def bar_chart(names: Sequence[str], values: Sequence[float], *, ylabel: str, title: str) -> bytes:
    """One bar per name -> PNG bytes."""
    figure = _figure(max(4.0, 0.7 * len(names) + 1.5), 3.0)
    axis = figure.add_subplot()
    bars = axis.bar(range(len(names)), values, color="#4c72b0")
    axis.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    axis.set_xticks(
        range(len(names)),
        [_literal(n) for n in names],
        rotation=30 if len(names) > 5 else 0,
        ha="right" if len(names) > 5 else "center",
    )
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.margins(y=0.15)
    return _png(figure)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], *, ylabel: str, title: str) -> bytes:
    """Per group, one bar per series (``series``: name -> value per group) -> PNG bytes."""
    figure = _figure(max(5.0, 0.45 * len(groups) * max(1, len(series)) + 2.0), 3.4)
    axis = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        offsets = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
        axis.bar(offsets, [0.0 if v is None or math.isnan(v) else v for v in values], width, label=_literal(name))
    axis.set_xticks(range(len(groups)), [_literal(g) for g in groups], rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return _png(figure)


def calibration_chart(
    alphas: Sequence[float],
    empirical: Sequence[float | None],
    *,
    method: str,
    feasible: Sequence[bool],
    fitted: tuple[float, float | None] | None,
) -> bytes:
    """Empirical against nominal miscoverage with the y = x diagonal; hollow markers where
    the calibration set was too small for the alpha (thresholds 1); ``fitted``: the stored
    fit's (alpha, measured miscoverage), marked -> PNG bytes."""
    figure = _figure(4.6, 4.0)
    axis = figure.add_subplot()
    top = max([*alphas, *(e for e in empirical if e is not None), 0.05]) * 1.1
    axis.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="y = x (promised bound)")
    points = [(a, e, ok) for a, e, ok in zip(alphas, empirical, feasible) if e is not None]
    axis.plot([a for a, _, _ in points], [e for _, e, _ in points], color="#4c72b0", linewidth=1)
    for ok, label in ((True, f"{method}, refitted per α"), (False, "too few calibration images (thresholds 1)")):
        chosen = [(a, e) for a, e, f in points if f == ok]
        if chosen:
            axis.plot(
                [a for a, _ in chosen],
                [e for _, e in chosen],
                marker="o",
                linestyle="none",
                color="#4c72b0",
                markerfacecolor="#4c72b0" if ok else "white",
                label=label,
            )
    if fitted is not None and fitted[1] is not None:
        axis.plot(
            [fitted[0]],
            [fitted[1]],
            marker="*",
            markersize=14,
            color="#dd8452",
            linestyle="none",
            label=f"stored fit (α = {fitted[0]:g})",
        )
    axis.set_xlim(0, top)
    axis.set_ylim(0, top)
    axis.set_xlabel("nominal miscoverage α")
    axis.set_ylabel("empirical miscoverage (evaluation images)")
    axis.legend(fontsize=8, loc="upper left")
    return _png(figure)


def rounds_chart(
    series: Mapping[str, Sequence[tuple[int, float | None]]], *, references: Mapping[str, float | None] | None = None
) -> bytes:
    """mIoU (fraction) per round for each series (name -> [(round, mIoU)]), reference sources
    as horizontal lines -> PNG bytes, in percent."""
    figure = _figure(4.6, 3.4)
    axis = figure.add_subplot()
    rounds = sorted({r for values in series.values() for r, _ in values})
    for name, values in series.items():
        shown = [(r, 100 * v) for r, v in values if v is not None]
        axis.plot([r for r, _ in shown], [v for _, v in shown], marker="o", label=_literal(f"{name}.r"))
    for name, value in (references or {}).items():
        if value is not None:
            axis.axhline(100 * value, color="grey", linestyle=":", linewidth=1, label=_literal(name))
    axis.set_xticks(rounds)
    axis.set_title("mIoU per round", fontsize=10)
    axis.set_xlabel("round r")
    axis.set_ylabel("mIoU % (evaluation images)")
    axis.legend(fontsize=8)
    return _png(figure)
