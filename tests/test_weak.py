"""Weak-label readers: label maps, point and box tables; every bad input is an InputError."""

from __future__ import annotations

import csv
import json
import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seglab.pipeline.base.errors import InputError
from seglab.stages.parts.weak import (
    assign_to_images,
    rasterize_points,
    read_box_table,
    read_label_map,
    read_point_table,
    validate_boxes,
    validate_points,
)

CLASSES = frozenset({0, 1, 2})
HW = (20, 30)


def read_map(path, hw=HW, class_ids=CLASSES, unlabelled=255):
    return read_label_map(path, expected_hw=hw, class_ids=class_ids, unlabelled=unlabelled)


def scribble(hw=HW) -> np.ndarray:
    labels = np.full(hw, 255, dtype=np.uint8)
    labels[2:5, 3:9] = 1
    labels[10, :] = 2
    labels[0, 0] = 0
    return labels


# ---------------------------------------------------------------- label maps


def test_grayscale_label_map_round_trip(tmp_path):
    Image.fromarray(scribble()).save(tmp_path / "s.png")
    out = read_map(tmp_path / "s.png")
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, scribble())


def test_16bit_label_map_with_large_class_ids_is_uint16(tmp_path):
    labels = np.full(HW, 65535, dtype=np.uint16)
    labels[3, 4], labels[5, 6] = 300, 7
    Image.fromarray(labels).save(tmp_path / "s.png")
    out = read_map(tmp_path / "s.png", class_ids=frozenset({7, 300}), unlabelled=65535)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)


def test_palette_label_map_uses_indices_not_colours(tmp_path):
    image = Image.fromarray(scribble(), mode="L").convert("P")  # identity palette...
    image.putpalette([(i * 37) % 256 for i in range(768)])  # ...then scrambled colours
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_map(tmp_path / "p.png"), scribble())


def test_wrong_size_names_both_sizes(tmp_path):
    Image.fromarray(scribble((20, 31))).save(tmp_path / "s.png")
    with pytest.raises(InputError, match=r"31x20 pixels \(width x height\).*its image is 30x20"):
        read_map(tmp_path / "s.png")


def test_transposed_size_without_exif_is_refused(tmp_path):
    Image.fromarray(scribble((30, 20))).save(tmp_path / "s.png")
    with pytest.raises(InputError, match="20x30") as info:
        read_map(tmp_path / "s.png")
    assert "EXIF" not in str(info.value)


def test_exif_orientation_is_applied_to_label_maps(tmp_path):
    stored = np.full((30, 20), 255, dtype=np.uint8)  # stored 20 wide, 30 high
    stored[0, 0] = 1
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "s.png", exif=exif)
    out = read_map(tmp_path / "s.png", hw=(20, 30))
    assert out[0, 29] == 1 and (out == 1).sum() == 1


def test_unknown_values_are_listed_with_counts(tmp_path):
    labels = scribble()
    labels[0, :7] = 9
    labels[1, :3] = 200
    Image.fromarray(labels).save(tmp_path / "s.png")
    with pytest.raises(InputError, match=r"9 \(7 px\), 200 \(3 px\)"):
        read_map(tmp_path / "s.png")


