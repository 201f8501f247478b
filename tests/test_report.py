"""seglab report: one self-contained HTML page whose numbers all come from the store and manifest."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import alter_row, batch_folder, calibrated_manifest, shapes_image, write_dataset, write_manifest
from PIL import Image
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.core.store import Store
from seglab.pipeline.evaluation.evaluate import evaluate
from seglab.pipeline.exports.labelsource import done_units
from seglab.pipeline.exports.palette import colour_of
from seglab.pipeline.manifest import open_manifest
from seglab.pipeline.report import html as report_html
from seglab.pipeline.report.data import ALPHAS, UNCERTAIN
from seglab.pipeline.runner import Runner
from seglab.stages.parts.weak_simulation import simulate_points

RETRAIN = "rounds: 1\nretrain: {epochs: 2, input_size: [48, 64], train_batch: 2, batch_size: 2}\n"
SECTIONS = ("run", "stages", "overlays", "shares", "calibration", "quality")
PLOTTED = SECTIONS[1:]
cli = CliRunner()


class Tables(HTMLParser):
    """The page's tables by id: rows of cells, each (text, data-value or None); and its sections by id."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table, self._row, self._cell = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", attrs.get("data-value")]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def body(self, table: str) -> list[list[tuple[str, str | None]]]:
        """Rows without the header row."""
        return self.tables[table][1:]


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', text, flags=re.S))


def decoded_images(html: str) -> list[Image.Image]:
    images = []
    for mime, data in re.findall(r'src="data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)"', html):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
        images.append(image)
    return images


def assert_self_contained(text: str) -> None:
    lowered = text.lower()
    assert 'src="http' not in lowered and 'href="http' not in lowered and "url(" not in lowered
    assert "<script" not in lowered and "<link" not in lowered and "<iframe" not in lowered
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', text))
    assert all(href.startswith("data:") for href in re.findall(r'href="([^"]*)"', text))


