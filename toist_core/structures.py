"""The padded image batch every model entry point takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """Images zero-padded to a common size, with the padding marked.

    tensors: ``[B, 3, H, W]`` normalised images, zero in the padding.
    mask:    ``[B, H, W]`` bool, True where a pixel is padding (the reference's convention).
    """

    tensors: Tensor
    mask: Tensor

    @classmethod
    def from_images(cls, images: Sequence[Tensor], size_divisibility: int = 1) -> "ImageBatch":
        """Pad ``[3, h_i, w_i]`` images to the batch's largest h and w, rounded up to a multiple
        of ``size_divisibility`` (1: no rounding, as the reference's training batches)."""
        if len(images) == 0:
            raise ValueError("cannot batch an empty list of images")
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        channels = images[0].shape[0]
        height = -(-max(int(img.shape[-2]) for img in images) // size_divisibility) * size_divisibility
        width = -(-max(int(img.shape[-1]) for img in images) // size_divisibility) * size_divisibility
        first = images[0]
        tensors = first.new_zeros((len(images), channels, height, width))
        mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            tensors[i, :, :h, :w].copy_(img)
            mask[i, :h, :w] = False
        return cls(tensors, mask)

    def to(self, device, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(self.tensors.to(device, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ImageBatch":
        """Page-locked copies (a DataLoader with ``pin_memory=True`` calls this; without it the
        images were passed through unpinned and ``to(cuda, non_blocking=True)`` waited for them)."""
        return ImageBatch(self.tensors.pin_memory(), self.mask.pin_memory())

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Un-padded (h, w) of every image."""
        valid = ~self.mask
        heights = valid.any(dim=2).sum(dim=1)
        widths = valid.any(dim=1).sum(dim=1)
        return [(int(h), int(w)) for h, w in zip(heights, widths)]

    def __len__(self) -> int:
        return self.tensors.shape[0]
