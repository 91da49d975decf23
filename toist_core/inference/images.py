"""Images in: the checks a frame must pass, the reference's evaluation resize (on the float
image, or on the uint8 image through PIL as the reference does) and the padded batch."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import InferenceConfig
from ..structures import ImageBatch
from .processing import Processing


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
               channels_last: bool, processing: Processing) -> tuple[ImageBatch, list[tuple[int, int]]]:
    """Resize (reference evaluation size rule, ``processing.resize`` method), normalise with
    ``mean`` / ``std`` ``[3, 1, 1]`` on their device and pad to a multiple of
    ``processing.pad_multiple``; returns the padded batch ``[B, 3, H, W]`` and each image's
    resized ``(h, w)``."""
    from ..data.transforms import resized_hw

    device = mean.device
    tensors, sizes = [], []
    for image in images:
        height, width = image.shape[:2]
        size = resized_hw(height, width, inference.short_side, inference.max_size)
        if processing.resize == "pil":
            x = resize_pil(image, size).to(device)
        else:
            x = resize_float(image, size, device)
        tensors.append((x - mean) / std)
        sizes.append(size)
    batch = ImageBatch.from_images(tensors, size_divisibility=processing.pad_multiple)
    if channels_last:
        batch = ImageBatch(batch.tensors.contiguous(memory_format=torch.channels_last), batch.mask)
    return batch, sizes


def resize_float(image: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``[3, h, w]`` float in [0, 1] at ``size`` = (h, w): antialiased
    bilinear on the float image, on ``device`` (no round trip through uint8)."""
    # A read-only array (a ROS message's buffer, np.frombuffer) is copied: torch warns on every
    # such array, though nothing here writes to it.
    pixels = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
    x = torch.from_numpy(pixels).to(device).permute(2, 0, 1).float().div_(255.0)
    if size != tuple(image.shape[:2]):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return x


def resize_pil(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``[3, h, w]`` float in [0, 1] at ``size`` = (h, w), as the
    reference: torchvision's ``F.resize`` on a PIL image is ``PIL.Image.resize((w, h), BILINEAR)``
    (the result rounded to uint8 again), then ``ToTensor`` divides by 255. On the CPU."""
    height, width = size
    pil = Image.fromarray(np.ascontiguousarray(image))              # H x W x 3 uint8 -> an RGB image
    if (height, width) != tuple(image.shape[:2]):
        # Image.Resampling is Pillow >= 9.1; Ubuntu 22.04 (Humble) ships 9.0.1. The same constant.
        pil = pil.resize((width, height), getattr(Image, "Resampling", Image).BILINEAR)
    pixels = torch.from_numpy(np.array(pil, dtype=np.uint8))      # [h, w, 3], a writable copy
    return pixels.permute(2, 0, 1).contiguous().float().div(255.0)
