"""Read and validate weak labels: label maps (scribbles, coarse masks), points and boxes.

Coordinates are in pixels of the displayed image (after EXIF orientation): ``x`` is the
column, ``y`` the row, and pixel (row r, column c) covers ``[c, c+1) x [r, r+1)``; a point
therefore lies in pixel ``(floor(y), floor(x))``, and a box ``x0, y0, x1, y1`` may reach
``x1 = W``, ``y1 = H``.

Label maps get the same decoding safety as images and, like images, have their EXIF
orientation applied: a map drawn on the displayed photo matches the transposed image, and
a map that carries an orientation tag asks to be shown rotated, exactly like the photo.

Point and box tables are JSON (a list of objects, or ``{"points": [...]}`` /
``{"boxes": [...]}``), CSV with a header row, or Parquet. Columns: ``image, x, y, class``
for points and ``image, x0, y0, x1, y1, class`` for boxes; other columns are ignored.
Numbers may be numeric strings. A NaN or infinite number fails its image (at ingest,
like a point outside the image), not the table. "row N" in messages counts data rows
from 1 (the CSV header is not a row). The ``image`` value is the image path relative to
the data root, or just its file name; ``assign_to_images`` resolves it (see there).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seglab.pipeline.base.errors import InputError
from seglab.stages.parts.imageio import open_checked, read_file_bytes

LABEL_MAP_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I", "1")
POINT_COLUMNS = ("image", "x", "y", "class")
BOX_COLUMNS = ("image", "x0", "y0", "x1", "y1", "class")
_MAX_LISTED = 5


class SourceRow(tuple):
    """One table row's values, e.g. (x, y, class), plus ``row``: its 1-based row number."""

    row: int

    def __new__(cls, values: Iterable, row: int = 0):
        self = super().__new__(cls, tuple(values))
        self.row = row
        return self

    def __getnewargs__(self):  # keep ``row`` when pickled
        return (tuple(self), self.row)


class _Problems(list):
    """Problem messages for one file; ``raise_if_any`` raises one InputError listing the first few."""

    def raise_if_any(self, path: Path | str, prefix: str = "") -> None:
        if self:
            more = f"; and {len(self) - _MAX_LISTED} more" if len(self) > _MAX_LISTED else ""
            raise InputError(path, prefix + "; ".join(self[:_MAX_LISTED]) + more)


def label_dtype(class_ids: Iterable[int], unlabelled: int) -> np.dtype:
    """uint8 when every class id and ``unlabelled`` fit in 0..255, else uint16."""
    class_ids = set(class_ids)
    values = [*class_ids, unlabelled]
    if unlabelled in class_ids:
        raise ValueError(f"the unlabelled value {unlabelled} is also a class id")
    if min(values) < 0 or max(values) > 65535:
        raise ValueError(f"class ids and the unlabelled value must be in 0..65535, got {sorted(values)}")
    return np.dtype(np.uint8 if max(values) <= 255 else np.uint16)


def _value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.dtype.kind in "bu" and values.dtype.itemsize <= 2:
        counts = np.bincount(values.ravel().astype(np.intp))
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(values, return_counts=True)


