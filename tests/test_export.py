"""seglab export: every format read back by its consumer library equals the store."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import alter_row, batch_folder, calibrated_manifest, record_failures
from PIL import Image
from pycocotools.coco import COCO
from skimage.measure import label as connected_components
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.batcharrays import batch_id, records_key
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.stagetable import parquet_bytes, parquet_table
from seglab.pipeline.core.store import CorruptOutput, Store
from seglab.pipeline.exports import coco
from seglab.pipeline.exports.export import export
from seglab.pipeline.exports.formats import ExportOptions
from seglab.pipeline.exports.labelsource import done_units
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.runner import Runner

pytestmark = pytest.mark.usefixtures("ray_local")
IGNORE = 255


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_local) -> Path:
    """A finished run over 6 images: calibration img00-01, evaluation img02, training img03-05."""
    folder = tmp_path_factory.mktemp("run")
    path = calibrated_manifest(folder, calibration="images/img0[01].png", evaluation="images/img02.png")
    assert Runner(load_manifest(path)).run().ok
    return folder / "run.zarr"


def stored(store: Path, stage: str = "refine") -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
    """unit -> (labels, uncertainty or None, source image) as the store holds them."""
    s = Store(store)
    sources = {u: e.source for u, e in s.entries("ingest").items()}
    out = {}
    for unit in done_units(s, stage):
        labels = s.read_unit([f"{stage}/labels"], unit)[f"{stage}/labels"]
        u = s.read_unit([f"{stage}/uncertainty"], unit)[f"{stage}/uncertainty"] if stage.startswith("refine") else None
        out[unit] = (labels, None if u is None else u.astype(np.float32), sources[unit])
    return out


def assert_checksums(folder: Path) -> None:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_png_layout_reads_back_with_pil_and_carries_provenance(store, tmp_path):
    truth = stored(store)
    out = tmp_path / "png"
    meta = export(store, out, ExportOptions(format="png", ignore_value=254))
    assert meta["stage"] == "refine" and meta["round"] == 0 and meta["written"]["images"] == len(truth) == 6
    provenance = json.loads((out / "export.json").read_text())["provenance"]
    assert provenance["backend"] == {"model": "weightfree", "checkpoint": "none"}
    assert provenance["calibration"]["method"] == "risk-control" and provenance["calibration"]["alpha"] == 0.3
    assert provenance["manifest_hash"] == Store(store).attrs["manifest_hash"] and provenance["seglab_version"]
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_image = {r["image"]: r for r in rows}
    for _unit, (labels, uncertainty, image) in truth.items():
        row = by_image[image]
        label = Image.open(out / row["label"])
        assert label.mode == "P" and Path(row["label"]).stem == Path(image).stem
        assert np.array_equal(np.asarray(label), np.where(labels == IGNORE, 254, labels))
        written = np.asarray(Image.open(out / row["uncertainty"]))
        assert written.dtype == np.uint8 and np.abs(written.astype(int) - np.rint(uncertainty * 255)).max() == 0
    assert [c["name"] for c in json.loads((out / "palette.json").read_text())] == ["background", "disc", "rectangle"]
    assert_checksums(out)

    npy = tmp_path / "npy"
    export(store, npy, ExportOptions(format="png", uncertainty_format="npy"))
    index = json.loads((npy / "index.json").read_text())
    for entry in index["images"]:
        assert np.array_equal(np.load(npy / entry["uncertainty"]).astype(np.float32), truth[entry["unit"]][1])


def test_coco_loads_with_pycocotools_one_annotation_per_region(store, tmp_path):
    truth = stored(store)
    out = tmp_path / "coco"
    meta = export(store, out, ExportOptions(format="coco"))
    api = COCO(str(out / "annotations.json"))
    assert sorted(api.getCatIds()) == [0, 1, 2] and len(api.getImgIds()) == 6
    assert meta["written"]["annotations"] == len(api.getAnnIds())
    for image_id in api.getImgIds():
        record = api.loadImgs(image_id)[0]
        labels, uncertainty, _ = truth[record["seglab_unit"]]
        painted = np.full(labels.shape, IGNORE, labels.dtype)
        for ann in api.loadAnns(api.getAnnIds(imgIds=image_id)):
            mask = api.annToMask(ann).astype(bool)
            assert connected_components(mask, connectivity=2).max() == 1  # one region per annotation
            assert (painted[mask] == IGNORE).all()  # regions do not overlap
            painted[mask] = ann["category_id"]
            assert ann["area"] == mask.sum()
            assert ann["uncertainty"] == pytest.approx(float(uncertainty[mask].mean()), abs=1e-6)
            assert ann["score"] == pytest.approx(1.0 - ann["uncertainty"])
        assert np.array_equal(painted, labels)
    assert_checksums(out)


def test_parquet_loads_with_pyarrow_and_datasets(store, tmp_path):
    truth = stored(store)
    out = tmp_path / "parquet"
    meta = export(store, out, ExportOptions(format="parquet", embed_images=True))
    table = pq.read_table(out / "labels.parquet")
    assert table.num_rows == 6 and json.loads(table.schema.metadata[b"seglab"])["stage"] == "refine"
    for row in table.to_pylist():
        labels, uncertainty, image = truth[row["unit"]]
        decoded = np.asarray(Image.open(io.BytesIO(row["label"]["bytes"])))
        assert np.array_equal(decoded, labels) and (row["height"], row["width"]) == labels.shape
        assert row["image"]["path"] == image and row["image"]["bytes"] == Path(image).read_bytes()
        present = sorted(set(np.unique(labels).tolist()) - {IGNORE})
        assert row["class_ids"] == present
        assert row["class_names"] == [["background", "disc", "rectangle"][c] for c in present]
        assert row["mean_uncertainty"] == pytest.approx(float(uncertainty.mean()), rel=1e-5)
        assert json.loads(row["provenance"]) == meta["provenance"]

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out / "labels.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(loaded) == 6 and type(loaded.features["label"]).__name__ == "Image"
    for row in loaded:
        assert np.array_equal(np.asarray(row["label"]), truth[row["unit"]][0])
        assert np.asarray(row["image"]).shape[:2] == truth[row["unit"]][0].shape


def test_split_and_uncertainty_filters(store, tmp_path):
    s = Store(store)
    splits = s.attrs["splits"]
    meta = export(store, tmp_path / "evaluation", ExportOptions(split="evaluation"))
    assert [i["unit"] for i in json.loads((tmp_path / "evaluation" / "index.json").read_text())["images"]] == splits[
        "evaluation"
    ] and meta["filters"]["split"] == "evaluation"
    training = export(store, tmp_path / "training", ExportOptions(format="coco", split="training"))
    held = set(splits["evaluation"]) | set(splits["calibration"])
    assert training["written"]["images"] == 6 - len(held) == 3

    fractions = {u: float((v[1] >= 0.3).mean()) for u, v in stored(store).items()}
    limit = float(np.median(list(fractions.values())))
    meta = export(store, tmp_path / "filtered", ExportOptions(max_uncertain=limit, uncertain_above=0.3))
    kept = {i["unit"] for i in json.loads((tmp_path / "filtered" / "index.json").read_text())["images"]}
    assert kept == {u for u, f in fractions.items() if f <= limit} and 0 < len(kept)
    assert {d["unit"] for d in meta["dropped"]} == set(fractions) - kept

    selected = export(store, tmp_path / "select", ExportOptions(stage="select"))
    assert selected["stage"] == "select" and not (tmp_path / "select" / "uncertainty").exists()
    with pytest.raises(SeglabError, match="no per-pixel uncertainty"):
        export(store, tmp_path / "bad", ExportOptions(stage="select", max_uncertain=0.5))
    with pytest.raises(SeglabError, match="no refine stage of round 1"):
        export(store, tmp_path / "bad", ExportOptions(round=1))
    with pytest.raises(SeglabError, match="is a class id"):
        export(store, tmp_path / "bad", ExportOptions(ignore_value=2))
    with pytest.raises(SeglabError, match="no finished units|has not run"):
        export(store, tmp_path / "bad", ExportOptions(stage="retrain"))
    assert not (tmp_path / "bad").exists()


def test_a_failed_export_leaves_nothing_and_a_killed_one_is_cleaned_up(store, tmp_path, monkeypatch):
    out = tmp_path / "coco"
    calls = []

    def failing(item, *args):
        calls.append(item.unit)
        if len(calls) == 3:
            raise OSError("disk full")
        return iter(())

    monkeypatch.setattr(coco, "annotations", failing)
    with pytest.raises(OSError, match="disk full"):
        export(store, out, ExportOptions(format="coco"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a process killed without warning mid-export: nothing at OUT, then the next export is whole
    script = (
        "import os, signal, sys\n"
        "from seglab.pipeline.exports import png\n"
        "from seglab.pipeline.exports.export import export\n"
        "from seglab.pipeline.exports.formats import ExportOptions\n"
        "real, seen = png.label_image, []\n"
        "def dying(labels):\n"
        "    seen.append(1)\n"
        "    if len(seen) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(labels)\n"
        "png.label_image = dying\n"
        "export(sys.argv[1], sys.argv[2], ExportOptions(format='png'))\n"
    )
    out = tmp_path / "png"
    killed = subprocess.run([sys.executable, "-c", script, str(store), str(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and len(list(tmp_path.glob(".png.*"))) == 1
    result = CliRunner().invoke(app, ["export", str(store), "--format", "png", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob(".png.*")) == [] and len(list((out / "labels").iterdir())) == 6
    assert_checksums(out)
    result = CliRunner().invoke(app, ["export", str(store), "--format", "parquet", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0 and "6 images" in result.output
    assert (out / "labels.parquet").exists() and not (out / "labels").exists() and os.listdir(tmp_path) == ["png"]


def test_images_the_stage_has_not_finished_are_named_not_silently_missing(store, tmp_path):
    copy = tmp_path / "run.zarr"
    shutil.copytree(store, copy)
    unit = sorted(Store(copy).entries("refine"))[0]
    record_failures(Store(copy), "refine", [unit], "lost")
    result = CliRunner().invoke(app, ["export", str(copy), "--format", "coco", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "1 images of the run have no finished refine labels" in result.output
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["unfinished"] == [unit] and meta["written"]["images"] == 5
    assert meta["failed"] == [{"unit": unit, "image": stored(store)[unit][2], "stage": "refine", "error": "lost"}]


def rewrite_info(store: Store, stage: str, entry: Receipt, info: dict) -> None:
    """Replace the facts the commit object of ``entry``'s batch records of its unit."""
    record = next(iter(entry.outputs.values()))
    key = records_key(stage, batch_id(record.batch))
    table = parquet_table(store.objects.get(key))
    infos = table.column("info").to_pylist()
    infos[record.row] = json.dumps(info)
    store.objects.put(
        key, parquet_bytes(table.set_column(table.schema.get_field_index("info"), "info", pa.array(infos)))
    )


