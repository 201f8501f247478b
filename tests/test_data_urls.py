"""A data root in a bucket (``data.root: s3://bucket/prefix``, moto's S3 server on 127.0.0.1):
globs matched against object keys as on disk, the same units and labels as from the same
files in a folder, inputs fingerprinted by their heads, and every failure one line naming the URL."""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import add_gold, write_dataset, write_manifest
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import InputError, ManifestError
from seglab.pipeline.base.fingerprint import array_sha256
from seglab.pipeline.bench.s3server import new_bucket
from seglab.pipeline.core.keyglob import glob_prefix, match_keys
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import evaluate
from seglab.pipeline.manifest import load_manifest
from seglab.pipeline.records import RunOptions
from seglab.pipeline.runner import Runner
from seglab.pipeline.units import enumerate_units, file_stat, input_digests, list_object_keys, unit_input_digest
from seglab.stages.parts.imageio import file_exists, read_file_bytes

STAGES = ("ingest", "embed", "prompts", "select", "refine")
SIZES = [(32, 48), (40, 32), (32, 40), (36, 44)]
cli = CliRunner()


def upload(folder: Path, url: str) -> None:
    """Every file under ``folder`` as an object under ``url``, keyed by its path relative to ``folder``."""
    objects = Objects(url)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            objects.put(path.relative_to(folder).as_posix(), path.read_bytes())


def local_dataset(tmp_path: Path) -> Path:
    """The conftest manifest over 4 small synthetic images, one of them in a subfolder
    (images/extra/img03.png; glob images/**/*.png), with gold masks for the 3 others; its
    store is local.zarr. -> the manifest."""
    write_dataset(tmp_path / "data", SIZES)
    manifest = write_manifest(tmp_path, store=str(tmp_path / "local.zarr"))
    add_gold(manifest, evaluation="images/*.png")
    images = tmp_path / "data" / "images"
    (images / "extra").mkdir()
    shutil.move(images / "img03.png", images / "extra" / "img03.png")
    manifest.write_text(manifest.read_text().replace('glob: "images/*.png"', 'glob: "images/**/*.png"'))
    return manifest


def bucket_manifest(local: Path, root: str, *, weak: str | None = None, store: str = "url.zarr") -> Path:
    """``local``'s manifest with data.root ``root``, the weak labels at ``weak`` (default: the
    scribbles under the root) and its store at ``store`` beside it."""
    text = (
        local.read_text()
        .replace("  root: data\n", f"  root: {root}\n")
        .replace("path: data/scribbles", f"path: {weak or root.rstrip('/') + '/scribbles'}")
        .replace(str(local.parent / "local.zarr"), str(local.parent / store))
    )
    path = local.parent / f"{store}.yaml"
    path.write_text(text)
    return path


def with_weak(manifest: Path, weak: str) -> None:
    """Replace the manifest's data.weak section by the flow mapping ``{weak}``."""
    text = re.sub(r"  weak: \{.*\}\n", f"  weak: {{{weak}}}\n", manifest.read_text(), count=1)
    manifest.write_text(text)


def problems_of(error: pytest.ExceptionInfo[ManifestError]) -> dict[str, str]:
    return dict(error.value.problems)


# ---------------------------------------------------------------- key globs


KEYS = [
    "a.png",
    ".hidden.png",
    "images/a.png",
    "images/b.JPG",
    "images/notes.txt",
    "images/.c.png",
    "images/sub/d.png",
    "images/sub/deeper/e.png",
    "images/.cache/f.png",
    "imagesX/g.png",
    "other/images/h.png",
]


@pytest.mark.parametrize(
    "pattern",
    [
        "*.png",
        "**",
        "**/*.png",
        "images/*",
        "images/*.png",
        "images/**/*.png",
        "images/**",
        "images/*/*.png",
        "images/.*.png",
        "images/.cache/*",
        "images/?.png",
        "images/[ab].*",
        "./images//*.png",
        "**/images/*.png",
        "image*/*.png",
        "images/sub/d.png",
    ],
)
def test_globs_select_the_keys_glob_selects_from_the_same_files_on_disk(tmp_path, pattern):
    for key in KEYS:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    on_disk = glob.glob(str(tmp_path / pattern), recursive=True)
    expected = sorted({os.path.relpath(p, tmp_path) for p in on_disk if os.path.isfile(p)})
    assert match_keys(KEYS, pattern) == expected


