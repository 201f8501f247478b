"""End-to-end runs of a tiny manifest on a local Ray: resume, signatures, --force, failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shapes_image
from PIL import Image
from scipy.ndimage import binary_erosion

from seglab.pipeline.base.errors import SignatureMismatch
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.store import Store
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner, RunOptions

pytestmark = pytest.mark.usefixtures("ray_local")
STAGES = ("ingest", "embed", "prompts", "select", "refine")


def run(path, **options):
    return Runner(load_manifest(path), RunOptions(**options)).run()


def readme_reader(root: Path, stage: str, unit: str) -> np.ndarray:
    """Run the README's snippet that reads one image's labels with plain zarr and pyarrow."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\nfrom pathlib import Path\nimport pyarrow.compute")
    code = text[start + len("```python\n") : text.index("```", start + 10)]
    given = 'root, stage, unit = Path("runs/demo.zarr"), "refine", "images__0001TP_006690.png"'
    assert given in code
    namespace: dict = {}
    exec(code.replace(given, f"root, stage, unit = Path({str(root)!r}), {stage!r}, {unit!r}"), namespace)
    return namespace["labels"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_end_to_end_then_rerun_does_nothing(tiny):
    report = run(tiny)
    assert report.ok and [s.done_now for s in report.stages] == [4, 4, 4, 4, 4]
    store = Store(tiny.parent / "run.zarr")
    for i, unit in enumerate(sorted(store.entries("select"))):
        labels = store.read_unit(["select/labels"], unit)["select/labels"]
        image = store.read_unit(["ingest/image"], unit)["ingest/image"]
        _, truth = shapes_image(*image.shape[:2], seed=i)
        assert labels.shape == image.shape[:2]  # every image keeps its own size
        for cls in (1, 2):
            assert iou(labels == cls, truth == cls) > 0.7, (unit, cls)
    for unit in store.entries("refine"):  # the README's plain-zarr reader reads what seglab wrote
        np.testing.assert_array_equal(
            readme_reader(tiny.parent / "run.zarr", "refine", unit), store.read_array("refine/labels", unit)
        )
    keys = store.objects.list("")
    again = run(tiny)
    assert again.ok and again.work_done == 0
    assert store.objects.list("") == keys  # a rerun with nothing to do writes nothing
    rerun = subprocess.run(  # and imports nothing that only running a stage needs (seconds of a short rerun)
        [sys.executable, "-c", RERUN_IMPORTS, str(tiny)], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0 and rerun.stdout.strip().splitlines()[-1] == "[]", rerun.stdout + rerun.stderr


RERUN_IMPORTS = """
import sys
from seglab.cli.app import main
sys.argv = ["seglab", "run", sys.argv[1]]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print([m for m in ("ray.data", "scipy.stats", "pyarrow.dataset", "torch") if m in sys.modules])
"""


def test_changed_config_stops_and_names_the_key_then_force_recomputes_downstream(tiny):
    run(tiny)
    store = Store(tiny.parent / "run.zarr")
    before = {s: store.committed_rows(s) for s in STAGES}
    tiny.write_text(
        tiny.read_text().replace("prompts: {batch_size: 2}", "prompts: {batch_size: 2, points_per_component: 3}")
    )
    with pytest.raises(SignatureMismatch) as info:
        run(tiny)
    assert info.value.stage == "prompts"
    assert "config.points_per_component: 5 -> 3" in info.value.changes
    report = run(tiny, force=("prompts",))
    assert report.ok
    assert {s.stage: s.done_now for s in report.stages} == {
        "ingest": 0,
        "embed": 0,
        "prompts": 4,
        "select": 4,
        "refine": 4,
    }
    after = {s: store.committed_rows(s) for s in STAGES}
    assert after["ingest"] == before["ingest"] and after["embed"] == before["embed"]
    assert after["prompts"] == after["select"] == after["refine"] == 4  # cleared, then written once


def test_a_bad_image_fails_alone_and_a_fixed_one_is_all_that_reruns(tiny):
    bad = tiny.parent / "data" / "images" / "img01.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    report = run(tiny)
    assert not report.ok
    ingest = report.stages[0]
    assert ingest.done_now == 3 and [u for u, _ in ingest.failures] == ["images__img01.png"]
    assert "img01.png" in ingest.failures[0][1]
    assert all(s.blocked == 1 and s.done_now == 3 for s in report.stages[1:])

    def where(stage: str) -> dict[str, int]:
        return {
            u: e.outputs[next(iter(e.outputs))].batch
            for u, e in Store(tiny.parent / "run.zarr").entries(stage).items()
            if isinstance(e, Receipt)
        }

    before = {s: where(s) for s in STAGES}
    bad.write_bytes(good_bytes)
    report = run(tiny)
    assert report.ok and all(s.done_now == 1 for s in report.stages)
    for stage in STAGES:  # the finished units stay where they were; only the fixed one is new
        after = where(stage)
        assert set(after) == {*before[stage], "images__img01.png"}
        assert {u: after[u] for u in before[stage]} == before[stage]


def test_added_images_are_processed_without_touching_finished_ones(tiny):
    run(tiny)
    image, _ = shapes_image(40, 100, seed=9)
    Image.fromarray(image).save(tiny.parent / "data" / "images" / "img09.png")
    Image.fromarray(np.where(np.arange(100) < 50, 0, 255).astype(np.uint8)[None].repeat(40, 0)).save(
        tiny.parent / "data" / "scribbles" / "img09.png"
    )
    report = run(tiny)
    assert report.ok and [s.done_now for s in report.stages] == [1] * len(STAGES)
    assert [s.already_done for s in report.stages] == [4] * len(STAGES)


def test_dry_run_and_only(tiny):
    report = run(tiny, dry_run=True)
    assert [s.todo for s in report.stages] == [4, 0, 0, 0, 0]
    assert [s.blocked for s in report.stages] == [0, 4, 4, 4, 4]
    assert not (tiny.parent / "run.zarr").exists()
    report = run(tiny, only="ingest")
    assert [s.stage for s in report.stages] == ["ingest"] and report.stages[0].done_now == 4


def test_a_run_allocates_arrow_memory_from_malloc_and_maps_large_blocks(tiny, monkeypatch):
    """The driver's short-lived Arrow tables go back to the C library, not into mimalloc's
    retained pages, and its large blocks are mapped on their own (base/allocation.py)."""
    import pyarrow as pa

    import seglab.pipeline.runner as runner_module

    mapped = []
    monkeypatch.setattr(runner_module, "map_large_allocations", lambda: mapped.append(True) or True)
    before = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        run(tiny, dry_run=True)
        assert pa.default_memory_pool().backend_name == "system" and mapped == [True]
    finally:
        pa.set_memory_pool(before)


def test_a_stage_is_folded_after_its_plan_is_let_go(tiny, monkeypatch):
    """A plan holds maps over every unit (ids to index rows, made-from digests, batches);
    the fold at a stage's end is its largest moment, so the plan is gone by then."""
    import weakref

    import seglab.pipeline.runner as runner_module

    plans: list[weakref.ref] = []
    alive_at_fold: list[bool] = []
    plan, tidy = runner_module.Planner.plan, runner_module.BatchNames.tidy

    def planned(self, *args, **kwargs):
        made = plan(self, *args, **kwargs)
        plans.append(weakref.ref(made))
        return made

    def folded(self):
        alive_at_fold.append(plans[-1]() is not None)
        return tidy(self)

    monkeypatch.setattr(runner_module.Planner, "plan", planned)
    monkeypatch.setattr(runner_module.BatchNames, "tidy", folded)
    run(tiny, only="ingest")
    assert alive_at_fold == [False]


def _truth_of(store: Store, unit: str, i: int) -> np.ndarray:
    image = store.read_unit(["ingest/image"], unit)["ingest/image"]
    return shapes_image(*image.shape[:2], seed=i)[1]


def test_boxes_become_box_prompts_and_labels_end_to_end(tiny):
    """A boxes table (one tight box per object, background unlabelled) through every stage."""
    store_path = tiny.parent / "run.zarr"
    rows = ["image,x0,y0,x1,y1,class"]
    for i, path in enumerate(sorted((tiny.parent / "data" / "images").glob("*.png"))):
        h, w = np.asarray(Image.open(path)).shape[:2]
        _, truth = shapes_image(h, w, seed=i)
        for cls in (1, 2):
            ys, xs = np.nonzero(truth == cls)
            rows.append(f"{path.name},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1},{cls}")
    (tiny.parent / "boxes.csv").write_text("\n".join(rows) + "\n")
    tiny.write_text(
        tiny.read_text().replace("{kind: scribbles, path: data/scribbles}", "{kind: boxes, path: boxes.csv}")
    )
    assert run(tiny).ok
    store = Store(store_path)
    for i, unit in enumerate(sorted(store.entries("select"))):
        prompts = store.read_unit(["prompts/boxes", "prompts/classes", "ingest/boxes"], unit)
        assert sorted(prompts["prompts/classes"].tolist()) == [1, 2] and not np.isnan(prompts["prompts/boxes"]).any()
        assert prompts["ingest/boxes"].shape == (2, 5)
        labels = store.read_unit(["select/labels"], unit)["select/labels"]
        truth = _truth_of(store, unit, i)
        for cls in (1, 2):
            assert iou(labels == cls, truth == cls) > 0.7, (unit, cls)


def test_coarse_masks_add_grown_component_boxes(tiny):
    data = tiny.parent / "data"
    (data / "coarse").mkdir()
    for i, path in enumerate(sorted((data / "images").glob("*.png"))):
        h, w = np.asarray(Image.open(path)).shape[:2]
        _, truth = shapes_image(h, w, seed=i)
        coarse = np.full(truth.shape, 255, np.uint8)
        for cls in (0, 1, 2):  # each class eroded by 3 px: the boundaries are left unlabelled
            coarse[binary_erosion(truth == cls, iterations=3)] = cls
        Image.fromarray(coarse).save(data / "coarse" / path.name)
    tiny.write_text(
        tiny.read_text().replace("{kind: scribbles, path: data/scribbles}", "{kind: coarse, path: data/coarse}")
    )
    assert run(tiny).ok
    store = Store(tiny.parent / "run.zarr")
    for i, unit in enumerate(sorted(store.entries("select"))):
        arrays = store.read_unit(["prompts/boxes", "prompts/classes", "select/labels"], unit)
        truth = _truth_of(store, unit, i)
        for box, cls in zip(arrays["prompts/boxes"], arrays["prompts/classes"]):
            if cls == 0:
                continue
            ys, xs = np.nonzero(truth == cls)
            assert box[0] <= xs.min() + 3 and box[2] >= xs.max() - 2  # the grown box spans the eroded object
        for cls in (1, 2):
            assert iou(arrays["select/labels"] == cls, truth == cls) > 0.8, (unit, cls)
