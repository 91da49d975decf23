"""From the decoder's outputs to instances in original-image pixels."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def select(scores: Tensor, threshold: float, limit: int) -> Tensor:
    """Indices of the queries scoring at least ``threshold``, best first, at most ``limit``."""
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] >= threshold]
    return order[:limit]


def to_pixels(boxes: Tensor, size: tuple[int, int], clip: bool = True) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` ``[N, 4]`` -> ``(x1, y1, x2, y2)`` pixels ``[N, 4]`` of an
    ``(H, W)`` image, as the reference's ``PostProcess``; ``clip``: then clipped to the image
    (the reference leaves a box that leaves the image as it is)."""
    height, width = size
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    if not clip:
        return xyxy
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return xyxy


def image_memory(memory: dict, b: int) -> dict:
    """The part of a batch's memory the mask head reads, for image ``b`` alone."""
    return {
        "src_proj": memory["src_proj"][b:b + 1],
        "features": [f[b:b + 1] for f in memory["features"]],
        "img_memory": memory["img_memory"][:, b:b + 1],
        "text_memory": memory["text_memory"][:, b:b + 1],
        "mask": memory["mask"][b:b + 1],
    }


def masks_at_original(logits: Tensor, size: tuple[int, int], padded: Sequence[int], orig: tuple[int, int],
                      threshold: float) -> np.ndarray:
    """``[N, H, W]`` bool masks at the original resolution from stride-4 logits ``[1, N, h, w]``.

    As the reference's ``PostProcessSegm``: bilinear to the padded input size -> crop to the
    image's resized ``size`` -> bilinear to the original size -> sigmoid > ``threshold``. (The
    reference upsamples to the batch's largest resized image, which is its padded size; with
    toist's rounded-up padding the padded size is the network's input, so the crop still
    removes exactly the padding.)
    """
    logits = F.interpolate(logits.float(), size=tuple(padded), mode="bilinear", align_corners=False)
    logits = logits[:, :, :size[0], :size[1]]
    logits = F.interpolate(logits, size=orig, mode="bilinear", align_corners=False)
    return (logits[0].sigmoid() > threshold).cpu().numpy()
