"""Do a model's masks belong to their instances? Numbers a mAP can hide.

- ``pairwise_iou_median``: median mask IoU over pairs of different instances of one image. A
  mask head that ignores its query paints the same region for every instance (IoU near 1); so
  do duplicate detections of one object, which a DETR-style model should not make.
- ``disjoint_iou_median``: the same over pairs whose *boxes* barely overlap (IoU < 0.1): two
  instances in different places must not share a mask, duplicates or not.
- ``inside_box_mean``: mean over instances of the share of the mask's pixels inside the
  instance's own box. A mask that spills over the image puts most of its pixels outside.

Computed from :class:`toist_core.inference.Prediction` objects (masks at image resolution).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

DISJOINT_BOX_IOU = 0.1


def mask_box_agreement(predictions: Iterable) -> dict[str, float]:
    """``{"pairwise_iou_median", "disjoint_iou_median", "inside_box_mean", "pairs", "disjoint_pairs",
    "instances"}`` over ``predictions`` (NaN where there is nothing to measure)."""
    import torch
    from torchvision.ops import box_iou

    ious: list[float] = []
    disjoint: list[float] = []
    inside: list[float] = []
    for pred in predictions:
        if pred.masks is None or len(pred) == 0:
            continue
        masks = pred.masks.reshape(len(pred), -1).astype(np.float32)        # [N, H*W]
        areas = masks.sum(1)
        overlap = masks @ masks.T                                            # [N, N] intersections
        union = areas[:, None] + areas[None, :] - overlap
        mask_iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
        boxes = torch.as_tensor(np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 4))
        apart = box_iou(boxes, boxes).numpy() < DISJOINT_BOX_IOU
        upper = np.triu_indices(len(pred), k=1)
        ious += mask_iou[upper].tolist()
        disjoint += mask_iou[upper][apart[upper]].tolist()
        height, width = pred.masks.shape[1:]
        for mask, area, box in zip(pred.masks, areas, pred.boxes):
            if area == 0:
                continue
            x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
            x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
            inside.append(float(mask[y0:y1, x0:x1].sum()) / float(area))

    def median(values):
        return float(np.median(values)) if values else float("nan")

    return {"pairwise_iou_median": median(ious), "disjoint_iou_median": median(disjoint),
            "inside_box_mean": float(np.mean(inside)) if inside else float("nan"),
            "pairs": float(len(ious)), "disjoint_pairs": float(len(disjoint)), "instances": float(len(inside))}
