"""SCALER's augmentation ensemble: view geometry, the vote, and select over cached views."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scribbles_from_truth, shapes_image

from seglab.stages.base import ClassTable, Context
from seglab.stages.embed import Embed, EmbedConfig
from seglab.stages.parts.fusion import ViewEnsemble
from seglab.stages.parts.promptset import POSITIVE, PromptBatch
from seglab.stages.parts.views import View, ViewSpec
from seglab.stages.prompts import Prompts, PromptsConfig
from seglab.stages.select import Select, SelectConfig, split_views
from seglab.workers.backend import build_backend, feature_names
from seglab.workers.weightfree import WeightFreeConfig


@pytest.mark.parametrize("flip, scale", [(True, 1.0), (False, 0.5), (True, 1.5)])
def test_points_and_boxes_land_on_the_same_content_in_the_view(flip, scale):
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:20, 5:15] = 255  # a white square at x 5..15, y 10..20
    view = View(flip, scale, (40, 60))
    seen = view.image(image)
    assert seen.shape[:2] == view.view_hw == (round(40 * scale), round(60 * scale))
    x, y = view.points(np.array([10.0, 15.0]))
    assert seen[int(y), int(x)].tolist() == [255, 255, 255]
    prompts = PromptBatch(
        np.array([[[10.0, 15.0]]], np.float32),
        np.array([[POSITIVE]], np.int32),
        np.array([[5, 10, 15, 20]], np.float32),
        np.array([1], np.int32),
        np.array([0], np.int32),
    )
    box = view.prompts(prompts).boxes[0]
    assert box[0] < box[2] and box[1] < box[3]
    inside = seen[int(box[1]) + 1 : int(box[3]) - 1, int(box[0]) + 1 : int(box[2]) - 1]
    assert inside.min() == 255


def test_back_undoes_the_view():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (30, 50)).astype(np.uint8)
    assert np.array_equal(View(True, 1.0, (30, 50)).back(View(True, 1.0, (30, 50)).label_map(labels), order=0), labels)
    double = View(True, 2.0, (30, 50))
    assert np.array_equal(double.back(double.label_map(labels), order=0), labels)
    assert View.from_array(double.to_array()) == double


def test_ensemble_averages_the_views_evidence_and_reports_its_variance():
    ensemble = ViewEnsemble(2, (1, 3))
    p = lambda a, b: np.array([[a], [b]], np.float32).reshape(2, 1, 1).repeat(3, axis=2)  # noqa: E731
    ensemble.add(p(0.9, 0.1))
    single_mean, single_variance = ensemble.result()
    assert np.array_equal(single_mean, p(0.9, 0.1)) and not single_variance.any()  # one view: as it is
    ensemble.add(p(0.7, 0.3))
    ensemble.add(p(0.2, 0.8))
    mean, variance = ensemble.result()
    np.testing.assert_allclose(mean[:, 0, 0], [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(variance[:, 0, 0], [np.var([0.9, 0.7, 0.2]), np.var([0.1, 0.3, 0.8])], atol=1e-6)


def test_select_decodes_every_cached_view_and_agrees_with_the_truth():
    image, truth = shapes_image(96, 128, seed=3)
    weak = scribbles_from_truth(truth)
    classes = ClassTable((0, 1, 2), ("background", "disc", "rectangle"), 255)
    backend = build_backend(WeightFreeConfig())
    ctx = Context(
        classes=classes,
        weak_kind="scribbles",
        seed=0,
        backend=backend,
        feature_names=feature_names(WeightFreeConfig()),
    )
    embed = Embed(EmbedConfig(views=(ViewSpec(flip=True), ViewSpec(scale=0.75))))
    features = embed.process(None, {"ingest/image": image}, ctx)
    assert set(features) == set(embed.outputs(ctx))
    assert [v for v, _ in split_views(features)][1:] == [View(True, 1.0, (96, 128)), View(False, 0.75, (96, 128))]
    prompts = Prompts(PromptsConfig()).process(None, {"ingest/weak": weak, "ingest/boxes": np.zeros((0, 5))}, ctx)
    inputs = {
        "ingest/weak": weak,
        "ingest/image": image,
        "ingest/boxes": np.zeros((0, 5), np.float32),
        **{f"embed/{k}": v for k, v in features.items()},
        **{f"prompts/{k}": v for k, v in prompts.items()},
    }
    out = Select(SelectConfig()).process(None, inputs, ctx)
    assert (out["labels"] == truth).mean() > 0.9
    assert out["variance"].shape == truth.shape and out["variance"].max() > 0
    assert out["chosen"].shape == (len(prompts["classes"]),)
