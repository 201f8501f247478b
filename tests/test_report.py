"""seglab report: one self-contained HTML page whose numbers all come from the store and manifest."""
from __future__ import annotations

import base64
import csv
import io
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import calibrated_manifest
from seglab.cli.app import app
from seglab.pipeline.evaluate import evaluate
from seglab.pipeline.labelsource import done_units
from seglab.pipeline.manifest import open_manifest
from seglab.pipeline.report import ALPHAS, UNCERTAIN
from seglab.pipeline.runner import Runner
from seglab.pipeline.store import Store

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
    result = cli.invoke(app, ["report", str(tmp / "run.zarr"), "--out", str(out), "--queue-out", str(queue),
                              "--sample", "3", "--queue", "4"])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    return SimpleNamespace(manifest=path, store=Store(tmp / "run.zarr"), out=out, queue=queue, text=text,
                           output=result.output, tables=Tables(text), sections=sections(text))


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
    panels = [image for figure in re.findall(r"<figure>(.*?)</figure>", overlay, flags=re.S)
              for image in decoded_images(figure)]
    assert len(panels) == 5 * 7 and all(p.width <= 320 for p in panels)
    assert [p.format for p in panels[:5]] == ["JPEG", "JPEG", "PNG", "PNG", "PNG"]
    assert "refine.1" in full.sections["run"] and full.store.attrs["manifest_hash"] in full.sections["run"]


def test_stage_table_counts_are_the_ledgers(full):
    store = full.store
    rows = {row[0][0]: row for row in full.tables.body("stages-table")}
    assert list(rows) == ["ingest", "embed", "prompts", "select", "calibrate", "refine", "retrain", "refine.1"]
    total = len(store.ledger("ingest").load())
    for stage, row in rows.items():
        entries = store.ledger(stage).load()
        failed = sum(e["status"] == "failed" for e in entries.values())
        assert [int(row[i][1]) for i in (1, 2, 3)] == [len(done_units(store, stage)), failed, total] == [6, 0, 6]
        summary = store.stage_attrs(stage)["summary"]
        assert float(row[7][1]) == pytest.approx(summary["computed"] / summary["seconds"])
    fitted = store.stage_attrs("retrain")["fitted"]
    assert float(rows["retrain"][5][1]) == fitted["seconds"]
    assert f"final loss {fitted['history'][-1]['loss']:.4f}" in rows["retrain"][8][0]
    assert "risk-control, alpha 0.4" in rows["calibrate"][8][0] and "n = 2 calibration images" in rows["calibrate"][8][0]


def test_review_queue_is_ranked_by_the_stored_uncertainty_and_written_as_csv(full):
    store = full.store
    images = {u: e["info"]["source"] for u, e in store.ledger("ingest").load().items()}
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
        (unit, images[unit], mean, fraction) for mean, fraction, unit in measured[:4]]
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
    assert 'alt="mIoU per label source"' in full.sections["quality"] and 'alt="mIoU per round"' in full.sections["quality"]
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
