"""Sigmoid focal loss and dice loss of matched masks (DETR ``loss_masks``)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def mask_focal_loss(mask_logits: Tensor, target_masks: Tensor, num_boxes: float,
                    alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss averaged over the pixels of each mask, summed over masks, / ``num_boxes``.

    ``mask_logits [M, P]`` and ``target_masks [M, P]`` (flattened masks, targets in {0, 1}).
    """
    loss = sigmoid_focal_loss(mask_logits, target_masks, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


def mask_dice_loss(mask_logits: Tensor, target_masks: Tensor, num_boxes: float) -> Tensor:
    """``sum_i (1 - (2 sum p t + 1) / (sum p + sum t + 1)) / num_boxes``, ``p = sigmoid``."""
    prob = mask_logits.sigmoid()
    numerator = 2 * (prob * target_masks).sum(1)
    denominator = prob.sum(-1) + target_masks.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def pad_target_masks(masks: Sequence[Tensor]) -> Tensor:
    """Zero-pad per-image ``[n_b, H_b, W_b]`` masks to ``[B, max n, max H, max W]`` floats.

    Padding is at the bottom/right, as the images are padded (the reference's
    ``NestedTensor.from_tensor_list``).
    """
    num = max(m.shape[0] for m in masks)
    height = max(m.shape[1] for m in masks)
    width = max(m.shape[2] for m in masks)
    out = torch.zeros((len(masks), num, height, width), dtype=torch.float32, device=masks[0].device)
    for b, m in enumerate(masks):
        out[b, : m.shape[0], : m.shape[1], : m.shape[2]] = m.float()
    return out


def upsample_masks(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``[M, h, w]`` mask logits to ``[M, H, W]`` (align_corners=False)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0,) + tuple(size))
    return F.interpolate(mask_logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
