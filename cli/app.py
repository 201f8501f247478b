"""The ``seglab`` command line (typer). Each command parses, calls the pipeline, renders."""

from __future__ import annotations

import functools
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from seglab.pipeline.base.errors import ManifestError, SeglabError, StorageError, UsageError, os_error_cause
from seglab.pipeline.exports.formats import format_help

STAGE_NAMES = "{stages}"
"""Stands in an option's help for the names of the stages; filled in only when the help
is shown, since the registry imports every stage (about a second)."""


def stage_names() -> str:
    """The stages by name in run order, the first rounds' included: 'ingest, …, refine.1, …'."""
    from seglab.pipeline.core.registry import STAGES, round_stages

    return ", ".join(dict.fromkeys([*STAGES, *round_stages(2)])) + " …"


class Engine(StrEnum):
    """What runs a bench's map stages: the manifest setting ``ray.engine``."""

    pool = "pool"
    data = "data"


class _NamedArgument(TyperArgument):
    """An argument shown by its name and help alone: typer (0.29) prints an argument's
    ``<type>`` even when it has a metavar, and builds arguments of its own class."""

    def display_type_rich(self, ctx) -> None:
        return None


def _plain(params) -> None:
    """Make ``params`` read as the command line is typed: flags bare (no ``<bool>``),
    arguments by name, options by their metavar; fill in the stage names."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
        elif isinstance(param, TyperArgument):
            param.__class__ = _NamedArgument
        if param.help and STAGE_NAMES in param.help:
            param.help = param.help.replace(STAGE_NAMES, stage_names())


class HelpCommand(TyperCommand):
    """A command whose --help shows its parameters as they are typed (see ``_plain``)."""

    def format_help(self, ctx, formatter) -> None:
        _plain(self.get_params(ctx))
        super().format_help(ctx, formatter)


class HelpGroup(TyperGroup):
    """A command group whose --help shows its options as they are typed (see ``_plain``)."""

    def format_help(self, ctx, formatter) -> None:
        _plain(self.get_params(ctx))
        super().format_help(ctx, formatter)


def examples(*lines: str) -> str:
    """A help epilog: an 'Examples' heading over command lines (no '[': rich markup)."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=HelpGroup,
    help="Weak labels in, dense labels with uncertainty out.",
    epilog=examples(
        "seglab run demo",
        "seglab status demo",
        "seglab export runs/demo.zarr --format png --out labels",
        "seglab report runs/demo.zarr --out report.html",
    ),
)
state = {"verbose": False}


