"""Valid inputs at the edges: strips one pixel thin, and weak labels a hair inside the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.embed import Embed, EmbedConfig, TilingConfig
from seglab.stages.ingest import Ingest, IngestConfig
from seglab.stages.parts.views import ViewSpec
from seglab.stages.parts.weak import rasterize_points, validate_boxes, validate_points
from seglab.stages.prompts import Prompts, PromptsConfig
from seglab.stages.refine import Refine, RefineConfig
from seglab.stages.select import Select, SelectConfig
from seglab.workers.tiling import TiledBackend
from seglab.workers.weightfree import WeightFreeBackend

CLASSES = ClassTable((0, 1), ("background", "object"), 255)
NO_BOXES = np.zeros((0, 5), np.float32)


def strip(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red object over the second fifth of a strip's length on grey, with one weak pixel of
    each class -> (image uint8 [H, W, 3], weak uint8 [H, W], truth uint8 [H, W])."""
    n = max(height, width)
    t = np.arange(n)
    along = ((t >= n // 5) & (t < 2 * n // 5)).astype(np.uint8)
    truth = np.broadcast_to(along[None] if height <= width else along[:, None], (height, width)).copy()
    image = np.where(truth[..., None] == 1, np.uint8([200, 40, 40]), np.uint8([90, 120, 100]))
    weak = np.full((height, width), 255, np.uint8)
    for k, i in ((1, (3 * n) // 10), (0, n - 1 - n // 10)):
        weak[(0, i) if height <= width else (i, 0)] = k
    return np.ascontiguousarray(image), weak, truth


def run_stages(image: np.ndarray, weak: np.ndarray, backend, views=()) -> tuple[dict, dict]:
    """embed -> prompts -> select -> refine as the workers call them -> (select's, refine's outputs)."""
    ctx = Context(
        classes=CLASSES,
        weak_kind="scribbles",
        seed=0,
        backend=backend,
        feature_names=backend.feature_names(),
    )
    unit = Unit("strip", "strip.png")
    embed = Embed(EmbedConfig(views=views)).process(unit, {"ingest/image": image}, ctx)
    prompts = Prompts(PromptsConfig()).process(unit, {"ingest/weak": weak, "ingest/boxes": NO_BOXES}, ctx)
    ingested = {"ingest/weak": weak, "ingest/image": image, "ingest/boxes": NO_BOXES}
    features = {f"embed/{k}": v for k, v in embed.items()}
    select = Select(SelectConfig()).process(
        unit, {**ingested, **features, **{f"prompts/{k}": v for k, v in prompts.items()}}, ctx
    )
    refine = Refine(RefineConfig()).process(
        unit, {**ingested, **features, **{f"select/{k}": v for k, v in select.items()}}, ctx
    )
    return select, refine


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (2, 3000), (3000, 2), (1, 1), (3, 700)])
def test_thin_strips_go_through_every_stage_and_are_segmented(shape):
    image, weak, truth = strip(*shape)
    views = (ViewSpec(flip=True), ViewSpec(scale=0.5))
    select, refine = run_stages(image, weak, WeightFreeBackend(), views)
    assert select["labels"].shape == refine["labels"].shape == shape
    assert select["probabilities"].shape == (2, *shape) and refine["signals"].shape[1:] == shape
    if shape != (1, 1):
        assert (select["chosen"] >= 0).all()
        assert (select["labels"] == truth).mean() > 0.95 and (refine["labels"] == truth).mean() > 0.95


def test_a_thin_strip_is_tiled_and_its_logits_reach_the_grid():
    image, weak, truth = strip(1, 3000)
    backend = TiledBackend(WeightFreeBackend(), TilingConfig(above=1024, tile=1024, halo=64))
    select, _ = run_stages(image, weak, backend)
    assert (select["chosen"] >= 0).all()  # each prompt's mask covers its weak pixel on the global grid
    assert (select["labels"][:, 650:950] == 1).all() and (truth[:, 650:950] == 1).all()


# ---------------------------------------------------------------- points and boxes in float32


def test_a_point_a_hair_left_of_the_right_edge_is_kept_in_the_last_pixel(tmp_path):
    Image.new("RGB", (64, 48), (90, 120, 100)).save(tmp_path / "im.png")
    unit = Unit(
        "im",
        str(tmp_path / "im.png"),
        weak_rows=((63.999999, 47.9999999, 1), (0.0, 0.0, 0)),
        weak_source=str(tmp_path / "points.csv"),
    )
    ctx = Context(classes=CLASSES, weak_kind="points", seed=0)
    weak = Ingest(IngestConfig()).process(unit, {}, ctx)["weak"]
    assert weak[47, 63] == 1 and weak[0, 0] == 0 and (weak != 255).sum() == 2


def test_points_in_neighbouring_pixels_stay_in_their_own_pixels():
    points = validate_points(
        [(4.99999999, 5.0, 1), (5.2, 5.0, 0)], path_for_errors="p.csv", image_hw=(48, 64), class_ids=frozenset({0, 1})
    )
    weak = rasterize_points(points, (48, 64), 255, np.uint8)
    assert weak[5, 4] == 1 and weak[5, 5] == 0


def test_box_corners_are_rounded_outward_and_still_fit():
    boxes = validate_boxes(
        [(63.99999999, 0.0, 64.0, 5.0, 1), (0.1, 0.2, 10.00000001, 47.99999999, 0)],
        path_for_errors="b.csv",
        image_hw=(48, 64),
        class_ids=frozenset({0, 1}),
    )
    assert boxes.dtype == np.float32
    x0, y0, x1, y1 = boxes[:, :4].astype(np.float64).T
    assert (x0 < x1).all() and (x1 <= 64).all() and (y1 <= 48).all()
    assert x0[0] <= 63.99999999 and x1[1] >= 10.00000001 and y0[1] <= 0.2
