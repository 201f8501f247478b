"""Everything the terminal shows: progress bars, tables, one-line errors (rich)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from seglab.pipeline.base.errors import ManifestError
from seglab.pipeline.bench.results import REFINE, SELECT, QualityRow
from seglab.pipeline.evaluation.evaluate import Evaluation
from seglab.pipeline.records import RunOptions, RunReport, StageReport
from seglab.pipeline.status import StageStatus
from seglab.pipeline.units import UnlabelledImages

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
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
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
        if report.failures:
            note += f", [red]{len(report.failures)} failed[/red]"
        if report.blocked:
            note += f", [yellow]{report.blocked} waiting on upstream[/yellow]"
        self.bars.update(self.tasks[stage], rate=note)


@dataclass(frozen=True)
class Rerun:
    """How the user named the run on the command line: the manifest argument as typed and
    the ``--store`` given, if any; the commands suggested next repeat them."""

    manifest: str
    store: str | None = None
    selection: tuple[str, ...] = ()
    """The run's own flags as typed (``run_flags``): what a dry run's suggested command repeats."""

    def command(self, name: str, *extra: str) -> str:
        """``seglab <name> <manifest> [--store S] <extra>``, quoted for a POSIX shell."""
        store = ["--store", str(self.store)] if self.store else []
        return shlex.join(["seglab", name, self.manifest, *store, *extra])


def run_flags(options: RunOptions) -> tuple[str, ...]:
    """``--from``, ``--only``, ``--force`` (each) and ``--address`` of a run, as command-line words."""
    given = [
        ("--from", options.start),
        ("--only", options.only),
        *(("--force", f) for f in options.force),
        ("--address", options.address),
    ]
    return tuple(word for flag, value in given if value is not None for word in (flag, value))


def _plan_table(report: RunReport) -> Table:
    table = Table("stage", "total", "done", "to do", "blocked", "why", title="plan (dry run)")
    for s in report.stages:
        table.add_row(
            escape(s.stage), str(s.total), str(s.already_done), str(s.todo), str(s.blocked), escape("; ".join(s.why))
        )
    return table


def next_steps(report: RunReport, rerun: Rerun) -> str:
    """What exists and what to do next: the labels' commands, or how to finish a run that
    failed or left units waiting."""
    failed = sum(len(s.failures) for s in report.stages)
    waiting = sum(s.blocked for s in report.stages)
    if failed:
        return (
            f"{failed} unit(s) failed (reasons above). Next: fix them and rerun {rerun.command('run')}; finished "
            f"work is kept. {rerun.command('status', '--json')} lists the failures."
        )
    if waiting:
        return (
            f"{waiting} unit(s) wait on stages this run did not finish. Next: {rerun.command('status')} "
            f"shows them; {rerun.command('run')} runs every stage."
        )
    store = shlex.quote(report.store)
    return (
        f"Labels in {report.store}. Next: {rerun.command('status')} · "
        f"seglab export {store} --format png --out labels · seglab report {store} --out report.html"
    )


def run_summary(report: RunReport, rerun: Rerun) -> None:
    """After ``seglab run``: the plan of a dry run, else warnings and failures, then what to do next."""
    if report.dry_run:
        console.print(_plan_table(report))
        console.print(
            f"Dry run: nothing was written. To run it: {rerun.command('run', *rerun.selection)}", markup=False
        )
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
    if report.ok:
        console.print(next_steps(report, rerun), markup=False)
    else:
        errors.print(f"[red]{escape(next_steps(report, rerun))}[/red]")


def status_table(rows: Sequence[StageStatus], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    table = Table("stage", "done", "total", "failed", "blocked", "signature", "seconds")
    for r in rows:
        sig = {"current": "[green]current[/green]", "stale": "[red]stale[/red]", "none": "-"}[r.signature]
        table.add_row(
            r.stage,
            str(r.done),
            str(r.total),
            str(r.failed),
            str(r.blocked),
            sig,
            "" if r.seconds is None else f"{r.seconds:.1f}",
        )
    console.print(table)
    for r in rows:
        for change in r.changes:
            console.print(f"[red]{r.stage}[/red] changed: {change}")
        for warning in r.warnings:
            errors.print(f"[yellow]{r.stage}: {warning}[/yellow]")
        if r.fit_summary:
            console.print(f"{r.stage}: {r.fit_summary}")


def manifest_problems(exc: ManifestError) -> None:
    errors.print(f"[red]{exc.path}: invalid manifest[/red]")
    for loc, msg in exc.problems:
        errors.print(f"  [bold]{loc or '(top)'}[/bold]: {msg}")


def error(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}")


def unlabelled_images(found: UnlabelledImages, examples: int = 3) -> None:
    """One warning line for listed images without a weak label (none: nothing)."""
    if not found.images:
        return
    shown = ", ".join(found.images[:examples]) + (", ..." if len(found.images) > examples else "")
    errors.print(
        f"[yellow]warning[/yellow]: {len(found.images)} of {found.total} images have no weak label "
        f"({escape(found.absent)}): {escape(shown)}; `seglab run` fails each of them at ingest"
    )


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
    table = Table(
        Column("source", no_wrap=True),
        "images",
        "missing",
        "mIoU",
        "pixel acc",
        "labelled",
        "acc on labelled",
        title=f"label quality (%) on {result.images} evaluation images",
    )
    for r in result.sources:
        s = r.scores
        table.add_row(
            r.source,
            str(r.evaluated),
            str(len(r.missing)),
            _pct(s.miou),
            _pct(s.pixel_accuracy),
            _pct(s.labelled_fraction),
            _pct(s.labelled_accuracy),
        )
    console.print(table)
    for r in result.sources:
        if r.measures:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.measures.items())
            console.print(f"{r.source}: {shown} (mean over its {r.evaluated} images)")
        if r.stale:
            console.print(
                f"[yellow]{r.source}[/yellow]: the store's outputs were made with other settings and are "
                "not evaluated (`seglab status` names the change)"
            )
    per_class = Table("class", *(r.source for r in result.sources), title="IoU % per class")
    for k, name in enumerate(result.class_names):
        per_class.add_row(name, *(_pct(r.scores.iou[k]) for r in result.sources))
    console.print(per_class)


def _points(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.1f}"


def quality_table(rows: Sequence[QualityRow], as_json: bool) -> None:
    """Per manifest: mIoU of each classical baseline (GrabCut for boxes only), select and refine,
    refine − the best baseline, refine's uncertainty AUROC, and seconds per image of select + refine
    and of the best baseline."""
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    names = {
        "nearest": "nearest",
        "random_walker": "random walker",
        "superpixel_walker": "superpixel walker",
        "dense_crf": "dense CRF",
        "grabcut": "GrabCut",
    }
    table = Table(
        Column("dataset", no_wrap=True),
        Column("kind", no_wrap=True),
        "images",
        *names.values(),
        "select",
        "refine",
        "refine − best",
        "AUROC",
        "s/img select+refine",
        "s/img best",
        title="mIoU % (the best baseline in bold; refine − best: refine − the best baseline, in points; "
        "AUROC: refine's uncertainty against its errors; s/img: mean seconds per image)",
    )
    for r in rows:
        select = r.source(SELECT)
        images = f"{select.evaluated}/{r.evaluation.images}" if select else f"0/{r.evaluation.images}"
        auroc = "-" if math.isnan(r.uncertainty_auroc) else f"{r.uncertainty_auroc:.3f}"
        best = r.best_baseline
        cells = []
        for name in names:
            if name not in r.baselines:
                cells.append("—")
            else:
                cell = _pct(r.miou(name))
                cells.append(f"[bold]{cell}[/bold]" if name == best else cell)
        best_seconds = r.seconds_per_image(best) if best else float("nan")
        table.add_row(
            r.dataset,
            r.kind,
            images,
            *cells,
            _pct(r.miou(SELECT)),
            _pct(r.miou(REFINE)),
            _points(r.refine_minus_best_baseline),
            auroc,
            _per_image(r.pipeline_seconds),
            f"{_per_image(best_seconds)} ({names[best]})" if best else "-",
        )
    console.print(table)
    for r in rows:
        for name, result in r.baselines.items():
            if result.unavailable:
                console.print(
                    f"[yellow]{r.dataset} {r.kind}: {names.get(name, name)} not measured[/yellow]: "
                    f"{escape(result.unavailable)}"
                )
        if r.failed:
            errors.print(f"[red]{r.manifest}: {r.failed} unit(s) failed; `seglab status` lists them[/red]")


def _per_image(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.3g}"


def conformal_table(result: dict, as_json: bool) -> None:
    """Per alpha: test miscoverage (mean ± std over splits), kept pixels, their accuracy."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(
        "alpha",
        "miscoverage",
        "kept pixels",
        "kept accuracy",
        "threshold",
        title=f"{result['method']} over {result['splits']} random splits: {result['calibration']} "
        f"calibration / {result['test']} test images",
    )
    for alpha, row in result["alphas"].items():
        s = row["summary"]
        table.add_row(
            alpha,
            f"{s['miscoverage']['mean']:.4f} ± {s['miscoverage']['std']:.4f}",
            f"{100 * s['kept']['mean']:.1f} %",
            f"{100 * s['kept_accuracy']['mean']:.2f} %",
            f"{s['threshold']['mean']:.4f}",
        )
    console.print(table)


