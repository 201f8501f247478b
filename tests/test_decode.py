"""`seglab bench decode`: the pipeline's cached, batched decode against the naive
SamPredictor loop, on a random-weight SAM with a tiny encoder (the mask decoder is
SAM's own). Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.workers.bench.decode import bench_decode, synthetic_scene
from seglab.workers.model_configs import VitShape

TINY_VIT = VitShape(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))


def test_bench_decode_reports_both_paths_on_the_same_prompts():
    r = bench_decode(
        model="custom",
        encoder=TINY_VIT,
        images=1,
        prompts_per_image=3,
        height=96,
        width=128,
        precision="fp32",
        sanity_prompts=2,
    )
    assert r["images"] == 1 and r["image_hw"] == [96, 128] and r["prompt_batch"] == 4  # the CPU default
    assert r["prompts"] == r["pipeline_prompts_decoded"] == r["naive_prompts_decoded"] == 3
    assert r["points_per_prompt"] == 5 + 16 and r["box_prompts"] == 0  # the prompts stage's defaults, scribbles

    # the same prompts decoded both ways: same masks, and the same logits from the same features
    assert r["sanity_prompts"] == 2 and r["sanity_mask_iou_min"] >= 0.9
    assert 0.0 < r["sanity_mask_positive_fraction"] < 1.0  # not a trivially empty or full mask
    assert r["sanity_logit_max_abs_diff"] < 1e-4

    seconds = (
        "encode_seconds",
        "decode_seconds",
        "cache_read_seconds",
        "select_seconds",
        "naive_seconds",
        "naive_set_image_seconds",
        "naive_predict_seconds",
    )
    assert all(r[k] > 0 for k in seconds)
    assert r["cache_read_seconds"] <= r["decode_seconds"]
    assert r["naive_seconds"] == pytest.approx(r["naive_set_image_seconds"] + r["naive_predict_seconds"], abs=2e-4)
    rate = lambda seconds: r["prompts"] / seconds  # noqa: E731
    assert r["pipeline_decode_prompts_per_s"] == pytest.approx(rate(r["decode_seconds"]), rel=1e-3)
    assert r["pipeline_end_to_end_prompts_per_s"] == pytest.approx(
        rate(r["encode_seconds"] + r["decode_seconds"]), rel=1e-3
    )
    assert r["pipeline_select_prompts_per_s"] == pytest.approx(rate(r["select_seconds"]), rel=1e-3)
    assert r["naive_prompts_per_s"] == pytest.approx(rate(r["naive_seconds"]), rel=1e-3)
    assert r["naive_predict_prompts_per_s"] == pytest.approx(rate(r["naive_predict_seconds"]), rel=1e-3)
    assert r["decode_over_naive"] == pytest.approx(
        r["pipeline_decode_prompts_per_s"] / r["naive_prompts_per_s"], rel=1e-3
    )
    assert r["end_to_end_over_naive"] == pytest.approx(
        r["pipeline_end_to_end_prompts_per_s"] / r["naive_prompts_per_s"], rel=1e-3
    )
    assert r["decode_over_predict"] == pytest.approx(
        r["pipeline_decode_prompts_per_s"] / r["naive_predict_prompts_per_s"], rel=1e-3
    )
    assert r["target_met"] == (r["decode_over_naive"] >= r["target"] == 5.0)
    assert r["torch_threads"] >= 1 and json.loads(json.dumps(r)) == r
    assert r["other_processes_cpu_share"] is None or 0.0 <= r["other_processes_cpu_share"] <= 1.0


def test_synthetic_scene_has_one_region_per_prompt():
    image, truth = synthetic_scene(480, 640, 32, np.random.default_rng(0))
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    from skimage.measure import label

    regions = sum(label(truth == c, connectivity=2).max() for c in np.unique(truth) if c != 0)
    assert regions == 32


def test_cli_prints_the_figures_as_json(monkeypatch):
    """The command's options reach the benchmark (run with the tiny encoder in place of vit_b)."""
    import seglab.workers.bench.decode as module

    seen = {}

    def tiny(**options):
        seen.update(options)
        return bench_decode(**{**options, "model": "custom", "encoder": TINY_VIT, "height": 96, "width": 128})

    monkeypatch.setattr(module, "bench_decode", tiny)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "decode",
            "--images",
            "1",
            "--prompts-per-image",
            "2",
            "--prompt-batch",
            "2",
            "--precision",
            "fp32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen == {"model": "vit_b", "images": 1, "prompts_per_image": 2, "batch": 2, "precision": "fp32"}
    figures = json.loads(result.stdout)
    assert figures["prompts"] == figures["naive_prompts_decoded"] == 2 and figures["prompt_batch"] == 2


def test_cli_rejects_an_unknown_model():
    result = CliRunner().invoke(app, ["bench", "decode", "--model", "custom", "--json"])
    assert result.exit_code == 1 and "vit_b, vit_l or vit_h" in result.output and "Traceback" not in result.output
