"""Bytes per ``toist_ros/TaskInstances`` message: the mask crop bound against the old unbounded hull.

    python bench/bench_mask_bytes.py [--instances 10] [--width 640 --height 480] [--reps 5]

Builds real messages (``toist_ros.msg`` types, filled by ``toist_ros.instances``) for a VGA frame
with 10 instances whose boxes are 40-300 px wide, and serializes them with
``rclpy.serialization.serialize_message`` (the bytes DDS carries, CDR). Three kinds of masks:
  (a) spill   every mask covers the whole image (a model whose masks leak over the frame);
  (b) inside  every mask lies inside its box, with holes (a well-behaved model);
  (c) overhang every mask is its box grown by 6 px (a slightly loose mask, kept whole by the margin).
For each it prints bytes per message with
  OLD rule   crop = the box's pixel hull grown to every mask pixel (computed here, in this script,
             as toist_ros did before the bound);
  NEW rule   crop = the box's pixel hull grown to the mask pixels in the crop window, the hull plus
             max(8 px, 10 % of its side) on each side (``toist_ros.instances.crop_window``);
  bound      the documented ceiling: the crop windows' pixels + the message's metadata (everything
             but the mask pixels, measured by serializing the message with its pixel bytes removed)
             + up to 7 B of CDR alignment per instance (the next 8-byte field after the mask bytes);
the median time to build and serialize one message (wall, indicative), and the mask pixels the new
rule does not publish (read back with ``full_mask``), of which inside the boxes (must be 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from rclpy.serialization import serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from toist_ros.instances import (crop_window, full_mask, rank_instances, task_instances_msg,  # noqa: E402
                                  to_instance_msgs)  # noqa: E402


def boxes_for(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """[n, 4] float32 xyxy boxes of 40-300 x 40-220 px (scaled to the image), inside the image."""
    rng = np.random.default_rng(seed)
    scale = min(width / 640, height / 480)
    w, h = rng.uniform(40, 300, n) * scale, rng.uniform(40, 220, n) * scale
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.float32)


def masks_for(kind: str, boxes: np.ndarray, width: int, height: int, seed: int = 0) -> np.ndarray:
    """[n, H, W] bool masks of one kind (see the module docstring)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(boxes), height, width), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if kind == "spill":
            masks[i] = True
        elif kind == "inside":
            ya, yb, xa, xb = int(math.ceil(y0)), int(y1), int(math.ceil(x0)), int(x1)
            masks[i, ya:yb, xa:xb] = rng.random((yb - ya, xb - xa)) > 0.2
        else:  # overhang: the box grown by 6 px
            masks[i, max(0, int(y0) - 6):int(y1) + 7, max(0, int(x0) - 6):int(x1) + 7] = True
    return masks


def old_rule(item, mask: np.ndarray, width: int, height: int):
    """The instance as the old rule published it: the box's pixel hull grown to cover every mask
    pixel, wherever it is; mask_area = the full mask's pixels."""
    x0, y0 = math.floor(item.box[0]), math.floor(item.box[1])
    x1, y1 = math.ceil(item.box[2]), math.ceil(item.box[3])
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size:
        rows = np.flatnonzero(mask.any(axis=1))
        x0, x1 = min(x0, int(cols[0])), max(x1, int(cols[-1]) + 1)
        y0, y1 = min(y0, int(rows[0])), max(y1, int(rows[-1]) + 1)
    x0, x1, y0, y1 = max(0, x0), min(width, x1), max(0, y0), min(height, y1)
    return dataclasses.replace(item, roi=(x0, y0, x1 - x0, y1 - y0), mask_crop=mask[y0:y1, x0:x1],
                               mask_area=int(mask.sum()))


def build(boxes, scores, masks, width, height, rule: str):
    """One TaskInstances for the frame under ``rule`` ("old", "new" or "metadata": the new rule's
    message with the mask pixel bytes removed)."""
    header = Header(frame_id="camera_color_optical_frame")
    ranked = rank_instances(boxes, scores, masks, (width, height))
    if rule == "old":
        order = np.argsort(-scores, kind="stable")
        ranked = [old_rule(item, masks[order[item.rank]], width, height) for item in ranked]
    msg = task_instances_msg(header, (width, height), "sit comfortably on something", 1, 10.0,
                             to_instance_msgs(ranked, header))
    if rule == "metadata":
        for inst in msg.instances:
            inst.mask.data = []
    return msg


def lost_pixels(msg, boxes, scores, masks, width, height) -> tuple[int, int]:
    """(mask pixels not published, of which inside the box's pixel hull) for one message."""
    order = np.argsort(-scores, kind="stable")
    dropped = inside = 0
    for inst in msg.instances:
        mask, box = masks[order[inst.rank]], boxes[order[inst.rank]]
        lost = mask & ~full_mask(inst, width, height)
        x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
        dropped, inside = dropped + int(lost.sum()), inside + int(lost[y0:y1, x0:x1].sum())
    return dropped, inside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--reps", type=int, default=5, help="repetitions for the build time")
    args = parser.parse_args()
    width, height, n = args.width, args.height, args.instances

    boxes = boxes_for(n, width, height)
    scores = np.linspace(0.95, 0.55, n).astype(np.float32)
    windows = [crop_window(b, width, height) for b in boxes]
    window_bytes = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows)
    metadata = len(serialize_message(build(boxes, scores, masks_for("spill", boxes, width, height), width, height,
                                           "metadata")))
    # CDR alignment: a mask's bytes end anywhere, and the next 8-byte field (Instance's float64
    # points, after mask_area and has_3d) starts on a multiple of 8: up to 7 B per instance.
    bound = window_bytes + metadata + 7 * n
    box_bytes = sum((math.ceil(b[2]) - math.floor(b[0])) * (math.ceil(b[3]) - math.floor(b[1])) for b in boxes)
    print(f"{n} instances in a {width}x{height} frame; box hulls {box_bytes:,} px in all, "
          f"crop windows {window_bytes:,} px in all; message metadata {metadata:,} B")
    print(f"bound (new rule) = windows + metadata + 7 B x {n} = {bound:,} B per message "
          f"(old rule worst case: {n} x {width}x{height} = {n * width * height:,} B of crops)\n")
    print(f"{'masks':<9} {'OLD rule B/msg':>15} {'NEW rule B/msg':>15} {'new/old':>8} {'<= bound':>9} "
          f"{'old ms':>7} {'new ms':>7}  {'NEW drops px':>12} {'of them in box':>14}")
    for kind in ("spill", "inside", "overhang"):
        masks = masks_for(kind, boxes, width, height)
        sizes, times = {}, {}
        for rule in ("old", "new"):
            samples = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                sizes[rule] = len(serialize_message(build(boxes, scores, masks, width, height, rule)))
                samples.append((time.perf_counter() - t0) * 1e3)
            times[rule] = statistics.median(samples)
        dropped, in_box = lost_pixels(build(boxes, scores, masks, width, height, "new"), boxes, scores, masks,
                                      width, height)
        print(f"{kind:<9} {sizes['old']:>15,} {sizes['new']:>15,} {sizes['new'] / sizes['old']:>8.3f} "
              f"{str(sizes['new'] <= bound):>9} {times['old']:>7.1f} {times['new']:>7.1f}  "
              f"{dropped:>12,} {in_box:>14,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
