"""Accuracy of the lower-precision inference paths on a trained model: the embedded default
model on its synthetic test split, fp32 against bf16 autocast and int8 dynamic quantisation.

    python bench/bench_precision_accuracy.py [--images 0] [--paths fp32,bf16,int8] [--threads 1]
    python bench/bench_precision_accuracy.py --device cuda --paths fp32,bf16,fp16      # on a GPU

The test split is generated as ``training/default_model.py``'s ``write_data`` generates it
(``toist_core.data.synth.generate`` with ``RecipeSettings``' tasks, sizes, object counts, empty
share and data seed; test split only) into a temporary directory. Each path runs the model as
``toist evaluate`` does (``TaskSegmenter.from_pretrained`` on the model directory, every query
kept: ``evaluation_inference``, no duplicate removal; one image at a time, the model's own
input size) and is scored with the project's evaluator
(``toist_core.eval.evaluator.evaluate_tasks``: box and mask AP@0.5 per task, mean over the
tasks). ``--images``: the first N images of each task file (default 0 = all 988 frames: a few
minutes on this project's 2-core VM; 200 frames moved the bf16 verdict from pass to fail by
subsampling noise). One CPU thread by default (``--threads``).
``--device cuda`` runs every path on the GPU (``fp16`` autocast is then a path too; ``int8``
dynamic quantisation is CPU-only) with TF32 off (``cudnn.allow_tf32`` and
``cuda.matmul.allow_tf32`` False: torch's default runs fp32 convolutions in TF32, which would
make the fp32 reference itself a reduced precision); the flags are printed.

Printed per path: box and mask mAP@0.5 and their difference from fp32, and the share of frames
whose top instance is the same as fp32's (rank 0 is the same query and its box overlaps fp32's
rank-0 box at IoU >= 0.5; predictions are sorted by score). Criterion for a lower-precision path: mAP within 0.01 of fp32 and the
same top instance on >= 95 % of the frames. Each path's line is printed as soon as it is scored
(a run stopped by a time limit keeps the paths done), the table at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import toist_core  # noqa: E402
from toist_core.cli.evaluate import evaluation_inference, predict_tasks  # noqa: E402
from toist_core.data.synth import generate  # noqa: E402
from toist_core.eval.evaluator import evaluate_tasks, load_ground_truth, task_files  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
from default_model import RecipeSettings  # noqa: E402

DEFAULT_MODEL = Path(toist_core.__file__).resolve().parent / "assets" / "default_model"
MAP_TOLERANCE = 0.01
TOP_AGREEMENT = 0.95


def write_test_split(settings: RecipeSettings, root: Path, seed: Optional[int] = None) -> Path:
    """The recipe's test split (as ``write_data`` writes it) under ``root/synth``; ``seed``
    (default: the recipe's data seed) other than the recipe's gives a validation split: images
    of the same distribution that were neither trained on nor tested on."""
    generate(root / "synth", tasks=settings.tasks, splits=("test",), images_per_split=settings.test_images,
             min_objects=settings.min_objects, max_objects=settings.max_objects,
             empty_fraction=settings.empty_fraction, seed=settings.data_seed if seed is None else seed,
             min_size=settings.min_size, max_size=settings.max_size)
    return root / "synth"


def int8_dynamic(segmenter: TaskSegmenter) -> TaskSegmenter:
    """The segmenter on a copy of its model with int8 dynamic quantisation of the ``nn.Linear``
    layers (transformer FFNs, heads, text encoder; ``bbox_attention`` reads its key weight as a
    conv kernel and stays fp32; attention in/out projections are not ``nn.Linear``)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model = segmenter.model
    spec = {name: default_dynamic_qconfig for name, module in model.named_modules()
            if type(module) is nn.Linear and not name.startswith("bbox_attention")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(copy.deepcopy(model), qconfig_spec=spec, inplace=False)
    return TaskSegmenter(quantized, device="cpu", memory_bank=segmenter.memory_bank, pronoun=segmenter.pronoun,
                         inference=segmenter.inference, config=segmenter.config,
                         trained_tasks=segmenter.trained_tasks)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class RankZeroRecorder:
    """``predict_tasks``' view of a segmenter that records the query ranked first in each frame."""

    def __init__(self, segmenter: TaskSegmenter):
        self.segmenter = segmenter
        self.inference = segmenter.inference
        self.top_queries: list[int] = []

    def set_task(self, task):
        return self.segmenter.set_task(task)

    def predict(self, image, **kwargs):
        pred = self.segmenter.predict(image, **kwargs)
        self.top_queries.append(int(pred.queries[0]) if len(pred.queries) else -1)
        return pred


def top_agreement(base: dict, other: dict, base_top: list[int], other_top: list[int]) -> tuple[float, float]:
    """(share of frames whose rank-0 instance is the same query with a box IoU >= 0.5 to fp32's,
    share whose rank-0 boxes overlap at IoU >= 0.5 whatever the query)."""
    same, overlap, total = 0, 0, 0
    frame = 0
    for task in sorted(base):
        for image_id, pred in base[task].items():
            alt = other[task][image_id]
            iou = box_iou(pred.boxes[0], alt.boxes[0]) if len(pred) and len(alt) else float(len(pred) == len(alt))
            overlap += iou >= 0.5
            same += iou >= 0.5 and base_top[frame] == other_top[frame]
            frame += 1
            total += 1
    return same / max(total, 1), overlap / max(total, 1)


def score_on_split(segmenter, split) -> tuple[dict, list[int], object, float]:
    """Run ``segmenter`` over ``split`` (``load_test_split``'s tuple) as ``toist evaluate`` does
    and score it: (predictions per task, rank-0 query of each frame, the evaluation, seconds)."""
    root, files, ground_truths, image_ids = split
    recorder = RankZeroRecorder(segmenter)
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        predictions = predict_tasks(recorder, files, _image_dir(root), image_ids, log=quiet)
    seconds = time.perf_counter() - start
    result = evaluate_tasks(ground_truths, predictions, ("bbox", "segm"), image_ids)
    return predictions, recorder.top_queries, result, seconds


def load_test_split(settings, folder: Path, images: int, seed: Optional[int] = None):
    """Write the recipe's test split (``seed``: see ``write_test_split``) into ``folder``: (root,
    task files, ground truths, image ids per task: the first ``images`` of each task file, 0 = all)."""
    root = write_test_split(settings, folder, seed)
    files = task_files(root, settings.tasks, "test")
    ground_truths = {t: load_ground_truth(path) for t, path in files.items()}
    image_ids = {t: [img["id"] for img in gt.dataset["images"]] for t, gt in ground_truths.items()}
    if images:
        image_ids = {t: ids[:images] for t, ids in image_ids.items()}
    return root, files, ground_truths, image_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="first N images of each task file (0 = all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--paths", default="fp32,bf16,int8", help="comma-separated: fp32, bf16, fp16 (GPU), int8 (CPU)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (default: the embedded one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small, and on a shared machine two "
                             "spinning threads per small op made frames ~20x slower)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not wanted:
        parser.error(f"--paths {args.paths!r}: name at least one of fp32, bf16, fp16, int8")
    if wanted[0] != "fp32":
        wanted = ["fp32"] + [p for p in wanted if p != "fp32"]
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"bench_precision_accuracy: --device {args.device}, but CUDA is not available on this "
                         "machine (torch.cuda.is_available() is False); nothing measured")
    if on_gpu:
        # The fp32 reference in true fp32: torch's defaults run cuDNN convolutions in TF32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(args.device)}; cudnn.allow_tf32="
              f"{torch.backends.cudnn.allow_tf32} cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} "
              f"cudnn.benchmark={torch.backends.cudnn.benchmark}", flush=True)
    for path in wanted:
        if path not in ("fp32", "bf16", "fp16", "int8"):
            raise SystemExit(f"unknown path {path!r}: expected fp32, bf16, fp16 or int8")
        if path == "fp16" and not on_gpu:
            raise SystemExit("fp16 autocast is a GPU path: add --device cuda")
        if path == "int8" and on_gpu:
            raise SystemExit("int8 dynamic quantisation runs on the CPU: leave it out with --device cuda")
    settings = RecipeSettings()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toist_precision_") as tmp:
        root, files, ground_truths, image_ids = load_test_split(settings, Path(tmp), args.images)
        frames = sum(len(ids) for ids in image_ids.values())
        print(f"test split generated in {time.perf_counter() - started:.0f} s: tasks {settings.tasks}, "
              f"{frames} frames evaluated ({'first ' + str(args.images) if args.images else 'all'} images "
              f"per task file); model {args.model}; device {args.device}", flush=True)
        inference = evaluation_inference()
        fp32 = TaskSegmenter.from_pretrained(args.model, device=args.device, inference=inference)
        results, predictions, seconds, tops = {}, {}, {}, {}
        for path in wanted:
            if path == "fp32":
                segmenter = fp32
            elif path in ("bf16", "fp16"):
                segmenter = TaskSegmenter.from_pretrained(
                    args.model, device=args.device, inference=evaluation_inference(precision=path))
            else:
                segmenter = int8_dynamic(fp32)
            predictions[path], tops[path], results[path], seconds[path] = score_on_split(
                segmenter, (root, files, ground_truths, image_ids))
            del segmenter
            print(f"{path}: {frames} frames in {seconds[path]:.0f} s ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)
            if path == "fp32":
                print(COLUMNS, flush=True)
            print(verdict_line(path, results, predictions, tops, seconds, frames), flush=True)

    print_verdicts(results, predictions, tops, seconds, frames, settings.tasks, started)


PATH_WIDTH = 20   # bench_cpu_paths' names too ("ort int8 conv+matmul")
COLUMNS = (f"  {'path':{PATH_WIDTH}s} {'box mAP':>8s} {'diff':>7s} {'mask mAP':>9s} {'diff':>7s} {'same top':>9s} "
           f"{'top IoU>=.5':>11s} {'ms/frame':>9s}  verdict")


def verdict_line(path: str, results: dict, predictions: dict, tops: dict, seconds: dict, frames: int) -> str:
    """One path's box / mask mAP@0.5 and difference from "fp32", same-top shares, ms per frame
    and verdict against the criterion ("fp32" must be scored first)."""
    base, result = results["fp32"], results[path]
    box, mask = result.mean_ap50("bbox"), result.mean_ap50("segm")
    dbox, dmask = box - base.mean_ap50("bbox"), mask - base.mean_ap50("segm")
    same, overlap = top_agreement(predictions["fp32"], predictions[path], tops["fp32"], tops[path])
    ok = abs(dbox) <= MAP_TOLERANCE and abs(dmask) <= MAP_TOLERANCE and same >= TOP_AGREEMENT
    verdict = "reference" if path == "fp32" else ("passes" if ok else "FAILS")
    return (f"  {path:{PATH_WIDTH}s} {box:8.3f} {dbox:+7.3f} {mask:9.3f} {dmask:+7.3f} {100 * same:8.1f}% "
            f"{100 * overlap:10.1f}% {1000 * seconds[path] / frames:9.1f}  {verdict}")


def print_verdicts(results: dict, predictions: dict, tops: dict, seconds: dict, frames: int, tasks,
                   started: float) -> None:
    """The table: :func:`verdict_line` of every path."""
    print(f"\nDefault model, synthetic test split, {frames} frames (mAP@0.5, mean over tasks {tasks}):")
    print(COLUMNS)
    for path in results:
        print(verdict_line(path, results, predictions, tops, seconds, frames))
    print(f"\ncriterion: |mAP diff| <= {MAP_TOLERANCE} (box and mask) and the same top instance on >= "
          f"{100 * TOP_AGREEMENT:.0f}% of frames; total {time.perf_counter() - started:.0f} s")


def _image_dir(root: Path) -> Path:
    from toist_core.data.config import DataConfig

    return DataConfig(root=str(root)).image_dir("test")


if __name__ == "__main__":
    main()
