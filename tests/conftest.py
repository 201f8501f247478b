"""Shared fixtures: a local Ray shared by the modules that use it, and a tiny synthetic dataset with scribbles."""

from __future__ import annotations

import faulthandler
import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.pipeline.bench.synthetic import scribbles_from_truth, shapes_image, write_dataset  # noqa: F401 (shared)


def pytest_unconfigure(config):
    """Close obstore's cached stores (their Rust runtimes and connection pools) while the
    interpreter is whole, and keep a faulthandler on through its shutdown: a session once
    ended in a segmentation fault after every test had passed, and this names where."""
    from seglab.pipeline.base.objecturl import forget_stores

    forget_stores()
    gc.collect()
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


RAY_OPTIONS = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "configure_logging": False}


@pytest.fixture(scope="session")
def _ray_for_the_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_for_the_session):
    """A local Ray shared by the modules that ask for it (starting Ray takes seconds), started
    anew when none runs (a module with a Ray of its own stopped it), and stopped after a
    module whose actors still hold CPUs, so that no module waits on another's leftovers."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", **RAY_OPTIONS)
    yield
    if ray.is_initialized() and not _cpus_all_free():
        ray.shutdown()


def _cpus_all_free(wait: float = 5.0) -> bool:
    """Whether every CPU of the local Ray is free within ``wait`` seconds (actors of a
    pool shut down release theirs a moment later)."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


MANIFEST = """\
run:
  name: tiny
  seed: 0
data:
  root: data
  images: {{glob: "images/*.png"}}
  weak: {{kind: scribbles, path: data/scribbles}}
  classes:
    - {{id: 0, name: background}}
    - {{id: 1, name: disc}}
    - {{id: 2, name: rectangle}}
store:
  path: {store}
  shard_size: {batch}
ray:
  workers: 2
ingest: {{batch_size: {batch}}}
embed: {{batch_size: {batch}}}
prompts: {{batch_size: {batch}}}
select: {{batch_size: {batch}}}
"""


def seglab_process(*args: str, **options) -> subprocess.Popen:
    """``seglab <args>`` in a new process and process group (a test can SIGKILL the driver
    with the Ray it starts); output piped unless ``options`` say otherwise."""
    return subprocess.Popen(
        [sys.executable, "-m", "seglab.cli.app", *args],
        **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "start_new_session": True, **options},
    )


def committed_units(location, stage: str) -> dict[str, int]:
    """Units done in ``stage`` by the commit objects the store at ``location`` holds now ->
    the batch holding each (the last one, when a unit was done twice); read afresh."""
    from seglab.pipeline.core.stagetable import DONE
    from seglab.pipeline.core.store import Store, store_exists

    if not store_exists(location):
        return {}
    store = Store(location)
    names = store.index().table.column("unit").to_pylist()
    done: dict[str, int] = {}
    for key in sorted(store.objects.list(f"_records/{stage}")):
        seq = int(key.rsplit("/b", 1)[1].split(".")[0])
        table = store.commit(stage, seq)
        if table is None:
            continue
        for uid, state in zip(table.column("uid").to_pylist(), table.column("state").to_pylist()):
            if state == DONE and uid < len(names):
                done[names[uid]] = seq
    return done


def batch_folder(location, stage: str, output: str, unit: str) -> Path:
    """The local folder of the batch array holding ``unit``'s ``stage/output``."""
    from seglab.pipeline.core.batcharrays import batch_id
    from seglab.pipeline.core.store import Store

    record = Store(location).entries(stage)[unit].outputs[output]
    return Path(location) / stage / output / batch_id(record.batch)


def alter_row(location, stage: str, output: str, unit: str) -> None:
    """Give ``unit``'s ``stage/output`` other values of the same shape, in valid chunks
    (class maps: each label + 1 mod 3): damage only its hash can tell."""
    import zarr

    from seglab.pipeline.core.store import Store

    record = Store(location).entries(stage)[unit].outputs[output]
    array = zarr.open_array(batch_folder(location, stage, output, unit), mode="r+")
    region = (record.row, *(slice(0, n) for n in record.shape))
    array[region] = (np.asarray(array[region]) + 1) % 3


