"""From model output to ``toist_ros/TaskInstances``: ranking, boxes in image pixels, mask crops.

Geometry is plain numpy (unit-tested without ROS); ``to_instance_msgs`` and
``task_instances_msg`` fill the generated messages.

Mask placement: ``mask_roi`` is the integer pixel hull of the (clamped) box, grown to take in
the mask pixels outside the box, but only as far as the box's *crop window*: the hull widened on
each side by ``max(MASK_MARGIN_MIN_PX, ceil(MASK_MARGIN_FRACTION * hull side))``, clamped to the
image. Mask pixels beyond the window are dropped, so a crop is never larger than
``(w + 2 mx) x (h + 2 my)`` for a ``w x h`` hull, whatever the model's mask does (a mask that
floods the frame used to cost a whole-frame crop per instance). Every pixel inside the box's hull
is kept exactly, holes included. ``mask_area`` counts the published pixels (the 255s of the
crop), so ``full_mask`` of the message always has ``mask_area`` pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from toist_ros.conversions import mask_from_image, mask_to_image

# Crop window margin on each side of the box's pixel hull (see the module docstring). Mask and box
# come from different heads and the mask is upsampled from a coarse grid, so a good mask can
# overhang its box by a few pixels or a few percent of the box: 10 % of the side keeps that
# overhang, and the 8 px floor keeps an upsampling stride's worth for small boxes. Anything
# further out is a mask that disagrees with its box, not worth up to W x H bytes per instance.
MASK_MARGIN_FRACTION = 0.1
MASK_MARGIN_MIN_PX = 8


@dataclass(frozen=True)
class RankedInstance:
    """One kept instance in original image pixels (no ROS types)."""

    rank: int
    score: float
    box: np.ndarray                 # [4] float32 x_min, y_min, x_max, y_max, inside the image
    roi: tuple[int, int, int, int]  # x_offset, y_offset, width, height of the mask crop
    mask_crop: Optional[np.ndarray]  # [roi h, roi w] bool, None when masks are off
    mask_area: int
    hull: tuple[int, int, int, int]  # x_offset, y_offset, width, height of the box's pixel hull


def as_numpy(value: Any) -> Optional[np.ndarray]:
    """numpy view of an array or a (possibly GPU) torch tensor; None stays None."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def rank_instances(boxes: Any, scores: Any, masks: Any, image_size: tuple[int, int], score_threshold: float = 0.0,
                   max_instances: int = 100) -> list[RankedInstance]:
    """Keep, rank and place the instances of one image.

    boxes [N, 4] xyxy in original pixels, scores [N], masks [N, H, W] bool (None: boxes only, the
    mask images stay empty); ``image_size`` = (width, height). Instances with score < threshold
    are dropped, and so are those whose box, clipped to the image, has no area (outside the
    image, or degenerate: they were published, ranked, with a 0 x N mask; the segmenter's own
    ``max_instances`` cut comes before this, so one may still leave a place empty); the rest are
    sorted by score (ties keep model order) and cut to ``max_instances``. A NaN or infinite
    score or box coordinate raises ValueError (a broken model or an fp16 overflow: the frame
    fails and is counted, it never becomes a made-up box).
    """
    width, height = int(image_size[0]), int(image_size[1])
    boxes = as_numpy(boxes)
    scores = as_numpy(scores)
    masks = as_numpy(masks)
    boxes = np.zeros((0, 4), np.float32) if boxes is None else boxes.reshape(-1, 4).astype(np.float32)
    scores = np.zeros((0,), np.float32) if scores is None else scores.reshape(-1).astype(np.float32)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"prediction has {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if masks is not None and masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"prediction has {boxes.shape[0]} boxes but {masks.shape[0]} masks")
    if masks is not None and tuple(masks.shape[1:]) != (height, width):
        raise ValueError(f"masks are {tuple(masks.shape[1:])} (H, W) but the image is {(height, width)}: "
                         "masks must be in original image pixels")

    broken = ~(np.isfinite(scores) & np.isfinite(boxes).all(axis=1))
    if broken.any():
        raise ValueError(f"the model gave non-finite scores or boxes for {int(broken.sum())} of {len(scores)} "
                         f"instances (first: score {scores[broken][0]}, box {boxes[broken][0].tolist()})")
    clamped = {int(i): clamp_box(boxes[i], width, height) for i in np.flatnonzero(scores >= score_threshold)}
    keep = np.array([i for i, box in clamped.items() if box[2] > box[0] and box[3] > box[1]], dtype=np.int64)
    order = keep[np.argsort(-scores[keep], kind="stable")][: max(0, int(max_instances))]
    out = []
    for rank, index in enumerate(order):
        box = clamped[int(index)]
        mask = masks[index].astype(bool, copy=False) if masks is not None else None
        roi = mask_roi(box, mask, width, height)
        crop, area = None, 0
        if mask is not None:
            x, y, w, h = roi
            crop = mask[y:y + h, x:x + w]
            area = int(np.count_nonzero(crop))  # published pixels: what full_mask gives back
        x0, y0, x1, y1 = box_hull(box, width, height)
        out.append(RankedInstance(rank, float(scores[index]), box, roi, crop, area, (x0, y0, x1 - x0, y1 - y0)))
    return out


