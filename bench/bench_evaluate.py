"""Time the COCO-Tasks evaluation of a full-size prediction set on CPU.

Default size = the real test set: 14 tasks x 900 images x 100 detections (all queries kept,
as the reference), boxes and RLE masks, scored per task with pycocotools COCOeval
(catIds=[1], bbox and segm). Ground truth is a synthetic COCO-Tasks test split with
COCO-like image sizes (480-640 px, 2-8 objects), generated once into --data.

Detections per image: noisy copies of every object (preferred or not; the preferred ones
score higher) plus random boxes; masks are filled ellipses inside the boxes (RLE straight
from polygons, so preparing the set is quick). The 14 tasks share their images, like the real files, so masks are encoded
once per image and only the scores differ per task.

    python bench/bench_evaluate.py                      # full size
    python bench/bench_evaluate.py --images 100         # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toist_core.data.synth import generate  # noqa: E402
from toist_core.eval.evaluator import (EvaluationResult, evaluate_tasks, load_ground_truth,  # noqa: E402
                                       task_files)
from toist_core.eval.predictions import ImagePredictions, load_predictions, save_predictions  # noqa: E402
from toist_core.eval.tables import paper_table_markdown  # noqa: E402


def _ellipse_polygon(x0, y0, x1, y1, points=24):
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1).reshape(-1).tolist()


def _image_detections(rng, anns, height, width, count):
    boxes = []
    for a in anns[:count]:
        x, y, w, h = a["bbox"]
        boxes.append(np.array([x, y, x + w, y + h]) + rng.normal(0, 0.08 * max(w, h), 4))
    while len(boxes) < count:
        x0, y0 = rng.uniform(0, width - 8), rng.uniform(0, height - 8)
        boxes.append([x0, y0, x0 + rng.uniform(8, (width - x0)), y0 + rng.uniform(8, (height - y0))])
    boxes = np.clip(np.array(boxes, dtype=np.float64), 0, [width, height, width, height])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
    rles = mask_utils.frPyObjects([_ellipse_polygon(*b) for b in boxes], height, width)
    masks = [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]
    return boxes, masks


def _merge(first: EvaluationResult, second: EvaluationResult) -> EvaluationResult:
    """One result holding the IoU types of two runs over the same tasks."""
    for a, b in zip(first.tasks, second.tasks):
        for name in ("ap50", "ap", "ap50_with_targets", "stats", "curves"):
            getattr(a, name).update(getattr(b, name))
    return EvaluationResult(first.tasks, first.iou_types + second.iou_types)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=14)
    parser.add_argument("--images", type=int, default=900, help="test images per task")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--data", default="/tmp/toist_bench_evaluate", help="synthetic ground truth (cached)")
    parser.add_argument("--with-io", action="store_true", help="also time save/load of the predictions file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tasks = list(range(1, args.tasks + 1))
    root = Path(args.data) / f"n{args.images}_s{args.seed}"
    started = time.perf_counter()
    if not all(p.is_file() for p in task_files(root, tasks).values()):
        generate(root, tasks=range(1, 15), splits=("test",), images_per_split=args.images, seed=args.seed,
                 min_size=480, max_size=640, min_objects=2, max_objects=8)
    files = task_files(root, tasks)
    ground_truths = {t: load_ground_truth(p) for t, p in files.items()}
    print(f"ground truth ready in {time.perf_counter() - started:.1f} s ({root})")

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    any_gt = ground_truths[tasks[0]]
    shared = {}
    for image_id in any_gt.getImgIds():
        info = any_gt.imgs[image_id]
        shared[image_id] = _image_detections(rng, any_gt.imgToAnns[image_id], info["height"], info["width"],
                                             args.dets)
    predictions = {}
    for t in tasks:  # scores per task: copies of the task's preferred objects tend to rank first
        predictions[t] = {}
        for image_id, (boxes, masks) in shared.items():
            scores = rng.uniform(0, 0.6, len(boxes))
            anns = ground_truths[t].imgToAnns[image_id][:args.dets]
            scores[:len(anns)] += 0.4 * np.array([a["category_id"] for a in anns], dtype=np.float64)
            predictions[t][image_id] = ImagePredictions(boxes, scores, masks)
    total = sum(len(p) for images in predictions.values() for p in images.values())
    print(f"prediction set: {len(tasks)} tasks x {len(shared)} images x {args.dets} = {total} detections "
          f"(boxes + RLE masks), built in {time.perf_counter() - started:.1f} s")

    if args.with_io:
        path = Path(args.data) / "predictions.json.gz"
        started = time.perf_counter()
        save_predictions(path, predictions)
        saved = time.perf_counter() - started
        started = time.perf_counter()
        predictions = load_predictions(path)
        print(f"predictions file {path.stat().st_size / 1e6:.1f} MB: save {saved:.1f} s, "
              f"load {time.perf_counter() - started:.1f} s")

    timings, combined = {}, None
    for iou_type in args.iou_types:
        started = time.perf_counter()
        result = evaluate_tasks(ground_truths, predictions, iou_types=[iou_type])
        timings[iou_type] = time.perf_counter() - started
        print(f"{iou_type}: {timings[iou_type]:.1f} s for {len(tasks)} tasks "
              f"({timings[iou_type] / len(tasks):.1f} s/task), mAP@0.5 = {100 * result.mean_ap50(iou_type):.1f}")
        combined = result if combined is None else _merge(combined, result)
    print(f"TOTAL evaluation time ({' + '.join(args.iou_types)}): {sum(timings.values()):.1f} s "
          f"on CPU for {total} detections")
    print(paper_table_markdown(combined))


if __name__ == "__main__":
    main()