@pytest.fixture(scope="module")
def full(tmp_path_factory, ray_local):
    """6 images, calibration = img00-01, evaluation = img04-05, one round of retraining; the report of it."""
    tmp = tmp_path_factory.mktemp("full")
    path = calibrated_manifest(tmp, calibration="images/img0[01].png", evaluation="images/img0[45].png", alpha=0.4)
    path.write_text(path.read_text() + RETRAIN)
    assert Runner(open_manifest(path)).run().ok
    out, queue = tmp / "out" / "report.html", tmp / "queue.csv"
    result = cli.invoke(
        app,
        [
            "report",
            str(tmp / "run.zarr"),
            "--out",
            str(out),
            "--queue-out",
            str(queue),
            "--sample",
            "3",
            "--queue",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    return SimpleNamespace(
        manifest=path,
        store=Store(tmp / "run.zarr"),
        out=out,
        queue=queue,
        text=text,
        output=result.output,
        tables=Tables(text),
        sections=sections(text),
    )


def test_the_page_is_one_file_with_every_section_plotted(full):
    assert sorted(p.name for p in full.out.parent.iterdir()) == ["report.html"]  # no temporary file left
    assert all(part in full.output for part in ("report.html", "KB", "3 sample", "4 review"))
    assert_self_contained(full.text)
    assert list(full.sections) == list(SECTIONS)
    for name in PLOTTED:
        body = full.sections[name]
        assert '<img src="data:image/png;base64,' in body, name
        assert 'class="reason"' not in body, name  # every section has its data
        assert decoded_images(body)
    overlay = full.sections["overlays"]
    assert overlay.count('class="row"') == 3 + 4
    panels = [
        image
        for figure in re.findall(r"<figure>(.*?)</figure>", overlay, flags=re.S)
        for image in decoded_images(figure)
    ]
    assert len(panels) == 5 * 7 and all(p.width <= 320 for p in panels)
    assert [p.format for p in panels[:5]] == ["JPEG", "JPEG", "PNG", "PNG", "PNG"]
    assert "refine.1" in full.sections["run"] and full.store.attrs["manifest_hash"] in full.sections["run"]


def test_stage_table_counts_are_the_ledgers(full):
    store = full.store
    rows = {row[0][0]: row for row in full.tables.body("stages-table")}
    assert list(rows) == ["ingest", "embed", "prompts", "select", "calibrate", "refine", "retrain", "refine.1"]
    total = len(store.entries("ingest"))
    for stage, row in rows.items():
        entries = store.entries(stage)
        failed = sum(e.status == "failed" for e in entries.values())
        assert [int(row[i][1]) for i in (1, 2, 3)] == [len(done_units(store, stage)), failed, total] == [6, 0, 6]
        summary = store.stage_attrs(stage)["summary"]
        assert float(row[7][1]) == pytest.approx(summary["computed"] / summary["seconds"])
    fitted = store.stage_attrs("retrain")["fitted"]
    assert float(rows["retrain"][5][1]) == fitted["seconds"]
    assert f"final loss {fitted['history'][-1]['loss']:.4f}" in rows["retrain"][8][0]
    assert (
        "risk-control, alpha 0.4" in rows["calibrate"][8][0] and "n = 2 calibration images" in rows["calibrate"][8][0]
    )


def test_review_queue_is_ranked_by_the_stored_uncertainty_and_written_as_csv(full):
    store = full.store
    images = {u: e.source for u, e in store.entries("ingest").items()}
    measured = []
    for unit in done_units(store, "refine.1"):
        u = store.read_unit(["refine.1/uncertainty"], unit)["refine.1/uncertainty"].astype(np.float32)
        measured.append((float(u.mean()), float((u >= UNCERTAIN).mean()), unit))
    measured.sort(key=lambda m: (-m[0], -m[1], m[2]))
    rows = full.tables.body("queue-table")
    assert [r[1][0] for r in rows] == [m[2] for m in measured[:4]]
    assert [float(r[3][1]) for r in rows] == [m[0] for m in measured[:4]]
    assert [float(r[3][1]) for r in rows] == sorted((float(r[3][1]) for r in rows), reverse=True)
    with open(full.queue, newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == ["unit", "image", "mean_uncertainty", "uncertain_fraction"]
    assert [(r[0], r[1], float(r[2]), float(r[3])) for r in written[1:]] == [
        (unit, images[unit], mean, fraction) for mean, fraction, unit in measured[:4]
    ]
    link = re.search(r'href="data:text/csv;base64,([^"]+)"', full.sections["overlays"]).group(1)
    assert base64.b64decode(link).decode() == full.queue.read_text()


def test_class_shares_and_abstention_add_up_and_match_the_labels(full):
    store = full.store
    rows = {row[0][0]: row for row in full.tables.body("shares-table")}
    assert list(rows) == ["select", "refine.1"]
    for source, row in rows.items():
        values = [float(v) for _, v in row[3:]]
        shares, abstention = values[:3], values[3]
        assert sum(shares) == pytest.approx(1 - abstention, abs=1e-12)
        counts, pixels = np.zeros(256, np.int64), 0
        for unit in done_units(store, source):
            labels = store.read_unit([f"{source}/labels"], unit)[f"{source}/labels"]
            counts += np.bincount(labels.ravel(), minlength=256)
            pixels += labels.size
        assert int(row[2][1]) == pixels
        assert shares == pytest.approx((counts[:3] / pixels).tolist(), abs=1e-15)
        assert abstention == pytest.approx(counts[255] / pixels, abs=1e-15)


def test_calibration_lists_every_nominal_alpha_and_measures_the_stored_fit(full):
    rows = full.tables.body("calibration-table")
    refitted = {float(r[1][1]): r for r in rows if r[0][0] == "refitted"}
    assert sorted(refitted) == sorted({*ALPHAS, 0.4})
    stored = [r for r in rows if r[0][0] == "stored fit"]
    assert len(stored) == 1 and float(stored[0][1][1]) == 0.4
    assert stored[0][2][1] == refitted[0.4][2][1]  # the same method and images: the same thresholds
    assert refitted[0.4][6][0] == "yes" and refitted[0.02][6][0] == "no"  # 2 calibration images
    miscoverage = evaluate(open_manifest(full.manifest)).sources
    calibrate = next(s for s in miscoverage if s.source == "calibrate")
    assert float(stored[0][2][1]) == pytest.approx(calibrate.measures["miscoverage"], abs=1e-12)


def test_quality_table_is_evaluates(full):
    result = evaluate(open_manifest(full.manifest))
    rows = {row[0][0]: row for row in full.tables.body("quality-table")}
    assert list(rows) == [s.source for s in result.sources]
    assert "refine.1" in rows and "retrain" in rows
    assert (
        'alt="mIoU per label source"' in full.sections["quality"] and 'alt="mIoU per round"' in full.sections["quality"]
    )
    for source in result.sources:
        row = rows[source.source]
        assert (int(row[1][1]), int(row[2][1])) == (source.evaluated, len(source.missing))
        assert float(row[3][1]) == source.scores.miou


def test_without_gold_sets_or_rounds_every_section_says_why_in_one_sentence(tiny, tmp_path, ray_local):
    assert Runner(open_manifest(tiny)).run().ok
    out = tmp_path / "report.html"
    result = cli.invoke(app, ["report", str(tmp_path / "run.zarr"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    parts = sections(text)
    assert list(parts) == list(SECTIONS)
    for name in ("stages", "overlays", "shares"):
        assert '<img src="data:image/png;base64,' in parts[name] and decoded_images(parts[name])
    for name in ("calibration", "quality"):
        reasons = re.findall(r'<p class="reason">(.*?)</p>', parts[name], flags=re.S)
        assert len(reasons) == 1 and reasons[0].endswith(".") and ". " not in reasons[0], reasons
        assert "<img" not in parts[name]
    assert "data.calibration" in parts["calibration"] and "data.evaluation" in parts["quality"]
    assert parts["overlays"].count('class="row"') == 4 + 4  # 4 images: all sampled, all queued

    before = out.read_bytes()
    refused = cli.invoke(app, ["report", str(tmp_path / "run.zarr"), "--out", str(out)])
    assert refused.exit_code == 1 and "already exists" in refused.output and str(out.name) in refused.output
    assert "Traceback" not in refused.output and out.read_bytes() == before
    replaced = cli.invoke(app, ["report", str(tmp_path / "run.zarr"), "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    for name, text in (
        ("notes.html", "<!DOCTYPE html>\n<html><head><title>mine</title></head></html>"),
        ("budget.csv", "unit,cost\n"),
    ):  # --overwrite replaces only what seglab report wrote
        (tmp_path / name).write_text(text)
        flag = "--out" if name.endswith(".html") else "--queue-out"
        refused = cli.invoke(
            app,
            [
                "report",
                str(tmp_path / "run.zarr"),
                flag,
                str(tmp_path / name),
                *(["--out", str(out)] if flag == "--queue-out" else []),
                "--overwrite",
            ],
        )
        assert refused.exit_code == 1 and "was not written by seglab report" in refused.output
        assert (tmp_path / name).read_text() == text


def test_without_uncertainty_the_queue_ranks_by_select_confidence_and_says_so(tiny, tmp_path, ray_local):
    assert Runner(open_manifest(tiny)).run().ok
    store = Store(tmp_path / "run.zarr")
    store.clear_stage("refine")  # select is now the default label source; it writes no uncertainty
    out, queue = tmp_path / "report.html", tmp_path / "queue.csv"
    result = cli.invoke(app, ["report", str(store.path), "--out", str(out), "--queue-out", str(queue), "--queue", "3"])
    assert result.exit_code == 0, result.output
    parts = sections(out.read_text(encoding="utf-8"))
    assert "ranked and shown by 1 − select/confidence" in parts["overlays"]
    measured = []
    for unit in done_units(store, "select"):
        u = 1.0 - store.read_unit(["select/confidence"], unit)["select/confidence"].astype(np.float32)
        measured.append((float(u.mean()), float((u >= UNCERTAIN).mean()), unit))
    measured.sort(key=lambda m: (-m[0], -m[1], m[2]))
    with open(queue, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [(r[0], float(r[2]), float(r[3])) for r in rows] == [(u, m, f) for m, f, u in measured[:3]]
    assert [r[0][0] for r in Tables(out.read_text(encoding="utf-8")).body("shares-table")] == ["select"]


def test_a_damaged_unit_is_left_out_and_named_on_the_page_not_a_crash(full, tmp_path):
    import shutil

    copy = tmp_path / "run.zarr"
    shutil.copytree(full.store.path, copy)
    altered, gone = "images__img02.png", "images__img03.png"  # training images: no gold section reads them
    alter_row(copy, "refine.1", "labels", altered)  # same shape, valid chunk, other labels
    shutil.rmtree(batch_folder(copy, "ingest", "image", gone))  # the batch of img02 and img03
    out = tmp_path / "report.html"
    result = cli.invoke(app, ["report", str(copy), "--out", str(out), "--sample", "6", "--queue", "6"])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    overlays, tables = " ".join(sections(text)["overlays"].split()), Tables(text)
    assert "2 images are left out" in overlays and altered in overlays and gone in overlays
    shown = set(re.findall(r'class="row" data-unit="([^"]+)"', overlays))
    assert shown == {f"images__img0{i}.png" for i in (0, 1, 4, 5)}
    assert [r[1][0] for r in tables.body("queue-table")] and {r[1][0] for r in tables.body("queue-table")} <= shown
    shares = {row[0][0]: int(row[1][1]) for row in tables.body("shares-table")}
    assert shares == {"select": 5, "refine.1": 5}  # the altered unit is left out, the other's labels are sound


@pytest.fixture(scope="module")
def points(tmp_path_factory, ray_local):
    """One 216x288 image (its panels, at scale 1, are too wide for five in 1280 px unless they
    shrink) with one point per shape, no gold sets, no rounds; the report of it and the points."""
    tmp = tmp_path_factory.mktemp("points")
    sizes = [(216, 288)]
    write_dataset(tmp / "data", sizes)
    rows = [
        {"image": f"img{i:02d}.png", "x": x, "y": y, "class": cls}
        for i, (h, w) in enumerate(sizes)
        for x, y, cls in simulate_points(
            shapes_image(h, w, seed=i)[1], (), np.random.default_rng(i), per_component=1, margin=8
        )
    ]
    (tmp / "data" / "points.json").write_text(json.dumps({"points": rows}))
    path = write_manifest(tmp)
    path.write_text(
        path.read_text().replace("{kind: scribbles, path: data/scribbles}", "{kind: points, path: data/points.json}")
    )
    assert Runner(open_manifest(path)).run().ok
    out = tmp / "report.html"
    result = cli.invoke(app, ["report", str(tmp / "run.zarr"), "--out", str(out), "--sample", "1", "--queue", "0"])
    assert result.exit_code == 0, result.output
    return SimpleNamespace(out=out, text=out.read_text(encoding="utf-8"), points=rows)


def test_a_point_weak_label_is_drawn_as_a_visible_marker(points):
    row = re.search(r'<div class="row" data-unit="images__img00.png">(.*?)</div>', points.text, flags=re.S).group(1)
    weak = np.asarray(decoded_images(re.findall(r"<figure>(.*?)</figure>", row, flags=re.S)[1])[0].convert("RGB"))
    assert weak.shape[:2] == (216, 288)  # scale 1: a point's panel pixel is its image pixel
    yy, xx = np.mgrid[:216, :288]
    shown = [p for p in points.points if p["image"] == "img00.png" and p["class"] != 0]  # class 0 is black: dim photo
    assert shown
    for p in shown:
        inside = (xx - p["x"]) ** 2 + (yy - p["y"]) ** 2 <= 3**2
        matches = np.abs(weak[inside].astype(int) - colour_of(p["class"])).sum(axis=1) < 90
        assert matches.mean() > 0.9, (p, matches.mean())  # a filled disc, not one pixel


def test_provenance_without_a_value_reads_none(points):
    provenance = {k: v for k, v in ((row[0][0], row[1][0]) for row in Tables(points.text).tables["provenance-table"])}
    assert provenance["calibration"] == "none" and provenance["segmenter"] == "none"
    assert all(v not in ("", "None") for v in provenance.values()), provenance


def test_panels_scale_down_instead_of_fixing_widths():
    style = " ".join(report_html.STYLE.split())
    assert "img { max-width: 100%; height: auto; }" in style
    assert re.search(r"\.row \{[^}]*display: grid;[^}]*grid-template-columns: repeat\(5, minmax\(0,", style)
    assert not re.findall(r"min-width: *\d+px", style)  # a floor under five panels is what overflowed
    assert all(5 * int(px) <= 1280 for px in re.findall(r"(?<![-\w])width: *(\d+)px", style))


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_the_page_fits_a_1280_pixel_window_in_chromium(points, tmp_path):
    """Measured by the browser: a copy of the page with a probe that, once loaded, writes the
    document's scroll width and client width onto <body> (the report itself has no script)."""
    probe = (
        '<script>addEventListener("load", () => { const d = document.documentElement; '
        "document.body.dataset.widths = d.scrollWidth + ' ' + d.clientWidth; });</script>"
    )
    page = tmp_path / "probed.html"
    page.write_text(points.text.replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,900",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    scroll, client = map(int, re.search(r'data-widths="(\d+) (\d+)"', dom).groups())
    assert 1200 < client <= 1280 and scroll <= client, (scroll, client)
