"""What the SAM and SAM2 backends share: a frozen network built lazily inside a worker
from a checkpoint that is hashed and loaded safely."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from seglab.stages.parts.promptset import PromptBatch
from seglab.workers.checkpoints import checkpoint_sha256, load_exact
from seglab.workers.devices import autocast_dtype, pick_device
from seglab.workers.promptable import PromptableBackend

#: default prompts per decoder call. On the CPU a batch of 64 needs ~256 MiB of attention
#: activations that glibc maps fresh for every call; the page faults cost more than the
#: arithmetic (measured by `seglab bench decode --prompt-batch N`).
CPU_PROMPT_BATCH = 4
ACCELERATOR_PROMPT_BATCH = 64


class FrozenModelBackend(PromptableBackend):
    """Subclasses name the architecture, the checkpoint layout and the preprocessing."""

    #: key under which the checkpoint nests its state dict (None: the file is the state dict)
    state_dict_key: str | None = None

    def __init__(self, config: Any):
        self.config = config
        self._model: torch.nn.Module | None = None
        self._sha256: str | None = None

    @abstractmethod
    def build_architecture(self) -> torch.nn.Module:
        """The network with random weights, on the CPU."""

    @abstractmethod
    def model_name(self) -> str: ...

    @abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """Everything besides the weights that changes the features."""

    def on_loaded(self, model: torch.nn.Module) -> None:
        """Hook after the weights are loaded and the model is on its device."""

    def signature(self) -> dict[str, str]:
        if self._sha256 is None:
            self._sha256 = checkpoint_sha256(self.config.checkpoint)
        preprocessing = {
            **self.preprocessing(),
            "precision": self.config.precision,
            "feature_dtype": self.config.feature_dtype,
        }
        return {
            "model": self.model_name(),
            "checkpoint": self._sha256,
            "preprocessing": json.dumps(preprocessing, sort_keys=True),
        }

    @property
    def model(self) -> torch.nn.Module:
        """Built, loaded, frozen (eval, no grad) and moved to its device on first use."""
        if self._model is None:
            model = self.build_architecture()
            load_exact(model, self.config.checkpoint, nested_key=self.state_dict_key)
            self.device = pick_device(self.config.device)
            self.dtype = autocast_dtype(self.device, self.config.precision)
            model.eval().requires_grad_(False).to(self.device)
            self.on_loaded(model)
            self._model = model
        return self._model

    @property
    def prompt_batch(self) -> int:
        """Prompts per decoder call: the manifest's, else the default of the model's device."""
        self.model  # noqa: B018 - the device is known once loaded
        if self.config.prompt_batch is not None:
            return self.config.prompt_batch
        return CPU_PROMPT_BATCH if self.device.type == "cpu" else ACCELERATOR_PROMPT_BATCH

    @abstractmethod
    def cached_tensors(self, features: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The cached features of one image as float32 tensors on the model's device."""

    @abstractmethod
    def decode_rows(
        self, cached: dict[str, torch.Tensor], coords: np.ndarray, labels: np.ndarray, boxes: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder call: coords float32 [p, K, 2] and boxes [p, 4] in model-input pixels,
        labels int32 [p, K] -> (logits [p, M, S, S], predicted IoU [p, M])."""

    def decode(self, features: Mapping[str, np.ndarray], prompts: PromptBatch) -> tuple[np.ndarray, np.ndarray]:
        self.model  # noqa: B018 - load on first use
        p, m, s = len(prompts), self.num_candidates, self.grid_size
        logits = np.zeros((p, m, s, s), np.float32)
        quality = np.zeros((p, m), np.float32)
        if p == 0:
            return logits, quality
        frame = self.frame(features)
        coords = frame.scale_to_input(prompts.coords).astype(np.float32)
        boxes = frame.scale_to_input(prompts.boxes.reshape(-1, 2, 2)).reshape(-1, 4).astype(np.float32)
        cached = self.cached_tensors(features)
        step = self.prompt_batch
        with torch.inference_mode():
            # prompts with and without a box are decoded apart: the padding slots a shared
            # batch would need are tokens the decoder attends to, and would change its output
            for boxed in (False, True):
                index = np.flatnonzero(prompts.has_box == boxed)
                for start in range(0, len(index), step):
                    rows = index[start : start + step]
                    low_res, iou = self.decode_rows(
                        cached, coords[rows], prompts.labels[rows], boxes[rows] if boxed else None
                    )
                    logits[rows], quality[rows] = low_res.float().cpu().numpy(), iou.float().cpu().numpy()
        return logits, quality
