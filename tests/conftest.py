"""Shared fixtures: a module-scoped local Ray, and a tiny synthetic dataset with scribbles."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.pipeline.bench.synthetic import scribbles_from_truth, shapes_image, write_dataset  # noqa: F401 (shared)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting Ray takes seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


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
ray:
  workers: 2
ingest: {{batch_size: {batch}}}
embed: {{batch_size: {batch}}}
prompts: {{batch_size: {batch}}}
select: {{batch_size: {batch}}}
"""


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
    """An S3 API server (moto's, the one s3fs and zarr test against) on 127.0.0.1 for the
    test session; -> its endpoint URL. Stopped at the end of the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """A new, empty bucket on the test S3 server, with the environment pointing every S3
    client (obstore, boto3) at it; -> 's3://<bucket>'. Credentials are fixed test values."""
    import re
    import uuid

    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "seglab-test",
        "AWS_SECRET_ACCESS_KEY": "seglab-test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
