"""Everything the terminal shows: progress bars, tables, one-line errors (rich)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from seglab.pipeline.bench_quality import REFINE, SELECT, QualityRow
from seglab.pipeline.errors import ManifestError
from seglab.pipeline.evaluate import NEAREST, WEAK, Evaluation
from seglab.pipeline.runner import RunReport, StageReport
from seglab.pipeline.status import StageStatus

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


class RichProgress:
    """One bar per stage: done/total, rate, ETA."""

    def __init__(self) -> None:
        self.bars = Progress(
            TextColumn("[bold]{task.fields[stage]:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def start(self, stage: str, total: int, done: int) -> None:
        self.tasks[stage] = self.bars.add_task("", total=total, completed=done, stage=stage, rate="")

    def advance(self, stage: str, count: int) -> None:
        task = self.bars.tasks[self.tasks[stage]]
        speed = task.speed
        self.bars.update(self.tasks[stage], advance=count, rate=f"{speed:.1f} img/s" if speed else "")

    def note(self, stage: str, text: str) -> None:
        self.bars.console.print(f"[bold]{stage}[/bold]: {text}")

    def finish(self, stage: str, report: StageReport) -> None:
        note = "nothing to do" if not report.todo else f"{report.done_now} done in {report.seconds:.1f}s"
        if report.adopted:
            note += f", {report.adopted} recovered from an interrupted run"
        if report.failures:
            note += f", [red]{len(report.failures)} failed[/red]"
        if report.blocked:
            note += f", [yellow]{report.blocked} waiting on upstream[/yellow]"
        self.bars.update(self.tasks[stage], rate=note)


def run_summary(report: RunReport) -> None:
    if report.dry_run:
        table = Table("stage", "total", "done", "to do", "blocked", title="plan (dry run)")
        for s in report.stages:
            table.add_row(s.stage, str(s.total), str(s.already_done), str(s.todo), str(s.blocked))
        console.print(table)
        return
    if report.work_done == 0 and report.ok:
        console.print(f"Nothing to do: every stage is complete in {report.store}.")
    for s in report.stages:
        for warning in s.warnings:
            errors.print(f"[yellow]{s.stage}: {warning}[/yellow]")
        for unit, reason in s.failures:
            errors.print(f"[red]{s.stage}: {unit}: {reason}[/red]")
        if s.resubmitted:
            errors.print(f"[yellow]{s.stage}: {s.resubmitted} unit(s) run again after their worker was lost[/yellow]")
        for unit, path in s.invalidated:
            errors.print(f"[yellow]{s.stage}: {unit}: stored {path} was damaged; it was recomputed[/yellow]")
    if not report.ok:
        failed = sum(len(s.failures) for s in report.stages)
        errors.print(f"[red]{failed} unit(s) failed; rerun after fixing them to finish the rest.[/red]")
    elif report.work_done:
        console.print(f"Done. Store: {report.store}")


def status_table(rows: Sequence[StageStatus], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table("stage", "done", "total", "failed", "signature", "seconds")
    for r in rows:
        sig = {"current": "[green]current[/green]", "stale": "[red]stale[/red]", "none": "-"}[r.signature]
        table.add_row(r.stage, str(r.done), str(r.total), str(r.failed), sig, "" if r.seconds is None else f"{r.seconds:.1f}")
    console.print(table)
    for r in rows:
        for change in r.changes:
            console.print(f"[red]{r.stage}[/red] changed: {change}")
        if r.fit_summary:
            console.print(f"{r.stage}: {r.fit_summary}")


def manifest_problems(exc: ManifestError) -> None:
    errors.print(f"[red]{exc.path}: invalid manifest[/red]")
    for loc, msg in exc.problems:
        errors.print(f"  [bold]{loc or '(top)'}[/bold]: {msg}")


def error(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}")


def figures(values: dict, as_json: bool) -> None:
    """A flat mapping of measured figures, as JSON or a two-column table."""
    if as_json:
        print(json.dumps(values, indent=2))
        return
    table = Table("figure", "value")
    for key, value in values.items():
        table.add_row(key, str(value))
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def evaluation_tables(result: Evaluation, as_json: bool) -> None:
    """One row per label source, then per-class IoU (classes as rows, sources as columns)."""
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    table = Table(Column("source", no_wrap=True), "images", "missing", "mIoU", "pixel acc", "labelled",
                  "acc on labelled", title=f"label quality (%) on {result.images} evaluation images")
    for r in result.sources:
        s = r.scores
        table.add_row(r.source, str(r.evaluated), str(len(r.missing)), _pct(s.miou), _pct(s.pixel_accuracy),
                      _pct(s.labelled_fraction), _pct(s.labelled_accuracy))
    console.print(table)
    for r in result.sources:
        if r.measures:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.measures.items())
            console.print(f"{r.source}: {shown} (mean over its {r.evaluated} images)")
        if r.stale:
            console.print(f"[yellow]{r.source}[/yellow]: the store's outputs were made with other settings and are "
                          "not evaluated (`seglab status` names the change)")
    per_class = Table("class", *(r.source for r in result.sources), title="IoU % per class")
    for k, name in enumerate(result.class_names):
        per_class.add_row(name, *(_pct(r.scores.iou[k]) for r in result.sources))
    console.print(per_class)


def _points(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.1f}"


def quality_table(rows: Sequence[QualityRow], as_json: bool) -> None:
    """Per manifest: mIoU of weak labels, the nearest-label baseline, select and refine, the gains,
    refine's uncertainty AUROC, wall time."""
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table(Column("dataset", no_wrap=True), Column("kind", no_wrap=True), "images", "weak", "nearest",
                  "select", "gain", "refine", "Δ refine", "AUROC", "wall s",
                  title="mIoU % (gain: select − nearest-label; Δ refine: refine − select, in points; "
                        "AUROC: refine's uncertainty against its errors)")
    for r in rows:
        select = r.source(SELECT)
        images = f"{select.evaluated}/{r.evaluation.images}" if select else f"0/{r.evaluation.images}"
        auroc = "-" if math.isnan(r.uncertainty_auroc) else f"{r.uncertainty_auroc:.3f}"
        table.add_row(r.dataset, r.kind, images, _pct(r.miou(WEAK)), _pct(r.miou(NEAREST)), _pct(r.miou(SELECT)),
                      _points(r.gain_points), _pct(r.miou(REFINE)), _points(r.refine_points), auroc,
                      f"{r.seconds['total']:.0f}")
    console.print(table)
    for r in rows:
        if r.failed:
            errors.print(f"[red]{r.manifest}: {r.failed} unit(s) failed; `seglab status` lists them[/red]")