def test_many_unknown_values_are_summarised(tmp_path):
    labels = scribble()
    labels[15, :8] = np.arange(10, 18)
    Image.fromarray(labels).save(tmp_path / "s.png")
    with pytest.raises(InputError, match="and 3 more"):
        read_map(tmp_path / "s.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_colour_or_alpha_label_map_is_refused(tmp_path, mode):
    Image.fromarray(scribble()).convert(mode).save(tmp_path / "s.png")
    with pytest.raises(InputError, match="single-channel index map"):
        read_map(tmp_path / "s.png")


def test_empty_label_map(tmp_path):
    Image.fromarray(np.full(HW, 255, dtype=np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(InputError, match="empty weak label"):
        read_map(tmp_path / "s.png")


def test_negative_values_in_32bit_map_are_unknown(tmp_path):
    labels = scribble().astype(np.int32)
    labels[0, 1] = -4
    Image.fromarray(labels).save(tmp_path / "s.tif")
    with pytest.raises(InputError, match=r"-4 \(1 px\)"):
        read_map(tmp_path / "s.tif")


def test_truncated_label_map(tmp_path):
    noisy = np.random.default_rng(0).choice([0, 1, 2, 255], size=HW).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "s.png")
    data = (tmp_path / "s.png").read_bytes()
    (tmp_path / "s.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_map(tmp_path / "s.png")


# ---------------------------------------------------------------- point tables

ROWS = [("a.jpg", 1.5, 2.0, 1), ("dir/b.jpg", 0.0, 19.25, 2), ("a.jpg", 29.9, 0.0, 0)]
EXPECTED = {"a.jpg": [(1.5, 2.0, 1), (29.9, 0.0, 0)], "dir/b.jpg": [(0.0, 19.25, 2)]}


def write_points(path, rows, columns=("image", "x", "y", "class")):
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps([dict(zip(columns, row)) for row in rows]))
    else:
        pq.write_table(pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)}), path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_points_round_trip(tmp_path, suffix):
    table = read_point_table(write_points(tmp_path / f"p{suffix}", ROWS))
    assert table == EXPECTED
    assert [row.row for row in table["a.jpg"]] == [1, 3]


