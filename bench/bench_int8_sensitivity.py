"""Which convolutions of the embedded default model can run in int8, measured on a *validation*
split: the search that chooses an int8 recipe must not look at the test split that judges it.

    python bench/bench_int8_sensitivity.py [--images 60] [--recipes all,stem,...] [--split val|test]
                                           [--variant conv|conv+act]

Each recipe is ONNX Runtime int8 static quantisation of the detector graph's convolutions
(``bench/onnx_int8.py``: QDQ, uint8 activations, per-channel int8 weights, MinMax calibration
on the first 64 images of the recipe's synthetic *train* split) with the convolutions of the
named structural groups kept in fp32 (``onnx_int8.select_convs``: ``stem``, ``depthwise``,
``input_proj``, ``stage:N``; joined with ``+``; ``all`` = every convolution int8), or
``weights-only``: the weights rounded to int8 and the network run in fp32 (what the weights'
rounding costs without the activations'), or ``bias-corrected``: every convolution int8 after
empirical bias correction (``onnx_int8.bias_correct``, on the calibration images; ~4 min).

The validation split is generated as ``training/default_model.py`` generates the test split
(the same tasks, pool size, sizes, object counts and empty share) with another seed (the
recipe's data seed + 1000): images neither trained on nor tested on. ``--split test`` runs the chosen recipes once
on the test split itself (``bench_precision_accuracy.load_test_split``; ``--images 0`` = all).

Printed per recipe, against fp32 (PyTorch) on the same frames: box and mask mAP@0.5 differences,
"same top" (the rank-0 query is the same and its box overlaps fp32's at IoU >= 0.5, the
criterion of docs/performance.md), "same object" (the rank-0 boxes overlap at IoU >= 0.5,
whichever query), "published" (the node's first published instance agrees: neither path scores
one above ``InferenceConfig.score_threshold``, or both do and their boxes overlap at IoU >= 0.5),
and the frames where "published" disagrees with fp32's top score on them (minimum, median,
maximum: a disagreement on a confidently detected object is a real change, not a coin toss
between near-tied queries or a score grazing the threshold).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bench_precision_accuracy as bpa  # noqa: E402
from bench_cpu_paths import VARIANTS, exported_default_model, synthetic_images  # noqa: E402
from onnx_int8 import (bias_correct, detector_feeds, fake_quantize_weights, quantize_detector,  # noqa: E402
                       select_convs)
from toist_core.cli.evaluate import REFERENCE_MAX_INSTANCES  # noqa: E402
from toist_core.config import InferenceConfig  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.inference.onnx_export import DETECTOR_FILE  # noqa: E402

VAL_SEED_OFFSET = 1000
CALIBRATION_IMAGES = 64
DEFAULT_RECIPES = ("all,weights-only,stem,depthwise,input_proj,stem+depthwise+input_proj,"
                   "stem+depthwise+input_proj+stage:1+stage:2+stage:3")


def published_agreement(base: dict, other: dict, threshold: float) -> tuple[float, list[float]]:
    """(share of frames whose first published instance agrees, fp32 top scores where it does not)."""
    agree, total, disagreements = 0, 0, []
    for task in sorted(base):
        for image_id, pred in base[task].items():
            alt = other[task][image_id]
            shown = len(pred) > 0 and pred.scores[0] >= threshold
            alt_shown = len(alt) > 0 and alt.scores[0] >= threshold
            if shown and alt_shown:
                same = bpa.box_iou(pred.boxes[0], alt.boxes[0]) >= 0.5
            else:
                same = shown == alt_shown
            agree += same
            total += 1
            if not same:
                disagreements.append(float(pred.scores[0]) if len(pred) else 0.0)
    return agree / max(total, 1), sorted(disagreements)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="first N images of each task file (0 = all)")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated recipes (see above)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="conv",
                        help="which op types are quantised (bench_cpu_paths.VARIANTS; conv+act: the activations too)")
    parser.add_argument("--work-dir", default="/tmp/bench_cpu_paths", help="cache of the exported default model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ops = VARIANTS[args.variant]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if "bias-corrected" in recipes and args.variant != "conv":
        # bias_correct compares each convolution's own output in fp32 and int8; with the activations
        # quantised ONNX Runtime drops them and that output no longer exists in the int8 graph.
        parser.error(f"--recipes bias-corrected needs --variant conv (got {args.variant}): it reads each "
                     f"convolution's own output, which the {args.variant} int8 graph does not have")
    settings = bpa.RecipeSettings()
    source = exported_default_model(Path(args.work_dir))
    work = Path(args.work_dir) / "sensitivity"
    work.mkdir(exist_ok=True)
    inference = InferenceConfig(score_threshold=0.0, max_instances=REFERENCE_MAX_INSTANCES)
    threshold = InferenceConfig().score_threshold
    fp32 = TaskSegmenter.from_pretrained(source, device="cpu", inference=inference)
    states = [fp32.encode_task(task) for task in settings.tasks]
    images = synthetic_images(CALIBRATION_IMAGES, seed=settings.data_seed, min_size=settings.min_size,
                              max_size=settings.max_size, tasks=settings.tasks)
    feeds = detector_feeds(fp32, images, states)

    with tempfile.TemporaryDirectory(prefix="toist_int8_sensitivity_") as tmp:
        seed = settings.data_seed + VAL_SEED_OFFSET if args.split == "val" else None
        split = bpa.load_test_split(settings, Path(tmp), args.images, seed)
        frames = sum(len(ids) for ids in split[3].values())
        base_pred, base_top, base, _ = bpa.score_on_split(fp32, split)
        box0, mask0 = base.mean_ap50("bbox"), base.mean_ap50("segm")
        print(f"{args.split} split: {frames} frames, tasks {settings.tasks}; fp32 box mAP@0.5 {box0:.3f}, "
              f"mask {mask0:.3f}; calibration: {len(feeds)} train images", flush=True)
        print(f"  {'recipe (fp32 kept)':46s} {'int8':>5s} {'box':>7s} {'mask':>7s} {'same top':>9s} "
              f"{'same obj':>9s} {'published':>9s}  frames where published differs: fp32 top score min / median / max")
        for recipe in recipes:
            target = work / recipe.replace("+", "_").replace(":", "")
            if recipe == "weights-only":
                int8 = f"{fake_quantize_weights(source, target)}w"
            elif recipe == "bias-corrected":
                bias_correct(source, work / "bias_corrected_fp32", feeds)
                info = quantize_detector(work / "bias_corrected_fp32", target, feeds, op_types=ops)
                int8 = str(info["nodes"].get("Conv", 0))
            else:
                kept = [] if recipe == "all" else select_convs(source / DETECTOR_FILE, recipe.split("+"))
                info = quantize_detector(source, target, feeds, op_types=ops, exclude=kept)
                int8 = str(info["nodes"].get("Conv", 0))
            segmenter = TaskSegmenter.from_pretrained(target, device="cpu", inference=InferenceConfig(
                score_threshold=0.0, max_instances=REFERENCE_MAX_INSTANCES, backend="onnxruntime"))
            pred, top, result, _ = bpa.score_on_split(segmenter, split)
            same, overlap = bpa.top_agreement(base_pred, pred, base_top, top)
            published, scores = published_agreement(base_pred, pred, threshold)
            shown = (f"{len(scores)}: {min(scores):.2f} / {statistics.median(scores):.2f} / {max(scores):.2f}"
                     if scores else "0")
            print(f"  {recipe:46s} {int8:>5s} {result.mean_ap50('bbox') - box0:+7.3f} "
                  f"{result.mean_ap50('segm') - mask0:+7.3f} {100 * same:8.1f}% {100 * overlap:8.1f}% "
                  f"{100 * published:8.1f}%  {shown}", flush=True)
    print(f"\ncriterion: |mAP diff| <= {bpa.MAP_TOLERANCE} and the same top on >= {100 * bpa.TOP_AGREEMENT:.0f}% "
          f"of frames; int8 = convolutions quantised of the graph's total; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
