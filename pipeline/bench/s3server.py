"""An S3 API server on 127.0.0.1 for benchmarks and tests: moto's ``ThreadedMotoServer``, the
server s3fs and zarr run their own tests against (``moto[server]``, in the test extra)."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from seglab.pipeline.base.errors import SeglabError


def s3_environment(endpoint: str) -> dict[str, str]:
    """What points every S3 client (obstore, boto3) at ``endpoint``, with fixed test credentials."""
    return {
        "AWS_ACCESS_KEY_ID": "seglab-test",
        "AWS_SECRET_ACCESS_KEY": "seglab-test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


@contextmanager
def s3_server() -> Iterator[str]:
    """Run the server on a free port of 127.0.0.1 while the block runs; -> its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer  # noqa: PLC0415 (a test extra, only for these benchmarks)
    except ImportError:
        raise SeglabError("an S3 server for benchmarks needs moto[server]: pip install -e '.[test]'") from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str, name: str) -> str:
    """A new, empty bucket on the server at ``endpoint`` named after ``name``; -> 's3://<bucket>'."""
    import boto3  # noqa: PLC0415 (comes with moto)

    bucket = f"{re.sub(r'[^a-z0-9-]', '-', name.lower())[:40].strip('-')}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@contextmanager
def s3_bucket_for(name: str) -> Iterator[str]:
    """A server, a new bucket on it and this process's environment pointing at it (child
    processes inherit it) while the block runs; -> 's3://<bucket>'."""
    with s3_server() as endpoint:
        saved = {key: os.environ.get(key) for key in s3_environment(endpoint)}
        os.environ.update(s3_environment(endpoint))
        try:
            yield new_bucket(endpoint, name)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
