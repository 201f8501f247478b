"""The calibrate stage end to end: fitted on the calibration gold set, applied per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import calibrated_manifest, shapes_image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import ManifestError
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import evaluate
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner, RunOptions
from seglab.stages.parts.conformal import prediction_sets
from seglab.stages.parts.ranking import auroc
from seglab.stages.parts.uncertainty import SIGNALS

pytestmark = pytest.mark.usefixtures("ray_local")


def test_thresholds_are_fitted_stored_and_applied(tmp_path):
    path = calibrated_manifest(tmp_path)
    report = Runner(load_manifest(path)).run()
    assert report.ok and [s.stage for s in report.stages][-2:] == ["calibrate", "refine"]
    assert not report.stages[-2].warnings  # 4 images suffice for alpha = 0.3
    store = Store(tmp_path / "run.zarr")
    fitted = store.stage_attrs("calibrate")["fitted"]
    assert fitted["method"] == "risk-control" and fitted["alpha"] == 0.3 and fitted["n"] == 4
    for unit in store.entries("calibrate"):
        arrays = store.read_unit(["select/probabilities", "calibrate/labels", "calibrate/set_size"], unit)
        sets = prediction_sets(arrays["select/probabilities"], fitted["thresholds"])
        assert np.array_equal(arrays["calibrate/set_size"], sets.sum(0))
        single = sets.sum(0) == 1
        assert np.array_equal(arrays["calibrate/labels"][single], sets.argmax(0)[single])  # class ids = 0, 1, 2
        assert np.all(arrays["calibrate/labels"][~single] == 255)
    status = CliRunner().invoke(app, ["status", str(path)])
    assert "calibrate: risk-control, alpha 0.3" in status.output and "n = 4" in status.output
    rows = {r["stage"]: r for r in json.loads(CliRunner().invoke(app, ["status", str(path), "--json"]).stdout)}
    assert rows["calibrate"]["fitted"]["thresholds"] == fitted["thresholds"]
    again = Runner(load_manifest(path)).run()  # nothing changed: the fit is reused, nothing recomputed
    assert again.work_done == 0
    assert all(s.todo == 0 for s in Runner(load_manifest(path), RunOptions(dry_run=True)).run().stages)


def test_a_new_alpha_refits_and_too_few_images_warn_with_the_number_needed(tmp_path):
    path = calibrated_manifest(tmp_path)
    Runner(load_manifest(path)).run()
    path.write_text(path.read_text().replace("alpha: 0.3", "alpha: 0.05"))
    report = Runner(load_manifest(path), RunOptions(force=("calibrate",))).run()
    calibrate = report.stages[-2]
    assert calibrate.done_now == 6
    assert calibrate.warnings and "19 are needed for alpha=0.05" in calibrate.warnings[0]
    fitted = Store(tmp_path / "run.zarr").stage_attrs("calibrate")["fitted"]
    assert fitted["feasible"] is False and set(fitted["thresholds"]) == {1.0}


def test_without_a_calibration_set_the_stage_does_not_run(tiny):
    report = Runner(load_manifest(tiny)).run()
    assert [s.stage for s in report.stages] == ["ingest", "embed", "prompts", "select", "refine"]


def test_calibration_and_evaluation_images_must_be_apart(tmp_path):
    path = calibrated_manifest(tmp_path, evaluation="images/img0[34].png")
    with pytest.raises(ManifestError, match="also evaluation images"):
        Runner(load_manifest(path)).run()


def test_evaluate_reports_the_miscoverage_of_the_calibrated_sets(tmp_path):
    path = calibrated_manifest(tmp_path)
    assert Runner(load_manifest(path)).run().ok
    result = CliRunner().invoke(app, ["evaluate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["source"]: r for r in json.loads(result.stdout)["sources"]}
    assert list(rows) == ["weak", "nearest-label", "select", "calibrate", "refine"]
    calibrate = rows["calibrate"]
    assert calibrate["evaluated"] == 2 and 0.0 <= calibrate["miscoverage"] <= 1.0
    # recompute it by hand from the stored probabilities and thresholds
    store = Store(tmp_path / "run.zarr")
    thresholds = np.asarray(store.stage_attrs("calibrate")["fitted"]["thresholds"])
    shares = []
    for unit, seed in (("images__img04.png", 4), ("images__img05.png", 5)):
        probabilities = store.read_unit(["select/probabilities"], unit)["select/probabilities"]
        truth = shapes_image(*probabilities.shape[1:], seed=seed)[1]
        covered = (1.0 - probabilities.astype(np.float64)) <= thresholds[:, None, None]
        shares.append(1.0 - np.take_along_axis(covered, truth[None].astype(np.int64), axis=0).mean())
    assert abs(calibrate["miscoverage"] - np.mean(shares)) < 1e-9
    assert calibrate["labelled_fraction"] <= rows["select"]["labelled_fraction"]
    # refine reads the calibrated labels: its calibration signal marks where they differ from its own
    aurocs = []
    for unit, seed in (("images__img04.png", 4), ("images__img05.png", 5)):
        arrays = store.read_unit(["calibrate/labels", "refine/labels", "refine/uncertainty", "refine/signals"], unit)
        labels = arrays["refine/labels"]
        kept = labels != 255
        calibration = arrays["refine/signals"][SIGNALS.index("calibration")]
        assert np.array_equal(calibration[kept] == 1, (arrays["calibrate/labels"] != labels)[kept])
        truth = shapes_image(*labels.shape, seed=seed)[1]
        aurocs.append(auroc(arrays["refine/uncertainty"][kept], (labels != truth)[kept]))
    assert rows["refine"]["uncertainty_auroc"] == pytest.approx(np.nanmean(aurocs), abs=1e-9)
    assert "auroc_calibration" in rows["refine"] and "auroc_probability" in rows["refine"]


def test_bench_conformal_tests_every_split_on_the_images_it_did_not_calibrate_on(tmp_path):
    path = calibrated_manifest(tmp_path)
    path.write_text(
        path.read_text()
        .replace("images/img0[45].png", "images/*.png")
        .replace("  calibration: {images: {glob: 'images/img0[0-3].png'}, masks: gold}\n", "")
    )
    assert Runner(load_manifest(path)).run().ok
    result = CliRunner().invoke(
        app, ["bench", "conformal", str(path), "--splits", "3", "--calibration", "4", "--alpha", "0.3", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 6 and report["test"] == 2
    splits = report["alphas"]["0.3"]["splits"]
    assert len(splits) == 3 and all(0.0 <= s["miscoverage"] <= 1.0 and 0.0 <= s["kept"] <= 1.0 for s in splits)
    mean = report["alphas"]["0.3"]["summary"]["miscoverage"]["mean"]
    assert abs(mean - np.mean([s["miscoverage"] for s in splits])) < 1e-12
    too_many = CliRunner().invoke(app, ["bench", "conformal", str(path), "--calibration", "6"])
    assert too_many.exit_code == 1 and "needs more" in too_many.output


def test_calibration_images_must_be_among_the_run_images(tmp_path):
    path = calibrated_manifest(tmp_path, calibration="gold/*.png")
    with pytest.raises(ManifestError) as info:
        Runner(load_manifest(path)).run()
    assert any(loc == "data.calibration.images" and "not among data.images" in msg for loc, msg in info.value.problems)


def test_gold_masks_of_symlinked_images_are_found_by_the_link_name_everywhere(tmp_path):
    path = calibrated_manifest(tmp_path, calibration="images/img0[0-2].png", evaluation="images/img0[45].png")
    data = tmp_path / "data"
    (data / "raw").mkdir()
    target = data / "raw" / "frame-a.png"  # the link keeps the name the gold mask and the weak label use
    (data / "images" / "img05.png").rename(target)
    (data / "images" / "img05.png").symlink_to(target)
    assert Runner(load_manifest(path)).run().ok  # calibrate fitted with the link's gold mask
    scored = evaluate(load_manifest(path))
    assert {s.source: (s.evaluated, len(s.missing)) for s in scored.sources}["refine"] == (2, 0)
