"""Train the segmenter on Ray Train (``TorchTrainer``), with a mean teacher and resumable checkpoints.

One ``TrainingJob`` says what to train on: the store, the training units, where their labels
and uncertainty live, and the settings. ``train`` runs ``train_loop`` on ``num_workers`` Ray
Train workers (data parallel: each takes every world_size-th unit; GPUs when asked). Each
epoch, rank 0 writes a checkpoint (student, EMA teacher, optimizer, RNG state and the
metrics of every epoch so far) as one object into the job's checkpoint folder, a local
folder or a bucket prefix (``pipeline/core/objects.py``): written whole or not at all (a
folder's file is staged and renamed into place). A rerun, or a worker restarted by Ray
Train after a failure, resumes from the newest checkpoint that loads (a corrupt one is
skipped).

Images are resized to ``input_size`` (H, W) for training (bilinear; labels and gold masks
nearest), with random horizontal flips.
"""

from __future__ import annotations

import copy
import io
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from seglab.pipeline.core.gold import read_gold_file
from seglab.pipeline.core.metrics import class_index
from seglab.pipeline.core.objects import Objects
from seglab.pipeline.core.store import Store
from seglab.workers.losses import IGNORE_INDEX, batch_loss
from seglab.workers.segmenter import Segmenter

CHECKPOINT = re.compile(r"^epoch-(\d{4})\.pt$")
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class TrainingJob:
    """What to train, JSON-able (it travels to every Ray Train worker).

    labels / uncertainty: store paths ('stage/array') of the HxW class ids and HxW [0, 1]
    uncertainty per unit; ``uncertainty`` None means every label is certain.
    label_files: instead of ``labels``, one gold mask file per unit (values: class ids, or
    ``label_ignore`` values, which are not learnt from); for training on ground truth.
    settings: the retrain stage's config (model_dump).
    """

    store_path: str
    units: tuple[str, ...]
    class_ids: tuple[int, ...]
    labels: str
    uncertainty: str | None
    checkpoints: str
    settings: dict[str, Any]
    seed: int
    label_files: tuple[str, ...] = ()
    label_ignore: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, job: dict[str, Any]) -> TrainingJob:
        """The job from its JSON form (lists back to tuples)."""
        return cls(
            store_path=job["store_path"],
            units=tuple(job["units"]),
            class_ids=tuple(job["class_ids"]),
            labels=job["labels"],
            uncertainty=job["uncertainty"],
            checkpoints=job["checkpoints"],
            settings=job["settings"],
            seed=job["seed"],
            label_files=tuple(job.get("label_files", ())),
            label_ignore=tuple(job.get("label_ignore", ())),
        )


# -- checkpoints ----------------------------------------------------------------------------
def checkpoint_files(folder: Objects) -> list[str]:
    """Keys of the checkpoints in ``folder``, oldest epoch first."""
    return [key for key in folder.list("") if CHECKPOINT.match(key)]


def load_checkpoint(data: bytes) -> dict[str, Any] | None:
    """A checkpoint's state, loaded as tensors only (weights_only: unpickling that would run
    code is refused unrun); None when it does not load or holds no integer ``epoch``."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # a torn, corrupt or unsafe checkpoint
        return None
    if isinstance(state, dict) and isinstance(state.get("epoch"), int) and not isinstance(state["epoch"], bool):
        return state
    return None


def latest_checkpoint(folder: Objects) -> tuple[str, dict[str, Any]] | None:
    """(key, state) of the newest checkpoint in ``folder`` that loads (``load_checkpoint``),
    or None: a corrupt or unsafe one is skipped for the one before."""
    for key in reversed(checkpoint_files(folder)):
        data = folder.get(key)
        state = None if data is None else load_checkpoint(data)
        if state is not None:
            return key, state
    return None


def save_checkpoint(folder: Objects, epoch: int, state: dict[str, Any]) -> str:
    """Write ``state`` as the object epoch-NNNN.pt, whole; keep the newest few; -> its key."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    key = f"epoch-{epoch:04d}.pt"
    folder.put(key, buffer.getvalue())
    folder.delete(checkpoint_files(folder)[:-KEEP_CHECKPOINTS])
    return key