def read_label_map(
    path: Path | str, *, expected_hw: tuple[int, int], class_ids: frozenset[int], unlabelled: int
) -> np.ndarray:
    """Scribble or coarse-mask file -> [H, W] class ids, ``unlabelled`` where there is no label.

    The file must be a single-channel integer image (mode L, P, I;16 or I; for P the
    palette *indices* are the values, the colours are ignored; mode 1 reads as 0/1) of
    size ``expected_hw`` = (H, W) after EXIF orientation. dtype: ``label_dtype``.
    """
    dtype = label_dtype(class_ids, unlabelled)
    height, width = expected_hw
    image, _ = open_checked(path, max_pixels=height * width, expected_hw=(height, width))
    if image.mode not in LABEL_MAP_MODES:
        raise InputError(
            path,
            f"has colour mode {image.mode}; a label map must be a single-channel index "
            f"map whose pixel values are class ids (8-bit grayscale 'L', palette 'P' "
            f"or 16-bit grayscale), not a colour or alpha image",
        )
    values = np.asarray(image)
    values = values.astype(np.uint8) if values.dtype == bool else values
    present, counts = _value_counts(values)
    unknown = ~np.isin(present, np.array(sorted({*class_ids, unlabelled})))
    if unknown.any():
        order = np.argsort(-counts[unknown], kind="stable")
        bad = [f"{present[unknown][i]} ({counts[unknown][i]} px)" for i in order[:_MAX_LISTED]]
        more = f" and {unknown.sum() - _MAX_LISTED} more" if unknown.sum() > _MAX_LISTED else ""
        raise InputError(
            path,
            f"has pixel values that are neither a class id {sorted(class_ids)} nor the "
            f"unlabelled value {unlabelled}: {', '.join(bad)}{more}",
        )
    if not (values != unlabelled).any():
        raise InputError(path, f"empty weak label: every pixel has the unlabelled value {unlabelled}")
    return np.ascontiguousarray(values.astype(dtype))


def _shown(value, limit: int = 40) -> str:
    """``repr(value)``, shortened to about ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _number(value, name: str) -> float:
    """A table cell -> float; NaN, infinities and numbers beyond float's range (as ±inf)
    included, for their image to refuse at ingest (``_validated``) rather than the whole
    table. ValueError naming ``name`` when the cell is empty or not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} is not a number (got {_shown(value)})")
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() would raise OverflowError
        return math.inf if value > 0 else -math.inf
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} is not a number (got {_shown(value)})") from None


def _normalise(image_path: str) -> PurePosixPath:
    """'./dir\\a.jpg ' -> dir/a.jpg: strip blanks, ``\\`` -> ``/``, drop ``.`` parts and repeated ``/``."""
    return PurePosixPath(image_path.strip().replace("\\", "/"))


def _image_key(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"image must be a non-empty path or file name (got {_shown(value)})")
    key = _normalise(value)
    if key.is_absolute() or ".." in key.parts:
        raise ValueError(f"image must be relative to the data root (got {_shown(value)})")
    return str(key)