def retrain_table(result: dict, as_json: bool) -> None:
    """Per round: label and segmenter mIoU; then the ground-truth segmenter and the ratio."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(
        "trained on",
        "label mIoU %",
        "segmenter mIoU %",
        "of ground truth's",
        "train s",
        title=f"{result['architecture']}, {result['epochs']} epochs, {result['training_images']} training "
        f"images, scored on {result['evaluation_images']} evaluation images",
    )
    for r in result["rounds"]:
        seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        table.add_row(
            f"round {r['round']} labels", _pct(r["label_miou"]), _pct(r["segmenter_miou"]), _pct(r["ratio"]), seconds
        )
    truth = result["ground_truth"]
    table.add_row("ground truth", "100.0", _pct(truth["segmenter_miou"]), "100.0", f"{truth['train_seconds']:.0f}")
    console.print(table)


def export_summary(meta: dict, out) -> None:
    """What was written where, then a line for each kind of image left out: dropped by the
    filters, damaged (skipped), and not finished by the run (naming the first few, with the
    stage and error that stopped them)."""
    written = meta["written"]
    extra = f", {written['annotations']} region annotations" if "annotations" in written else ""
    console.print(
        f"wrote {written['images']} images of [bold]{meta['stage']}[/bold] (round {meta['round']}) "
        f"as {meta['format']} to {out}{extra}"
    )
    if meta["dropped"]:
        console.print(
            f"dropped {len(meta['dropped'])} images with more than {meta['filters']['max_uncertain']:.0%} "
            f"uncertain pixels (listed in export.json)"
        )
    if meta["damaged"]:
        console.print(
            f"[yellow]skipped {len(meta['damaged'])} images whose stored arrays are missing or damaged"
            f"[/yellow] (listed in export.json as 'damaged'; `seglab run` redoes them)",
            highlight=False,
        )
    failed = meta["failed"]
    if failed:
        console.print(
            f"[yellow]{len(failed)} images of the run have no finished {meta['stage']} labels and are not "
            f"exported[/yellow] (all listed in export.json as 'failed'):",
            highlight=False,
        )
        for f in failed[:5]:
            why = f"failed: {f['error']}" if f["error"] else "not finished"
            console.print(f"  {f['unit']}: {f['stage']} {why}", markup=False, highlight=False)
        if len(failed) > 5:
            console.print(f"  … and {len(failed) - 5} more", highlight=False)


def plan_table(result: dict, as_json: bool) -> None:
    """``bench plan``: one row per stage, then the totals."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("stage", "plan s", "to do", "shards to do", "blocked", "why")
    for s in result["stages"]:
        why = ", ".join(f"{n} {reason}" for reason, n in s["reasons"].items())
        table.add_row(
            s["stage"], f"{s['plan_seconds']:.2f}", str(s["todo"]), str(s["shards_to_do"]), str(s["blocked"]), why
        )
    console.print(table)
    console.print(
        f"{result['units']:,} units in {result['shards']:,} shards: planning every stage took "
        f"{result['planning_seconds']:.1f} s (index {result['index_seconds']:.1f} s), peak memory "
        f"{result['peak_rss_bytes'] / 2**30:.2f} GiB"
    )