def clamp_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """[4] xyxy clipped to the image ([0, W] x [0, H]); corners put in order (finite: ``rank_instances``)."""
    box = np.asarray(box, dtype=np.float32)
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    return np.array([min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                     min(max(x1, 0.0), width), min(max(y1, 0.0), height)], dtype=np.float32)


def box_hull(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: the integer pixels that ``box`` [4] xyxy touches, in the image."""
    x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
    x1, y1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    return x0, y0, max(x0, x1), max(y0, y1)


def crop_window(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: the largest mask crop ``box`` [4] xyxy can get.

    The box's pixel hull grown on each side by ``max(MASK_MARGIN_MIN_PX, ceil(MASK_MARGIN_FRACTION
    * side))`` (side = hull width for x, hull height for y), clamped to the image.
    """
    x0, y0, x1, y1 = box_hull(box, width, height)
    mx = max(MASK_MARGIN_MIN_PX, math.ceil(MASK_MARGIN_FRACTION * (x1 - x0)))
    my = max(MASK_MARGIN_MIN_PX, math.ceil(MASK_MARGIN_FRACTION * (y1 - y0)))
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)


def mask_roi(box: np.ndarray, mask: Optional[np.ndarray], width: int, height: int) -> tuple[int, int, int, int]:
    """(x_offset, y_offset, width, height) of the mask crop: the pixel hull of ``box`` [4] xyxy, grown
    to cover the pixels of ``mask`` [H, W] bool that lie in the box's ``crop_window`` (pixels
    beyond it are not published). ``mask`` None: the hull itself."""
    x0, y0, x1, y1 = box_hull(box, width, height)
    if mask is not None:
        wx0, wy0, wx1, wy1 = crop_window(box, width, height)
        inside = mask[wy0:wy1, wx0:wx1]  # only the window is scanned: a flooded mask costs no more
        cols = np.flatnonzero(inside.any(axis=0))
        if cols.size:
            rows = np.flatnonzero(inside.any(axis=1))
            x0, x1 = min(x0, wx0 + int(cols[0])), max(x1, wx0 + int(cols[-1]) + 1)
            y0, y1 = min(y0, wy0 + int(rows[0])), max(y1, wy0 + int(rows[-1]) + 1)
    return x0, y0, x1 - x0, y1 - y0


def to_instance_msgs(ranked: list[RankedInstance], header: Any = None, with_masks: bool = True) -> list:
    """``toist_ros/Instance`` messages (masks as mono8 crops; an empty Image when the instance has
    no mask or ``with_masks`` is false, e.g. masks computed for 3D only: ``mask_roi`` is then the
    box's pixel hull, as without masks, not a crop nobody receives)."""
    from toist_ros.msg import Instance

    out = []
    for item in ranked:
        msg = Instance()
        msg.score = item.score
        msg.rank = item.rank
        msg.box = item.box
        x, y, w, h = item.roi if with_masks else item.hull
        msg.mask_roi.x_offset, msg.mask_roi.y_offset = x, y
        msg.mask_roi.width, msg.mask_roi.height = w, h
        if item.mask_crop is not None and with_masks:
            msg.mask = mask_to_image(item.mask_crop, header)
            msg.mask_area = item.mask_area
        out.append(msg)
    return out


def task_instances_msg(header: Any, image_size: tuple[int, int], task: str, revision: int, inference_ms: float,
                       instances: list, latency_ms: float = float("nan"), task_id: Optional[int] = None):
    """A ``toist_ros/TaskInstances`` carrying the input ``header`` verbatim; ``task_id`` None
    (free text) is sent as 0; ``latency_ms`` NaN: unknown (the message's convention)."""
    from toist_ros.msg import TaskInstances

    msg = TaskInstances()
    msg.header = header
    msg.image_width, msg.image_height = int(image_size[0]), int(image_size[1])
    msg.task = task
    msg.task_id = int(task_id or 0)
    msg.task_revision = int(revision)
    msg.inference_ms = float(inference_ms)
    msg.latency_ms = float(latency_ms)
    msg.depth_offset_ms = float("nan")  # DEPTH_OFF until depth is paired
    msg.instances = instances
    return msg


def full_mask(instance: Any, width: int, height: int) -> np.ndarray:
    """The ``[height, width]`` bool mask of an ``Instance`` message (its crop put back in place)."""
    out = np.zeros((height, width), dtype=bool)
    crop = mask_from_image(instance.mask)
    if crop.size == 0:
        return out
    x, y = int(instance.mask_roi.x_offset), int(instance.mask_roi.y_offset)
    h, w = crop.shape
    if x + w > width or y + h > height:
        raise ValueError(f"mask crop {w}x{h} at ({x}, {y}) does not fit in a {width}x{height} image")
    out[y:y + h, x:x + w] = crop
    return out