def test_points_json_object_form_bom_and_spaced_header(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"points": [dict(zip("image x y class".split(), r)) for r in ROWS]}))
    assert read_point_table(tmp_path / "p.json") == EXPECTED
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbfimage, x ,y,class,note\na.jpg,1,2,1,hi\n")
    assert read_point_table(tmp_path / "p.csv") == {"a.jpg": [(1.0, 2.0, 1)]}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a.jpg", "abc", 1, 1)], r"row 1: x is not a number \(got 'abc'\)"),
        ([("a.jpg", 1, 1, 1), ("a.jpg", 1, 1, 1.5)], r"row 2: class is not an integer"),
        ([("a.jpg", 1, None, 1)], r"row 1: y is missing"),
        ([("", 1, 1, 1)], r"row 1: image must be a non-empty"),
        ([("/etc/a.jpg", 1, 1, 1)], r"relative to the data root"),
        ([("../a.jpg", 1, 1, 1)], r"relative to the data root"),
        ([("a.jpg", True, 1, 1)], r"x is not a number \(got True\)"),
        ([(3, 1, 1, 1)], r"image must be"),
        ([("a.jpg", "x", 1, 1)] * 7, r"and 2 more"),
    ],
)
def test_malformed_json_rows(tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        read_point_table(write_points(tmp_path / "p.json", rows))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,x,y\na.jpg,1,2\n", "missing: class"),
        ("image,x,y,class\na.jpg,1,2\n", "row 1: class is missing"),
        ("image,x,y,class\na.jpg,1,2,1,9\n", "row 1: has more fields than the header"),
        ("image,x,y,class\na.jpg,1,2,one\n", "row 1: class is not a number"),
        ("image,x,y,class\n", "contains no points"),
        ("", "missing: image, x, y, class"),
    ],
)
def test_malformed_csv(tmp_path, content, message):
    (tmp_path / "p.csv").write_text(content)
    with pytest.raises(InputError, match=message):
        read_point_table(tmp_path / "p.csv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.json", b'[{"image": ', "not valid JSON: .* line 1"),
        ("p.json", b'{"rows": []}', "list of objects"),
        ("p.json", b'[["a.jpg", 1, 2, 3]]', "row 1: expected an object"),
        ("p.csv", b"image,x,y,class\n\xff\xfe,1,2,3\n", "not UTF-8"),
        ("p.parquet", b"PAR1 not really", "not a readable Parquet file"),
        ("p.txt", b"image,x,y,class\n", "unsupported table type '.txt'"),
        # json.loads raised ValueError / RecursionError here, not JSONDecodeError (found by tests/test_fuzz.py)
        (
            "p.json",
            b'[{"image": "a.jpg", "x": 1' + b"0" * 5000 + b', "y": 1, "class": 1}]',
            "a number has too many digits",
        ),
        ("p.json", b"[" * 100_000, "nested too deeply"),
    ],
)
def test_unreadable_tables(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        read_point_table(tmp_path / name)
    assert info.value.path == str(tmp_path / name)


def test_parquet_missing_column_and_missing_file(tmp_path):
    pq.write_table(pa.table({"image": ["a.jpg"], "x": [1.0]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="missing: y, class"):
        read_point_table(tmp_path / "p.parquet")
    with pytest.raises(InputError, match="not found"):
        read_point_table(tmp_path / "absent.csv")


def test_source_rows_keep_row_number_when_pickled(tmp_path):
    row = read_point_table(write_points(tmp_path / "p.csv", ROWS))["dir/b.jpg"][0]
    copy = pickle.loads(pickle.dumps(row))
    assert copy == (0.0, 19.25, 2) and copy.row == 2


# ---------------------------------------------------------------- validation


def test_validate_points_accepts_in_bounds_points():
    out = validate_points(EXPECTED["a.jpg"], path_for_errors="p.csv", image_hw=HW, class_ids=CLASSES)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_allclose(out, [[1.5, 2.0, 1], [29.9, 0.0, 0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ((30.0, 1.0, 1), "outside the 30x20 image"),
        ((-0.01, 1.0, 1), "outside"),
        ((1.0, 20.0, 1), "outside"),
        ((1.0, 1.0, 5), r"class 5 is not one of \[0, 1, 2\]"),
    ],
)
def test_validate_points_refuses_bad_points(tmp_path, point, message):
    path = write_points(tmp_path / "p.csv", [("a.jpg", 1, 1, 1), ("a.jpg", *point)])
    rows = read_point_table(path)["a.jpg"]
    with pytest.raises(InputError, match=message) as info:
        validate_points(rows, path_for_errors=path, image_hw=HW, class_ids=CLASSES, image="a.jpg")
    assert info.value.path == str(path) and "image 'a.jpg': row 2:" in info.value.problem


def test_validate_points_refuses_empty_and_conflicting_points():
    with pytest.raises(InputError, match="no points"):
        validate_points([], path_for_errors="p.csv", image_hw=HW, class_ids=CLASSES)
    with pytest.raises(InputError, match="point 2 and point 3 give different classes to the same pixel"):
        validate_points(
            [(4.2, 5.9, 1), (4.5, 5.5, 1), (4.9, 5.0, 2)], path_for_errors="p.csv", image_hw=HW, class_ids=CLASSES
        )
    with pytest.raises(InputError, match="rows of 3 numbers"):
        validate_points([(1.0, 2.0)], path_for_errors="p.csv", image_hw=HW, class_ids=CLASSES)


def test_rasterize_points_marks_the_containing_pixel():
    points = np.array([[1.5, 2.0, 1], [29.9, 19.99, 2]], dtype=np.float32)
    out = rasterize_points(points, HW, 255, np.uint8)
    assert out.dtype == np.uint8 and out.shape == HW
    assert out[2, 1] == 1 and out[19, 29] == 2 and (out != 255).sum() == 2
    with pytest.raises(ValueError):
        rasterize_points(np.array([[30.0, 0.0, 1]]), HW, 255, np.uint8)


def test_assign_to_images_by_path_or_unique_file_name(tmp_path):
    table = {"a.jpg": [(1.0, 1.0, 1)], "dir/b.jpg": [(2.0, 2.0, 2)], "c.jpg": [(3.0, 3.0, 0)]}
    images = ["x/a.jpg", "dir\\b.jpg", "./c.jpg", "y/c.jpg"]
    assigned = assign_to_images(table, images, path_for_errors=tmp_path / "p.csv")
    assert assigned == {"x/a.jpg": [(1.0, 1.0, 1)], "dir\\b.jpg": [(2.0, 2.0, 2)], "./c.jpg": [(3.0, 3.0, 0)]}
    with pytest.raises(InputError, match="'a.jpg' is ambiguous, it names w/a.jpg, x/a.jpg"):
        assign_to_images(table, [*images, "w/a.jpg"], path_for_errors=tmp_path / "p.csv")
    with pytest.raises(InputError, match="'dir/b.jpg' matches no image"):
        assign_to_images(table, ["x/a.jpg", "./c.jpg"], path_for_errors=tmp_path / "p.csv")
    assert assign_to_images(table, ["x/a.jpg"], path_for_errors="p", allow_unmatched=True) == {
        "x/a.jpg": [(1.0, 1.0, 1)]
    }


# ---------------------------------------------------------------- boxes


def test_boxes_round_trip_and_checks(tmp_path):
    columns = ("image", "x0", "y0", "x1", "y1", "class")
    path = write_points(tmp_path / "b.csv", [("a.jpg", 0, 0, 30, 20, 1), ("a.jpg", 2.5, 3, 4, 5, 2)], columns)
    boxes = read_box_table(path)["a.jpg"]
    assert boxes == [(0.0, 0.0, 30.0, 20.0, 1), (2.5, 3.0, 4.0, 5.0, 2)]
    out = validate_boxes(boxes, path_for_errors=path, image_hw=HW, class_ids=CLASSES)
    assert out.dtype == np.float32 and out.shape == (2, 5)
    with pytest.raises(InputError, match=r"box 1: \(0, 0, 31, 20\) does not fit the 30x20 image"):
        validate_boxes([(0.0, 0.0, 31.0, 20.0, 1)], path_for_errors=path, image_hw=HW, class_ids=CLASSES)
    bad = write_points(tmp_path / "bad.json", [("a.jpg", 5, 0, 5, 20, 1)], columns)
    with pytest.raises(InputError, match="row 1: box needs x0 < x1 and y0 < y1"):
        read_box_table(bad)


def test_a_box_of_the_background_class_fails_its_image_at_ingest_naming_the_table_and_row(tmp_path):
    from seglab.stages.base import ClassTable, Context, Unit
    from seglab.stages.ingest import Ingest, IngestConfig

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    columns = ("image", "x0", "y0", "x1", "y1", "class")
    path = write_points(tmp_path / "b.csv", [("a.png", 2, 2, 9, 9, 1), ("a.png", 0, 0, 30, 20, 0)], columns)
    unit = Unit(
        id="a.png", image=str(tmp_path / "a.png"), weak_rows=tuple(read_box_table(path)["a.png"]), weak_source=str(path)
    )

    def ingest(background):
        ctx = Context(
            classes=ClassTable((0, 1, 2), ("bg", "a", "b"), 255),
            weak_kind="boxes",
            seed=0,
            unlabelled=255,
            background=background,
        )
        return Ingest(IngestConfig()).process(unit, {}, ctx)

    assert ingest(None)["boxes"].shape == (2, 5)  # unset: class 0 is boxed like any class
    with pytest.raises(InputError) as info:
        ingest(0)
    assert info.value.path == str(path) and "\n" not in str(info.value)
    assert info.value.problem == (
        "image 'a.png': row 2: class 0 is the background class (data.weak.background): "
        "it has no boxes, it is what no box covers"
    )


# ---------------------------------------------------------------- property

PROPERTY_HW = (50, 50)
GOOD_NUMBER = st.one_of(st.floats(-2, 60).map(lambda v: round(v, 3)), st.sampled_from([0.0, 49.999, 50.0]))
BAD_NUMBER = st.sampled_from(["abc", "", None])
NON_FINITE = ["nan", "inf", "-inf"]  # readable: the table keeps the row, its image refuses it
GOOD_ROW = st.tuples(st.sampled_from(["a.jpg", "d/b.jpg"]), GOOD_NUMBER, GOOD_NUMBER, st.integers(0, 3))


@st.composite
def table_row(draw):
    """Mostly readable rows; about one in six has one field replaced by something unreadable
    or not finite."""
    row = list(draw(GOOD_ROW))
    if draw(st.integers(0, 5)):
        return tuple(row)
    field = draw(st.integers(0, 3))
    row[field] = draw(
        st.sampled_from(["", None])
        if field == 0
        else st.sampled_from(["1.5", "x", None])
        if field == 3
        else st.one_of(BAD_NUMBER, st.sampled_from(NON_FINITE))
    )
    return tuple(row)


ROW = table_row()


def row_is_readable(row) -> bool:
    image, x, y, class_value = row
    return bool(image) and all(isinstance(v, float) or v in NON_FINITE for v in (x, y)) and isinstance(class_value, int)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=8), suffix=st.sampled_from([".csv", ".json"]))
def test_random_point_tables(tmp_path_factory, rows, suffix):
    path = write_points(tmp_path_factory.mktemp("pts") / f"p{suffix}", rows)
    try:
        table = read_point_table(path)
    except InputError:
        assert not all(row_is_readable(row) for row in rows)
        return
    assert all(row_is_readable(row) for row in rows)
    assert sum(len(v) for v in table.values()) == len(rows)
    for image, points in table.items():
        np.testing.assert_array_equal(points, [(float(x), float(y), c) for i, x, y, c in rows if i == image])
        height, width = PROPERTY_HW
        in_bounds = all(0 <= x < width and 0 <= y < height and c in CLASSES for x, y, c in points)
        try:
            out = validate_points(points, path_for_errors=path, image_hw=PROPERTY_HW, class_ids=CLASSES, image=image)
        except InputError as exc:
            assert not in_bounds or "same pixel" in exc.problem
        else:
            assert in_bounds and out.shape == (len(points), 3)
            assert not math.isnan(float(out.sum()))


# ---------------------------------------------------------------- non-finite values (issue 16, item 12)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (math.nan, "x is NaN"),
        (math.inf, "x is infinite or too large (inf)"),
        (-math.inf, "x is infinite or too large (-inf)"),
    ],
)
def test_a_non_finite_coordinate_fails_its_image_not_the_table(tmp_path, suffix, value, problem):
    path = write_points(tmp_path / f"p{suffix}", [("a.jpg", 1, 1, 1), ("a.jpg", value, 2, 1), ("b.jpg", 3, 3, 2)])
    table = read_point_table(path)
    assert validate_points(table["b.jpg"], path_for_errors=path, image_hw=HW, class_ids=CLASSES).shape == (1, 3)
    with pytest.raises(InputError) as info:
        validate_points(table["a.jpg"], path_for_errors=path, image_hw=HW, class_ids=CLASSES, image="a.jpg")
    assert info.value.path == str(path) and info.value.problem == f"image 'a.jpg': row 2: {problem}"


