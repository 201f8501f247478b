"""``seglab bench scale`` and ``seglab bench rerun``: how a run's cost grows with the dataset
and the workers, and what a rerun of a finished run costs.

Every measured run is what an operator starts: ``seglab run M`` in its own process (Ray
started by it, weight-free backend). The driver's peak resident memory is its
``VmHWM`` (/proc/<pid>/status) just before it exits; each stage's workers report their
own peak (``StageWorker.peak_rss``) into the stage summary, with the stage's map time and
units computed, from which images/s per stage come.

Datasets are synthetic (``pipeline/bench/synthetic.py``): ``images`` scenes of ``size`` with
scribbles, written once into ``folder`` and listed per run (``data.images.list``), so
runs with fewer images use a prefix of the same images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seglab.pipeline.base.errors import SeglabError
from seglab.pipeline.bench.synthetic import write_dataset
from seglab.pipeline.core.ledger import Receipt
from seglab.pipeline.core.store import Store, store_exists
from seglab.pipeline.manifest import open_manifest

MANIFEST = """\
run: {{name: {name}, seed: 0}}
data:
  root: {root}
  images: {{list: {listing}}}
  weak: {{kind: scribbles, path: {root}/scribbles}}
  classes:
    - {{id: 0, name: background}}
    - {{id: 1, name: disc}}
    - {{id: 2, name: rectangle}}
