"""The report as one self-contained HTML page: styles inline, every picture a base64 data
URI, no script and no external reference. Every string that comes from the store or the
manifest is escaped. Numeric table cells carry their unrounded value in ``data-value``.

``write_report`` builds the data (pipeline/report/build.py), draws it (pipeline/report/figures.py)
and writes the page atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.core.store import Store
from seglab.pipeline.exports.labelsource import open_source
from seglab.pipeline.exports.palette import colour_of
from seglab.pipeline.report import figures
from seglab.pipeline.report.build import UnitReader, build_report
from seglab.pipeline.report.data import MAX_FAILURES, UNCERTAIN, CalibrationRow, QueueRow, ReportData

QUEUE_COLUMNS = ("unit", "image", "mean_uncertainty", "uncertain_fraction")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1750px; color: #222; }
img { max-width: 100%; height: auto; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.reason { color: #8a5a00; background: #fff8e6; padding: 0.4em 0.7em; border-left: 3px solid #e0a800; }
.note { color: #555; }
.wide { overflow-x: auto; }
.row { display: grid; grid-template-columns: repeat(5, minmax(0, 320px)); gap: 6px; align-items: start;
       margin: 0.3em 0 0.9em; }
.row figure { margin: 0; min-width: 0; } .row figcaption { font-size: 0.75em; color: #555; }
.row img { display: block; image-rendering: pixelated; }
.caption { font-size: 0.85em; margin-top: 0.6em; }
.missing { height: 60px; background: #eee; color: #777; font-size: 0.8em; padding: 0.4em; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; border: 1px solid #999;
          margin-right: 0.3em; }
.legend span.item { margin-right: 1.1em; white-space: nowrap; }
code { font-size: 0.9em; overflow-wrap: anywhere; }
"""


# -- small pieces ------------------------------------------------------------------------
def _text(value: Any) -> str:
    return escape("" if value is None else str(value))


def _fact(value: Any) -> str:
    """A fact's value, 'none' when it has none (None, or an empty string or collection)."""
    return "none" if value is None or value == "" or value == [] or value == {} else _text(value)


def _num(value: float | int | None, fmt: str = "{:.3g}", *, percent: bool = False) -> str:
    """A numeric cell: shown formatted, the unrounded value in data-value; '–' when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="n">–</td>'
    shown = f"{100 * value:.2f} %" if percent else fmt.format(value)
    return f'<td class="n" data-value="{value!r}">{escape(shown)}</td>'


def _table(table_id: str, header: Sequence[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return (
        f'<div class="wide"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img src="{figures.data_uri(data, mime)}" alt="{escape(alt)}">'


def _reason(text: str | None) -> str:
    return f'<p class="reason">{escape(text)}</p>' if text else ""


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def queue_csv(rows: Sequence[QueueRow]) -> str:
    """The review queue as CSV text: unit,image,mean_uncertainty,uncertain_fraction (rank order)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(QUEUE_COLUMNS)
    writer.writerows([r.unit, r.image or "", repr(r.mean_uncertainty), repr(r.uncertain_fraction)] for r in rows)
    return buffer.getvalue()


# -- sections ---------------------------------------------------------------------------
def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


def header_section(data: ReportData) -> str:
    h = data.header
    facts = [
        ("store", h["store"]),
        ("manifest", h["manifest"]),
        ("seglab version", h["seglab_version"]),
        ("manifest hash", h["manifest_hash"]),
        ("generated (UTC)", h["generated"]),
        ("default label source", h["default_stage"]),
    ]
    if h.get("recorded_manifest") and h["recorded_manifest"] != h["manifest"]:
        facts.insert(2, ("manifest recorded by the run", h["recorded_manifest"]))
    return _section(
        "run",
        "Run",
        _facts_table("run-table", facts)
        + f"<h3>Provenance of the default labels ({_text(h['default_stage'])})</h3>"
        + _facts_table("provenance-table", _flatten("", h["provenance"])),
    )