def copied(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run.zarr"
    shutil.copytree(store, copy)
    return copy


def one_line_refusal(result, *words: str) -> str:
    """The CLI's refusal: exit 1, one line, no traceback, holding every one of ``words``."""
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert all(w in output for w in words), output
    return output


def test_overwrite_replaces_only_an_unchanged_seglab_export(store, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["export", str(store), "--out", str(precious), "--overwrite"])
    one_line_refusal(result, "precious", "not a seglab export")
    assert (precious / "notes.txt").read_text() == "x" and os.listdir(precious) == ["notes.txt"]

    out = tmp_path / "out"
    export(store, out, ExportOptions(format="png"))
    assert json.loads((out / "export.json").read_text())["seglab_export"] == 1
    (out / "labels" / "my-fix.png").write_bytes(b"mine")  # a user's file next to the export
    with pytest.raises(SeglabError, match=r"out: .*'labels/my-fix.png' is not part of the export"):
        export(store, out, ExportOptions(format="coco", overwrite=True))
    (out / "labels" / "my-fix.png").unlink()
    edited = sorted((out / "labels").iterdir())[0]
    edited.write_bytes(edited.read_bytes() + b"hand-corrected")
    with pytest.raises(SeglabError, match=rf"'labels/{edited.name}' changed since the export was written"):
        export(store, out, ExportOptions(format="coco", overwrite=True))
    assert (out / "index.csv").exists() and not (out / "annotations.json").exists()

    # an export written before export.json had 'seglab_export' is still proven one by its SHA256SUMS
    older = tmp_path / "older"
    export(store, older, ExportOptions(format="png"))
    meta = json.loads((older / "export.json").read_text())
    del meta["seglab_export"]
    (older / "export.json").write_text(json.dumps(meta, indent=2))
    subprocess.run(
        "find . -type f ! -name SHA256SUMS -printf '%P\\n' | sort | xargs sha256sum > SHA256SUMS",
        shell=True,
        cwd=older,
        check=True,
    )
    export(store, older, ExportOptions(format="coco", overwrite=True))
    assert sorted(os.listdir(older)) == ["SHA256SUMS", "annotations.json", "export.json"]


def test_checksums_of_names_with_a_newline_or_backslash_pass_sha256sum_check(store, tmp_path):
    copy = copied(store, tmp_path)
    unit, entry = sorted(Store(copy).entries("ingest").items())[0]
    assert isinstance(entry, Receipt) and entry.source is not None
    odd = str(Path(entry.source).with_name("we\\ird\nname.png"))  # a stem holding both
    rewrite_info(Store(copy), "ingest", entry, {**entry.info, "source": odd})
    out = tmp_path / "out"
    export(copy, out, ExportOptions(format="png"))
    assert (out / "labels" / "we\\ird\nname.png").exists()
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert (
        check.returncode == 0 and check.stdout.count(": OK") == len([p for p in out.rglob("*") if p.is_file()]) - 1
    ), check.stdout + check.stderr
    export(copy, out, ExportOptions(format="coco", overwrite=True))  # the escaped listing proves it an export


def test_images_that_failed_ingest_are_listed_with_stage_and_error_and_warned_about(store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(store.parent, run)
    for name in ("img06.png", "img07.png"):
        (run / "data" / "images" / name).write_bytes(b"not an image")
    Runner(load_manifest(run / "manifest.yaml")).run()
    result = CliRunner().invoke(app, ["export", str(run / "run.zarr"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "wrote 6 images" in output and "2 images of the run have no finished refine labels" in output
    assert "images__img06.png: ingest failed:" in output and "not an image" in output
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["unfinished"] == ["images__img06.png", "images__img07.png"]
    assert [(f["unit"], f["stage"]) for f in meta["failed"]] == [
        ("images__img06.png", "ingest"),
        ("images__img07.png", "ingest"),
    ]
    assert all("img0" in f["error"] and "not an image" in f["error"] for f in meta["failed"])


def test_an_array_that_differs_from_its_record_or_is_gone_is_never_exported(store, tmp_path):
    copy = copied(store, tmp_path)
    entries = Store(copy).entries("refine")
    b = sorted(done_units(Store(copy), "refine"))[1]
    where = entries[b].outputs["labels"]
    b, c = sorted(u for u, e in entries.items() if e.outputs["labels"].batch == where.batch)  # one batch's two
    alter_row(copy, "refine", "labels", b)  # a valid chunk of the same shape, other labels
    shutil.rmtree(batch_folder(copy, "refine", "uncertainty", c))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(out)])
    one_line_refusal(
        result, "not exported", "2 refine images are missing or damaged", b, c, "seglab run", "--skip-damaged"
    )
    assert not out.exists() and list(tmp_path.iterdir()) == [copy]

    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(out), "--skip-damaged"])
    assert result.exit_code == 0 and "skipped 2 images whose stored arrays are missing or damaged" in result.output
    meta = json.loads((out / "export.json").read_text())
    assert meta["written"]["images"] == 4 and [d["unit"] for d in meta["damaged"]] == [b, c]
    assert "damaged" in meta["damaged"][0]["problem"] and "missing" in meta["damaged"][1]["problem"]
    assert {i["unit"] for i in json.loads((out / "index.json").read_text())["images"]} == set(stored(store)) - {b, c}
    assert_checksums(out)


def test_a_zarr_json_declaring_a_huge_array_is_refused_before_anything_is_allocated(store, tmp_path):
    copy = copied(store, tmp_path)
    unit = done_units(Store(copy), "refine")[0]
    array = copy / "refine" / "labels" / batch_id(Store(copy).entries("refine")[unit].outputs["labels"].batch)
    meta = json.loads((array / "zarr.json").read_text())
    rows = meta["shape"][0]
    meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [rows, 50000, 50000]
    (array / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(array / "c")  # no chunk: zarr would fill 2.5 GB with the fill value
    script = (
        "import resource, sys, time\n"
        "from seglab.pipeline.exports.export import export\nfrom seglab.pipeline.exports.formats import ExportOptions\n"
        "from seglab.pipeline.base.errors import SeglabError\n"
        "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))  # a safety net\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    export(sys.argv[1], sys.argv[2], ExportOptions())\n"
        "except SeglabError as exc:\n"
        "    print('SeglabError', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, exc)\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script, str(copy), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("SeglabError "), done.stdout + done.stderr[-2000:]
    growth_mib = int(done.stdout.split()[1])
    assert growth_mib < 500 and time.monotonic() - started < 60, done.stdout
    assert "not exported" in done.stdout and unit in done.stdout and "--skip-damaged" in done.stdout
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorruptOutput):
        Store(copy).read_recorded("refine/labels", unit, Store(copy).entries("refine")[unit].outputs["labels"])
