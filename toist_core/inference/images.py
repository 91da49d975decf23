"""Images in: the checks a frame must pass, and the reference's evaluation resize."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import InferenceConfig
from ..structures import ImageBatch


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB array, or a ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array (H x W x 3 uint8 RGB), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected shape H x W x 3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{where}: empty image {image.shape}")
    return image


def preprocess(images: Sequence[np.ndarray], inference: InferenceConfig, mean: torch.Tensor, std: torch.Tensor,
               channels_last: bool) -> tuple[ImageBatch, list[tuple[int, int]]]:
    """Resize (reference evaluation rule), normalise with ``mean`` / ``std`` ``[3, 1, 1]`` on their
    device and pad to a multiple of ``inference.pad_multiple``; returns the padded batch
    ``[B, 3, H, W]`` and each image's resized ``(h, w)``."""
    from ..data.transforms import resized_hw

    device = mean.device
    tensors, sizes = [], []
    for image in images:
        height, width = image.shape[:2]
        size = resized_hw(height, width, inference.short_side, inference.max_size)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)
        if size != (height, width):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        tensors.append((x - mean) / std)
        sizes.append(size)
    batch = ImageBatch.from_images(tensors, size_divisibility=inference.pad_multiple)
    if channels_last:
        batch = ImageBatch(batch.tensors.contiguous(memory_format=torch.channels_last), batch.mask)
    return batch, sizes