def _facts_table(table_id: str, facts: Iterable[tuple[str, Any]]) -> str:
    """A two-column table: each fact's name as a header cell, its value as code."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{_fact(v)}</code></td></tr>" for k, v in facts)
    return f'<div class="wide"><table id="{table_id}">{rows}</table></div>'


def stages_section(data: ReportData) -> str:
    s = data.stages
    if s.reason:
        return _section("stages", "Stages", _reason(s.reason))
    rows = [
        f'<tr data-stage="{_text(r.stage)}"><td>{_text(r.stage)}</td>{_num(r.done, "{:d}")}{_num(r.failed, "{:d}")}'
        f"{_num(r.total, '{:d}')}{_num(r.time, '{:.1f}')}{_num(r.train_seconds, '{:.1f}')}"
        f"{_num(r.computed, '{:d}')}{_num(r.throughput, '{:.3g}')}<td>{_text(r.fit)}</td></tr>"
        for r in s.rows
    ]
    body = _table(
        "stages-table",
        ("stage", "done", "failed", "total", "time s", "of which training s", "computed in last run", "img/s", "fit"),
        rows,
    )
    body += (
        '<p class="note">done: units done with the stage\'s stored signature; total: units ingest knows; '
        "time: the last run that computed units (plus training for a trained stage); "
        "img/s: units computed in that run per second of its map phase.</p>"
    )
    if s.failures_total:
        shown = [
            f"<tr><td>{_text(f.stage)}</td><td>{_text(f.unit)}</td><td>{_text(f.message)}</td></tr>" for f in s.failures
        ]
        more = s.failures_total - len(s.failures)
        body += f"<h3>Failures ({s.failures_total})</h3>"
        body += _table("failures-table", ("stage", "unit", "message"), shown)
        if more:
            body += (
                f'<p class="note">… and {more} more (the first {MAX_FAILURES} are shown; '
                "<code>seglab status</code> lists all).</p>"
            )
    else:
        body += '<p class="note">No failed units.</p>'
    measured = [(r.stage, r.throughput) for r in s.rows if r.throughput]
    if measured:
        chart = figures.bar_chart(
            [stage for stage, _ in measured],
            [throughput for _, throughput in measured],
            ylabel="images / s",
            title="throughput per stage (last run that computed units)",
        )
        body += _img(chart, "image/png", "throughput per stage")
    body += _reason(s.throughput_reason)
    return _section("stages", "Stages", body)


def _legend(data: ReportData) -> str:
    items = [
        f'<span class="item"><span class="swatch" style="background: rgb{colour_of(i)}"></span>'
        f"{_text(name)} ({i})</span>"
        for i, name in data.classes
    ]
    items.append(
        f'<span class="item"><span class="swatch" style="background: rgb{figures.NO_LABEL}"></span>'
        f"no label ({data.ignore_id})</span>"
    )
    return f'<p class="legend">{"".join(items)}</p>'


def _panel(panel: tuple[bytes, str] | None, caption: str, missing: str) -> str:
    inner = _img(*panel, caption) if panel else f'<div class="missing">{escape(missing)}</div>'
    return f"<figure>{inner}<figcaption>{escape(caption)}</figcaption></figure>"


def _overlay_row(reader: UnitReader, data: ReportData, unit: str, caption: str) -> str:
    o, ignore = data.overlays, data.ignore_id
    a = reader.read(unit)
    panels = [
        _panel(figures.photo_panel(a.image) if a.image is not None else None, "image", "no ingest output"),
        _panel(
            figures.weak_panel(a.image, a.weak, ignore, a.boxes)
            if a.image is not None and a.weak is not None
            else None,
            "weak label",
            "no ingest output",
        ),
        _panel(figures.label_panel(a.select, ignore) if a.select is not None else None, "select", "no select output"),
        _panel(
            figures.label_panel(a.labels, ignore) if a.labels is not None else None,
            f"{o.stage} (default)",
            f"no {o.stage} output",
        ),
        _panel(
            figures.uncertainty_panel(a.uncertainty) if a.uncertainty is not None else None,
            o.uncertainty_from or "uncertainty",
            "no uncertainty",
        ),
    ]
    return (
        f'<div class="caption"><b>{_text(unit)}</b> <code>{_text(o.images.get(unit))}</code> '
        f"{escape(caption)}</div>"
        f'<div class="row" data-unit="{_text(unit)}">{"".join(panels)}</div>'
    )


def overlays_section(data: ReportData, store: Store) -> str:
    o = data.overlays
    if o.reason:
        return _section("overlays", "Overlays", _reason(o.reason))
    reader = UnitReader(store, open_source(store, stage=o.stage))
    legend = _legend(data)
    bar = _img(
        figures.colour_bar(f"uncertainty: {o.uncertainty_from} (0 = certain)"), "image/png", "uncertainty colour bar"
    )
    body = (
        f"<p>Default label source <b>{_text(o.stage)}</b> ({o.units} done images). Panels: image; weak label over "
        f"the dimmed image; select's labels; {_text(o.stage)}'s labels; uncertainty ({_text(o.uncertainty_from)}). "
        f"White: no label.</p>{legend}{bar}"
    )
    if o.note:
        body += f'<p class="note">{escape(o.note)}</p>'
    body += f"<h3>Sample ({len(o.sample)} images, evenly over the sorted units)</h3>"
    body += "".join(_overlay_row(reader, data, u, "") for u in o.sample)
    csv_text = queue_csv(o.queue)
    link = (
        f'<a download="review-queue.csv" href="data:text/csv;base64,'
        f'{base64.b64encode(csv_text.encode()).decode("ascii")}">download the review queue as CSV</a>'
    )
    rows = [
        f'<tr data-unit="{_text(r.unit)}">{_num(r.rank, "{:d}")}<td>{_text(r.unit)}</td>'
        f"<td><code>{_text(r.image)}</code></td>{_num(r.mean_uncertainty, '{:.4f}')}"
        f"{_num(r.uncertain_fraction, percent=True)}</tr>"
        for r in o.queue
    ]
    body += (
        f"<h3>Review queue ({len(o.queue)} most uncertain of {o.units} images)</h3>"
        f"<p>Ranked by mean uncertainty ({_text(o.uncertainty_from)}); "
        f"ties by the share of pixels with uncertainty ≥ {UNCERTAIN}. {link}</p>"
    )
    body += _table("queue-table", ("rank", "unit", "image", "mean uncertainty", "uncertain fraction"), rows)
    body += "".join(
        _overlay_row(reader, data, r.unit, f"rank {r.rank}, mean uncertainty {r.mean_uncertainty:.4f}") for r in o.queue
    )
    return _section("overlays", "Overlays", body)


def shares_section(data: ReportData) -> str:
    s = data.shares
    if s.reason or not s.sources:
        reason = s.reason or "No label source has finished units."
        return _section("shares", "Class shares and abstention", _reason(reason))
    names = [name for _, name in data.classes]
    show_other = any(c.other for c in s.sources)
    header = ("source", "images", "pixels", *names, "abstained (no label)", *(["other values"] if show_other else []))
    rows = [
        f'<tr data-source="{_text(c.source)}"><td>{_text(c.source)}</td>'
        f"{_num(c.units, '{:d}')}{_num(c.pixels, '{:d}')}"
        + "".join(_num(v, percent=True) for v in c.shares)
        + _num(c.abstention, percent=True)
        + (_num(c.other, percent=True) if show_other else "")
        + "</tr>"
        for c in s.sources
    ]
    chart = figures.grouped_bars(
        [*names, "abstained"],
        {c.source: [*c.shares, c.abstention] for c in s.sources},
        ylabel="share of all pixels",
        title="pixels per class and abstention",
    )
    body = (
        "<p>Share of all pixels of every finished image labelled with each class, and the share left without a "
        "label (abstention); per source they sum to 100 %.</p>"
        + _table("shares-table", header, rows)
        + _img(chart, "image/png", "class shares")
    )
    return _section("shares", "Class shares and abstention", body)


def _calibration_row(r: CalibrationRow, label: str) -> str:
    return (
        f'<tr data-alpha="{r.alpha!r}"><td>{escape(label)}</td>'
        f"{_num(r.alpha, '{:g}')}{_num(r.miscoverage, '{:.4f}')}"
        f"{_num(r.kept, percent=True)}{_num(r.kept_accuracy, percent=True)}{_num(r.threshold, '{:.4f}')}"
        f"<td>{'yes' if r.feasible else 'no'}</td></tr>"
    )


def calibration_section(data: ReportData) -> str:
    c = data.calibration
    if c.reason:
        return _section("calibration", "Calibration", _reason(c.reason))
    assert c.method is not None  # set on every section that gives no reason
    chart = figures.calibration_chart(
        [r.alpha for r in c.rows],
        [r.miscoverage for r in c.rows],
        method=c.method,
        feasible=[r.feasible for r in c.rows],
        fitted=(c.stored.alpha, c.stored.miscoverage) if c.stored else None,
    )
    rows = [_calibration_row(r, "refitted") for r in c.rows]
    if c.stored:
        rows.append(_calibration_row(c.stored, "stored fit"))
    body = (
        f"<p>{_text(c.method)} thresholds fitted at each nominal α on the {c.calibration_images} calibration "
        f"images, empirical miscoverage (share of gold pixels whose class is outside the set, averaged over images) "
        "measured "
        f"on the {c.evaluation_images} evaluation images. Points under the diagonal keep the promise. "
        f"The stored fit has α = {c.fitted_alpha:g}"
        + (f" (manifest: α = {c.manifest_alpha:g})" if c.manifest_alpha is not None else "")
        + ".</p>"
        + _img(chart, "image/png", "calibration curve")
        + _table(
            "calibration-table",
            (
                "thresholds",
                "nominal α",
                "empirical miscoverage",
                "kept (single class)",
                "kept accuracy",
                "mean threshold",
                "feasible",
            ),
            rows,
        )
    )
    return _section("calibration", "Calibration", body)


def quality_section(data: ReportData) -> str:
    q = data.quality
    if q.reason:
        return _section("quality", "Quality", _reason(q.reason))
    rows = [
        f'<tr data-source="{_text(r.source)}"><td>{_text(r.source)}</td>{_num(r.evaluated, "{:d}")}'
        f"{_num(r.missing, '{:d}')}{_num(r.miou, percent=True)}{_num(r.pixel_accuracy, percent=True)}"
        f"{_num(r.labelled_fraction, percent=True)}{_num(r.labelled_accuracy, percent=True)}"
        f"<td>{'stale' if r.stale else ''}</td></tr>"
        for r in q.rows
    ]
    body = (
        f"<p>Every label source scored against the {q.images} evaluation images' gold masks "
        "(as <code>seglab evaluate</code>).</p>"
        + _table(
            "quality-table",
            (
                "source",
                "evaluated",
                "missing",
                "mIoU",
                "pixel accuracy",
                "labelled",
                "accuracy on labelled",
                "settings",
            ),
            rows,
        )
    )
    scored = [(r.source, r.miou) for r in q.rows if r.miou is not None]
    if scored:
        body += _img(
            figures.bar_chart(
                [source for source, _ in scored],
                [100 * miou for _, miou in scored],
                ylabel="mIoU (%)",
                title="mIoU per label source",
            ),
            "image/png",
            "mIoU per label source",
        )
    if q.rounds:
        references = {r.source: r.miou for r in q.rows if r.source == "select"}
        body += _img(figures.rounds_chart(q.rounds, references=references), "image/png", "mIoU per round")
    body += _reason(q.rounds_reason)
    return _section("quality", "Quality", body)


def render_html(data: ReportData, store: Store) -> str:
    """The whole page; ``store`` is read for the overlay rows' arrays, one unit at a time."""
    title = f"seglab report: {Path(data.header['store']).name}"
    parts = [
        header_section(data),
        stages_section(data),
        overlays_section(data, store),
        shares_section(data),
        calibration_section(data),
        quality_section(data),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>" + "\n".join(parts) + "</body></html>\n"
    )