def _records(path: Path | str, columns: Sequence[str], list_key: str) -> list[dict]:
    """Raw rows of a JSON, CSV or Parquet table (a file or an object's URL) as dicts (column -> value as stored)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".csv", ".parquet", ".pq"):
        raise InputError(path, f"unsupported table type '{suffix}'; use .json, .csv or .parquet")
    data = read_file_bytes(path)
    if suffix in (".parquet", ".pq"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(path, f"not a readable Parquet file ({exc})") from exc
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(path, f"must have the columns {', '.join(columns)}; missing: {', '.join(missing)}")
        return table.select(list(columns)).to_pylist()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"is not UTF-8 text ({exc})") from exc
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            rows = list(reader)
        except csv.Error as exc:
            raise InputError(path, f"is not valid CSV ({exc})") from exc
        missing = [c for c in columns if c not in reader.fieldnames]
        if missing:
            raise InputError(path, f"header must name {', '.join(columns)}; missing: {', '.join(missing)}")
        return rows
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except ValueError as exc:  # e.g. Python's limit on the digits of an integer (a DoS guard)
        what = "a number has too many digits" if "digits" in str(exc) else "it cannot be parsed"
        raise InputError(path, f"is not usable JSON: {what} ({str(exc).split(';')[0]})") from None
    except RecursionError:
        raise InputError(path, "is not usable JSON: its arrays or objects are nested too deeply") from None
    if isinstance(document, dict) and isinstance(document.get(list_key), list):
        document = document[list_key]
    if not isinstance(document, list):
        raise InputError(path, f'JSON must be a list of objects or {{"{list_key}": [...]}}')
    return document


def _read_table(path: Path | str, columns: Sequence[str], list_key: str) -> dict[str, list[SourceRow]]:
    """image key -> rows of the numeric columns (class last, as int), in file order."""
    records = _records(path, columns, list_key)
    if not records:
        raise InputError(path, f"contains no {list_key}")
    table: dict[str, list[SourceRow]] = {}
    problems = _Problems()
    for row_number, record in enumerate(records, start=1):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected an object with keys {', '.join(columns)}, got {type(record).__name__}")
            if record.get("\0extra"):
                raise ValueError("has more fields than the header")
            missing = [c for c in columns if c not in record]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            key = _image_key(record["image"])
            numbers = [_number(record[c], c) for c in columns[1:]]
            finite = all(map(math.isfinite, numbers))
            if finite and not numbers[-1].is_integer():
                raise ValueError(f"class is not an integer (got {_shown(record['class'])})")
            if list_key == "boxes" and finite and not (numbers[0] < numbers[2] and numbers[1] < numbers[3]):
                raise ValueError(f"box needs x0 < x1 and y0 < y1 (got {numbers[:4]})")
        except ValueError as exc:
            problems.append(f"row {row_number}: {exc}")
            continue
        class_value = int(numbers[-1]) if math.isfinite(numbers[-1]) else numbers[-1]
        table.setdefault(key, []).append(SourceRow([*numbers[:-1], class_value], row_number))
    problems.raise_if_any(path)
    return table


def read_point_table(path: Path | str) -> dict[str, list[SourceRow]]:
    """Points file -> image key -> [(x, y, class)] (``SourceRow``s, carrying ``.row``)."""
    return _read_table(path, POINT_COLUMNS, "points")


def read_box_table(path: Path | str) -> dict[str, list[SourceRow]]:
    """Boxes file -> image key -> [(x0, y0, x1, y1, class)] (``SourceRow``s); each row has x0 < x1, y0 < y1."""
    return _read_table(path, BOX_COLUMNS, "boxes")


def assign_to_images(
    table: dict[str, list], image_paths: Iterable[str], *, path_for_errors: Path | str, allow_unmatched: bool = False
) -> dict[str, list]:
    """Resolve table keys to the dataset's images -> image path (as given) -> rows.

    A key equal to an image's relative path (after normalising ``\\``, ``./``, ``//``)
    names that image. Otherwise a key without a directory part names the one image with
    that file name; it is an InputError if several images share it (write the relative
    path instead). Keys matching no image are an InputError unless ``allow_unmatched``.
    """
    by_path = {str(_normalise(p)): p for p in image_paths}
    by_name: dict[str, list[str]] = {}
    for key, original in by_path.items():
        by_name.setdefault(PurePosixPath(key).name, []).append(original)
    assigned: dict[str, list] = {}
    problems = _Problems()
    for key, rows in table.items():
        if key in by_path:
            target = by_path[key]
        elif "/" not in key and len(by_name.get(key, ())) == 1:
            target = by_name[key][0]
        elif "/" not in key and key in by_name:
            problems.append(
                f"'{key}' is ambiguous, it names {', '.join(sorted(by_name[key])[:3])}: "
                f"write the path relative to the data root"
            )
            continue
        else:
            if not allow_unmatched:
                problems.append(f"'{key}' matches no image in the dataset")
            continue
        assigned.setdefault(target, []).extend(rows)
    problems.raise_if_any(path_for_errors)
    return assigned


#: the numeric columns of a row, by the kind of row ``_validated`` checks
_ROW_COLUMNS = {"point": POINT_COLUMNS[1:], "box": BOX_COLUMNS[1:]}


def _non_finite(row: np.ndarray, names: Sequence[str]) -> str | None:
    """'x is NaN, y is infinite or too large (inf)' for the non-finite values of float [width] ``row``
    (named by ``names``); None when every value is finite."""
    bad = [
        f"{name} is NaN" if math.isnan(value) else f"{name} is infinite or too large ({value:g})"
        for name, value in zip(names, row)
        if not math.isfinite(value)
    ]
    return ", ".join(bad) or None


def _validated(
    rows: Sequence,
    width: int,
    kind: str,
    misfit: Callable[[np.ndarray], str | None],
    *,
    path: Path | str,
    image: str,
    class_ids: frozenset[int],
) -> tuple[np.ndarray, list[str]]:
    """Checks shared by points and boxes -> (float64 [K, width] rows, a label per row).

    ``misfit(row)`` says why a row of finite values does not fit the image (None when it
    does); a row with NaN or an infinity is refused by name instead ("row 3: x is NaN"). A
    row's label is "row N" when it came from a table (``SourceRow``), else "<kind> N".
    """
    where = f"image '{image}': " if image else ""
    if len(rows) == 0:
        raise InputError(path, f"{where}no {kind}s (empty weak label)")
    try:
        values = np.asarray([tuple(r) for r in rows], dtype=np.float64).reshape(len(rows), width)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"{where}{kind}s must be rows of {width} numbers ({exc})") from exc
    labels = [f"row {r.row}" if getattr(r, "row", 0) else f"{kind} {i}" for i, r in enumerate(rows, 1)]
    problems = _Problems()
    for row, label in zip(values, labels):
        if (why := _non_finite(row, _ROW_COLUMNS[kind])) is not None:
            problems.append(f"{label}: {why}")
            continue
        if (why := misfit(row)) is not None:
            problems.append(f"{label}: {why}")
        if not (math.isfinite(row[-1]) and row[-1].is_integer() and int(row[-1]) in class_ids):
            problems.append(f"{label}: class {row[-1]:g} is not one of {sorted(class_ids)}")
    problems.raise_if_any(path, where)
    return values, labels


def point_pixels(xy: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (x, y) float [K, 2] -> (rows, cols) intp [K], the pixel (floor(y), floor(x))
    each lies in, and ``inside`` bool [K], whether that pixel is in the HxW image (rows and
    cols are 0 where it is not). The one mapping that validation and rasterisation share."""
    height, width = hw
    xy = np.asarray(xy).reshape(-1, 2)
    fy, fx = np.floor(xy[:, 1]), np.floor(xy[:, 0])
    inside = (fy >= 0) & (fy < height) & (fx >= 0) & (fx < width)
    return np.where(inside, fy, 0).astype(np.intp), np.where(inside, fx, 0).astype(np.intp), inside


