"""Hungarian matching between the queries of a model and the target boxes of each image.

Cost of assigning query ``q`` to target box ``j`` (MDETR's ``HungarianMatcher``)::

    C[q, j] = w_bbox * ||b_q - b_j||_1  -  w_class * sum_t softmax(logits_q)_t * pos_j[t]
              -  w_giou * GIoU(b_q, b_j)

with ``pos_j`` the binary positive-token map of box ``j`` (so the class term is the *sum* of
the probabilities of its positive tokens) and boxes in (cx, cy, w, h) for L1, converted to
corners for GIoU. The assignment minimises the total cost, one image at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

# (query indices, target indices), both int64 on the CPU, as DETR returns them.
Match = tuple[Tensor, Tensor]


def _check_target(target: dict, index: int, num_tokens: int) -> None:
    for key in ("boxes", "positive_map"):
        if key not in target:
            raise KeyError(f"targets[{index}] has no {key!r} (keys: {sorted(target)})")
    boxes, pos = target["boxes"], target["positive_map"]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"targets[{index}]['boxes']: expected [n, 4], got {tuple(boxes.shape)}")
    if pos.shape != (boxes.shape[0], num_tokens):
        raise ValueError(
            f"targets[{index}]['positive_map']: expected [{boxes.shape[0]}, {num_tokens}] "
            f"(one row per box, one column per logit), got {tuple(pos.shape)}"
        )


def matching_cost(logits: Tensor, boxes: Tensor, target_boxes: Tensor, positive_map: Tensor,
                  cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Tensor:
    """Cost matrix ``[Q, n]`` of one image.

    ``logits [Q, C]``, ``boxes [Q, 4]`` and ``target_boxes [n, 4]`` (cx, cy, w, h),
    ``positive_map [n, C]`` binary.
    """
    prob = logits.softmax(-1)
    class_term = -(prob @ positive_map.to(prob).t())
    bbox_term = torch.cdist(boxes, target_boxes.to(boxes), p=1)
    giou_term = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                     box_convert(target_boxes.to(boxes), "cxcywh", "xyxy"))
    return cost_bbox * bbox_term + cost_class * class_term + cost_giou * giou_term


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target boxes, per image (no gradients)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[Match]:
        """Match ``outputs['pred_logits'] [B, Q, C]`` / ``outputs['pred_boxes'] [B, Q, 4]``
        to ``targets[b]['boxes'] [n_b, 4]`` with ``targets[b]['positive_map'] [n_b, C]``.

        Returns, per image, ``(query_indices, target_indices)``: int64 CPU tensors of length
        ``min(Q, n_b)``, query indices in increasing order.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for a batch of {logits.shape[0]} predictions")
        matches = []
        for b, target in enumerate(targets):
            _check_target(target, b, logits.shape[-1])
            if target["boxes"].shape[0] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = matching_cost(logits[b].float(), boxes[b].float(), target["boxes"].float(),
                                 target["positive_map"], self.cost_class, self.cost_bbox, self.cost_giou)
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(f"matcher: the cost matrix of image {b} has NaN/inf entries "
                                 "(non-finite predicted logits or boxes, or degenerate target boxes)")
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