store: {{path: {store}}}
ray: {{workers: {workers}, engine: {engine}}}
"""


def dataset(folder: Path, images: int, size: tuple[int, int]) -> Path:
    """``folder``/data with at least ``images`` synthetic scenes (made once, reused); -> data root."""
    root = folder / "data"
    have = len(list((root / "images").glob("*.png"))) if (root / "images").exists() else 0
    if have < images:
        write_dataset(root, [size] * images)
    return root


def write_run_manifest(
    folder: Path,
    name: str,
    images: int,
    workers: int,
    size: tuple[int, int],
    stores: str | None = None,
    engine: str = "pool",
) -> Path:
    """A manifest over the first ``images`` scenes with ``workers`` workers per stage, the map
    stages run by ``engine`` (``ray.engine``), and its own store, in ``folder`` or under the
    location ``stores`` (an s3:// prefix, say)."""
    root = dataset(folder, images, size)
    listing = root / f"{name}.txt"  # image listings must live under the data root
    listing.write_text("".join(f"images/img{i:02d}.png\n" for i in range(images)))
    path = folder / f"{name}.yaml"
    path.write_text(
        MANIFEST.format(
            name=name,
            root=root,
            listing=listing,
            store=store_of(folder, name, stores),
            workers=workers,
            engine=engine,
        )
    )
    return path


def store_of(folder: Path, name: str, stores: str | None) -> str:
    """Where the run ``name`` keeps its store: ``<name>.zarr`` in ``folder`` or under ``stores``."""
    return f"{stores.rstrip('/')}/{name}.zarr" if stores else str(folder / f"{name}.zarr")


def timed_run(manifest: Path) -> dict[str, Any]:
    """``seglab run manifest`` in a new process -> wall seconds and the driver's peak RSS (bytes)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "seglab.cli.app", "run", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _high_water_mark(proc.pid))
        time.sleep(0.05)
    assert proc.stdout is not None  # stdout=PIPE
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SeglabError(f"{manifest}: seglab run failed (exit {proc.returncode}):\n{output[-2000:]}")
    return {"seconds": round(time.perf_counter() - started, 2), "driver_peak_rss": peak}


def _high_water_mark(pid: int) -> int:
    """VmHWM of a live process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stage_figures(location: str, workers: int) -> dict[str, dict[str, Any]]:
    """Per stage of a store: units computed, stage seconds, images/s, worker peak RSS, and
    the framework's own cost: the stage's wall time minus the time its workers spent inside
    ``process`` (summed over the units its records hold, shared by ``workers``), per unit.
    Stage seconds leave out Ray's start, which the run's first stage to need Ray records
    apart (``ray_start_seconds``)."""
    store = Store(location)
    figures = {}
    for stage in store.stages():
        summary = store.stage_attrs(stage).get("summary") or {}
        computed, seconds = summary.get("computed"), summary.get("seconds")
        inside = sum(e.seconds or 0.0 for e in store.entries(stage).values() if isinstance(e, Receipt))
        figures[stage] = {
            "computed": computed,
            "seconds": seconds,
            "images_per_second": round(computed / seconds, 3) if computed and seconds else None,
            "process_seconds": round(inside, 3),
            "overhead_ms_per_unit": round(1000 * (seconds - inside / workers) / computed, 3)
            if computed and seconds
            else None,
            "worker_peak_rss": summary.get("worker_peak_rss"),
            "ray_start_seconds": summary.get("ray_start_seconds"),
        }
    return figures


def measure(
    folder: Path, images: int, workers: int, size: tuple[int, int], stores: str | None = None, engine: str = "pool"
) -> dict[str, Any]:
    """One fresh run over ``images`` scenes with ``workers`` workers of ``engine`` (its store
    in ``folder``, or under ``stores``)."""
    name = f"scale-{images}-w{workers}" + ("" if engine == "pool" else f"-{engine}")
    manifest = write_run_manifest(folder, name, images, workers, size, stores, engine)
    store = store_of(folder, name, stores)
    if store_exists(store):  # a fresh run each time, over a store an earlier bench made
        Store(store).remove()
    run = timed_run(manifest)
    stages = stage_figures(store, workers)
    map_seconds = sum(s["seconds"] or 0.0 for s in stages.values())
    peaks = [s["worker_peak_rss"] for s in stages.values() if s["worker_peak_rss"]]
    objects = len(Store(store).objects.list(""))
    return {
        "images": images,
        "workers": workers,
        "engine": engine,
        "store": store,
        **run,
        "map_seconds": round(map_seconds, 2),
        "ray_start_seconds": round(sum(s["ray_start_seconds"] or 0.0 for s in stages.values()), 2),
        "images_per_second": round(images / map_seconds, 3) if map_seconds else None,
        "worker_peak_rss": max(peaks, default=None),
        "objects": objects,
        "objects_per_image": round(objects / images, 3),
        "stages": stages,
    }


def bench_scale(
    folder: Path,
    *,
    images: Sequence[int] = (200, 2000),
    workers: Sequence[int] = (1, 2),
    size: tuple[int, int] = (96, 128),
    stores: str | None = None,
    engine: str = "pool",
) -> dict[str, Any]:
    """Every ``images`` count with the most workers, and the smallest count with each of
    ``workers``; -> the runs and the two ratios the targets are stated in. ``stores``: where
    the stores go instead of ``folder`` (a location: an s3:// prefix, say); ``engine``: what
    runs the map stages (``ray.engine``)."""
    folder = folder.resolve()  # the manifests written there name absolute paths
    folder.mkdir(parents=True, exist_ok=True)
    small, large, most = min(images), max(images), max(workers)
    runs = [measure(folder, n, most, size, stores, engine) for n in sorted(images)]
    runs += [measure(folder, small, w, size, stores, engine) for w in sorted(workers) if w != most]
    by = {(r["images"], r["workers"]): r for r in runs}
    result: dict[str, Any] = {"size": list(size), "cpus": os.cpu_count(), "engine": engine, "runs": runs}
    if small != large:
        result["driver_memory_ratio"] = round(
            by[large, most]["driver_peak_rss"] / by[small, most]["driver_peak_rss"], 3
        )
        result["worker_memory_ratio"] = round(
            by[large, most]["worker_peak_rss"] / by[small, most]["worker_peak_rss"], 3
        )
    if len(set(workers)) > 1:
        least = min(workers)
        result["worker_speedup"] = round(
            by[small, most]["images_per_second"] / by[small, least]["images_per_second"], 3
        )
    return result


def bench_rerun(
    folder: Path,
    *,
    images: int = 200,
    size: tuple[int, int] = (96, 128),
    manifest: Path | None = None,
    stores: str | None = None,
    engine: str = "pool",
) -> dict[str, Any]:
    """A run from nothing, then the same command again: wall times, their ratio, and the
    units each stage computed in the rerun (embed's = encoder calls). ``stores``, ``engine``:
    as for ``bench_scale`` (synthetic images only)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        name = f"rerun-{images}" + ("" if engine == "pool" else f"-{engine}")
        manifest = write_run_manifest(folder, name, images, 2, size, stores, engine)

    store = open_manifest(str(manifest)).store_location
    if store_exists(store):
        raise SeglabError(f"{store} exists: bench rerun times a first run from nothing; remove it or use another store")
    first = timed_run(manifest)
    rows = _committed_rows(store)
    again = timed_run(manifest)
    computed = {stage: n - rows.get(stage, 0) for stage, n in _committed_rows(store).items()}
    return {
        "manifest": str(manifest),
        "first_seconds": first["seconds"],
        "rerun_seconds": again["seconds"],
        "rerun_share": round(again["seconds"] / first["seconds"], 4),
        "encoder_calls_in_rerun": computed.get("embed", 0),
        "records_added_by_rerun": computed,
    }


def _committed_rows(location: str) -> dict[str, int]:
    """Unit records per stage over its commit objects (a recomputed or failed unit adds one)."""
    store = Store(location)
    return {stage: store.committed_rows(stage) for stage in store.stages()}
