import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from seglab.pipeline.base.errors import ManifestError
from seglab.pipeline.manifest import load_manifest, manifest_schema, open_manifest

ROOT = Path(__file__).resolve().parents[1]
SCRIBBLES = "{kind: scribbles, path: data/scribbles}"


def with_gold(manifest: Path, evaluation: str) -> None:
    """Add a data.evaluation section (YAML flow mapping) to a conftest manifest."""
    manifest.write_text(manifest.read_text().replace("store:\n", f"  evaluation: {evaluation}\nstore:\n", 1))


def problems(path: Path) -> dict[str, str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return dict(info.value.problems)


def test_good_manifest_resolves_paths(tiny):
    m = load_manifest(tiny)
    root = tiny.parent / "data"
    assert m.data.root == str(root.resolve())
    assert m.data.weak.path == str((tiny.parent / "data" / "scribbles").resolve())  # against the manifest's folder
    assert m.store_location == str((tiny.parent / "run.zarr").resolve())
    assert [c.name for c in m.data.classes] == ["background", "disc", "rectangle"]
    assert m.select.tau == (0.3, 0.7) and m.select.field.beta == 25.0 and m.ray.workers == 2


def test_unknown_key_is_named_with_its_location(tiny):
    text = tiny.read_text().replace("select: {batch_size: 2}", "select: {batch_size: 2, min_probabilty: 0.4}")
    tiny.write_text(text)
    found = problems(tiny)
    assert "select.min_probabilty" in found
    assert "Extra inputs are not permitted" in found["select.min_probabilty"]


def test_every_problem_is_listed_at_once(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "run: {name: 'bad name!'}\n"
        "data:\n  images: {glob: '*.png', list: x.txt}\n  weak: {kind: lines, path: w}\n"
        "  classes: [{id: 1, name: a}, {id: 1, name: a}]\n"
        "colour: red\n"
    )
    found = problems(path)
    assert "run.name" in found
    assert "data.images" in found and "exactly one" in found["data.images"]
    assert "data.weak.kind" in found
    assert "colour" in found


def test_duplicate_yaml_keys_are_refused(tiny):
    tiny.write_text(tiny.read_text() + "run: {name: again}\n")
    found = problems(tiny)
    assert any("duplicate key 'run'" in msg for msg in found.values())


@pytest.mark.parametrize(
    "masks, message",
    [
        ("../../etc", "outside the data root"),
        ("s3://bucket/masks", "is a URL"),
        ("/etc/passwd", "outside the data root"),
    ],
)
def test_paths_must_stay_inside_the_data_root(tiny, masks, message):
    with_gold(tiny, f"{{images: {{glob: 'images/*.png'}}, masks: '{masks}'}}")
    found = problems(tiny)
    assert message in found["data.evaluation.masks"]


def test_weak_labels_resolve_against_the_manifest_and_may_live_outside_the_data_root(tiny):
    outside = tiny.parent / "labels" / "scribbles"
    tiny.write_text(tiny.read_text().replace("path: data/scribbles", "path: labels/scribbles"))
    assert load_manifest(tiny).data.weak.path == str(outside.resolve())
    tiny.write_text(tiny.read_text().replace("path: labels/scribbles", "path: 's3://bucket/labels'"))
    assert "is a URL" in problems(tiny)["data.weak.path"]


def test_gold_ignore_values_must_not_be_class_ids(tiny):
    with_gold(tiny, "{images: {glob: 'images/*.png'}, masks: gold, ignore: [2, 11]}")
    assert "evaluation.ignore [2] are also class ids" in problems(tiny)["data"]


def test_class_ids_must_be_unique_and_distinct_from_ignore(tiny):
    original = tiny.read_text()
    tiny.write_text(original.replace("{id: 2, name: rectangle}", "{id: 1, name: rectangle}"))
    assert "class ids must be unique; repeated: [1]" in problems(tiny)["data"]
    tiny.write_text(original)
    tiny.write_text(tiny.read_text().replace("{id: 2, name: rectangle}", "{id: 255, name: rectangle}"))
    found = problems(tiny)
    assert any("ignore_id 255 is also a class id" in m for m in found.values())


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    assert "not valid YAML" in str(problems(bad))
    bad.write_text("- just\n- a list\n")
    assert "must be a mapping" in str(problems(bad))
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.yaml")


def test_python_tags_are_not_executed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: !!python/object/apply:os.system ['touch canary']\n")
    assert "not valid YAML" in str(problems(bad))
    assert not Path("canary").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [  # each raised TypeError, ValueError, ... (tests/test_fuzz.py)
        ("? [a, b]\n: 1\n", "a key must be a plain value, not a list"),
        ("run: {name: 2024-13-45}\n", "cannot convert the value '2024-13-45' (month must be in 1..12)"),
        ("run: {name: !!int abc}\n", "cannot convert the value 'abc'"),
        ("run: {name: !!float abc}\n", "cannot convert the value 'abc'"),
        ("run: !!timestamp x\n", "cannot convert the value 'x'"),
        ("run: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    ],
)
def test_yaml_values_that_do_not_convert_are_manifest_errors(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ManifestError, match="not valid YAML") as info:
        load_manifest(bad)
    assert message in str(info.value)


def test_alias_bomb_and_recursive_alias_are_refused_but_aliases_still_work(tiny):
    original = tiny.read_text()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
    )
    tiny.write_text(bomb + original)  # 10**9 values once expanded
    assert "alias bomb" in str(problems(tiny))
    tiny.write_text("loop: &loop [*loop]\n" + original)
    assert "recursive alias" in str(problems(tiny))
    tiny.write_text(
        original.replace("embed: {batch_size: 2}", "embed: &batch {batch_size: 2}").replace(
            "prompts: {batch_size: 2}", "prompts: *batch"
        )
    )
    assert load_manifest(tiny).prompts.batch_size == 2


def test_paths_that_cannot_be_resolved_are_named(tiny):
    original = tiny.read_text()
    tiny.write_text(original.replace("  root: data\n", '  root: "da\\0ta"\n'))  # raised ValueError
    assert "not a usable path" in problems(tiny)["data.root"]
    tiny.write_text(
        original.replace(
            "store:\n", "  evaluation: {images: {glob: 'images/*.png'}, masks: '~no-such-user-here/gold'}\nstore:\n"
        )
    )  # raised RuntimeError
    assert "not a usable path" in problems(tiny)["data.evaluation.masks"]


@pytest.mark.parametrize(
    ("index", "content", "message"),
    [  # each crashed `seglab validate` in pipeline/units.py
        ("list.txt", b"images/img00.png\n\xff\xfe\n", "is not UTF-8 text"),
        ("list.txt", b"images/img00.png\nhttps://example.com/a.png\n", "names URLs"),
        ("index.parquet", b"PAR1 not really", "Parquet index .*index.parquet cannot be read"),
        ("index.parquet", "no-column", "cannot be read"),
    ],
)
def test_image_index_must_be_a_readable_file_of_local_paths(tiny, index, content, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tiny.parent / "data" / index
    if content == "no-column":
        pq.write_table(pa.table({"file": ["images/img00.png"]}), path)
    elif content is not None:
        path.write_bytes(content)
    kind = "list" if index.endswith(".txt") else "parquet"
    tiny.write_text(tiny.read_text().replace('images: {glob: "images/*.png"}', f"images: {{{kind}: {index}}}"))
    assert re.search(message, problems(tiny)["data.images"])


def test_a_missing_image_list_is_named_at_its_key(tiny):
    tiny.write_text(tiny.read_text().replace('images: {glob: "images/*.png"}', "images: {list: list.txt}"))
    assert re.search(r"'list.txt' is not a file: looked for .*list.txt", problems(tiny)["data.images.list"])


def test_embedded_demo_manifest_loads_with_store_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = open_manifest("demo")
    assert m.data.images.sample and m.data.weak.kind == "points"
    assert m.store_location == str(tmp_path / "runs" / "demo.zarr")


def test_schema_file_is_current():
    stored = json.loads((ROOT / "manifests" / "schema.json").read_text())
    assert stored == manifest_schema(), "manifests/schema.json is stale: run `seglab schema > manifests/schema.json`"


@pytest.mark.parametrize(
    "value,message",
    [(0, "greater than or equal to 1"), (5000, "less than or equal to 4096"), ("many", "valid integer")],
)
def test_a_bad_prompt_batch_is_named_at_its_key(tiny, value, message):
    (tiny.parent / "sam.pth").write_bytes(b"not read while validating")
    tiny.write_text(tiny.read_text() + f"backend: {{name: sam, checkpoint: sam.pth, prompt_batch: {value}}}\n")
    assert message in problems(tiny)["backend.sam.prompt_batch"]


def test_prompt_batch_left_unset_is_chosen_by_the_device(tiny):
    (tiny.parent / "sam.pth").write_bytes(b"not read while validating")
    tiny.write_text(tiny.read_text() + "backend: {name: sam, checkpoint: sam.pth}\n")
    assert load_manifest(tiny).backend.prompt_batch is None  # the backend picks 4 on the CPU, 64 on a GPU


# ---------------------------------------------------------------- issue 16: one clear line per failure


def test_yaml_errors_name_the_manifest_file_not_a_unicode_string(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n    seed: [1\n")
    message = str(problems(bad))
    assert f'in "{bad}", line 3' in message and "<unicode string>" not in message
    bad.write_text("run: {name: x}\nrun: {name: y}\n")
    assert f'in "{bad}", line 2, column 1' in str(problems(bad))


def test_a_missing_data_root_is_named_as_such(tiny):
    original = tiny.read_text()
    tiny.write_text(original.replace("  root: data\n", "  root: /no/such/folder\n"))
    assert problems(tiny)["data.root"] == "/no/such/folder does not exist"
    (tiny.parent / "afile").write_text("")
    tiny.write_text(original.replace("  root: data\n", "  root: afile\n"))
    assert problems(tiny)["data.root"] == f"{(tiny.parent / 'afile').resolve()} is a file, not a folder"


def test_a_huge_manifest_is_refused_by_its_size_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:
        handle.write(b"run: {name: x}\n")
        handle.truncate(50 * 2**20)  # sparse: nothing is written, nothing may be read
    message = str(problems(huge))
    assert "is 50.0 MB; a manifest is a few KB, refusing files over 1 MB" in message
    assert "alias" not in message


def test_a_large_plain_document_is_not_called_an_alias_bomb(tiny, monkeypatch):
    from seglab.pipeline import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_YAML_NODES", 1000)
    tiny.write_text(tiny.read_text() + "notes: [" + ", ".join(["x"] * 3000) + "]\n")
    found = problems(tiny)
    assert list(found) == ["notes"] and "Extra inputs" in found["notes"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abc", "bcd")
    )
    tiny.write_text(bomb + tiny.read_text())  # 10**4 values from about 3 100 written
    assert "alias bomb" in str(problems(tiny))


@pytest.mark.parametrize("root", ["/", "/proc", "/sys/kernel", "/dev"])
def test_a_recursive_glob_over_a_system_folder_is_refused_at_once(tiny, root):
    import time

    tiny.write_text(
        tiny.read_text()
        .replace("  root: data\n", f"  root: {root}\n")
        .replace('glob: "images/*.png"', 'glob: "**/*.png"')
    )
    started = time.perf_counter()
    found = problems(tiny)
    assert time.perf_counter() - started < 2.0
    message = found.get("data.images.glob") or found["data.root"]
    assert "system folder" in message or "whole file system" in message, found
    if root == "/":
        assert "list file" in message and "narrower" in message


def test_a_subset_list_may_live_beside_the_manifest_outside_a_read_only_root(tiny):
    (tiny.parent / "subset.txt").write_text("images/img00.png\nimages/img02.png\n")
    tiny.write_text(tiny.read_text().replace('images: {glob: "images/*.png"}', "images: {list: subset.txt}"))
    m = load_manifest(tiny)
    assert m.data.images.list == str((tiny.parent / "subset.txt").resolve())
    from seglab.pipeline.units import list_images

    root = Path(m.data.root)
    assert list_images(m.data.images, root, m.path) == [root / "images/img00.png", root / "images/img02.png"]


def test_an_index_relative_to_the_data_root_still_works_and_may_sit_above_it(tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tiny.parent / "data" / "subset.txt").write_text("images/img01.png\n")  # the rule before: under data.root
    text = tiny.read_text()
    tiny.write_text(text.replace('images: {glob: "images/*.png"}', "images: {list: subset.txt}"))
    assert load_manifest(tiny).data.images.list == str((tiny.parent / "data" / "subset.txt").resolve())
    lists = tiny.parent.parent / f"{tiny.parent.name}-lists"
    lists.mkdir()
    pq.write_table(pa.table({"path": ["images/img03.png"]}), lists / "index.parquet")
    tiny.write_text(text.replace('images: {glob: "images/*.png"}', f"images: {{parquet: '{lists}/index.parquet'}}"))
    assert load_manifest(tiny).data.images.parquet == str((lists / "index.parquet").resolve())


def test_a_missing_index_names_both_places_it_was_looked_for(tiny):
    tiny.write_text(tiny.read_text().replace('images: {glob: "images/*.png"}', "images: {list: subset.txt}"))
    message = problems(tiny)["data.images.list"]
    assert str(tiny.parent / "subset.txt") in message and str(tiny.parent / "data" / "subset.txt") in message


def test_weak_background_is_for_boxes_only_and_must_be_a_class(tiny):
    text = tiny.read_text()
    tiny.write_text(text.replace(SCRIBBLES, "{kind: scribbles, path: data/scribbles, background: 0}"))
    assert "only for kind: boxes, not kind: scribbles" in problems(tiny)["data.weak.background"]
    tiny.write_text(text.replace(SCRIBBLES, "{kind: boxes, path: boxes.csv, background: 7}"))
    assert "weak.background 7 is not a class id (the classes are [0, 1, 2])" in problems(tiny)["data"]
    tiny.write_text(text.replace(SCRIBBLES, "{kind: boxes, path: boxes.csv, background: 0}"))
    assert load_manifest(tiny).data.weak.background == 0
    tiny.write_text(text.replace(SCRIBBLES, "{kind: boxes, path: boxes.csv}"))
    assert load_manifest(tiny).data.weak.background is None


def test_an_unset_background_keeps_the_signatures_stores_were_written_with(tiny):
    """Stores made before data.weak.background existed stay current when it is unset; setting
    it changes every stage's signature (all of them read the weak labels)."""
    from seglab.pipeline.base.fingerprint import diff_signatures, digest
    from seglab.pipeline.dag import Dag
    from seglab.pipeline.planning import active_stages, build_context, signatures

    def signed(weak: str):
        tiny.write_text(text.replace(SCRIBBLES, weak))
        manifest = load_manifest(tiny)
        ctx = build_context(manifest)
        return ctx.background, signatures(manifest, Dag(active_stages(manifest)), ctx)

    text = tiny.read_text()
    background, before = signed("{kind: boxes, path: boxes.csv}")
    assert background is None
    # the data settings every stage signs, digested as they were before the key existed
    assert {digest(s["config"]["_data"]) for s in before.values()} == {
        "c0e712ac96e833b460e7f99df4ff4a3c95ba53ec2adaae3d5562349ee3c97895"
    }
    background, after = signed("{kind: boxes, path: boxes.csv, background: 0}")
    assert background == 0 and all(digest(after[n]) != digest(before[n]) for n in before)
    assert "config._data.weak_background added (0)" in diff_signatures(before["ingest"], after["ingest"])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs the shared evaluation data beside the checkout")
def test_box_bench_manifests_box_every_camvid_class_and_only_the_grabcut_object():
    camvid = load_manifest(ROOT / "manifests" / "bench" / "camvid-boxes.yaml")
    grabcut = load_manifest(ROOT / "manifests" / "bench" / "grabcut-boxes.yaml")
    assert (camvid.data.weak.kind, camvid.data.weak.background, len(camvid.data.classes)) == ("boxes", None, 11)
    assert (grabcut.data.weak.kind, grabcut.data.weak.background, grabcut.data.weak.unlabelled) == ("boxes", 0, 128)
    assert [Path(m.data.weak.path).parent.name for m in (camvid, grabcut)] == [m.run.name for m in (camvid, grabcut)]


def test_every_registered_stage_is_a_manifest_key_and_in_the_schema():
    from seglab.pipeline.core.registry import STAGES
    from seglab.pipeline.manifest import Manifest

    schema = manifest_schema()
    for name, stage in STAGES.items():
        field = Manifest.model_fields[name]
        assert field.annotation is stage.Config and field.default == stage.Config(), name
        assert schema["properties"][name]["$ref"] == f"#/$defs/{stage.Config.__name__}", name


def test_what_the_type_checker_sees_of_the_stage_sections_is_the_registry():
    """manifest.py spells the stage sections out for mypy only (``if TYPE_CHECKING``); they
    must be the registry's stages with their Config classes, in its order."""
    import ast

    from seglab.pipeline.core.registry import STAGES

    tree = ast.parse((ROOT / "pipeline" / "manifest.py").read_text())
    typed = next(
        node
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ClassDef) and node.name == "StageSections"
    )
    fields = [(f.target.id, ast.unparse(f.annotation)) for f in typed.body if isinstance(f, ast.AnnAssign)]
    assert fields == [(name, stage.Config.__name__) for name, stage in STAGES.items()]


def test_the_store_may_be_an_object_storage_url_or_a_file_url(tiny):
    text = tiny.read_text()
    tiny.write_text(text.replace("path: run.zarr", "path: s3://bucket/runs/tiny.zarr"))
    assert load_manifest(tiny).store_location == "s3://bucket/runs/tiny.zarr"
    tiny.write_text(text.replace("path: run.zarr", f"path: file://{tiny.parent}/other.zarr"))
    assert load_manifest(tiny).store_location == str(tiny.parent / "other.zarr")
    tiny.write_text(text.replace("path: run.zarr", "path: s3:///no-bucket"))
    with pytest.raises(ManifestError, match="no bucket named"):
        load_manifest(tiny)


def test_units_hold_no_attribute_dictionary_and_survive_pickling(tiny):
    """A driver holds every unit of a run (a million at scale): a Unit is its five fields,
    with no per-instance __dict__ beside them, and travels to workers intact."""
    import pickle

    from seglab.pipeline.units import enumerate_units

    units = enumerate_units(load_manifest(tiny))
    assert units and not hasattr(units[0], "__dict__")
    assert pickle.loads(pickle.dumps(units)) == units