def record_failures(store, stage: str, units: list[str], message: str = "it broke") -> None:
    """Commit failure rows for ``units`` (already in the index) of ``stage``, as a run does."""
    from seglab.pipeline.core.batcharrays import batch_id
    from seglab.pipeline.core.stagerecords import failure_records

    uid = {u: i for i, u in enumerate(store.index().table.column("unit").to_pylist())}
    inputs = store.stage_inputs(stage)
    table = failure_records([uid[u] for u in units], [message] * len(units), bytes(32), bytes(32), inputs)
    store.shards.commit_failures(stage, batch_id(store.state(stage).next_batch), table)
    store.refresh()


def write_manifest(folder: Path, *, store: str = "run.zarr", batch: int = 2, extra: str = "") -> Path:
    path = folder / "manifest.yaml"
    path.write_text(MANIFEST.format(store=store, batch=batch) + textwrap.dedent(extra))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A manifest over 4 synthetic images of different sizes with scribbles."""
    write_dataset(tmp_path / "data", [(60, 80), (72, 64), (50, 90), (64, 64)])
    return write_manifest(tmp_path)


def add_gold(manifest: Path, evaluation: str = "images/*.png") -> None:
    """Gold masks (the shapes' truth) in data/gold and a data.evaluation section over ``evaluation``."""
    data = manifest.parent / "data"
    (data / "gold").mkdir(exist_ok=True)
    for i, path in enumerate(sorted((data / "images").glob("*.png"))):
        height, width = np.asarray(Image.open(path)).shape[:2]
        Image.fromarray(shapes_image(height, width, seed=i)[1]).save(data / "gold" / path.name)
    text = manifest.read_text().replace(
        "store:\n", f"  evaluation: {{images: {{glob: '{evaluation}'}}, masks: gold}}\nstore:\n", 1
    )
    manifest.write_text(text)


CALIBRATED_SIZES = [(60, 80), (72, 64), (50, 90), (64, 64), (56, 70), (66, 60)]


def calibrated_manifest(
    tmp_path: Path,
    *,
    calibration="images/img0[0-3].png",
    evaluation="images/img0[45].png",
    alpha=0.3,
    method="risk-control",
) -> Path:
    """A manifest over 6 synthetic images with gold masks: calibration and evaluation gold
    sets (globs over data/images) and a calibrate section with ``alpha`` and ``method``."""
    data = tmp_path / "data"
    write_dataset(data, CALIBRATED_SIZES)
    (data / "gold").mkdir()
    for i, (h, w) in enumerate(CALIBRATED_SIZES):
        Image.fromarray(shapes_image(h, w, seed=i)[1]).save(data / "gold" / f"img{i:02d}.png")
    path = write_manifest(tmp_path, extra=f"calibrate: {{method: {method}, alpha: {alpha}}}\n")
    gold = (
        f"  calibration: {{images: {{glob: '{calibration}'}}, masks: gold}}\n"
        f"  evaluation: {{images: {{glob: '{evaluation}'}}, masks: gold}}\n"
    )
    path.write_text(path.read_text().replace("store:\n", gold + "store:\n", 1))
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 API server on 127.0.0.1 for the test session (pipeline/bench/s3server.py); ->
    its endpoint URL. Stopped at the end of the session."""
    from seglab.pipeline.bench.s3server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_ray(s3_endpoint):
    """The S3 environment set for this process, then a local Ray of the module's own started
    in it (the shared one stopped first): its workers inherit the environment, as a
    cluster's workers have their machines' credentials. -> the endpoint URL."""
    import ray

    from seglab.pipeline.bench.s3server import s3_environment

    saved = {key: os.environ.get(key) for key in s3_environment(s3_endpoint)}
    os.environ.update(s3_environment(s3_endpoint))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", **RAY_OPTIONS)
    yield s3_endpoint
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """A new, empty bucket on the test S3 server, with the environment pointing every S3
    client at it; -> 's3://<bucket>'."""
    from seglab.pipeline.bench.s3server import new_bucket, s3_environment

    for key, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    return new_bucket(s3_endpoint, request.node.name)
