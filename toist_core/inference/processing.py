"""The four choices in which toist's pre- and post-processing differs from the reference's
evaluation, and how ``InferenceConfig.protocol`` sets them.

The network is the reference's to fp32 noise; what moves the outputs of an official checkpoint
is how the image gets in and how the boxes come out:

* resize: toist resizes the float image (antialiased bilinear, on the model's device); the
  reference resizes the uint8 PIL image (``T.RandomResize([800], max_size=1333)`` ->
  torchvision's ``F.resize`` on a PIL image = ``PIL.Image.resize(..., BILINEAR)``), then
  ``ToTensor``. Both use the same output size rule.
* padding: toist pads a batch to its largest image rounded up to a multiple of 32 (a lone
  frame too); the reference's ``NestedTensor`` pads to the batch's largest image only.
* box clipping: toist clips boxes to the image; the reference's ``PostProcess`` does not.
* duplicates: toist drops an instance whose mask (box, without masks) overlaps a better-scoring
  kept one with IoU above ``InferenceConfig.duplicate_iou``; the reference keeps every query.

Masks follow the reference's ``PostProcessSegm`` under both protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import InferenceConfig

ResizeMethod = Literal["float", "pil"]


@dataclass(frozen=True)
class Processing:
    """How :class:`~toist_core.inference.TaskSegmenter` prepares images and boxes.

    resize:       ``"float"`` (antialiased bilinear on the float image) or ``"pil"`` (PIL
                  bilinear on the uint8 image, the reference's).
    pad_multiple: a batch ``[B, 3, H, W]`` is padded to its largest image rounded up to a
                  multiple of this (1: the largest image itself, the reference's).
    clip_boxes:   clip ``(x1, y1, x2, y2)`` to the image (the reference does not).
    duplicate_iou: drop an instance overlapping a better kept one by more than this IoU
                  (None: keep all, the reference's).
    """

    resize: ResizeMethod
    pad_multiple: int
    clip_boxes: bool
    duplicate_iou: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resize not in ("float", "pil"):
            raise ValueError(f"resize must be 'float' or 'pil', got {self.resize!r}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")


# The reference evaluation: uint8 PIL resize, NestedTensor padding, PostProcess boxes, every query.
REFERENCE = Processing(resize="pil", pad_multiple=1, clip_boxes=False, duplicate_iou=None)


def processing_of(inference: InferenceConfig) -> Processing:
    """The processing ``inference.protocol`` stands for (``"toist"`` uses ``pad_multiple``)."""
    if inference.protocol == "reference":
        return REFERENCE
    return Processing(resize="float", pad_multiple=inference.pad_multiple, clip_boxes=True,
                      duplicate_iou=inference.duplicate_iou)