def conformal_table(result: dict, as_json: bool) -> None:
    """Per alpha: test miscoverage (mean ± std over splits), kept pixels, their accuracy."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("alpha", "miscoverage", "kept pixels", "kept accuracy", "threshold",
                  title=f"{result['method']} over {result['splits']} random splits: {result['calibration']} "
                        f"calibration / {result['test']} test images")
    for alpha, row in result["alphas"].items():
        s = row["summary"]
        table.add_row(alpha, f"{s['miscoverage']['mean']:.4f} ± {s['miscoverage']['std']:.4f}",
                      f"{100 * s['kept']['mean']:.1f} %", f"{100 * s['kept_accuracy']['mean']:.2f} %",
                      f"{s['threshold']['mean']:.4f}")
    console.print(table)


def retrain_table(result: dict, as_json: bool) -> None:
    """Per round: label and segmenter mIoU; then the ground-truth segmenter and the ratio."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("trained on", "label mIoU %", "segmenter mIoU %", "of ground truth's", "train s",
                  title=f"{result['architecture']}, {result['epochs']} epochs, {result['training_images']} training "
                        f"images, scored on {result['evaluation_images']} evaluation images")
    for r in result["rounds"]:
        seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        table.add_row(f"round {r['round']} labels", _pct(r["label_miou"]), _pct(r["segmenter_miou"]),
                      _pct(r["ratio"]), seconds)
    truth = result["ground_truth"]
    table.add_row("ground truth", "100.0", _pct(truth["segmenter_miou"]), "100.0", f"{truth['train_seconds']:.0f}")
    console.print(table)


def export_summary(meta: dict, out) -> None:
    """One line per export: what was written where, and what the filters dropped."""
    written = meta["written"]
    extra = f", {written['annotations']} region annotations" if "annotations" in written else ""
    console.print(f"wrote {written['images']} images of [bold]{meta['stage']}[/bold] (round {meta['round']}) "
                  f"as {meta['format']} to {out}{extra}")
    if meta["dropped"]:
        console.print(f"dropped {len(meta['dropped'])} images with more than {meta['filters']['max_uncertain']:.0%} "
                      f"uncertain pixels (listed in export.json)")
    if meta["unfinished"]:
        console.print(f"[yellow]{len(meta['unfinished'])} images of the run have no finished {meta['stage']} "
                      f"labels and are not exported[/yellow] (listed in export.json as 'unfinished')")


def scale_table(result: dict, as_json: bool) -> None:
    """``bench scale``: one row per run, then the ratios."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("images", "workers", "wall s", "map s", "img/s", "driver peak MiB", "worker peak MiB")
    for r in result["runs"]:
        table.add_row(str(r["images"]), str(r["workers"]), f"{r['seconds']:.1f}", f"{r['map_seconds']:.1f}",
                      f"{r['images_per_second']:.2f}", f"{r['driver_peak_rss'] / 2**20:.0f}",
                      f"{(r['worker_peak_rss'] or 0) / 2**20:.0f}")
    console.print(table)
    for key in ("driver_memory_ratio", "worker_memory_ratio", "worker_speedup"):
        if key in result:
            console.print(f"{key.replace('_', ' ')}: {result[key]}")
