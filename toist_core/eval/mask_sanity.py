"""Do a model's masks belong to their instances? Two numbers a mAP can hide.

- ``pairwise_iou_median``: median mask IoU over pairs of different instances of one image. A
  mask head that ignores its query paints the same region for every instance (IoU near 1).
- ``inside_box_mean``: mean over instances of the share of the mask's pixels inside the
  instance's own box. A mask that spills over the image puts most of its pixels outside.

Computed from :class:`toist_core.inference.Prediction` objects (masks at image resolution).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def mask_box_agreement(predictions: Iterable) -> dict[str, float]:
    """``{"pairwise_iou_median", "inside_box_mean", "pairs", "instances"}`` over ``predictions``
    (NaN where there is nothing to measure: no pair, no non-empty mask)."""
    ious: list[float] = []
    inside: list[float] = []
    for pred in predictions:
        if pred.masks is None or len(pred) == 0:
            continue
        masks = pred.masks.reshape(len(pred), -1).astype(np.float32)        # [N, H*W]
        areas = masks.sum(1)
        overlap = masks @ masks.T                                            # [N, N] intersections
        union = areas[:, None] + areas[None, :] - overlap
        upper = np.triu_indices(len(pred), k=1)
        ious += [float(i / u) if u > 0 else 0.0 for i, u in zip(overlap[upper], union[upper])]
        height, width = pred.masks.shape[1:]
        for mask, area, box in zip(pred.masks, areas, pred.boxes):
            if area == 0:
                continue
            x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
            x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
            inside.append(float(mask[y0:y1, x0:x1].sum()) / float(area))
    return {"pairwise_iou_median": float(np.median(ious)) if ious else float("nan"),
            "inside_box_mean": float(np.mean(inside)) if inside else float("nan"),
            "pairs": float(len(ious)), "instances": float(len(inside))}
