"""Fit strategies (pipeline/fitting.py) read from a store built by hand: no Ray, no fitting run.

What a fit is keyed by decides when a rerun refits; these tests change one input at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import calibrated_manifest, record_failures

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.base.fingerprint import file_sha256
from seglab.pipeline.core.store import Store
from seglab.pipeline.fitting import GoldSetFit, Training, current_fit, fitter_for
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.planning import Planner
from seglab.pipeline.units import enumerate_units, training_units


def done(store: Store, stage: str, units: list[str], value: float = 0.0) -> None:
    """Record ``units`` done in ``stage`` with probabilities all ``value``."""
    store.put_units(stage, units, [{"probabilities": np.full((3, 4, 4), value, np.float16)} for _ in units])


@pytest.fixture
def calibrated(tmp_path):
    manifest = load_manifest(calibrated_manifest(tmp_path))
    planner = Planner(manifest)
    store = Store(manifest.store_location, create=True)
    return manifest, planner, store, enumerate_units(manifest)


def test_only_fitted_stages_have_a_fitter_of_their_kind(calibrated):
    _, planner, _, _ = calibrated
    assert isinstance(fitter_for(planner, "calibrate"), GoldSetFit)
    assert fitter_for(planner, "select") is None and current_fit(planner, None, "select", []) == (None, None)


def test_a_gold_set_fit_waits_for_every_calibration_image_and_is_keyed_by_its_inputs(calibrated):
    manifest, planner, store, units = calibrated
    fitter = fitter_for(planner, "calibrate")
    ids = [u.id for u in units]
    done(store, "select", ids[:4])
    record_failures(store, "select", [ids[3]])
    with pytest.raises(SeglabError, match=rf"cannot fit, 1 calibration image\(s\) .* \(first: {ids[3]}\)"):
        fitter.key(store, units)
    assert current_fit(planner, store, "calibrate", units) == (None, "fitted once its inputs are done")

    done(store, "select", [ids[3]])
    key, samples = fitter.key(store, units)
    assert [u.id for u in samples] == ids[:4]
    done(store, "select", [ids[5]], 1.0)  # an evaluation image: not a sample
    assert fitter.key(store, units)[0] == key
    done(store, "select", [ids[2]], 2.0)  # a sample's probabilities changed
    changed, _ = fitter.key(store, units)
    assert changed != key
    mask = Path(manifest.path).parent / "data" / "gold" / "img00.png"
    os.utime(mask, (1, 1))  # the gold mask was replaced
    assert fitter.key(store, units)[0] != changed


def test_a_stored_fit_counts_only_for_the_key_it_was_made_from(calibrated):
    _, planner, store, units = calibrated
    done(store, "select", [u.id for u in units])
    fitter = fitter_for(planner, "calibrate")
    key, _ = fitter.key(store, units)
    assert current_fit(planner, store, "calibrate", units) == (None, "to be fitted anew")
    store.set_stage_attrs("calibrate", fitted={"lambda": 0.5}, fitted_from=key)
    assert current_fit(planner, store, "calibrate", units) == ({"lambda": 0.5}, None)
    assert current_fit(planner, store, "calibrate", units, cleared=frozenset({"calibrate"}))[0] is None
    store.set_stage_attrs("calibrate", fitted_from="another key")
    assert fitter.stored(store, key) is None


def test_a_trained_fit_needs_its_checkpoint_unchanged(tmp_path):
    path = calibrated_manifest(tmp_path, calibration="images/img0[01].png", evaluation="images/img02.png")
    path.write_text(path.read_text() + "rounds: 1\n")
    manifest = load_manifest(path)
    planner = Planner(manifest)
    store = Store(manifest.store_location, create=True)
    units = enumerate_units(manifest)
    fitter = fitter_for(planner, "retrain")
    assert isinstance(fitter, Training) and fitter.kind.labels == "refine/labels"
    with pytest.raises(SeglabError, match="nothing to train on"):
        fitter.key(store, units)
    training = training_units(manifest, units)
    for stage in planner.dag.deps["retrain"]:
        done(store, stage, [u.id for u in training[1:]])
    key, samples = fitter.key(store, units)
    assert samples == training[1:] and len(training) == 3  # what is done of the images outside the gold sets
    assert store.local is not None
    key_of_checkpoint = f"{store.checkpoint_prefix('retrain')}/{key[:16]}/epoch-0001.pt"
    checkpoint = store.local / key_of_checkpoint
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    fitted = {"checkpoint": key_of_checkpoint, "sha256": file_sha256(checkpoint)}
    store.set_stage_attrs("retrain", fitted=fitted, fitted_from=key)
    assert fitter.stored(store, key) == fitted
    checkpoint.write_bytes(b"other weights")
    assert fitter.stored(store, key) is None
    assert current_fit(planner, store, "retrain", units) == (None, "to be trained anew")
