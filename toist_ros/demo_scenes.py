"""Held-out synthetic scenes for the demo, and whether the node's instances on them are right.

The embedded default model was trained on synthetic COCO-Tasks (``toist_core.data.synth``).
Its ``metrics.json`` records the generator settings, so the demo can draw scenes of the *test*
split (never used in training) and knows their objects: an instance is right when its box
overlaps a preferred object of the task with IoU >= 0.5 (the paper metric's threshold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

IOU_RIGHT = 0.5


@dataclass
class Scene:
    """A synthetic test image and the boxes ``[n, 4]`` (x0, y0, x1, y1 px) of the task's preferred
    objects; ``objects`` (bottom to top) and ``boxes`` (theirs, in that order) are all of them."""

    name: str
    pixels: np.ndarray
    preferred_boxes: np.ndarray
    objects: list = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def model_metrics(model_dir: Path) -> Optional[dict]:
    """The default model's ``metrics.json`` (recipe settings and test metrics), if present."""
    path = Path(model_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def held_out_scenes(settings: dict, task_id: int, count: int) -> list[Scene]:
    """The first ``count`` test-split scenes (the recipe's generator settings) that show an
    object preferred for ``task_id``."""
    from toist_core.data.synth import object_box, preferred_class_indices, scene

    scenes, index = [], 0
    while len(scenes) < count and index < 100 * count:
        pixels, objects = scene("test", index, seed=settings["data_seed"], min_size=settings["min_size"],
                                max_size=settings["max_size"], min_objects=settings["min_objects"],
                                max_objects=settings["max_objects"])
        wanted = preferred_class_indices(task_id, [o.class_index for o in objects])
        boxes = [object_box(o) for o in objects if o.class_index in wanted]
        if boxes:
            scenes.append(Scene(f"synth_test_{index}", pixels, np.asarray(boxes, dtype=np.float64), list(objects),
                                np.asarray([object_box(o) for o in objects], dtype=np.float64)))
        index += 1
    return scenes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes (torchvision's, on numpy arrays)."""
    import torch
    from torchvision.ops import box_iou as torch_box_iou

    a = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4))
    return torch_box_iou(a, b).numpy()


def right_instances(boxes: np.ndarray, preferred_boxes: np.ndarray) -> list[bool]:
    """Per instance box: does it hit a preferred object (IoU >= 0.5)?"""
    if len(preferred_boxes) == 0:
        return [False] * len(np.asarray(boxes).reshape(-1, 4))
    return [bool(row.max() >= IOU_RIGHT) for row in box_iou(boxes, preferred_boxes)]
