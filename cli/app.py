"""The ``seglab`` command line (typer). Each command parses, calls the pipeline, renders."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from seglab.pipeline.errors import ManifestError, SeglabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Weak labels in, dense labels with uncertainty out.")
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
            raise typer.Exit(1) from None
    return wrapper


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False) -> None:
    state["verbose"] = verbose


def _manifest(path: str, store: Optional[Path] = None):
    from seglab.pipeline.manifest import open_manifest

    return open_manifest(path, store=store)


ManifestArg = Annotated[str, typer.Argument(help="Manifest YAML file, or 'demo' for the embedded demo.")]


@app.command()
@handled
def run(
    manifest: ManifestArg,
    store: Annotated[Optional[Path], typer.Option(help="Store folder (overrides the manifest).")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Start at this stage.")] = None,
    only: Annotated[Optional[str], typer.Option(help="Run only this stage.")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="Recompute this stage and everything downstream.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would run.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address.")] = None,
) -> None:
    """Run the pipeline; finished work is kept and skipped."""
    from seglab.cli import render
    from seglab.pipeline.runner import Runner, RunOptions

    options = RunOptions(start=from_, only=only, force=tuple(force or ()), dry_run=dry_run, address=address)
    with render.RichProgress() as progress:
        report = Runner(_manifest(manifest, store), options, progress).run()
    render.run_summary(report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@handled
def status(
    manifest: ManifestArg,
    store: Annotated[Optional[Path], typer.Option(help="Store folder (overrides the manifest).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per stage: done, total, failed, and whether stored outputs match the manifest."""
    from seglab.cli import render
    from seglab.pipeline.status import store_status

    render.status_table(store_status(_manifest(manifest, store)), json_)


@app.command()
@handled
def validate(manifest: ManifestArg) -> None:
    """Check a manifest; every problem is listed with its location (exit 2 if any)."""
    from seglab.cli import render
    from seglab.pipeline.units import enumerate_units

    units = enumerate_units(_manifest(manifest))
    render.console.print(f"[green]valid[/green]: {manifest} ({len(units)} images)")