# -- writing ------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> int:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder; -> bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = text.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(encoded)


GENERATOR = '<meta name="generator" content="seglab report">'
"""What every page seglab writes carries in its head: how ``--overwrite`` knows a file is one."""


def _is_ours(target: Path) -> bool:
    """Whether ``target`` is a file seglab's report wrote: a page whose head carries
    GENERATOR, or a review-queue CSV whose first line is QUEUE_COLUMNS."""
    try:
        with open(target, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    if target.suffix.lower() in (".html", ".htm") or head.startswith("<!DOCTYPE html>"):
        return GENERATOR in head.split("</head>", 1)[0]
    return head.split("\n", 1)[0] == ",".join(QUEUE_COLUMNS)


def write_report(
    store_path: Path | str,
    out: Path | str,
    *,
    manifest: str | Path | None = None,
    sample: int = 6,
    queue: int = 12,
    queue_out: Path | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build, draw and write the report of the store at ``store_path`` to ``out`` (and the
    review queue to ``queue_out`` as CSV). Refuses an existing file unless ``overwrite``.
    -> {path, bytes, sample, queue, seconds, data}."""
    started = time.perf_counter()
    targets = [Path(out)] + ([Path(queue_out)] if queue_out is not None else [])
    for target in targets:
        if target.is_dir():
            raise SeglabError(f"{target} is a folder; give a file name")
        if target.exists() and not overwrite:
            raise SeglabError(f"{target} already exists (choose another file, or pass --overwrite)")
        if target.exists() and not _is_ours(target):
            raise SeglabError(
                f"{target} exists and was not written by seglab report; --overwrite replaces only "
                "a report or review queue seglab wrote (choose another file)"
            )
    data = build_report(store_path, manifest=manifest, sample=sample, queue=queue)
    text = render_html(data, Store(store_path))
    size = write_atomic(Path(out), text)
    if queue_out is not None:
        write_atomic(Path(queue_out), queue_csv(data.overlays.queue))
    return {
        "path": str(out),
        "bytes": size,
        "sample": len(data.overlays.sample),
        "queue": len(data.overlays.queue),
        "seconds": time.perf_counter() - started,
        "data": data,
    }