def test_non_finite_box_values_and_classes_fail_their_image(tmp_path):
    columns = ("image", "x0", "y0", "x1", "y1", "class")
    rows = [("a.jpg", 0, 0, math.inf, 20, 1), ("a.jpg", 2, 3, 4, 5, math.nan), ("b.jpg", 0, 0, 5, 5, 1)]
    path = write_points(tmp_path / "b.csv", rows, columns)
    table = read_box_table(path)
    with pytest.raises(InputError) as info:
        validate_boxes(table["a.jpg"], path_for_errors=path, image_hw=HW, class_ids=CLASSES, image="a.jpg")
    assert info.value.problem == "image 'a.jpg': row 1: x1 is infinite or too large (inf); row 2: class is NaN"
    (tmp_path / "p.json").write_text('[{"image": "a.jpg", "x": 1' + "0" * 400 + ', "y": 1, "class": 1}]')
    with pytest.raises(InputError, match=r"row 1: x is infinite or too large \(inf\)$"):  # too large for a float
        validate_points(
            read_point_table(tmp_path / "p.json")["a.jpg"], path_for_errors=path, image_hw=HW, class_ids=CLASSES
        )


@pytest.mark.usefixtures("ray_local")
def test_a_nan_point_fails_only_its_image_in_a_run(tiny):
    from seglab.pipeline.manifest import load_manifest
    from seglab.pipeline.runner import Runner, RunOptions

    rows = ["image,x,y,class", *(f"img0{i}.png,5,5,1" for i in range(4)), "img01.png,NaN,7,2"]
    (tiny.parent / "points.csv").write_text("\n".join(rows) + "\n")
    tiny.write_text(
        tiny.read_text().replace("{kind: scribbles, path: data/scribbles}", "{kind: points, path: points.csv}")
    )
    report = Runner(load_manifest(tiny), RunOptions(only="ingest")).run()
    ingest = report.stages[0]
    assert ingest.done_now == 3 and [unit for unit, _ in ingest.failures] == ["images__img01.png"]
    assert (
        ingest.failures[0][1] == f"{(tiny.parent / 'points.csv').resolve()}: image 'images__img01.png': row 5: x is NaN"
    )