def test_star_stays_in_one_folder_and_double_star_recurses_but_skips_hidden_names():
    assert match_keys(KEYS, "images/*.png") == ["images/a.png"]
    assert match_keys(KEYS, "images/**/*.png") == ["images/a.png", "images/sub/d.png", "images/sub/deeper/e.png"]
    assert match_keys(KEYS, "images/.*.png") == ["images/.c.png"]
    assert glob_prefix("images/sub/**/*.png") == "images/sub" and glob_prefix("*.png") == ""
    assert glob_prefix("images/a.png") == "images" and glob_prefix("im*/sub/*.png") == ""


def test_a_glob_over_a_bucket_lists_under_its_prefix_and_keeps_image_suffixes(s3_bucket, tmp_path):
    root = f"{s3_bucket}/data"
    objects = Objects(root)
    for key in KEYS:
        objects.put(key, b"x")
    Objects(s3_bucket).put("elsewhere/images/z.png", b"x")  # outside the root: never listed
    manifest = bucket_manifest(local_dataset(tmp_path), root)
    images = load_manifest(manifest).data.images
    everything = images.model_copy(update={"glob": "**"})
    assert list_object_keys(everything, root, str(manifest)) == [
        "a.png",
        "images/a.png",
        "images/b.JPG",  # suffixes are matched in any case; notes.txt is no image
        "images/sub/d.png",
        "images/sub/deeper/e.png",
        "imagesX/g.png",
        "other/images/h.png",
    ]
    one_folder = images.model_copy(update={"glob": "images/*"})
    assert list_object_keys(one_folder, root, str(manifest)) == ["images/a.png", "images/b.JPG"]


# ---------------------------------------------------------------- validation (no network)


def test_validation_accepts_a_bucket_root_without_asking_the_bucket(tmp_path):
    local = local_dataset(tmp_path)
    manifest = load_manifest(bucket_manifest(local, "s3://no-such-bucket-anywhere/data/"))
    assert manifest.data.root == "s3://no-such-bucket-anywhere/data"
    assert manifest.data.weak.path == "s3://no-such-bucket-anywhere/data/scribbles"
    assert manifest.data.evaluation is not None
    assert manifest.data.evaluation.masks == "s3://no-such-bucket-anywhere/data/gold"
    relative = load_manifest(bucket_manifest(local, "gs://bucket/a/b", weak="data/scribbles", store="gs.zarr"))
    assert relative.data.weak.path == str((tmp_path / "data" / "scribbles").resolve())  # as for a folder root


@pytest.mark.parametrize(
    "entry",
    ["../secret.png", "images/../../secret.png", "/etc/passwd"],
)
def test_a_list_entry_escaping_a_url_root_is_refused(tmp_path, entry):
    local = local_dataset(tmp_path)
    (tmp_path / "subset.txt").write_text(f"images/img00.png\n{entry}\n")
    manifest = bucket_manifest(local, "s3://bucket/data")
    manifest.write_text(manifest.read_text().replace('images: {glob: "images/**/*.png"}', "images: {list: subset.txt}"))
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest)
    problem = problems_of(error)["data.images"]
    assert entry in problem and "outside the data root s3://bucket/data" in problem, problem


def test_list_entries_under_a_url_root_are_keys_under_it_in_list_order(tmp_path):
    local = local_dataset(tmp_path)
    (tmp_path / "subset.txt").write_text("./images//extra/img03.png\n# a comment\nimages/img00.png\n")
    manifest = bucket_manifest(local, "s3://bucket/data")
    manifest.write_text(manifest.read_text().replace('images: {glob: "images/**/*.png"}', "images: {list: subset.txt}"))
    loaded = load_manifest(manifest)
    keys = list_object_keys(loaded.data.images, loaded.data.root, loaded.path)  # no listing: no network
    assert keys == ["images/extra/img03.png", "images/img00.png"]


