"""The ``debug_image`` overlay: masks tinted, boxes, rank and score, the task on top.

Works on the ranked instances' mask crops, so only the pixels of each mask's box are touched
(toist_core.visualize blends whole-image masks, too slow per frame); colours are the same.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from toist_core.visualize import box_pixels, instance_color


def draw_overlay(rgb: np.ndarray, ranked: Sequence, title: str = "", alpha: float = 0.45) -> np.ndarray:
    """A ``[H, W, 3]`` uint8 BGR picture of ``rgb`` with the ranked instances drawn on it."""
    out = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    scale = max(0.4, min(out.shape[:2]) / 600.0)
    thickness = max(1, int(round(2 * scale)))
    for item in reversed(list(ranked)):  # best instance drawn last, on top
        colour = tuple(reversed(instance_color(item.rank)))  # RGB palette -> BGR
        crop = item.mask_crop
        if crop is not None and crop.size:
            x, y, w, h = item.roi
            region = out[y:y + h, x:x + w]
            tint = np.empty_like(region)
            tint[:] = colour
            blended = cv2.addWeighted(region, 1.0 - alpha, tint, alpha, 0.0)
            region[crop] = blended[crop]
        x0, y0, x1, y1 = box_pixels(item.box)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness)
        _label(out, f"#{item.rank} {item.score:.2f}", (x0, y0), colour, scale)
    if title:
        _label(out, title, (0, 0), (255, 255, 255), scale, below=True)
    return out


def _label(image: np.ndarray, text: str, corner: tuple[int, int], colour, scale: float, below: bool = False) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    (w, h), base = cv2.getTextSize(text, font, 0.5 * scale, 1)
    x = min(max(corner[0], 0), max(0, image.shape[1] - w - 2))
    y = corner[1] + h + base + 2 if below or corner[1] < h + base + 2 else corner[1]
    cv2.rectangle(image, (x, y - h - base - 2), (x + w + 2, y), (0, 0, 0), -1)
    cv2.putText(image, text, (x + 1, y - base), font, 0.5 * scale, colour, 1, cv2.LINE_AA)