def _float32_toward(values: np.ndarray, toward: float) -> np.ndarray:
    """float64 -> float32, each value rounded toward ``toward`` (-inf or +inf) instead of to
    the nearest: 63.999999 stays below 64 when rounded down, so the pixel it lies in and a
    bound ``x < W`` or ``x1 <= W`` (W an integer below 2**24) survive the cast. Values beyond
    float32's range become its largest finite values."""
    values = np.asarray(values, np.float64)
    largest = float(np.finfo(np.float32).max)
    single = np.clip(values, -largest, largest).astype(np.float32)
    overshot = (single > values if toward < 0 else single < values) & (np.abs(values) < largest)
    single[overshot] = np.nextafter(single[overshot], np.float32(toward))
    return single


def _stored_points(values: np.ndarray) -> np.ndarray:
    """Validated float64 [K, 3] (x, y, class) -> float32 [K, 3] as ingest uses them: coordinates rounded down."""
    out = np.asarray(values, np.float64).astype(np.float32)
    out[:, :2] = _float32_toward(values[:, :2], -np.inf)
    return out


def validate_points(
    points: Sequence,
    *,
    path_for_errors: Path | str,
    image_hw: tuple[int, int],
    class_ids: frozenset[int],
    image: str = "",
) -> np.ndarray:
    """Rows (x, y, class) of one image -> float32 [K, 3] (x, y, class), K >= 1.

    Every point must be finite and inside the image (0 <= x < W, 0 <= y < H), have a known
    class, and not share its pixel with a point of another class. Errors name the points
    file (``path_for_errors``), the image and the offending rows. The checks run on the
    float32 values returned (coordinates rounded down, so x = 63.999999 on a 64-wide image
    stays in pixel 63) through ``point_pixels``, the mapping ``rasterize_points`` uses.
    """
    height, width = image_hw

    def misfit(point: np.ndarray) -> str | None:
        if point_pixels(_float32_toward(point[None, :2], -np.inf), image_hw)[2][0]:
            return None
        x, y = point[:2]
        return f"(x={x:g}, y={y:g}) is outside the {width}x{height} image (needs 0 <= x < {width}, 0 <= y < {height})"

    values, labels = _validated(points, 3, "point", misfit, path=path_for_errors, image=image, class_ids=class_ids)
    stored = _stored_points(values)
    rows, cols, _ = point_pixels(stored[:, :2], image_hw)
    pixel = rows.astype(np.int64) * width + cols
    order = np.argsort(pixel, kind="stable")
    clash = np.flatnonzero((np.diff(pixel[order]) == 0) & (np.diff(values[order, 2]) != 0))
    if clash.size:
        first, second = order[clash[0]], order[clash[0] + 1]
        where = f"image '{image}': " if image else ""
        raise InputError(
            path_for_errors,
            f"{where}{labels[first]} and {labels[second]} give different classes "
            f"to the same pixel (x={values[first, 0]:g}, y={values[first, 1]:g})",
        )
    return stored