def test_an_image_list_and_a_parquet_index_may_be_objects_in_the_bucket(s3_bucket, tmp_path):
    """A list given by its key under a URL data root (not found beside the manifest) and a
    Parquet index given by its URL are read from the bucket; the units are those of the
    same list as a local file. One that is in neither place is one line naming both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = local_dataset(tmp_path)
    root = f"{s3_bucket}/data"
    upload(tmp_path / "data", root)
    subset = "images/extra/img03.png\n# a comment\nimages/img00.png\n"
    (tmp_path / "subset.txt").write_text(subset)
    beside = bucket_manifest(local, root, store="beside.zarr")
    beside.write_text(beside.read_text().replace('images: {glob: "images/**/*.png"}', "images: {list: subset.txt}"))
    expected = [(u.id, u.image) for u in enumerate_units(load_manifest(beside))]
    assert [uid for uid, _ in expected] == ["images__extra__img03.png", "images__img00.png"]

    Objects(root).put("lists/subset.txt", subset.encode())
    listed = bucket_manifest(local, root, store="listed.zarr")
    listed.write_text(
        listed.read_text().replace('images: {glob: "images/**/*.png"}', "images: {list: lists/subset.txt}")
    )
    assert load_manifest(listed).data.images.list == f"{root}/lists/subset.txt"
    assert [(u.id, u.image) for u in enumerate_units(load_manifest(listed))] == expected

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": ["images/extra/img03.png", "images/img00.png"]}), sink)
    Objects(s3_bucket).put("indexes/subset.parquet", sink.getvalue().to_pybytes())
    indexed = bucket_manifest(local, root, store="indexed.zarr")
    text = indexed.read_text().replace(
        'images: {glob: "images/**/*.png"}', f"images: {{parquet: '{s3_bucket}/indexes/subset.parquet'}}"
    )
    indexed.write_text(text)
    assert [(u.id, u.image) for u in enumerate_units(load_manifest(indexed))] == expected

    listed.write_text(listed.read_text().replace("lists/subset.txt", "lists/absent.txt"))
    with pytest.raises(ManifestError) as error:
        load_manifest(listed)
    problem = problems_of(error)["data.images.list"]
    assert str(tmp_path / "lists" / "absent.txt") in problem and f"{root}/lists/absent.txt" in problem, problem


@pytest.mark.parametrize("masks", ["../gold", "/gold", "s3://other/gold"])
def test_gold_masks_outside_a_url_root_are_refused(tmp_path, masks):
    manifest = bucket_manifest(local_dataset(tmp_path), "s3://bucket/data")
    manifest.write_text(manifest.read_text().replace("masks: gold", f"masks: '{masks}'"))
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest)
    assert "outside the data root" in problems_of(error)["data.evaluation.masks"]


@pytest.mark.parametrize("root", ["http://example.com/data", "ftp://host/data", "s3:///data"])
def test_a_root_of_another_scheme_is_refused_in_one_line(tmp_path, root):
    manifest = bucket_manifest(local_dataset(tmp_path), root, weak="data/scribbles")
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest)
    problem = problems_of(error)["data.root"]
    assert root in problem and "\n" not in str(error.value)
    assert "where no dataset can be" in problem or "no bucket" in problem


# ---------------------------------------------------------------- listing and fingerprints


def test_a_points_table_object_gives_the_units_and_rows_of_the_same_local_table(s3_bucket, tmp_path):
    local = local_dataset(tmp_path)
    table = "image,x,y,class\nimages/img00.png,3,4,1\nimg03.png,5.5,6,2\nimages/img01.png,1,1,0\n"
    (tmp_path / "data" / "points.csv").write_text(table)
    root = f"{s3_bucket}/data"
    upload(tmp_path / "data", root)
    remote = bucket_manifest(local, root)
    with_weak(local, "kind: points, path: data/points.csv")
    with_weak(remote, f"kind: points, path: {root}/points.csv")
    expected = enumerate_units(load_manifest(local))
    units = enumerate_units(load_manifest(remote))
    assert [(u.id, u.weak_rows) for u in units] == [(u.id, u.weak_rows) for u in expected]
    by_id = {u.id: u for u in units}
    assert by_id["images__extra__img03.png"].weak_rows == ((5.5, 6.0, 2),)  # named by its file name
    first = by_id["images__img00.png"]
    assert first.image == f"{root}/images/img00.png" and first.weak_source == f"{root}/points.csv"


def test_a_changed_object_changes_its_units_input_digest_and_only_its(s3_bucket, tmp_path):
    local = local_dataset(tmp_path)
    root = f"{s3_bucket}/data"
    upload(tmp_path / "data", root)
    manifest = load_manifest(bucket_manifest(local, root))
    units = {u.id: u for u in enumerate_units(manifest)}
    before = {uid: unit_input_digest(u) for uid, u in units.items()}
    assert {uid: unit_input_digest(u) for uid, u in units.items()} == before  # asking again: the same heads
    Objects(root).put("images/img01.png", (tmp_path / "data" / "images" / "img00.png").read_bytes())
    after = {u.id: unit_input_digest(u) for u in enumerate_units(manifest)}
    assert sorted(uid for uid in units if after[uid] != before[uid]) == ["images__img01.png"]
    Objects(root).put("scribbles/img02.png", (tmp_path / "data" / "scribbles" / "img00.png").read_bytes())
    img02 = units["images__img02.png"]
    assert unit_input_digest(img02) != after[img02.id]  # the weak label map is an input too
    Objects(root).delete(["images/img00.png"])
    img00 = units["images__img00.png"].image
    assert file_stat(img00) == [img00, None]  # like a missing file


def test_planning_a_bucket_lists_each_prefix_once_and_asks_no_object_its_head(s3_bucket, tmp_path, monkeypatch):
    """A unit's fingerprint comes from the listing of its image's and label map's prefix:
    one listing per prefix for the whole dataset, no head request per object, and the
    digests the heads give (so stores planned before keep their units)."""
    import obstore

    local = local_dataset(tmp_path)
    root = f"{s3_bucket}/data"
    upload(tmp_path / "data", root)
    Objects(root).delete(["scribbles/img01.png"])  # absent from its listing: like a missing file
    units = enumerate_units(load_manifest(bucket_manifest(local, root)))
    by_heads = [unit_input_digest(u) for u in units]
    listed: list[str] = []
    list_with_delimiter = obstore.list_with_delimiter

    def listing(store, prefix=None, **kwargs):
        listed.append(prefix)
        return list_with_delimiter(store, prefix, **kwargs)

    monkeypatch.setattr(obstore, "head", lambda *a, **k: pytest.fail("asked an object for its head"))
    monkeypatch.setattr(obstore, "list_with_delimiter", listing)
    assert [bytes(d).hex() for d in input_digests(units)] == by_heads
    prefixes = {path.rsplit("/", 1)[0] for u in units for path in (u.image, u.weak_map)}
    assert sorted(listed) == sorted(f"{p[len(s3_bucket) + 1 :]}/" for p in prefixes)
    assert len(prefixes) == 3  # images/, images/extra/, scribbles/


# ---------------------------------------------------------------- failures


def test_a_missing_bucket_or_a_glob_matching_nothing_is_one_line_naming_the_url(s3_bucket, tmp_path):
    local = local_dataset(tmp_path)
    root = f"{s3_bucket}/data"
    upload(tmp_path / "data", root)
    missing = "s3://no-such-bucket-for-seglab/data"
    for weak, where, url in [
        (None, "data.weak.path", f"{missing}/scribbles"),
        ("data/scribbles", "data.images.glob", f"{missing}/images"),
    ]:
        with pytest.raises(ManifestError) as error:
            enumerate_units(load_manifest(bucket_manifest(local, missing, weak=weak, store="missing.zarr")))
        problem = problems_of(error)[where]
        assert url in problem and "bucket does not exist" in problem and "\n" not in str(error.value), problem
    manifest = bucket_manifest(local, root)
    manifest.write_text(manifest.read_text().replace('glob: "images/**/*.png"', 'glob: "images/**/*.jpg"'))
    with pytest.raises(ManifestError) as error:
        enumerate_units(load_manifest(manifest))
    assert problems_of(error)["data.images.glob"] == f"'images/**/*.jpg' matches no image under {root}"


def test_a_missing_object_or_bucket_is_an_input_error_naming_the_url(s3_bucket):
    Objects(s3_bucket).put("data/there.png", b"bytes")
    assert read_file_bytes(f"{s3_bucket}/data/there.png") == b"bytes" and file_exists(f"{s3_bucket}/data/there.png")
    assert not file_exists(f"{s3_bucket}/data/gone.png")
    for url, says in [
        (f"{s3_bucket}/data/gone.png", "object not found"),
        ("s3://no-such-bucket-for-seglab/data/there.png", "bucket not found"),
    ]:
        with pytest.raises(InputError) as error:
            read_file_bytes(url)
        assert str(error.value) == f"{url}: {says}"


def test_a_corrupt_image_object_fails_its_unit_in_one_line_naming_its_url(s3_ray, tmp_path):
    local = local_dataset(tmp_path)
    root = new_bucket(s3_ray, "corrupt") + "/data"
    upload(tmp_path / "data", root)
    Objects(root).put("images/img01.png", b"no image at all")
    Objects(root).delete(["scribbles/img02.png"])
    report = Runner(load_manifest(bucket_manifest(local, root)), RunOptions(only="ingest")).run()
    ingest = report.stages[0]
    failures = dict(ingest.failures)
    assert ingest.done_now == 2 and sorted(failures) == ["images__img01.png", "images__img02.png"]
    corrupt, unlabelled = failures["images__img01.png"], failures["images__img02.png"]
    assert corrupt.startswith(f"{root}/images/img01.png: not an image Pillow can read"), corrupt
    assert unlabelled == f"{root}/scribbles/img02.png: no weak label map for this image"
    assert "\n" not in corrupt


# ---------------------------------------------------------------- end to end


def test_a_run_over_a_bucket_matches_a_run_over_the_same_files_in_a_folder(s3_ray, tmp_path):
    local = local_dataset(tmp_path)
    root = new_bucket(s3_ray, "data-root") + "/data"
    upload(tmp_path / "data", root)
    remote = bucket_manifest(local, root)
    assert Runner(load_manifest(local)).run().ok
    report = Runner(load_manifest(remote)).run()
    assert report.ok and [s.done_now for s in report.stages] == [4] * len(STAGES)
    reference, store = Store(tmp_path / "local.zarr"), Store(tmp_path / "url.zarr")
    ids = sorted(reference.entries("refine"))
    assert ids == ["images__extra__img03.png", "images__img00.png", "images__img01.png", "images__img02.png"]
    for stage in STAGES:
        assert sorted(store.entries(stage)) == ids, stage
        for unit, entry in reference.entries(stage).items():
            got = store.entries(stage)[unit].outputs
            assert {k: r.sha256 for k, r in got.items()} == {k: r.sha256 for k, r in entry.outputs.items()}
    labels = [store.read_unit(["refine/labels"], unit)["refine/labels"] for unit in ids]
    expected = [reference.read_unit(["refine/labels"], unit)["refine/labels"] for unit in ids]
    assert [array_sha256(a) for a in labels] == [array_sha256(a) for a in expected]
    assert [a.shape for a in labels] == [SIZES[3], *SIZES[:3]] and np.isin(labels[1], [0, 1, 2, 255]).all()
    ingested = store.read_unit(["ingest/image"], "images__img00.png")["ingest/image"]
    assert np.array_equal(ingested, np.asarray(Image.open(tmp_path / "data" / "images" / "img00.png")))

    scored, truth = evaluate(load_manifest(remote)).to_json(), evaluate(load_manifest(local)).to_json()
    assert scored["sources"] == truth["sources"] and scored["images"] == 3  # gold masks read from the bucket
    assert all(source["evaluated"] == 3 for source in scored["sources"])
    assert Runner(load_manifest(remote)).run().work_done == 0  # the objects' heads are unchanged
    validated = cli.invoke(app, ["validate", str(remote)])
    assert validated.exit_code == 0, validated.output
    status = cli.invoke(app, ["status", str(remote), "--json"])
    assert status.exit_code == 0 and '"complete": true' in status.output, status.output
