"""The reference's train / test transforms on an image and its target together.

Before :class:`Normalize` a sample is ``(image, target)`` with ``image`` a uint8
``tv_tensors.Image [3, H, W]`` and, in ``target``, ``boxes [n, 4]`` (x0, y0, x1, y1 in pixels),
optional ``masks [n, H, W]`` bool and ``area [n]``. torchvision.transforms.v2 kernels move image,
boxes and masks together; the random choices and the output-size rule are the reference's:

train (``cautious=True`` in ``datasets/tdod.py``: no horizontal flip), with probability 1/2 each
  (a) RandomResize(480..800 step 32, max 1333), or
  (b) RandomResize(400/500/600) -> RandomSizeCrop(384, 1333, keep every box)
      -> RandomResize(480..800 step 32, max 1333);
test: RandomResize([800], max 1333);
then Normalize: ImageNet mean/std, boxes -> cx, cy, w, h normalised to the image size.

Randomness comes from torch's global CPU generator (and Python's); training seeds both per
sample, from (seed, epoch, index), through ``training.sampling.SeededSamples``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SIZES = tuple(range(480, 801, 32))
CROP_RESIZE_SIZES = (400, 500, 600)

Sample = tuple[Tensor, dict]


def resized_hw(height: int, width: int, size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """Output (h, w) with the short side ``size``, the long side at most about ``max_size``.

    The reference rule (``get_size_with_aspect_ratio``): the short side is reduced to
    ``round(max_size * short / long)`` when the long side would exceed ``max_size``; the long
    side is then ``int(size * long / short)`` (truncated). torchvision's own rule differs by a
    pixel in some cases, so the size is computed here and passed explicitly.

    An image more elongated than ``2 * max_size`` : 1 (e.g. 1 x 2000 at ``max_size`` 256) would
    get a short side of 0 pixels (the reference's rule asks for an empty image); it keeps 1
    pixel, and its long side then exceeds ``max_size``. Every other size is the reference's.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = max(1, int(round(max_size * short / long)))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Tensor, target: dict, size_hw: tuple[int, int]) -> Sample:
    """Resize to exactly ``size_hw``: image bilinear (antialiased), masks nearest, boxes and area scaled."""
    height, width = image.shape[-2:]
    out_h, out_w = size_hw
    if (out_h, out_w) == (height, width):
        return image, target
    image = F.resize(image, [out_h, out_w], antialias=True)
    target = dict(target)
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
    target["boxes"] = F.resize(boxes, [out_h, out_w]).as_subclass(Tensor)
    target["area"] = target["area"] * ((out_w / width) * (out_h / height))
    if "masks" in target:
        target["masks"] = F.resize(tv_tensors.Mask(target["masks"]), [out_h, out_w]).as_subclass(Tensor)
    target["size"] = torch.tensor([out_h, out_w])
    return image, target


def crop(image: Tensor, target: dict, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a region; boxes are shifted and clipped, area recomputed from the clipped boxes (reference)."""
    in_h, in_w = image.shape[-2:]
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    boxes = _cropped_boxes(target["boxes"], top, left, height, width)
    target["boxes"] = boxes
    target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    target["size"] = torch.tensor([height, width])
    return image, target


def _cropped_boxes(boxes: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    shifted = boxes - boxes.new_tensor([left, top, left, top])
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum(shifted, limit).clamp(min=0)


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Tensor, dict], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> Sample:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomResize:
    """Short side drawn uniformly from ``sizes``; long side capped by ``max_size`` (reference rule)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Tensor, target: dict) -> Sample:
        size = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        height, width = image.shape[-2:]
        return resize(image, target, resized_hw(height, width, size, self.max_size))


class RandomSizeCrop:
    """Random crop of size in ``[min_size, min(image, max_size)]`` per side that keeps every box.

    A candidate crop is accepted when every box keeps a positive width and height once clipped
    to it (the reference's ``respect_boxes=True``). After ``max_tries`` failed candidates the
    sample is returned uncropped, so no target is ever lost.
    """

    def __init__(self, min_size: int, max_size: int, max_tries: int = 150):
        self.min_size = min_size
        self.max_size = max_size
        self.max_tries = max_tries

    def __call__(self, image: Tensor, target: dict) -> Sample:
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        max_w, max_h = min(width, self.max_size), min(height, self.max_size)
        min_w, min_h = min(self.min_size, max_w), min(self.min_size, max_h)
        for _ in range(self.max_tries):
            crop_w = int(torch.randint(min_w, max_w + 1, ()))
            crop_h = int(torch.randint(min_h, max_h + 1, ()))
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            kept = _cropped_boxes(boxes, top, left, crop_h, crop_w)
            if bool(((kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])).all()):
                return crop(image, target, top, left, crop_h, crop_w)
        return image, target


class RandomSelect:
    """``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Tensor, target: dict) -> Sample:
        if float(torch.rand(())) < self.p:
            return self.first(image, target)
        return self.second(image, target)


class Normalize:
    """uint8 image -> float normalised ``[3, H, W]``; boxes -> cx, cy, w, h in [0, 1] of this image."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Tensor, target: dict) -> Sample:
        pixels = image.as_subclass(Tensor).to(torch.float32).div_(255.0)
        pixels = (pixels - self.mean) / self.std
        target = dict(target)
        height, width = pixels.shape[-2:]
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        target["boxes"] = cxcywh / cxcywh.new_tensor([width, height, width, height])
        return pixels, target


def make_transforms(split: str, train_sizes: Sequence[int] = TRAIN_SIZES, max_size: int = 1333,
                    crop_resize_sizes: Sequence[int] = CROP_RESIZE_SIZES, crop_min_size: int = 384,
                    crop_max_size: int = 1333, test_size: int = 800) -> Compose:
    """The reference pipeline for ``split`` ("train" or anything else = test)."""
    if split == "train":
        resize_only = RandomResize(train_sizes, max_size=max_size)
        resize_crop_resize = Compose([
            RandomResize(crop_resize_sizes),
            RandomSizeCrop(crop_min_size, crop_max_size),
            RandomResize(train_sizes, max_size=max_size),
        ])
        return Compose([RandomSelect(resize_only, resize_crop_resize), Normalize()])
    return Compose([RandomResize([test_size], max_size=max_size), Normalize()])