def validate_boxes(
    boxes: Sequence,
    *,
    path_for_errors: Path | str,
    image_hw: tuple[int, int],
    class_ids: frozenset[int],
    image: str = "",
    background: int | None = None,
) -> np.ndarray:
    """Rows (x0, y0, x1, y1, class) of one image -> float32 [K, 5], K >= 1.

    Every box must satisfy 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and have a known class
    other than ``background`` (the manifest's ``data.weak.background``: the class of what no
    box covers, which has no boxes of its own).
    The checks run on the float32 values returned, whose corners are rounded outward (x0,
    y0 down, x1, y1 up), so the stored box still holds the given one and passes them.
    """
    height, width = image_hw

    def misfit(box: np.ndarray) -> str | None:
        (x0, y0), (x1, y1) = _float32_toward(box[:2], -np.inf), _float32_toward(box[2:4], np.inf)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            x0, y0, x1, y1 = box[:4]
            return (
                f"({x0:g}, {y0:g}, {x1:g}, {y1:g}) does not fit the {width}x{height} image "
                f"(needs 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})"
            )
        if background is not None and box[4] == background:
            return (
                f"class {background} is the background class (data.weak.background): it has no boxes, "
                f"it is what no box covers"
            )
        return None

    values, _ = _validated(boxes, 5, "box", misfit, path=path_for_errors, image=image, class_ids=class_ids)
    return _stored_boxes(values)


def _stored_boxes(values: np.ndarray) -> np.ndarray:
    """Validated float64 [K, 5] (x0, y0, x1, y1, class) -> float32 [K, 5] as ingest stores them: corners
    rounded outward."""
    out = np.asarray(values, np.float64).astype(np.float32)
    out[:, :2] = _float32_toward(values[:, :2], -np.inf)
    out[:, 2:4] = _float32_toward(values[:, 2:4], np.inf)
    return out


def rasterize_points(points: np.ndarray, hw: tuple[int, int], unlabelled: int, dtype) -> np.ndarray:
    """Validated points float [K, 3] (x, y, class) -> [H, W] map of ``dtype``: the class in
    pixel (floor(y), floor(x)) of every point, ``unlabelled`` elsewhere."""
    height, width = hw
    points = np.asarray(points).reshape(-1, 3)
    rows, cols, inside = point_pixels(points[:, :2], hw)
    if not inside.all():
        raise ValueError("points outside the image: run validate_points first")
    out = np.full((height, width), unlabelled, dtype=dtype)
    out[rows, cols] = points[:, 2].astype(dtype)
    return out
