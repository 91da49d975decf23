"""Time the COCO-Tasks evaluation of a full-size prediction set on CPU, pycocotools against
faster-coco-eval, in one run.

Default size = the real test set: 14 tasks x 900 images x 100 detections (all queries kept,
as the reference), boxes and RLE masks, scored per task with COCOeval (catIds=[1], bbox and
segm). Each task is evaluated by both backends back to back (the order alternates from task
to task, so a background load hits both alike); the bench prints their times side by side and
the largest difference of every number (AP@0.5, the 12 COCO stats, AP@0.5 on images with
targets) over all tasks. Ground truth is a synthetic COCO-Tasks test split with
COCO-like image sizes (480-640 px, 2-8 objects), generated once into --data.

Detections per image: noisy copies of every object (preferred or not; the preferred ones
score higher) plus random boxes; masks are filled ellipses inside the boxes (RLE straight
from polygons, so preparing the set is quick). The 14 tasks share their images, like the real
files, so masks are encoded once per image and only the scores differ per task.

    python bench/bench_evaluate.py                      # full size
    python bench/bench_evaluate.py --images 100         # quick check
    python bench/bench_evaluate.py --backends pycocotools   # one backend only

Beside toist's two backends (both check every prediction and accumulate once more for the
images with targets), the bench times what the reference's evaluator runs per task and IoU
type, nothing more: COCO results -> loadRes -> COCOeval (catIds=[1]) evaluate, accumulate,
summarize (``--no-plain`` leaves it out). Its speed-up is the one the target is about.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toist_core.data.synth import generate  # noqa: E402
from toist_core.eval.evaluator import (BACKENDS, EvaluationResult, detections_to_coco, evaluate_task,  # noqa: E402
                                       load_ground_truth, task_files)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=_task_count, default=14, help="tasks 1..N (N at most 14)")
    parser.add_argument("--images", type=int, default=900, help="test images per task")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--data", default="/tmp/toist_bench_evaluate", help="synthetic ground truth (cached)")
    parser.add_argument("--with-io", action="store_true", help="also time save/load of the predictions file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=["pycocotools", "faster-coco-eval"], choices=BACKENDS,
                        help="COCOeval implementations to time (default: both, interleaved per task)")
    parser.add_argument("--no-plain", action="store_true",
                        help="leave out the plain pycocotools run (the reference's evaluator, no checks)")
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

    backends = list(dict.fromkeys(args.backends))
    runs = backends + ([] if args.no_plain else [PLAIN])
    timings = {(b, i): 0.0 for b in runs for i in args.iou_types}
    results = {b: [] for b in backends}
    plain_stats = {i: [] for i in args.iou_types}  # per task, the plain run's 12 numbers
    for index, t in enumerate(tasks):
        order = runs if index % 2 == 0 else runs[::-1]
        per_backend = {}
        for backend in order:
            per_iou = []
            own = _fresh(predictions[t])   # outside the timing: each backend pays for its own mask checks
            for iou_type in args.iou_types:
                started = time.perf_counter()
                if backend == PLAIN:
                    plain_stats[iou_type].append(_plain_pycocotools(ground_truths[t], own, iou_type))
                else:
                    per_iou.append(evaluate_task(ground_truths[t], own, [iou_type], task_id=t, backend=backend))
                timings[backend, iou_type] += time.perf_counter() - started
            if backend != PLAIN:
                per_backend[backend] = _merge_tasks(per_iou)
        for backend in backends:
            results[backend].append(per_backend[backend])
        print(f"task {t}: " + ", ".join(f"{b} {sum(timings[b, i] for i in args.iou_types):.1f} s" for b in runs)
              + " (cumulative)", flush=True)

    print(f"\n{len(tasks)} tasks x {len(shared)} images x {args.dets} detections = {total}, CPU, "
          "per-task runs interleaved")
    header = "| IoU type | " + " | ".join(f"{b} (s)" for b in backends)
    if len(backends) == 2:
        header += " | speed-up | max abs diff AP@0.5 | max abs diff 12 stats | max abs diff AP@0.5 w/ targets"
    print(header + " |")
    print("|" + "---|" * (header.count("|")))
    for iou_type in args.iou_types + ["total"]:
        secs = [sum(timings[b, i] for i in args.iou_types) if iou_type == "total" else timings[b, iou_type]
                for b in backends]
        row = f"| {iou_type} | " + " | ".join(f"{v:.1f}" for v in secs)
        if len(backends) == 2:
            kinds = args.iou_types if iou_type == "total" else [iou_type]
            diffs = [_max_diff(results[backends[0]], results[backends[1]], kinds, name)
                     for name in ("ap50", "stats", "ap50_with_targets")]
            row += f" | {secs[0] / secs[1]:.2f}x | " + " | ".join(f"{d:.1e}" for d in diffs)
        print(row + " |")
    if not args.no_plain:
        plain = {i: timings[PLAIN, i] for i in args.iou_types}
        print(f"\n{PLAIN} (the reference's evaluator: loadRes, COCOeval evaluate / accumulate / summarize, no "
              "checks, no second accumulate):")
        for iou_type in args.iou_types + ["total"]:
            secs = sum(plain.values()) if iou_type == "total" else plain[iou_type]
            kinds = args.iou_types if iou_type == "total" else [iou_type]
            line = f"  {iou_type}: {secs:.1f} s"
            for backend in backends:
                own = sum(timings[backend, i] for i in kinds)
                diff = max(float(np.max(np.abs(np.asarray(plain_stats[i][k]) - np.asarray(results[backend][k].stats[i]))))
                           for i in kinds for k in range(len(tasks)))
                line += f"; {backend} {own:.1f} s, {secs / own:.2f}x, max |12 stats diff| {diff:.1e}"
            print(line)
    for backend in backends:
        combined = EvaluationResult(results[backend], tuple(args.iou_types))
        print(f"\n{backend}: " + ", ".join(f"mAP@0.5 {i} = {100 * combined.mean_ap50(i):.3f}" for i in args.iou_types))
    print(paper_table_markdown(EvaluationResult(results[backends[-1]], tuple(args.iou_types))))


PLAIN = "plain pycocotools"


def _task_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tasks, 1..14, got {text!r}") from None
    if not 1 <= value <= 14:
        raise argparse.ArgumentTypeError(f"the COCO-Tasks-sized set has tasks 1..14, got {value}")
    return value


def _plain_pycocotools(ground_truth, predictions, iou_type) -> list[float]:
    """What the reference's evaluator runs for one task and IoU type: results -> loadRes ->
    COCOeval (catIds=[1], every image) evaluate, accumulate, summarize; its 12 numbers."""
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(detections_to_coco(predictions, iou_type))
        coco_eval = COCOeval(ground_truth, detections, iouType=iou_type)
        coco_eval.params.catIds = [1]
        coco_eval.params.imgIds = sorted(ground_truth.getImgIds())
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats]


def _fresh(images: dict) -> dict:
    """New ``ImagePredictions`` of the same arrays and masks: a mask check passed is remembered on
    the object (``_valid_rle``), so the backend timed second for a task skipped the checks the
    first one had paid for (each backend paid them on half the tasks)."""
    return {image_id: ImagePredictions(pred.boxes, pred.scores, pred.masks) for image_id, pred in images.items()}


def _merge_tasks(parts):
    """One TaskResult holding the IoU types of several runs of the same task."""
    first = parts[0]
    for other in parts[1:]:
        for name in ("ap50", "ap", "ap50_with_targets", "stats", "curves"):
            getattr(first, name).update(getattr(other, name))
    return first


def _max_diff(first, second, iou_types, name) -> float:
    """Largest |a - b| of a TaskResult field over tasks and IoU types (NaN-aware: both NaN = 0)."""
    worst = 0.0
    for a, b in zip(first, second):
        for iou_type in iou_types:
            x = np.atleast_1d(np.asarray(getattr(a, name)[iou_type], dtype=np.float64))
            y = np.atleast_1d(np.asarray(getattr(b, name)[iou_type], dtype=np.float64))
            both_nan = np.isnan(x) & np.isnan(y)
            d = np.where(both_nan, 0.0, np.abs(x - y))
            worst = max(worst, float(np.nan_to_num(d, nan=np.inf).max()))
    return worst

if __name__ == "__main__":
    main()
