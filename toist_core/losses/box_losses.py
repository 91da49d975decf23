"""L1 and GIoU losses of matched (prediction, target) box pairs (DETR ``loss_boxes``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


def box_l1_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> Tensor:
    """``sum |src - target| / num_boxes`` over ``[M, 4]`` (cx, cy, w, h) pairs."""
    return F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes


def box_giou_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> Tensor:
    """``sum (1 - GIoU(src_i, target_i)) / num_boxes`` over ``[M, 4]`` (cx, cy, w, h) pairs."""
    giou = generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                               box_convert(target_boxes, "cxcywh", "xyxy"))
    return (1 - torch.diag(giou)).sum() / num_boxes