def handled(command):
    """Print SeglabErrors as one red line (traceback with --verbose); exit 2 for manifests."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from seglab.cli import render

        try:
            return command(*args, **kwargs)
        except ManifestError as exc:
            render.manifest_problems(exc)
            raise typer.Exit(2) from None
        except SeglabError as exc:
            if state["verbose"]:
                raise
            render.error(str(exc))
            raise typer.Exit(2 if isinstance(exc, UsageError) else 1) from None
        except OSError as exc:  # a full disk or an unwritable folder outside a run's own handling
            if state["verbose"] or (cause := os_error_cause(exc)) is None:
                raise
            render.error(str(StorageError.from_os_error(cause, "")))
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False) -> None:
    state["verbose"] = verbose


def _manifest(path: str, store: str | None = None):
    from seglab.pipeline.manifest import open_manifest

    return open_manifest(path, store=store)


ManifestArg = Annotated[str, typer.Argument(help="Manifest YAML file, or 'demo' for the embedded demo.")]
StoreOption = Annotated[
    str | None,
    typer.Option(metavar="PATH|URL", help="Store folder or s3://, gs:// URL (overrides the manifest)."),
]


@app.command(
    cls=HelpCommand,
    epilog=examples(
        "seglab run demo",
        "seglab run manifest.yaml --dry-run",
        "seglab run manifest.yaml --force select",
        "seglab run manifest.yaml --only refine",
        "seglab run manifest.yaml --address head-node:6379",
    ),
)
@handled
def run(
    manifest: ManifestArg,
    store: StoreOption = None,
    from_: Annotated[
        str | None,
        typer.Option("--from", metavar="STAGE", help=f"Run this stage and every stage after it ({STAGE_NAMES})."),
    ] = None,
    only: Annotated[str | None, typer.Option(metavar="STAGE", help=f"Run only this stage ({STAGE_NAMES}).")] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            metavar="STAGE", help=f"Recompute this stage and everything downstream (repeatable; {STAGE_NAMES})."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan per stage; write nothing.")] = False,
    address: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="Join this Ray cluster (default: start Ray on this machine)."),
    ] = None,
) -> None:
    """Run the pipeline; finished work is kept and skipped."""
    from seglab.cli import render
    from seglab.pipeline.runner import Runner, RunOptions

    options = RunOptions(start=from_, only=only, force=tuple(force or ()), dry_run=dry_run, address=address)
    loaded = _manifest(manifest, store)
    if dry_run:  # no progress bars: nothing runs
        report = Runner(loaded, options).run()
    else:
        with render.RichProgress() as progress:
            report = Runner(loaded, options, progress).run()
    render.run_summary(report, render.Rerun(manifest, store, render.run_flags(options)))
    if not report.ok and not dry_run:
        raise typer.Exit(1)


@app.command(cls=HelpCommand, epilog=examples("seglab status demo", "seglab status manifest.yaml --json"))
@handled
def status(
    manifest: ManifestArg,
    store: StoreOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per stage: done, total, failed, and whether stored outputs match the manifest."""
    from seglab.cli import render
    from seglab.pipeline.status import store_status

    render.status_table(store_status(_manifest(manifest, store)), json_)


@app.command(cls=HelpCommand, epilog=examples("seglab validate manifest.yaml", "seglab validate demo"))
@handled
def validate(manifest: ManifestArg) -> None:
    """Check a manifest; every problem is listed with its location (exit 2 if any)."""
    from seglab.cli import render
    from seglab.pipeline.units import enumerate_units, unlabelled_images

    loaded = _manifest(manifest)
    units = enumerate_units(loaded)
    render.console.print(f"[green]valid[/green]: {manifest} ({len(units)} images)")
    render.unlabelled_images(unlabelled_images(loaded, units))