def scale_table(result: dict, as_json: bool) -> None:
    """``bench scale``: one row per run, the ratios, then per stage of the largest run its
    rate and the framework's own cost."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(
        "images",
        "workers",
        "wall s",
        "Ray start s",
        "map s",
        "img/s",
        "objects/img",
        "driver peak MiB",
        "worker peak MiB",
    )
    for r in result["runs"]:
        table.add_row(
            str(r["images"]),
            str(r["workers"]),
            f"{r['seconds']:.1f}",
            f"{r['ray_start_seconds']:.1f}",
            f"{r['map_seconds']:.1f}",
            f"{r['images_per_second']:.2f}",
            f"{r['objects_per_image']:.3f}",
            f"{r['driver_peak_rss'] / 2**20:.0f}",
            f"{(r['worker_peak_rss'] or 0) / 2**20:.0f}",
        )
    console.print(table)
    for key in ("driver_memory_ratio", "worker_memory_ratio", "worker_speedup"):
        if key in result:
            console.print(f"{key.replace('_', ' ')}: {result[key]}")
    largest = max(result["runs"], key=lambda r: (r["images"], r["workers"]))
    stages = Table(
        "stage",
        "img/s",
        "overhead_ms_per_unit",
        title=f"{largest['images']} images, {largest['workers']} workers",
    )
    for name, figures in largest["stages"].items():
        rate, overhead = figures["images_per_second"], figures["overhead_ms_per_unit"]
        stages.add_row(name, "-" if rate is None else f"{rate:.1f}", "-" if overhead is None else f"{overhead:.2f}")
    console.print(stages)
