"""From the decoder's outputs to instances in original-image pixels."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou


def select(scores: Tensor, threshold: float, limit: int) -> Tensor:
    """Indices of the queries scoring at least ``threshold``, best first, at most ``limit``."""
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] >= threshold]
    return order[:limit]


def drop_duplicates(candidates: Tensor, regions: Callable[[Tensor], Tensor],
                    overlap: Callable[[Tensor, Tensor], Tensor], iou: float, limit: int) -> tuple[Tensor, list[int]]:
    """Greedy duplicate removal: walk ``candidates`` (query indices ``[N]``, best first) and keep
    each one whose IoU with every instance kept before it is at most ``iou``, until ``limit`` are
    kept. ``regions(queries [n]) -> [n, ...]`` describes a chunk of candidates (masks or boxes),
    computed ``limit`` candidates at a time so that only as many are described as the walk
    reaches; ``overlap(a [n, ...], b [m, ...]) -> [n, m]`` IoU. Returns the kept queries
    ``[k]`` and their positions in ``candidates`` (none for ``limit`` 0: nothing is described)."""
    kept: list[int] = []
    kept_regions: list[Tensor] = []
    if limit <= 0:
        return candidates[:0], kept
    step = limit
    for start in range(0, len(candidates), step):
        chunk = regions(candidates[start:start + step])
        for i in range(len(chunk)):
            region = chunk[i:i + 1]
            if kept_regions and float(overlap(region, torch.cat(kept_regions)).max()) > iou:
                continue
            kept.append(start + i)
            kept_regions.append(region)
            if len(kept) == limit:
                return candidates[kept], kept
    return candidates[kept], kept


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[n, m]`` of flattened binary masks ``a [n, P]`` and ``b [m, P]``."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_or_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[n, m]`` of instances described as ``[mask (P values, 0/1), box (x1, y1, x2, y2)]``
    rows ``a [n, P + 4]``, ``b [m, P + 4]``: their masks' IoU, their boxes' where either mask is
    empty (a mask threshold above every pixel's probability leaves no shape to compare, and one
    object found twice would be kept twice)."""
    masks_a, masks_b = a[:, :-4], b[:, :-4]
    empty = (masks_a.sum(1) == 0)[:, None] | (masks_b.sum(1) == 0)[None, :]
    return torch.where(empty, box_iou(a[:, -4:], b[:, -4:]), mask_iou(masks_a, masks_b))


def binary_low_res(logits: Tensor, size: Sequence[int], padded: Sequence[int], threshold: float) -> Tensor:
    """``[N, h*w]`` bool: stride-4 mask logits ``[N, h, w]`` cropped to the part that covers the
    image's resized ``size`` (not its padding) and thresholded, for comparing masks cheaply."""
    height = math.ceil(size[0] * logits.shape[-2] / padded[0])
    width = math.ceil(size[1] * logits.shape[-1] / padded[1])
    return (logits[:, :height, :width].float().sigmoid() > threshold).flatten(1)


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

    Instances are upsampled a group at a time, about :data:`MASK_CHUNK_BYTES` of float logits
    at the original size per group (each instance's pixels are computed alone either way): all
    at once, 100 instances of a 48-megapixel photo took ~40 GB.
    """
    count = logits.shape[1]
    per_instance = 4 * max(1, orig[0] * orig[1], padded[0] * padded[1])
    chunk = max(1, MASK_CHUNK_BYTES // per_instance)
    masks = np.empty((count, *orig), dtype=bool)
    for start in range(0, count, chunk):
        part = F.interpolate(logits[:, start:start + chunk].float(), size=tuple(padded), mode="bilinear",
                             align_corners=False)
        part = F.interpolate(part[:, :, :size[0], :size[1]], size=orig, mode="bilinear", align_corners=False)
        masks[start:start + chunk] = (part[0].sigmoid_() > threshold).cpu().numpy()
    return masks


MASK_CHUNK_BYTES = 256 * 2 ** 20
