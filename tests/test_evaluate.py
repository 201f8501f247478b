"""`seglab evaluate` on the tiny dataset, and `seglab bench quality` on the shared real data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED_DATA, add_gold, scribbles_from_truth, shapes_image
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
cli = CliRunner()


def add_image(manifest: Path, name: str, seed: int) -> None:
    data = manifest.parent / "data"
    image, truth = shapes_image(64, 64, seed=seed)
    Image.fromarray(image).save(data / "images" / name)
    Image.fromarray(scribbles_from_truth(truth)).save(data / "scribbles" / name)
    Image.fromarray(truth).save(data / "gold" / name)


def test_a_manifest_without_gold_is_a_clear_error(tiny):
    result = cli.invoke(app, ["evaluate", str(tiny)])
    assert result.exit_code == 1 and "names no evaluation gold set (data.evaluation)" in result.output


@pytest.mark.usefixtures("ray_local")
def test_evaluate_scores_every_source_and_counts_missing_images(tiny):
    add_gold(tiny)
    assert Runner(load_manifest(tiny)).run().ok
    add_image(tiny, "img04.png", seed=4)  # evaluated, but not run yet: missing everywhere

    result = cli.invoke(app, ["evaluate", str(tiny), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {r["source"]: r for r in report["sources"]}
    assert list(rows) == ["weak", "nearest-label", "select", "refine"] and report["images"] == 5
    for row in rows.values():
        assert row["evaluated"] == 4 and row["missing"] == 1
        assert row["missing_images"] == [str((tiny.parent / "data" / "images" / "img04.png").resolve())]
        assert set(row["iou"]) == {"background", "disc", "rectangle"}
    assert rows["weak"]["labelled_fraction"] < 0.1
    assert rows["nearest-label"]["labelled_fraction"] == 1.0
    assert rows["select"]["miou"] > rows["nearest-label"]["miou"] > rows["weak"]["miou"]
    assert rows["select"]["miou"] > 0.8 and rows["refine"]["miou"] > 0.8
    assert 0.0 <= rows["refine"]["uncertainty_auroc"] <= 1.0 and "auroc_spread" in rows["refine"]
    assert "auroc_calibration" not in rows["refine"]  # no calibration set: that signal is absent, not 0

    result = cli.invoke(app, ["evaluate", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "nearest-label" in result.output and "IoU % per class" in result.output and "rectangle" in result.output

    tiny.write_text(tiny.read_text().replace("select: {batch_size: 2}", "select: {batch_size: 2, tau: [0.3, 0.6]}"))
    report = json.loads(cli.invoke(app, ["evaluate", str(tiny), "--json"]).stdout)
    rows = {r["source"]: r for r in report["sources"]}
    for stale in (rows["select"], rows["refine"]):  # refine was made from the old select
        assert stale["stale"] and stale["evaluated"] == 0 and stale["missing"] == 5 and stale["miou"] is None
    assert "made with other settings" in cli.invoke(app, ["evaluate", str(tiny)]).output

    gold = tiny.parent / "data" / "gold" / "img00.png"
    mask = np.asarray(Image.open(gold)).copy()
    mask[0, :3] = 7
    Image.fromarray(mask).save(gold)
    result = cli.invoke(app, ["evaluate", str(tiny)])
    assert result.exit_code == 1
    assert str(gold.resolve()) in result.output and "[7]" in result.output


def test_simulate_weak_writes_the_unlabelled_value_asked_for(tmp_path):
    (tmp_path / "masks").mkdir()
    Image.fromarray(shapes_image(60, 80, seed=0)[1] * 100).save(tmp_path / "masks" / "a.png")  # classes 0, 100, 200
    result = cli.invoke(
        app,
        [
            "simulate-weak",
            "--masks",
            str(tmp_path / "masks"),
            "--kind",
            "scribbles",
            "--out",
            str(tmp_path / "weak"),
            "--unlabelled",
            "128",
        ],
    )
    assert result.exit_code == 0, result.output
    assert set(np.unique(np.asarray(Image.open(tmp_path / "weak" / "a.png")))) == {0, 100, 128, 200}


def test_bench_quality_by_default_runs_every_bench_manifest_of_the_checkout():
    from seglab.pipeline.bench.quality import default_manifests

    found = [p.name for p in default_manifests()]
    kinds = ("boxes", "coarse", "points", "scribbles")
    assert found == [f"{d}-{k}.yaml" for d in ("camvid", "grabcut") for k in kinds]
    assert all(p.parent == Path(__file__).resolve().parents[1] / "manifests" / "bench" for p in default_manifests())


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
@pytest.mark.usefixtures("ray_local")
def test_bench_quality_on_two_grabcut_images(tmp_path):
    """The packaged bench manifest, pointed at a temporary weak-label folder and store."""
    spec = yaml.safe_load((ROOT / "manifests" / "bench" / "grabcut-points.yaml").read_text())
    spec["data"]["root"] = str(SHARED_DATA)
    spec["data"]["weak"]["path"] = str(tmp_path / "weak" / "points.csv")
    spec["store"]["path"] = str(tmp_path / "grabcut-points.zarr")
    manifest = tmp_path / "grabcut-points.yaml"
    manifest.write_text(yaml.safe_dump(spec))

    result = cli.invoke(app, ["bench", "quality", str(manifest), "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["dataset"], row["kind"], row["images"], row["failed"]) == ("grabcut", "points", 2, 0)
    baselines = ["nearest", "random_walker", "superpixel_walker", "dense_crf"]  # no GrabCut: not boxes
    assert list(row["miou"]) == ["weak", *baselines, "select", "refine"]
    assert list(row["seconds_per_image"]) == [*baselines, "select", "refine"]
    extra = importlib.util.find_spec("pydensecrf") is not None  # the bench extra; CI installs only .[test]
    measured = baselines if extra else baselines[:-1]
    for name in measured:  # each labelled both images
        assert row["baselines"][name]["evaluated"] == 2 and row["baselines"][name]["unavailable"] is None
        assert 0 <= row["baselines"][name]["pixel_accuracy"] <= 1 and row["seconds_per_image"][name] > 0
    if not extra:
        assert "pip install -e '.[bench]'" in row["baselines"]["dense_crf"]["unavailable"]
        assert row["miou"]["dense_crf"] is None and row["seconds_per_image"]["dense_crf"] is None
    assert all(0 <= row["miou"][n] <= 100 for n in ["weak", *measured, "select", "refine"])  # in %, to 0.1
    nearest = next(s for s in row["evaluation"]["sources"] if s["source"] == "nearest-label")
    assert row["miou"]["nearest"] == round(100 * nearest["miou"], 1)  # the same nearest fill as evaluate's
    assert row["miou"][row["best_baseline"]] == max(row["miou"][n] for n in measured)
    assert row["refine_points"] == pytest.approx(row["miou"]["refine"] - row["miou"]["select"], abs=0.11)
    assert row["refine_minus_best_baseline"] == pytest.approx(
        row["miou"]["refine"] - row["miou"][row["best_baseline"]], abs=0.11
    )
    spent = row["seconds_per_image"]
    assert spent["select"] > 0 and spent["refine"] > 0
    assert row["speed_ratio"] == pytest.approx(
        (spent["select"] + spent["refine"]) / spent[row["best_baseline"]], rel=0.02, abs=0.01
    )
    for source in row["evaluation"]["sources"]:
        assert source["evaluated"] == 2 and source["missing"] == 0
        assert set(source["iou"]) == {"background", "object"}
        numbers = [source[k] for k in ("miou", "pixel_accuracy", "labelled_fraction", "labelled_accuracy")]
        assert all(0 <= v <= 1 for v in numbers + list(source["iou"].values()))
    assert (tmp_path / "weak" / "points.csv").is_file()
    assert (tmp_path / "grabcut-points.first2" / "images.txt").read_text().count("\n") == 2
