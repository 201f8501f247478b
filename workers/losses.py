"""Uncertainty-aware training losses (SUM) and image weights (SCALER), on torch tensors.

Shapes: logits float [B, C, H, W]; target int64 [B, H, W] class index, ``IGNORE_INDEX`` where
the label is unknown; uncertainty float [B, H, W] in [0, 1] (0 = certain).

  focal:  SUM's focal loss weighted per pixel by the certainty 1 - u,
          mean over labelled pixels of (1 - u) * -(1 - p_t)^gamma * log p_t;
  dice:   soft Dice over classes, on the labelled pixels whose certainty exceeds 1/2 only;
  images: SCALER-style image weights 1 - mean binary entropy of u over the image's labelled
          pixels: an image whose labels are undecided (u near 1/2) counts less.
Each image's loss is focal + dice_weight * dice; the batch loss is the image-weighted mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def focal_loss(logits: torch.Tensor, target: torch.Tensor, certainty: torch.Tensor, gamma: float) -> torch.Tensor:
    """-> float [B], per image: the certainty-weighted mean focal loss over labelled pixels."""
    labelled = target != IGNORE_INDEX
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt * certainty * labelled
    return loss.flatten(1).sum(1) / labelled.flatten(1).sum(1).clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, certainty: torch.Tensor) -> torch.Tensor:
    """-> float [B], per image: 1 - mean soft Dice over the classes present (in the label or
    the prediction) on labelled pixels with certainty > 1/2; 0 for an image without any."""
    keep = ((target != IGNORE_INDEX) & (certainty > 0.5)).unsqueeze(1).float()
    probabilities = F.softmax(logits, dim=1) * keep
    one_hot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * keep
    intersection = (probabilities * one_hot).flatten(2).sum(2)
    sizes = probabilities.flatten(2).sum(2) + one_hot.flatten(2).sum(2)
    present = sizes > 1e-6
    dice = (2 * intersection + 1e-6) / (sizes + 1e-6)
    per_image = 1.0 - (dice * present).sum(1) / present.sum(1).clamp(min=1)
    return per_image * (keep.flatten(1).sum(1) > 0)


def image_weights(target: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """-> float [B] in [0, 1]: 1 - mean over labelled pixels of H(u) / log 2."""
    labelled = (target != IGNORE_INDEX).float()
    u = uncertainty.clamp(1e-6, 1 - 1e-6)
    entropy = -(u * u.log() + (1 - u) * (1 - u).log()) / math.log(2.0)
    mean = (entropy * labelled).flatten(1).sum(1) / labelled.flatten(1).sum(1).clamp(min=1)
    return 1.0 - mean


def batch_loss(
    logits: torch.Tensor, target: torch.Tensor, uncertainty: torch.Tensor, *, gamma: float, dice_weight: float
) -> torch.Tensor:
    """The scalar training loss of a batch (see the module docstring)."""
    certainty = 1.0 - uncertainty
    per_image = focal_loss(logits, target, certainty, gamma) + dice_weight * dice_loss(logits, target, certainty)
    weights = image_weights(target, uncertainty)
    return (weights * per_image).sum() / weights.sum().clamp(min=1e-6)
