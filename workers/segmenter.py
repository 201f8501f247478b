"""The segmentation network ``retrain`` trains: a torchvision model built without weights.

No weights are downloaded (``weights=None, weights_backbone=None``): the network starts from
random initialisation, as every model here must. ``forward`` returns per-class logits at
the input's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation

from seglab.workers.checkpoints import load_exact
from seglab.workers.devices import pick_device


class Segmenter(nn.Module):
    """images: float32 [B, 3, H, W] in [0, 1] (RGB) -> logits float32 [B, C, H, W]."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, architecture: str, num_classes: int):
        super().__init__()

        if not hasattr(segmentation, architecture):
            raise ValueError(f"torchvision has no segmentation model '{architecture}'")
        self.architecture = architecture
        self.net = getattr(segmentation, architecture)(weights=None, weights_backbone=None, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)["out"]


class TeacherPredictor:
    """The mean teacher of a retrain checkpoint, loaded safely (weights_only, exact keys):
    ``predictor(image)`` with image HxWx3 uint8 RGB -> float32 [C, h, w] softmax at ``input_size``."""

    def __init__(
        self,
        checkpoint: str,
        architecture: str,
        num_classes: int,
        input_size: tuple[int, int],
        data: bytes | None = None,
    ):
        """``checkpoint``: its file, or only its name when ``data`` holds its bytes."""
        self.device = pick_device("auto")
        self.input_size = tuple(input_size)
        self.model = Segmenter(architecture, num_classes)
        load_exact(self.model, checkpoint, nested_key="teacher", data=data)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(self.device)
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return torch.softmax(self.model(x), dim=1)[0].cpu().numpy()