# -- data -----------------------------------------------------------------------------------
def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> torch.Tensor:
    """HxW or HxWxC numpy -> torch [C, h, w] (or [h, w]) at ``size``."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim == 2:
        tensor = tensor[None]
    else:
        tensor = tensor.permute(2, 0, 1)
    mode = "nearest" if nearest else "bilinear"
    resized = F.interpolate(tensor[None].float(), size=size, mode=mode, **({} if nearest else {"align_corners": False}))
    return resized[0]


def load_examples(
    job: TrainingJob, units: tuple[str, ...], label_files: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> images uint8 [N, 3, h, w], targets int64 [N, h, w], uncertainty float16 [N, h, w].
    ``label_files``: the units' gold masks, when training on ground truth."""
    store = Store(job.store_path)
    size = tuple(job.settings["input_size"])
    images, targets, uncertainties = [], [], []
    paths = ["ingest/image"] + ([] if label_files else [job.labels]) + ([job.uncertainty] if job.uncertainty else [])
    for i, arrays in enumerate(store.read_units(paths, list(units))):
        images.append(_resize(arrays["ingest/image"], size, nearest=False).round().clamp(0, 255).to(torch.uint8))
        if label_files:
            index, valid = read_gold_file(
                label_files[i], job.label_ignore, job.class_ids, arrays["ingest/image"].shape[:2]
            )
        else:
            index, valid = class_index(arrays[job.labels], job.class_ids)  # the ignore id is no class
        index = np.where(valid, index, IGNORE_INDEX)
        targets.append(_resize(index, size, nearest=True)[0].long())
        u = arrays[job.uncertainty].astype(np.float32) if job.uncertainty else np.zeros(index.shape, np.float32)
        uncertainties.append(_resize(u, size, nearest=False)[0].clamp(0, 1).half())
    return torch.stack(images), torch.stack(targets), torch.stack(uncertainties)


# -- the loop -------------------------------------------------------------------------------
def _learning_rate(base: float, step: int, total: int) -> float:
    """Polynomial decay (power 0.9), the usual schedule for segmentation."""
    return base * (1.0 - min(step, total - 1) / total) ** 0.9


@torch.no_grad()
def _update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for mine, theirs in zip(teacher.buffers(), student.buffers()):
        mine.copy_(theirs)


def train_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (``config['job']`` is a TrainingJob as a dict)."""
    job = TrainingJob.from_json(config["job"])
    s = job.settings
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(job.seed)
    images, targets, uncertainty = load_examples(job, job.units[rank::world], job.label_files[rank::world])
    student = Segmenter(s["architecture"], len(job.class_ids))
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=s["learning_rate"], weight_decay=s["weight_decay"])
    start, history = 0, []
    checkpoints = Objects(job.checkpoints)
    found = latest_checkpoint(checkpoints)
    if found is not None:
        _, state = found
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, history = int(state["epoch"]) + 1, list(state["history"])
    device = ray.train.torch.get_device()
    teacher.to(device)
    model = ray.train.torch.prepare_model(student)  # DDP across workers, on the worker's device
    steps_per_epoch = max(1, -(-len(images) // s["train_batch"]))
    total_steps = s["epochs"] * steps_per_epoch
    for epoch in range(start, s["epochs"]):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(images))
        losses = []
        for step, first in enumerate(range(0, len(images), s["train_batch"])):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(s["learning_rate"], epoch * steps_per_epoch + step, total_steps)
            pick = order[first : first + s["train_batch"]]
            flip = torch.rand(len(pick)) < 0.5
            x = images[pick].float().div(255)
            y, u = targets[pick], uncertainty[pick].float()
            x[flip], y[flip], u[flip] = x[flip].flip(-1), y[flip].flip(-1), u[flip].flip(-1)
            loss = batch_loss(
                model(x.to(device)), y.to(device), u.to(device), gamma=s["focal_gamma"], dice_weight=s["dice_weight"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _update_teacher(teacher, student, s["ema_decay"])
            losses.append(float(loss.detach()))
        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "seconds": round(time.perf_counter() - started, 3),
            "images": len(images) * world,
        }
        history.append(metrics)
        if rank == 0:
            save_checkpoint(
                checkpoints,
                epoch,
                {
                    "student": {k: v.cpu() for k, v in student.state_dict().items()},
                    "teacher": {k: v.cpu() for k, v in teacher.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history": history,
                    "architecture": s["architecture"],
                    "class_ids": list(job.class_ids),
                },
            )
        ray.train.report(metrics)


def train(job: TrainingJob, *, num_workers: int, use_gpu: bool, max_failures: int) -> tuple[str, dict[str, Any]]:
    """Run ``train_loop`` on Ray Train until every epoch has a checkpoint -> (the last
    checkpoint's key in ``job.checkpoints``, its state). Resumes from the checkpoints there.
    Ray Train keeps its own run files in a temporary folder: seglab reports it no
    checkpoint, so nothing of them outlives the call."""
    checkpoints = Objects(job.checkpoints)
    found = latest_checkpoint(checkpoints)
    if found is None or int(found[1]["epoch"]) + 1 < job.settings["epochs"]:
        with tempfile.TemporaryDirectory(prefix="seglab-train-") as ray_train_files:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"job": asdict(job)},
                scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                run_config=RunConfig(
                    name="train",
                    storage_path=ray_train_files,
                    failure_config=FailureConfig(max_failures=max_failures),
                ),
            )
            trainer.fit()
        found = latest_checkpoint(checkpoints)
    if found is None:
        raise RuntimeError(f"{job.checkpoints}: training finished without a readable checkpoint")
    return found
