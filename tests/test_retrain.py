"""retrain: the uncertainty-aware losses, atomic checkpoints, and training on Ray Train end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import add_gold, seglab_process
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner
from seglab.stages.parts.uncertainty import SIGNALS
from seglab.workers.losses import IGNORE_INDEX, batch_loss, dice_loss, focal_loss, image_weights
from seglab.workers.trainer import checkpoint_files, latest_checkpoint, save_checkpoint

RETRAIN = "rounds: {rounds}\nretrain: {{epochs: {epochs}, input_size: [48, 64], train_batch: 2, batch_size: 2}}\n"


def test_focal_loss_counts_only_labelled_pixels_weighted_by_certainty():
    logits = torch.zeros(1, 3, 2, 2)  # uniform: p_t = 1/3 everywhere
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    per_pixel = -((1 - 1 / 3) ** 2) * np.log(1 / 3)
    full = focal_loss(logits, target, torch.ones(1, 2, 2), gamma=2.0)
    assert full.item() == pytest.approx(per_pixel)  # mean over the 3 labelled pixels
    half = focal_loss(logits, target, torch.tensor([[[1.0, 0.0], [0.5, 1.0]]]), gamma=2.0)
    assert half.item() == pytest.approx(per_pixel * 1.5 / 3)
    assert focal_loss(logits, target, torch.zeros(1, 2, 2), gamma=2.0).item() == 0.0


def test_dice_uses_only_confident_pixels_and_image_weights_follow_entropy():
    target = torch.tensor([[[0, 0], [1, 1]]])
    perfect = torch.tensor([[[[9.0, 9.0], [-9.0, -9.0]], [[-9.0, -9.0], [9.0, 9.0]]]])
    assert dice_loss(perfect, target, torch.ones(1, 2, 2)).item() == pytest.approx(0.0, abs=1e-3)
    assert dice_loss(-perfect, target, torch.ones(1, 2, 2)).item() == pytest.approx(1.0, abs=1e-3)
    # the wrong row is uncertain (certainty 0.4 < 0.5): dice ignores it
    half_wrong = torch.cat([perfect[..., :1, :], -perfect[..., 1:, :]], dim=2)
    certainty = torch.tensor([[[1.0, 1.0], [0.4, 0.4]]])
    assert dice_loss(half_wrong, target, certainty).item() == pytest.approx(0.0, abs=1e-3)
    weights = image_weights(target.repeat(2, 1, 1), torch.stack([torch.zeros(2, 2), torch.full((2, 2), 0.5)]))
    assert weights.tolist() == pytest.approx([1.0, 0.0], abs=1e-4)
    loss = batch_loss(
        perfect.repeat(2, 1, 1, 1),
        target.repeat(2, 1, 1),
        torch.stack([torch.zeros(2, 2), torch.full((2, 2), 0.5)]),
        gamma=2.0,
        dice_weight=1.0,
    )
    assert loss.item() < 1e-3  # the undecided image has weight 0


def test_checkpoints_are_whole_objects_and_a_torn_newest_falls_back(tmp_path):
    folder = Objects(str(tmp_path))
    for epoch in range(3):
        save_checkpoint(folder, epoch, {"epoch": epoch, "w": torch.full((2,), float(epoch))})
    assert checkpoint_files(folder) == ["epoch-0001.pt", "epoch-0002.pt"]  # the newest two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]  # no staging file left
    newest = tmp_path / checkpoint_files(folder)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    key, state = latest_checkpoint(folder)
    assert key == "epoch-0001.pt" and state["epoch"] == 1


class _RunsCode:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch '{self.canary}'",))


def test_resume_skips_unsafe_and_foreign_checkpoints(tmp_path):
    folder = Objects(str(tmp_path))
    save_checkpoint(folder, 0, {"epoch": 0, "w": torch.zeros(2)})
    newest = tmp_path / "epoch-0001.pt"
    for state in (
        {"epoch": 1, "w": _RunsCode(tmp_path / "canary")},  # unpickling would run code
        torch.zeros(3),
        {"epoch": "1"},
        [1, 2],
    ):  # tensors, but no training state: train() crashed
        torch.save(state, newest)
        key, loaded = latest_checkpoint(folder)
        assert key == "epoch-0000.pt" and loaded["epoch"] == 0
    assert not (tmp_path / "canary").exists()


@pytest.mark.slow  # about 75 s; rounds run end to end in the default suite too (tests/test_report.py's run)
@pytest.mark.usefixtures("ray_local")
def test_rounds_train_on_images_outside_the_gold_sets_feed_the_next_refine_and_are_reused(tiny):
    add_gold(tiny, evaluation="images/img03.png")
    tiny.write_text(tiny.read_text() + RETRAIN.format(rounds=2, epochs=2))
    report = Runner(load_manifest(tiny)).run()
    order = [s.stage for s in report.stages]
    assert report.ok and order[order.index("refine") :] == ["refine", "retrain", "refine.1", "retrain.1", "refine.2"]
    assert all(s.done_now == 4 for s in report.stages)
    store = Store(tiny.parent / "run.zarr")
    for name, trained_on in (("retrain", "refine"), ("retrain.1", "refine.1")):  # one segmenter per round
        fitted = store.stage_attrs(name)["fitted"]
        assert fitted["epochs"] == 2 and fitted["units"] == 3 and len(fitted["history"]) == 2  # img03 held out
        assert fitted["checkpoint"].startswith(f"_checkpoints/{name}/")
        checkpoint = store.local / fitted["checkpoint"]
        assert checkpoint.is_file() and all(np.isfinite(h["loss"]) for h in fitted["history"])
        assert store.stage_attrs(name)["signature"]["upstream"].keys() >= {trained_on, "ingest"}
    assert store.stage_attrs("retrain")["fitted"]["sha256"] != store.stage_attrs("retrain.1")["fitted"]["sha256"]
    for unit in store.entries("retrain"):
        arrays = store.read_unit(
            ["retrain/labels", "retrain/probabilities", "ingest/image", "refine/signals", "refine.2/signals"], unit
        )
        assert arrays["retrain/labels"].shape == arrays["ingest/image"].shape[:2]
        assert arrays["retrain/probabilities"].shape == (3, 48, 64)
        np.testing.assert_allclose(arrays["retrain/probabilities"].astype(np.float32).sum(0), 1.0, atol=1e-2)
        # round 0 has no teacher; later rounds measure the disagreement with theirs
        assert len(arrays["refine/signals"]) == len(SIGNALS) - 1
        assert np.isfinite(arrays["refine.2/signals"][SIGNALS.index("teacher")].astype(np.float32)).all()
    stamp = checkpoint.stat().st_mtime_ns
    again = Runner(load_manifest(tiny)).run()
    assert again.work_done == 0 and checkpoint.stat().st_mtime_ns == stamp  # nothing retrained
    status = json.loads(CliRunner().invoke(app, ["status", str(tiny), "--json"]).stdout)
    assert {r["stage"]: r for r in status}["retrain.1"]["fitted"]["epochs"] == 2
    shown = CliRunner().invoke(app, ["status", str(tiny)]).output
    assert "retrain.1: lraspp_mobilenet_v3_large, 2 epochs on 3 images" in shown
    evaluation = json.loads(CliRunner().invoke(app, ["evaluate", str(tiny), "--json"]).stdout)
    sources = {r["source"]: r for r in evaluation["sources"]}
    assert [s for s in sources if s.startswith("re")] == ["refine", "retrain", "refine.1", "retrain.1", "refine.2"]
    assert all(sources[s]["evaluated"] == 1 and 0.0 <= sources[s]["miou"] <= 1.0 for s in sources)
    assert "auroc_teacher" in sources["refine.1"] and "auroc_teacher" not in sources["refine"]

    # the same segmenter and budget on the gold masks of the same three training images
    result = CliRunner().invoke(
        app, ["bench", "retrain", str(tiny), "--gold-masks", str(tiny.parent / "data" / "gold"), "--json"]
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert (bench["training_images"], bench["evaluation_images"]) == (3, 1)
    truth = bench["ground_truth"]["segmenter_miou"]
    assert 0.0 < truth <= 1.0 and [r["round"] for r in bench["rounds"]] == [0, 1, 2]
    for r, (labels, segmenter) in enumerate((("refine", "retrain"), ("refine.1", "retrain.1"), ("refine.2", None))):
        row = bench["rounds"][r]
        assert row["label_miou"] == pytest.approx(sources[labels]["miou"])
        if segmenter is None:  # the last round's labels have no segmenter yet
            assert row["segmenter_miou"] is None and row["ratio"] is None
        else:
            assert row["segmenter_miou"] == pytest.approx(sources[segmenter]["miou"])
            assert row["ratio"] == pytest.approx(sources[segmenter]["miou"] / truth)
    assert list((store.local / "_checkpoints" / "bench-retrain-gold").glob("*/epoch-0001.pt"))


@pytest.mark.slow  # two `seglab run` processes with Ray Train (about 2 min); checkpoints themselves are tested above
def test_interrupted_training_resumes_from_its_last_checkpoint(tiny):
    tiny.write_text(tiny.read_text() + RETRAIN.format(rounds=1, epochs=8))
    store_path = tiny.parent / "run.zarr"
    proc = seglab_process("run", str(tiny), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    saved = []
    while time.time() < deadline and proc.poll() is None:
        saved = list((store_path / "_checkpoints" / "retrain").glob("*/epoch-0002.pt"))
        if saved:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert saved, "training never reached epoch 2 before the deadline"
    _, before = latest_checkpoint(Objects(str(saved[0].parent)))
    assert 2 <= before["epoch"] < 7  # killed mid-training

    rerun = subprocess.run(
        [sys.executable, "-m", "seglab.cli.app", "run", str(tiny)], capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    fitted = Store(store_path).stage_attrs("retrain")["fitted"]
    assert [h["epoch"] for h in fitted["history"]] == list(range(8))
    # the epochs finished before the kill come from the old checkpoint, not from a new start
    assert fitted["history"][: before["epoch"] + 1] == before["history"]


def test_rounds_add_a_retrain_and_a_refine_per_round_and_are_bounded(tiny):
    from seglab.pipeline.base.errors import ManifestError
    from seglab.pipeline.dag import Dag
    from seglab.pipeline.planning import active_stages

    assert not any(s.startswith("retrain") for s in active_stages(load_manifest(tiny)))
    tiny.write_text(tiny.read_text() + "rounds: 3\n")
    order = Dag(active_stages(load_manifest(tiny))).order
    assert order[order.index("refine") :] == (
        "refine",
        "retrain",
        "refine.1",
        "retrain.1",
        "refine.2",
        "retrain.2",
        "refine.3",
    )
    tiny.write_text(tiny.read_text().replace("rounds: 3", "rounds: 21"))
    with pytest.raises(ManifestError) as info:
        load_manifest(tiny)
    assert any(loc == "rounds" for loc, _ in info.value.problems)
