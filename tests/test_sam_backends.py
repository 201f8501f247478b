"""SAM and SAM2 backends with the official architectures and random weights, loaded
through the same checkpoint path an operator uses. Nothing is downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shapes_image

from seglab.pipeline.base.errors import InputError
from seglab.stages.parts.promptset import PromptBatch
from seglab.workers.model_configs import Sam2Config, SamConfig, VitShape
from seglab.workers.sam import SamBackend, build_sam_architecture
from seglab.workers.sam2 import Sam2Backend, build_sam2_architecture

TINY_VIT = VitShape(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))


def tiny_sam_config(path: Path, **kw) -> SamConfig:
    return SamConfig(model="custom", encoder=TINY_VIT, checkpoint=str(path), precision="fp32", **kw)


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam_architecture(tiny_sam_config(path)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam2") / "sam2_hiera_t.pt"
    model = build_sam2_architecture(Sam2Config(checkpoint=str(path)))
    torch.save({"model": model.state_dict()}, path)
    return path


def point_prompts(image_hw) -> PromptBatch:
    h, w = image_hw
    coords = np.array(
        [
            [[w * 0.3, h * 0.35], [w * 0.7, h * 0.7]],
            [[w * 0.7, h * 0.7], [0, 0]],
            [[w * 0.5, h * 0.5], [w * 0.1, h * 0.9]],
        ],
        np.float32,
    )
    labels = np.array([[1, 0], [1, -1], [-1, -1]], np.int32)
    boxes = np.full((3, 4), np.nan, np.float32)
    boxes[2] = (w * 0.1, h * 0.1, w * 0.6, h * 0.6)
    return PromptBatch(coords, labels, boxes, np.zeros(3, np.int32), np.arange(3, dtype=np.int32))


def test_sam_decode_from_cache_equals_sampredictor(sam_checkpoint):
    from segment_anything import SamPredictor

    image, _ = shapes_image(90, 140, seed=0)
    backend = SamBackend(tiny_sam_config(sam_checkpoint, feature_dtype="float32"))
    features = backend.encode([image])[0]
    assert features["image_embed"].shape == (256, 64, 64) and features["image_embed"].dtype == np.float32
    stored = {k: np.array(v, copy=True) for k, v in features.items()}  # what the store gives back
    prompts = point_prompts(image.shape[:2])
    logits, iou = backend.decode(stored, prompts)
    assert logits.shape == (3, 3, 256, 256) and iou.shape == (3, 3)

    predictor = SamPredictor(backend.model)
    predictor.set_image(image)
    np.testing.assert_array_equal(predictor.features[0].numpy(), features["image_embed"])
    for i in range(2):  # one prompt at a time, as a user would; padding points (label -1)
        # are part of the prompt, SAM's decoder attends to them, so they are passed as well
        _, ref_iou, ref_low = predictor.predict(
            prompts.coords[i], prompts.labels[i], multimask_output=True, return_logits=True
        )
        np.testing.assert_allclose(logits[i], ref_low, rtol=0, atol=1e-4)
        np.testing.assert_allclose(iou[i], ref_iou, rtol=0, atol=1e-5)
    _, ref_iou, ref_low = predictor.predict(box=prompts.boxes[2], multimask_output=True, return_logits=True)
    np.testing.assert_allclose(logits[2], ref_low, rtol=0, atol=1e-4)

    again, _ = backend.decode(stored, prompts)
    np.testing.assert_array_equal(again, logits)  # bit-for-bit from the cache, fp32


def test_prompt_batch_defaults_to_the_device_and_never_changes_the_logits(sam_checkpoint):
    image, _ = shapes_image(64, 80, seed=3)
    default = SamBackend(tiny_sam_config(sam_checkpoint, feature_dtype="float32"))
    assert default.prompt_batch == 4  # the CPU default (64 on a GPU)
    features = default.encode([image])[0]
    rng = np.random.default_rng(0)  # 11 point prompts and 2 box prompts: uneven batches of 4 and of 3
    coords = rng.uniform(0, 64, (13, 2, 2)).astype(np.float32)
    labels = np.ones((13, 2), np.int32)
    boxes = np.full((13, 4), np.nan, np.float32)
    boxes[[4, 9]] = (5, 5, 40, 50)
    prompts = PromptBatch(coords, labels, boxes, np.zeros(13, np.int32), np.arange(13, dtype=np.int32))
    expected, expected_iou = default.decode(features, prompts)
    for batch in (1, 3, 64):
        backend = SamBackend(tiny_sam_config(sam_checkpoint, feature_dtype="float32", prompt_batch=batch))
        assert backend.prompt_batch == batch
        logits, iou = backend.decode(features, prompts)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
        np.testing.assert_allclose(iou, expected_iou, rtol=0, atol=1e-5)


def test_sam_fp16_features_stay_close(sam_checkpoint):
    image, _ = shapes_image(64, 64, seed=1)
    full = SamBackend(tiny_sam_config(sam_checkpoint, feature_dtype="float32"))
    half = SamBackend(tiny_sam_config(sam_checkpoint, feature_dtype="float16"))
    f32, f16 = full.encode([image])[0], half.encode([image])[0]
    assert f16["image_embed"].dtype == np.float16
    prompts = point_prompts(image.shape[:2])
    a, _ = full.decode(f32, prompts)
    b, _ = half.decode(f16, prompts)
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
    assert ((a > 0) == (b > 0)).mean() > 0.99


def test_sam2_cache_round_trips_and_matches_its_predictor(sam2_checkpoint):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image, _ = shapes_image(96, 128, seed=2)
    backend = Sam2Backend(Sam2Config(checkpoint=str(sam2_checkpoint), precision="fp32", feature_dtype="float32"))
    features = backend.encode([image])[0]
    assert {k: v.shape for k, v in features.items() if k != "frame"} == {
        "image_embed": (256, 64, 64),
        "high_res_feats_0": (32, 256, 256),
        "high_res_feats_1": (64, 128, 128),
    }
    prompts = point_prompts(image.shape[:2])
    logits, iou = backend.decode(features, prompts)

    predictor = SAM2ImagePredictor(backend.model)
    predictor.set_image(image)
    np.testing.assert_array_equal(predictor._features["image_embed"][0].numpy(), features["image_embed"])
    for i in range(2):
        _, ref_iou, ref_low = predictor.predict(
            prompts.coords[i], prompts.labels[i], multimask_output=True, return_logits=True
        )
        np.testing.assert_allclose(np.clip(logits[i], -32, 32), ref_low, rtol=0, atol=1e-4)
        np.testing.assert_allclose(iou[i], ref_iou, rtol=0, atol=1e-5)
    _, _, ref_low = predictor.predict(
        prompts.coords[2], prompts.labels[2], box=prompts.boxes[2], multimask_output=True, return_logits=True
    )
    np.testing.assert_allclose(np.clip(logits[2], -32, 32), ref_low, rtol=0, atol=1e-4)


class _RunsCode:
    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (Path(self.canary),))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, sam_checkpoint):
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"image_encoder.pos_embed": _RunsCode(str(canary))}, f)
    torch.save({"weights": _RunsCode(str(canary))}, tmp_path / "evil_zip.pth")
    for path in (evil, tmp_path / "evil_zip.pth"):
        with pytest.raises(InputError, match="not a safe tensor checkpoint"):
            SamBackend(tiny_sam_config(path)).encode([np.zeros((8, 8, 3), np.uint8)])
    assert not canary.exists()


def test_refusals_are_one_clear_line(tmp_path, sam_checkpoint):
    torch.save({"weights": _RunsCode(str(tmp_path / "canary"))}, tmp_path / "evil.pth")
    with pytest.raises(InputError) as info:
        _ = SamBackend(tiny_sam_config(tmp_path / "evil.pth")).model
    message = str(info.value)  # torch's own text has colour codes and advises weights_only=False
    assert "would call getattr" in message and "\x1b[" not in message and "weights_only=False" not in message
    assert "\n" not in message and not (tmp_path / "canary").exists()


@pytest.mark.parametrize("keep", [0, 100, -1])
def test_empty_or_truncated_checkpoint_is_a_clear_error(tmp_path, sam_checkpoint, keep):
    data = sam_checkpoint.read_bytes()
    torn = tmp_path / "torn.pth"
    torn.write_bytes(data[:keep] if keep >= 0 else data[:keep])  # the empty file raised IndexError
    with pytest.raises(InputError, match="empty or truncated") as info:
        _ = SamBackend(tiny_sam_config(torn)).model
    assert info.value.path == str(torn)


def test_checkpoint_keys_must_match_exactly(tmp_path, sam_checkpoint):
    state = torch.load(sam_checkpoint, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    state["extra.head.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(InputError) as info:
        SamBackend(tiny_sam_config(bad)).encode([np.zeros((8, 8, 3), np.uint8)])
    message = str(info.value)
    assert "missing keys: mask_decoder.iou_token.weight" in message
    assert "unexpected keys: extra.head.weight" in message and "bad.pth" in message


def test_signature_names_checkpoint_hash(sam_checkpoint, tmp_path):
    sig = SamBackend(tiny_sam_config(sam_checkpoint)).signature()
    other = tmp_path / "other.pth"
    other.write_bytes(sam_checkpoint.read_bytes() + b"\0")
    assert sig["checkpoint"] != SamBackend(tiny_sam_config(other)).signature()["checkpoint"]
    assert len(sig["checkpoint"]) == 64 and "fp32" in sig["preprocessing"]


@pytest.mark.usefixtures("ray_local")
def test_sam_manifest_runs_end_to_end_and_a_rerun_encodes_nothing(tiny, sam_checkpoint, tmp_path):
    from seglab.pipeline.base.errors import SignatureMismatch
    from seglab.pipeline.core.store import Store
    from seglab.pipeline.manifest import load_manifest
    from seglab.pipeline.runner import Runner

    text = tiny.read_text() + (
        "backend:\n  name: sam\n  model: custom\n  encoder: {embed_dim: 32, depth: 2, num_heads: 2, "
        f"global_attn_indexes: [1]}}\n  checkpoint: {sam_checkpoint}\n  precision: fp32\n"
    )
    tiny.write_text(text)
    report = Runner(load_manifest(tiny)).run()
    assert report.ok and [s.done_now for s in report.stages] == [4, 4, 4, 4, 4]
    store = Store(tiny.parent / "run.zarr")
    signature = store.stage_attrs("embed")["signature"]["model"]
    assert signature["checkpoint"] == SamBackend(tiny_sam_config(sam_checkpoint)).signature()["checkpoint"]
    for unit, entry in store.entries("embed").items():
        assert entry.outputs["image_embed"].shape == (256, 64, 64)
        labels = store.read_unit(["select/labels", "refine/uncertainty", "ingest/image"], unit)
        assert labels["select/labels"].shape == labels["refine/uncertainty"].shape == labels["ingest/image"].shape[:2]

    again = Runner(load_manifest(tiny)).run()
    assert again.work_done == 0  # the encoder ran zero times

    other = tmp_path / "other.pth"
    state = torch.load(sam_checkpoint, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, other)
    tiny.write_text(text.replace(str(sam_checkpoint), str(other)))
    with pytest.raises(SignatureMismatch) as info:
        Runner(load_manifest(tiny)).run()
    assert info.value.stage == "embed" and any(c.startswith("model.checkpoint:") for c in info.value.changes)


@pytest.mark.usefixtures("ray_local")
def test_sam2_manifest_runs_end_to_end(tiny, sam2_checkpoint):
    from seglab.pipeline.core.store import Store
    from seglab.pipeline.manifest import load_manifest
    from seglab.pipeline.runner import Runner

    tiny.write_text(tiny.read_text() + f"backend: {{name: sam2, checkpoint: {sam2_checkpoint}}}\n")
    report = Runner(load_manifest(tiny)).run()
    assert report.ok and [s.done_now for s in report.stages] == [4, 4, 4, 4, 4]
    store = Store(tiny.parent / "run.zarr")
    entry = next(iter(store.entries("embed").values()))
    assert entry.outputs["high_res_feats_0"].shape == (32, 256, 256)
    assert entry.outputs["image_embed"].dtype == "<f2"  # fp16 cache by default
    assert Runner(load_manifest(tiny)).run().work_done == 0
