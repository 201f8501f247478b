"""Starting or joining Ray, and sizing worker pools from what the cluster has."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import ray

from seglab.pipeline.base.errors import SeglabError
from seglab.stages.base import Resources

TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray (2.60) warns, on every new local cluster, that it enabled token authentication.
Setting RAY_AUTH_MODE=token instead would skip the warning but also the refresh of the
driver's cached config that Ray does with it, and the driver would then fail to connect."""


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def ensure_ray(address: str | None, *, num_cpus: int | None = None) -> float:
    """Join ``address`` when given, else start Ray on this machine (never a guess at
    another cluster), without Ray's notice that the cluster it starts for seglab alone
    uses token authentication. Reuses a Ray already initialised in this process (tests).
    -> the seconds it took (0.0 when Ray was initialised already)."""
    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    init = partial(
        ray.init, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, configure_logging=True
    )
    try:
        if address:
            init(address=address)
        else:
            with quiet_logger(TOKEN_SETUP_LOGGER):
                init(address="local", num_cpus=num_cpus)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SeglabError(f"cannot start or reach Ray at {address or 'a local instance'}: {exc}") from None
    return time.perf_counter() - started


def wants_gpu(setting: str) -> bool:
    """'yes' / 'no', or 'auto': whether the Ray cluster this driver joined has GPUs."""
    if setting != "auto":
        return setting == "yes"
    return ray.cluster_resources().get("GPU", 0) > 0


def capacity(resources: Resources) -> int:
    """How many workers needing ``resources`` the cluster's live nodes have room for in all."""
    total = ray.cluster_resources()
    fits = []
    if resources.cpus:
        fits.append(int(total.get("CPU", 0) // resources.cpus))
    if resources.gpus:
        fits.append(int(total.get("GPU", 0) // resources.gpus))
    return min(fits) if fits else 1


def assigned_cpus() -> int:
    """The CPUs Ray gave the calling actor or task (at least 1; 1 outside a Ray worker)."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def pool_size(resources: Resources, requested: int | None) -> int:
    """Actors for a pool: ``requested``, or as many as the cluster's CPUs/GPUs allow."""
    room = capacity(resources)
    if room < 1:
        total = ray.cluster_resources()
        raise SeglabError(
            f"the Ray cluster cannot host one worker needing {resources.cpus} CPU and {resources.gpus} GPU "
            f"(it has {total.get('CPU', 0)} CPU, {total.get('GPU', 0)} GPU)"
        )
    return max(1, min(requested or room, room))


def worker_resources(stage: Resources, backend_config) -> Resources:
    """What one worker of a stage asks Ray for: a stage that runs a model backend gets one
    GPU when the cluster has GPUs and the backend may use one (device auto or cuda)."""
    wants_gpu = stage.needs_backend and getattr(backend_config, "device", "cpu") != "cpu"
    if wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return Resources(cpus=stage.cpus, gpus=1.0, needs_backend=True)
    if wants_gpu and getattr(backend_config, "device", "cpu") == "cuda":
        raise SeglabError("backend device 'cuda' was requested but the Ray cluster has no GPU")
    return stage