@app.command()
@handled
def export(
    store: Annotated[Path, typer.Argument(help="Store folder written by `seglab run`.")],
    out: Annotated[Path, typer.Option(help="Output folder (created atomically).")],
    format_: Annotated[str, typer.Option("--format", help="png, coco or parquet.")] = "png",
    round_: Annotated[Optional[int], typer.Option("--round", min=0, help="Export this round's refine.")] = None,
    stage: Annotated[Optional[str], typer.Option(help="Export this stage's labels (default: the last round's refine).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only training, calibration or evaluation images.")] = None,
    max_uncertain: Annotated[Optional[float], typer.Option(
        help="Drop images whose share of uncertain pixels exceeds this (0..1).")] = None,
    uncertain_above: Annotated[float, typer.Option(help="A pixel is uncertain at or above this uncertainty.")] = 0.5,
    ignore_value: Annotated[int, typer.Option(help="Value of unlabelled pixels in the export.")] = 255,
    uncertainty: Annotated[str, typer.Option(help="png format: uncertainty as 8-bit png or float16 npy.")] = "png",
    embed_images: Annotated[bool, typer.Option(help="parquet format: store image file bytes, not only paths.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write a stage's labels and uncertainty as a dataset other trainers load directly."""
    from seglab.cli import render
    from seglab.pipeline.exports import ExportOptions, export as write_export

    options = ExportOptions(format=format_, stage=stage, round=round_, split=split, max_uncertain=max_uncertain,
                            uncertain_above=uncertain_above, ignore_value=ignore_value,
                            uncertainty_format=uncertainty, embed_images=embed_images, overwrite=overwrite)
    render.export_summary(write_export(store, out, options), out)


@app.command()
@handled
def evaluate(
    manifest: ManifestArg,
    store: Annotated[Optional[Path], typer.Option(help="Store folder (overrides the manifest).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Score the weak labels, the nearest-label baseline and every stage's labels against data.evaluation."""
    from seglab.cli import render
    from seglab.pipeline.evaluate import evaluate as score

    render.evaluation_tables(score(_manifest(manifest, store)), json_)


@app.command()
@handled
def report(
    store: Annotated[Path, typer.Argument(help="Store folder written by `seglab run`.")],
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained).")],
    manifest: Annotated[Optional[str], typer.Option(
        help="Manifest with the gold sets (default: the one the store records, if it exists).")] = None,
    sample: Annotated[int, typer.Option(min=0, help="Images shown, evenly over the units.")] = 6,
    queue: Annotated[int, typer.Option(min=0, help="Most uncertain images in the review queue.")] = 12,
    queue_out: Annotated[Optional[Path], typer.Option(help="Also write the review queue to this CSV file.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """One HTML page showing, in pictures, whether a run's labels can be trusted."""
    from seglab.cli import render
    from seglab.pipeline.report_html import write_report

    written = write_report(store, out, manifest=manifest, sample=sample, queue=queue, queue_out=queue_out,
                           overwrite=overwrite)
    render.console.print(f"wrote {written['path']} ({written['bytes'] / 1024:.0f} KB): {written['sample']} sample "
                         f"and {written['queue']} review-queue images in {written['seconds']:.1f}s")


@app.command("simulate-weak")
@handled
def simulate_weak(
    masks: Annotated[Path, typer.Option(help="Folder of ground-truth class-id masks.")],
    kind: Annotated[str, typer.Option(help="points, scribbles, coarse or boxes.")],
    out: Annotated[Path, typer.Option(help="New folder for the weak labels.")],
    seed: Annotated[int, typer.Option(help="Same seed, same weak labels.")] = 0,
    ignore: Annotated[Optional[list[int]], typer.Option(help="Mask values that are not classes (repeatable).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder, to name table rows by image file.")] = None,
    unlabelled: Annotated[int, typer.Option(min=0, max=65535,
                                            help="Label-map value for 'no label' (scribbles, coarse).")] = 255,
) -> None:
    """Derive weak labels from ground-truth masks the way weakly supervised papers do."""
    from seglab.cli import render
    from seglab.pipeline.simulate import simulate_weak as simulate

    count = simulate(masks=masks, kind=kind, out=out, seed=seed, ignore=tuple(ignore or ()), images=images,
                     unlabelled=unlabelled)
    render.console.print(f"wrote {kind} for {count} masks to {out}")


bench = typer.Typer(help="Benchmarks (measurements, not tests).", no_args_is_help=True)
app.add_typer(bench, name="bench")


@bench.command("encoder")
@handled
def bench_encoder(
    backend: Annotated[str, typer.Option(help="Backend to measure.")] = "sam",
    model: Annotated[str, typer.Option(help="SAM encoder: vit_b, vit_l or vit_h (random weights).")] = "vit_b",
    images: Annotated[int, typer.Option(min=1, help="Images (480x640, random).")] = 4,
    batch_size: Annotated[int, typer.Option(min=1)] = 2,
    precision: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Images/s through the embed stage vs a bare encoder forward, GFLOP/s, bytes stored."""
    from seglab.cli import render
    from seglab.workers.bench_encoder import bench_encoder as measure

    if backend != "sam":
        raise SeglabError(f"bench encoder measures the 'sam' backend; got '{backend}'")
    render.figures(measure(model=model, images=images, batch_size=batch_size, precision=precision), json_)


@bench.command("decode")
@handled
def bench_decode(
    model: Annotated[str, typer.Option(help="SAM model: vit_b, vit_l or vit_h (random weights).")] = "vit_b",
    images: Annotated[int, typer.Option(min=1, help="Images (480x640, synthetic).")] = 4,
    prompts_per_image: Annotated[int, typer.Option(min=1, max=4096, help="Prompts per image (from simulated scribbles).")] = 32,
    prompt_batch: Annotated[Optional[int], typer.Option(min=1, max=4096, help="Prompts per decoder call (default: the backend's).")] = None,
    precision: Annotated[str, typer.Option(help="Encoder autocast of the pipeline: auto, bf16, fp16 or fp32.")] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Prompts/s decoded by the pipeline from cached features vs the naive SamPredictor loop."""
    from seglab.cli import render
    from seglab.workers.bench_decode import bench_decode as measure

    if model not in ("vit_b", "vit_l", "vit_h"):
        raise SeglabError(f"bench decode measures SAM vit_b, vit_l or vit_h; got '{model}'")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise SeglabError(f"unknown precision '{precision}'; choose auto, bf16, fp16 or fp32")
    render.figures(measure(model=model, images=images, prompts_per_image=prompts_per_image, batch=prompt_batch,
                           precision=precision), json_)


@bench.command("quality")
@handled
def bench_quality(
    manifests: Annotated[Optional[list[Path]], typer.Argument(
        help="Benchmark manifests (default: every manifests/bench/*.yaml of the source checkout).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only each manifest's first N images.")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="Recompute this stage and everything downstream.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Simulate weak labels from gold masks, run, evaluate: mIoU of weak, nearest-label, select."""
    from seglab.cli import render
    from seglab.pipeline.bench_quality import bench_quality as measure, default_manifests

    paths = manifests or default_manifests()
    options = dict(limit=limit, force=tuple(force or ()))
    if json_:
        rows = measure(paths, **options)
    else:
        with render.RichProgress() as progress:
            rows = measure(paths, **options, progress=progress)
    render.quality_table(rows, json_)


@bench.command("conformal")
@handled
def bench_conformal(
    manifest: ManifestArg,
    store: Annotated[Optional[Path], typer.Option(help="Store folder (overrides the manifest).")] = None,
    alpha: Annotated[Optional[list[float]], typer.Option(help="Target miscoverage (repeatable).")] = None,
    splits: Annotated[int, typer.Option(min=1, help="Random calibration/test splits.")] = 20,
    calibration: Annotated[int, typer.Option(min=1, help="Calibration images per split.")] = 50,
    method: Annotated[str, typer.Option(help="risk-control, mondrian or pixel-split.")] = "risk-control",
    seed: Annotated[int, typer.Option(help="Seed of the splits.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fit conformal thresholds on random splits of the evaluation images; test miscoverage on the rest."""
    from seglab.cli import render
    from seglab.pipeline.bench_conformal import bench_conformal as measure
    from seglab.stages.conformal import METHODS

    if method not in METHODS:
        raise SeglabError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    result = measure(_manifest(manifest, store), alphas=tuple(alpha or (0.05, 0.1)), splits=splits,
                     calibration=calibration, method=method, seed=seed)
    render.conformal_table(result, json_)


@bench.command("retrain")
@handled
def bench_retrain(
    manifest: ManifestArg,
    gold_masks: Annotated[Path, typer.Option(help="Folder of gold masks (<image stem>.png) of the training images.")],
    gold_ignore: Annotated[Optional[list[int]], typer.Option(help="Gold mask value not to learn from (repeatable).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Store folder (overrides the manifest).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Segmenter trained on seglab's labels against the same one trained on ground truth."""
    from seglab.cli import render
    from seglab.pipeline.bench_retrain import bench_retrain as measure

    loaded = _manifest(manifest, store)
    if json_:
        result = measure(loaded, gold_masks=gold_masks, gold_ignore=tuple(gold_ignore or ()))
    else:
        with render.RichProgress() as progress:
            result = measure(loaded, gold_masks=gold_masks, gold_ignore=tuple(gold_ignore or ()), progress=progress)
    render.retrain_table(result, json_)


@bench.command("scale")
@handled
def bench_scale(
    images: Annotated[Optional[list[int]], typer.Option(min=1, help="Dataset sizes (repeatable).")] = None,
    workers: Annotated[Optional[list[int]], typer.Option(min=1, help="Workers per stage (repeatable).")] = None,
    folder: Annotated[Path, typer.Option(help="Where the synthetic images and the stores go.")] = Path("runs/bench/scale"),
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Synthetic images through the whole DAG: wall time, images/s per stage, peak memory of
    driver and workers, at each size and worker count."""
    from seglab.cli import render
    from seglab.pipeline.bench_scale import bench_scale as measure

    render.scale_table(measure(folder, images=tuple(images or (200, 2000)), workers=tuple(workers or (1, 2))), json_)


@bench.command("rerun")
@handled
def bench_rerun(
    manifest: Annotated[Optional[str], typer.Argument(help="Manifest to run twice (default: synthetic images).")] = None,
    images: Annotated[int, typer.Option(min=1, help="Synthetic images when no manifest is given.")] = 200,
    folder: Annotated[Path, typer.Option(help="Where the synthetic images and the store go.")] = Path("runs/bench/rerun"),
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """A run from nothing, then the same run again: wall times, their ratio, encoder calls in the rerun."""
    from seglab.cli import render
    from seglab.pipeline.bench_scale import bench_rerun as measure

    render.figures(measure(folder, images=images, manifest=Path(manifest) if manifest else None), json_)


@app.command()
def schema() -> None:
    """Print the manifest's JSON schema (what manifests/schema.json holds)."""
    import json

    from seglab.pipeline.manifest import manifest_schema

    print(json.dumps(manifest_schema(), indent=2, sort_keys=True))


def main() -> None:
    app(prog_name="seglab")


if __name__ == "__main__":
    sys.exit(main())
