"""Weak labels simulated from ground truth: faithful to the mask, deterministic per seed."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import shapes_image
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.stages.parts import weak_simulation as sim


@pytest.fixture
def truth():
    mask = shapes_image(120, 160, seed=0)[1].astype(np.int64)
    mask[:5] = 11  # an 'unlabelled' band that is not a class
    return mask


def test_points_lie_inside_their_class_and_skip_ignored_ids(truth):
    rows = sim.simulate_points(truth, (11,), np.random.default_rng(0), per_component=3)
    assert {cls for _, _, cls in rows} == {0, 1, 2}
    assert len(rows) == 9
    assert all(truth[y, x] == cls for x, y, cls in rows)


def test_scribbles_follow_the_class_and_are_limited(truth):
    weak = sim.simulate_scribbles(truth, (11,), np.random.default_rng(0))
    labelled = weak != 255
    assert labelled.any() and (weak[labelled] == truth[labelled]).all()
    for cls in (0, 1, 2):
        frac = (weak == cls).sum() / (truth == cls).sum()
        assert 0 < frac < 0.5


def test_coarse_masks_miss_boundaries_but_cover_most(truth):
    weak = sim.simulate_coarse(truth, (11,), np.random.default_rng(0), erode=3)
    for cls in (1, 2):
        coarse, real = weak == cls, truth == cls
        assert (truth[coarse] == cls).all()
        assert 0.5 < coarse.sum() / real.sum() < 0.98


def test_boxes_are_tight(truth):
    rows = sim.simulate_boxes(truth, (11,), np.random.default_rng(0))
    for x0, y0, x1, y1, cls in rows:
        if cls == 2:
            ys, xs = np.nonzero(truth == 2)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_the_background_class_gets_no_boxes_and_the_other_classes_keep_theirs(tmp_path, truth):
    every = sim.simulate_boxes(truth, (11,), np.random.default_rng(0))
    assert 0 in {row[-1] for row in every}
    assert sim.simulate_boxes(truth, (11,), np.random.default_rng(0), background=0) == [r for r in every if r[-1] != 0]
    masks = _masks(tmp_path / "masks", truth, count=2)
    runner = CliRunner()

    def run(kind, out):
        return runner.invoke(
            app,
            [
                "simulate-weak",
                "--masks",
                str(masks),
                "--kind",
                kind,
                "--ignore",
                "11",
                "--background",
                "0",
                "--out",
                str(tmp_path / out),
            ],
        )

    assert run("boxes", "b").exit_code == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "boxes.csv")))
    assert rows and {r["class"] for r in rows} == {"1", "2"}
    result = run("points", "p")
    assert result.exit_code == 1 and "--background is only for --kind boxes" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_cli_is_deterministic_per_seed(tmp_path, truth):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        Image.fromarray(np.roll(truth, 7 * i, axis=1).astype(np.uint8)).save(masks / f"m{i}.png")
    runner = CliRunner()

    def run(kind, out, seed):
        result = runner.invoke(
            app,
            [
                "simulate-weak",
                "--masks",
                str(masks),
                "--kind",
                kind,
                "--out",
                str(tmp_path / out),
                "--seed",
                str(seed),
                "--ignore",
                "11",
            ],
        )
        assert result.exit_code == 0, result.output

    run("scribbles", "a", 1)
    run("scribbles", "b", 1)
    run("scribbles", "c", 2)
    same = [
        np.array_equal(
            np.asarray(Image.open(tmp_path / "a" / f"m{i}.png")), np.asarray(Image.open(tmp_path / "b" / f"m{i}.png"))
        )
        for i in range(3)
    ]
    different = [
        np.array_equal(
            np.asarray(Image.open(tmp_path / "a" / f"m{i}.png")), np.asarray(Image.open(tmp_path / "c" / f"m{i}.png"))
        )
        for i in range(3)
    ]
    assert all(same) and not all(different)
    run("points", "p", 0)
    rows = list(csv.DictReader(open(tmp_path / "p" / "points.csv")))
    assert {r["image"] for r in rows} == {"m0.png", "m1.png", "m2.png"} and "11" not in {r["class"] for r in rows}
    result = runner.invoke(
        app, ["simulate-weak", "--masks", str(masks), "--kind", "points", "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 1 and "already exists" in result.output


def _masks(folder, truth, count=5):
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.roll(truth, 5 * i, axis=1).astype(np.uint8)).save(folder / f"m{i}.png")
    return folder


def test_a_name_list_and_a_limit_choose_the_masks(tmp_path, truth):
    masks = _masks(tmp_path / "masks", truth)
    names = tmp_path / "names.txt"
    names.write_text("m1.jpg\n\nm3\nm4.png\n")  # an image name, a stem, a mask name
    runner = CliRunner()

    def run(out, *extra):
        return runner.invoke(
            app,
            [
                "simulate-weak",
                "--masks",
                str(masks),
                "--kind",
                "scribbles",
                "--ignore",
                "11",
                "--out",
                str(tmp_path / out),
                *extra,
            ],
        )

    assert run("listed", "--list", str(names)).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "listed").iterdir()) == ["m1.png", "m3.png", "m4.png"]
    assert run("first", "--list", str(names), "--limit", "2").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["m1.png", "m3.png"]
    names.write_text("m1\nm9\n")
    result = run("typo", "--list", str(names))
    assert result.exit_code == 1 and "match no mask" in result.output and "m9" in result.output
    assert not (tmp_path / "typo").exists()


def test_progress_is_told_of_every_mask(tmp_path, truth):
    from seglab.pipeline.evaluation.simulate import simulate_weak

    class Recorder:
        def __init__(self):
            self.calls = []

        def start(self, stage, total, done):
            self.calls.append(("start", stage, total, done))

        def advance(self, stage, count):
            self.calls.append(("advance", stage, count))

    recorder = Recorder()
    count = simulate_weak(
        masks=_masks(tmp_path / "masks", truth),
        kind="points",
        out=tmp_path / "p",
        seed=0,
        ignore=(11,),
        limit=4,
        progress=recorder,
    )
    assert count == 4
    assert recorder.calls == [("start", "points", 4, 0)] + [("advance", "points", 1)] * 4