@app.command(
    cls=HelpCommand,
    epilog=examples(
        "seglab export runs/demo.zarr --format png --out labels",
        "seglab export runs/demo.zarr --format coco --max-uncertain 0.2 --out labels-coco",
        "seglab export runs/demo.zarr --format parquet --embed-images --split training --out labels-parquet",
    ),
)
@handled
def export(
    store: Annotated[str, typer.Argument(help="Store written by `seglab run`: a folder or an s3://, gs:// URL.")],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder (created atomically).")],
    format_: Annotated[str, typer.Option("--format", metavar="FORMAT", help=format_help())] = "png",
    round_: Annotated[
        int | None, typer.Option("--round", min=0, metavar="N", help="Export this round's refine.")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(metavar="STAGE", help="Export this stage's labels (default: the last round's refine)."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(metavar="SPLIT", help="Only this split's images: training, calibration or evaluation."),
    ] = None,
    max_uncertain: Annotated[
        float | None,
        typer.Option(metavar="F", help="Drop images whose share of uncertain pixels exceeds this (0..1)."),
    ] = None,
    uncertain_above: Annotated[
        float, typer.Option(metavar="U", help="A pixel is uncertain at or above this uncertainty.")
    ] = 0.5,
    ignore_value: Annotated[int, typer.Option(metavar="V", help="Value of unlabelled pixels in the export.")] = 255,
    uncertainty: Annotated[
        str, typer.Option(metavar="png|npy", help="png format: uncertainty as 8-bit png or float16 npy.")
    ] = "png",
    embed_images: Annotated[bool, typer.Option(help="parquet format: store image file bytes, not only paths.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output folder if it is an unchanged seglab export.")
    ] = False,
    skip_damaged: Annotated[
        bool, typer.Option(help="Export the other images when some stored arrays are damaged (listed in export.json).")
    ] = False,
) -> None:
    """Write a stage's labels and uncertainty as a dataset other trainers load directly."""
    from seglab.cli import render
    from seglab.pipeline.exports.export import export as write_export
    from seglab.pipeline.exports.formats import ExportOptions

    options = ExportOptions(
        format=format_,
        stage=stage,
        round=round_,
        split=split,
        max_uncertain=max_uncertain,
        uncertain_above=uncertain_above,
        ignore_value=ignore_value,
        uncertainty_format=uncertainty,
        embed_images=embed_images,
        overwrite=overwrite,
        skip_damaged=skip_damaged,
    )
    render.export_summary(write_export(store, out, options), out)


@app.command(cls=HelpCommand, epilog=examples("seglab evaluate manifest.yaml", "seglab evaluate manifest.yaml --json"))
@handled
def evaluate(
    manifest: ManifestArg,
    store: StoreOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Score the weak labels, the nearest-label baseline and every stage's labels against data.evaluation."""
    from seglab.cli import render
    from seglab.pipeline.evaluation.evaluate import evaluate as score

    render.evaluation_tables(score(_manifest(manifest, store)), json_)


@app.command(
    cls=HelpCommand,
    epilog=examples(
        "seglab report runs/demo.zarr --out report.html",
        "seglab report runs/demo.zarr --out report.html --queue 50 --queue-out queue.csv --overwrite",
    ),
)
@handled
def report(
    store: Annotated[str, typer.Argument(help="Store written by `seglab run`: a folder or an s3://, gs:// URL.")],
    out: Annotated[Path, typer.Option(metavar="FILE", help="HTML file to write (self-contained).")],
    manifest: Annotated[
        str | None,
        typer.Option(
            metavar="FILE", help="Manifest with the gold sets (default: the one the store records, if it exists)."
        ),
    ] = None,
    sample: Annotated[int, typer.Option(min=0, metavar="N", help="Images shown, evenly over the units.")] = 6,
    queue: Annotated[int, typer.Option(min=0, metavar="N", help="Most uncertain images in the review queue.")] = 12,
    queue_out: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Also write the review queue to this CSV file.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """One HTML page showing, in pictures, whether a run's labels can be trusted."""
    from seglab.cli import render
    from seglab.pipeline.report.html import write_report

    written = write_report(
        store, out, manifest=manifest, sample=sample, queue=queue, queue_out=queue_out, overwrite=overwrite
    )
    render.console.print(
        f"wrote {written['path']} ({written['bytes'] / 1024:.0f} KB): {written['sample']} sample "
        f"and {written['queue']} review-queue images in {written['seconds']:.1f}s"
    )


@app.command(
    "simulate-weak",
    cls=HelpCommand,
    epilog=examples(
        "seglab simulate-weak --masks gold --kind scribbles --out weak/scribbles",
        "seglab simulate-weak --masks camvid/trainannot --images camvid/train --kind points --ignore 11 "
        "--list train.txt --out weak/points",
        "seglab simulate-weak --masks gold --kind boxes --limit 20 --out weak/boxes-20",
        "seglab simulate-weak --masks grabcut/masks --kind boxes --background 0 --ignore 128 --out weak/boxes",
    ),
)
@handled
def simulate_weak(
    masks: Annotated[Path, typer.Option(metavar="DIR", help="Folder of ground-truth class-id masks.")],
    kind: Annotated[str, typer.Option(metavar="KIND", help="points, scribbles, coarse or boxes.")],
    out: Annotated[Path, typer.Option(metavar="DIR", help="New folder for the weak labels.")],
    seed: Annotated[int, typer.Option(metavar="N", help="Same seed, same weak labels.")] = 0,
    ignore: Annotated[
        list[int] | None, typer.Option(metavar="ID", help="Mask values that are not classes (repeatable).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Image folder, to name table rows by image file.")
    ] = None,
    unlabelled: Annotated[
        int, typer.Option(min=0, max=65535, metavar="V", help="Label-map value for 'no label' (scribbles, coarse).")
    ] = 255,
    list_: Annotated[
        Path | None,
        typer.Option(
            "--list",
            metavar="FILE",
            help="Only the masks named in this file: one image or mask file name, or stem, a line.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, metavar="N", help="Only the first N masks (by name).")] = None,
    background: Annotated[
        int | None,
        typer.Option(metavar="ID", help="Boxes only: the class whose components get no box (what no box covers)."),
    ] = None,
) -> None:
    """Derive weak labels from ground-truth masks the way weakly supervised papers do."""
    from seglab.cli import render
    from seglab.pipeline.evaluation.simulate import read_names
    from seglab.pipeline.evaluation.simulate import simulate_weak as simulate

    names = read_names(list_) if list_ else None
    with render.RichProgress() as progress:
        count = simulate(
            masks=masks,
            kind=kind,
            out=out,
            seed=seed,
            ignore=tuple(ignore or ()),
            images=images,
            unlabelled=unlabelled,
            names=names,
            limit=limit,
            progress=progress,
            background=background,
        )
    render.console.print(f"wrote {kind} for {count} masks to {out}")


bench = typer.Typer(
    help="Benchmarks (measurements, not tests).",
    no_args_is_help=True,
    cls=HelpGroup,
    epilog=examples("seglab bench quality --limit 10", "seglab bench rerun --json"),
)
app.add_typer(bench, name="bench")


@bench.command("encoder", cls=HelpCommand, epilog=examples("seglab bench encoder --model vit_b --images 8 --json"))
@handled
def bench_encoder(
    backend: Annotated[str, typer.Option(metavar="NAME", help="Backend to measure.")] = "sam",
    model: Annotated[
        str, typer.Option(metavar="MODEL", help="SAM encoder: vit_b, vit_l or vit_h (random weights).")
    ] = "vit_b",
    images: Annotated[int, typer.Option(min=1, metavar="N", help="Images (480x640, random).")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Images per encoder call.")] = 2,
    precision: Annotated[str, typer.Option(metavar="PRECISION", help="auto, bf16, fp16 or fp32.")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Images/s through the embed stage vs a bare encoder forward, GFLOP/s, bytes stored."""
    from seglab.cli import render
    from seglab.workers.bench.encoder import bench_encoder as measure

    if backend != "sam":
        raise SeglabError(f"bench encoder measures the 'sam' backend; got '{backend}'")
    render.figures(measure(model=model, images=images, batch_size=batch_size, precision=precision), json_)


@bench.command(
    "decode",
    cls=HelpCommand,
    epilog=examples("seglab bench decode", "seglab bench decode --prompts-per-image 64 --json"),
)
@handled
def bench_decode(
    model: Annotated[
        str, typer.Option(metavar="MODEL", help="SAM model: vit_b, vit_l or vit_h (random weights).")
    ] = "vit_b",
    images: Annotated[int, typer.Option(min=1, metavar="N", help="Images (480x640, synthetic).")] = 4,
    prompts_per_image: Annotated[
        int, typer.Option(min=1, max=4096, metavar="N", help="Prompts per image (from simulated scribbles).")
    ] = 32,
    prompt_batch: Annotated[
        int | None,
        typer.Option(min=1, max=4096, metavar="B", help="Prompts per decoder call (default: the backend's)."),
    ] = None,
    precision: Annotated[
        str, typer.Option(metavar="PRECISION", help="Encoder autocast of the pipeline: auto, bf16, fp16 or fp32.")
    ] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Prompts/s decoded by the pipeline from cached features vs the naive SamPredictor loop."""
    from seglab.cli import render
    from seglab.workers.bench.decode import bench_decode as measure

    if model not in ("vit_b", "vit_l", "vit_h"):
        raise SeglabError(f"bench decode measures SAM vit_b, vit_l or vit_h; got '{model}'")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise SeglabError(f"unknown precision '{precision}'; choose auto, bf16, fp16 or fp32")
    render.figures(
        measure(
            model=model, images=images, prompts_per_image=prompts_per_image, batch=prompt_batch, precision=precision
        ),
        json_,
    )


@bench.command(
    "quality",
    cls=HelpCommand,
    epilog=examples(
        "seglab bench quality", "seglab bench quality manifests/bench/camvid-scribbles.yaml --limit 20 --force select"
    ),
)
@handled
def bench_quality(
    manifests: Annotated[
        list[Path] | None,
        typer.Argument(help="Benchmark manifests (default: every manifests/bench/*.yaml of the source checkout)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, metavar="N", help="Only each manifest's first N images.")] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            metavar="STAGE", help=f"Recompute this stage and everything downstream (repeatable; {STAGE_NAMES})."
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Simulate weak labels, run, evaluate: mIoU and s/img of select, refine and classical baselines."""
    from seglab.cli import render
    from seglab.pipeline.bench.quality import bench_quality as measure
    from seglab.pipeline.bench.quality import default_manifests

    paths = manifests or default_manifests()
    forced = tuple(force or ())
    if json_:
        rows = measure(paths, limit=limit, force=forced)
    else:
        with render.RichProgress() as progress:
            rows = measure(paths, limit=limit, force=forced, progress=progress)
    render.quality_table(rows, json_)


@bench.command(
    "conformal",
    cls=HelpCommand,
    epilog=examples("seglab bench conformal manifests/bench/calibrated/camvid-scribbles.yaml --alpha 0.05 --alpha 0.1"),
)
@handled
def bench_conformal(
    manifest: ManifestArg,
    store: StoreOption = None,
    alpha: Annotated[list[float] | None, typer.Option(metavar="A", help="Target miscoverage (repeatable).")] = None,
    splits: Annotated[int, typer.Option(min=1, metavar="N", help="Random calibration/test splits.")] = 20,
    calibration: Annotated[int, typer.Option(min=1, metavar="N", help="Calibration images per split.")] = 50,
    method: Annotated[
        str, typer.Option(metavar="METHOD", help="risk-control, mondrian or pixel-split.")
    ] = "risk-control",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the splits.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fit conformal thresholds on random splits of the evaluation images; test miscoverage on the rest."""
    from seglab.cli import render
    from seglab.pipeline.bench.conformal import bench_conformal as measure
    from seglab.stages.parts.conformal import METHODS

    if method not in METHODS:
        raise SeglabError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    result = measure(
        _manifest(manifest, store),
        alphas=tuple(alpha or (0.05, 0.1)),
        splits=splits,
        calibration=calibration,
        method=method,
        seed=seed,
    )
    render.conformal_table(result, json_)


@bench.command(
    "retrain",
    cls=HelpCommand,
    epilog=examples(
        "seglab bench retrain manifests/bench/retrain/camvid-scribbles.yaml "
        "--gold-masks ../shared/data/camvid/trainannot --gold-ignore 11"
    ),
)
@handled
def bench_retrain(
    manifest: ManifestArg,
    gold_masks: Annotated[
        Path,
        typer.Option(
            metavar="DIR", help="Folder of gold masks of the training images, named by image stem (stem.png)."
        ),
    ],
    gold_ignore: Annotated[
        list[int] | None, typer.Option(metavar="V", help="Gold mask value not to learn from (repeatable).")
    ] = None,
    store: StoreOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Segmenter trained on seglab's labels against the same one trained on ground truth."""
    from seglab.cli import render
    from seglab.pipeline.bench.retrain import bench_retrain as measure

    loaded = _manifest(manifest, store)
    if json_:
        result = measure(loaded, gold_masks=gold_masks, gold_ignore=tuple(gold_ignore or ()))
    else:
        with render.RichProgress() as progress:
            result = measure(loaded, gold_masks=gold_masks, gold_ignore=tuple(gold_ignore or ()), progress=progress)
    render.retrain_table(result, json_)


@bench.command(
    "scale",
    cls=HelpCommand,
    epilog=examples("seglab bench scale --json", "seglab bench scale --images 200 --workers 1 --workers 2"),
)
@handled
def bench_scale(
    images: Annotated[list[int] | None, typer.Option(min=1, metavar="N", help="Dataset sizes (repeatable).")] = None,
    workers: Annotated[
        list[int] | None, typer.Option(min=1, metavar="N", help="Workers per stage (repeatable).")
    ] = None,
    folder: Annotated[Path, typer.Option(metavar="DIR", help="Where the synthetic images and the stores go.")] = Path(
        "runs/bench/scale"
    ),
    s3: Annotated[
        bool, typer.Option("--s3", help="Put the stores in a bucket of an S3 server started on 127.0.0.1 (moto).")
    ] = False,
    engine: Annotated[Engine, typer.Option(help="What runs the map stages (ray.engine).")] = Engine.pool,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Synthetic images through the whole DAG: wall time, images/s and the framework's own
    cost per stage, objects per image, peak memory of driver and workers, at each size and
    worker count."""
    from seglab.cli import render
    from seglab.pipeline.bench.s3server import s3_bucket_for
    from seglab.pipeline.bench.scale import bench_scale as measure

    sizes, counts = tuple(images or (200, 2000)), tuple(workers or (1, 2))
    if s3:
        with s3_bucket_for("bench-scale") as bucket:
            result = measure(folder, images=sizes, workers=counts, stores=f"{bucket}/scale", engine=engine.value)
    else:
        result = measure(folder, images=sizes, workers=counts, engine=engine.value)
    render.scale_table(result, json_)


@bench.command(
    "rerun", cls=HelpCommand, epilog=examples("seglab bench rerun --json", "seglab bench rerun manifest.yaml")
)
@handled
def bench_rerun(
    manifest: Annotated[str | None, typer.Argument(help="Manifest to run twice (default: synthetic images).")] = None,
    images: Annotated[int, typer.Option(min=1, metavar="N", help="Synthetic images when no manifest is given.")] = 200,
    folder: Annotated[Path, typer.Option(metavar="DIR", help="Where the synthetic images and the store go.")] = Path(
        "runs/bench/rerun"
    ),
    s3: Annotated[
        bool, typer.Option("--s3", help="Put the store in a bucket of an S3 server started on 127.0.0.1 (moto).")
    ] = False,
    engine: Annotated[Engine, typer.Option(help="What runs the map stages (ray.engine).")] = Engine.pool,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A run from nothing, then the same run again: wall times, their ratio, encoder calls in the rerun."""
    from seglab.cli import render
    from seglab.pipeline.bench.s3server import s3_bucket_for
    from seglab.pipeline.bench.scale import bench_rerun as measure

    given = Path(manifest) if manifest else None
    if s3 and given is not None:
        raise typer.BadParameter("--s3 is for the synthetic images; point your manifest's store.path at a bucket")
    if s3:
        with s3_bucket_for("bench-rerun") as bucket:
            result = measure(folder, images=images, stores=f"{bucket}/rerun", engine=engine.value)
    else:
        result = measure(folder, images=images, manifest=given, engine=engine.value)
    render.figures(result, json_)


@bench.command(
    "plan",
    cls=HelpCommand,
    epilog=examples("seglab bench plan --units 1000000", "seglab bench plan --units 20000 --json"),
)
@handled
def bench_plan(
    units: Annotated[int, typer.Option(min=1, metavar="N", help="Units in the synthetic store.")] = 1_000_000,
    shard_size: Annotated[int, typer.Option(min=1, metavar="N", help="Units per shard.")] = 128,
    folder: Annotated[Path, typer.Option(metavar="DIR", help="Where the synthetic index and tables go.")] = Path(
        "runs/bench/plan"
    ),
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Plan every stage over a synthetic store of N units (a unit index and per-stage record
    tables, no images): seconds per stage and the planning process's peak memory."""
    from seglab.cli import render
    from seglab.pipeline.bench.plan import bench_plan as measure

    render.plan_table(measure(folder, units=units, shard_size=shard_size), json_)


@app.command(cls=HelpCommand, epilog=examples("seglab schema > schema.json"))
def schema() -> None:
    """Print the manifest's JSON schema (what manifests/schema.json holds)."""
    import json

    from seglab.pipeline.manifest import manifest_schema

    print(json.dumps(manifest_schema(), indent=2, sort_keys=True))


def main() -> None:
    app(prog_name="seglab")


if __name__ == "__main__":
    main()
