import numpy as np
import pytest
from test_ledger import done_line

from seglab.pipeline.base.fingerprint import array_sha256, diff_signatures, stage_signature
from seglab.pipeline.core.store import Store, StoreError


def test_units_of_different_shapes_round_trip(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True, attrs={"seglab_version": "x"})
    store.prepare_stage("ingest", ["image", "pts"])
    arrays = {
        "a": {"image": np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3), "pts": np.zeros((0, 4), np.float32)},
        "b": {"image": np.ones((33, 17, 3), np.uint8), "pts": np.ones((5, 4), np.float32)},
    }
    receipts = {u: store.write_unit("ingest", u, a) for u, a in arrays.items()}
    again = Store(tmp_path / "s.zarr")
    for unit, outs in arrays.items():
        got = again.read_unit(["ingest/image", "ingest/pts"], unit)
        for name, value in outs.items():
            np.testing.assert_array_equal(got[f"ingest/{name}"], value)
            assert got[f"ingest/{name}"].dtype == value.dtype
            assert receipts[unit][name].sha256 == array_sha256(value)
    assert again.stages() == ["ingest"] and again.attrs["seglab_version"] == "x"


def test_all_zero_arrays_are_real_chunks_and_missing_units_are_named(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.prepare_stage("select", ["labels"])
    store.write_unit("select", "u1", {"labels": np.zeros((4, 4), np.uint8)})
    assert (tmp_path / "s.zarr" / "select" / "labels" / "u1" / "c").exists()
    with pytest.raises(StoreError, match="'select/labels/u2' is missing"):
        store.read_unit(["select/labels"], "u2")


def test_opening_a_folder_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no seglab store here"):
        Store(tmp_path)


def test_clear_stage_removes_arrays_attrs_and_ledger(tmp_path):
    store = Store(tmp_path / "s.zarr", create=True)
    store.prepare_stage("embed", ["f"])
    store.write_unit("embed", "a", {"f": np.ones(3)})
    store.set_stage_attrs("embed", signature={"v": 1})
    store.ledger("embed").append([done_line("a")])
    store.clear_stage("embed")
    assert store.stages() == [] and store.ledger("embed").load() == {} and store.stage_attrs("embed") == {}


def test_signature_diff_names_the_changed_key():
    old = stage_signature(version=1, config={"tau": 0.3, "n": 5}, model={"checkpoint": "aa"}, upstream={"embed": "1"})
    new = stage_signature(version=2, config={"tau": 0.4, "n": 5}, model={"checkpoint": "bb"}, upstream={"embed": "2"})
    changes = diff_signatures(old, new)
    assert "config.tau: 0.3 -> 0.4" in changes
    assert "version: 1 -> 2" in changes
    assert "model.checkpoint: 'aa' -> 'bb'" in changes
    assert any(c.startswith("upstream stage embed") for c in changes)
    assert diff_signatures(old, old) == []
