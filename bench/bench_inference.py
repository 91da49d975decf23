"""Per-frame CPU time of the paper-size TOIST segmentation model (random weights).

    python bench/bench_inference.py [--reps 2] [--kept 10] [--width 640 --height 480]

Prints
1. the per-frame time of each stage of the full (naive) forward on a 640x480 image
   (resized to 800 x 1066 as the reference evaluation): image backbone (+ input projection),
   text encoder (RoBERTa + resizer), transformer (encoder + decoder), heads (class, box,
   scores), mask head (all 100 queries) and mask post-processing (upsampling, threshold);
2. the TaskSegmenter fast path (text cached per task, mask head on the kept queries only),
   in fp32 and bf16 autocast, against the naive path (text re-encoded and all 100 masks
   computed and upsampled every frame, fp32), as speed-up ratios, with the largest box (px)
   and score difference of each fast path from the naive fp32 outputs on the kept queries.

Random weights score every query alike, so "kept" is fixed by ``max_instances`` (--kept).
Times are CPU seconds of this process (all threads; less sensitive than wall time to other
processes sharing the machine) and wall seconds, medians of a few repetitions (the model is
large, CPUs are slow); the three frame paths are timed interleaved, round by round, so that
they see the same machine load. Figures are indicative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toist_core.config import InferenceConfig, preset  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.tokens import NO_OBJECT_INDEX  # noqa: E402


def timed(fn, reps: int):
    """(median CPU seconds, median wall seconds, last result) of ``fn()`` over ``reps`` runs after
    one warm-up."""
    result = fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), result


def naive_frame(seg: TaskSegmenter, image: np.ndarray, caption: str):
    """Reference-style frame: encode text + image, decode, all 100 masks, upsample all."""
    height, width = image.shape[:2]
    batch, sizes = seg.preprocess([image])
    out = seg.model(batch, [caption])
    scores = 1 - out["pred_logits"][0].softmax(-1)[:, NO_OBJECT_INDEX]
    cx, cy, w, h = out["pred_boxes"][0].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    logits = F.interpolate(out["pred_masks"], size=sizes[0], mode="bilinear", align_corners=False)
    masks = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
    return scores.numpy(), boxes.numpy(), masks.numpy()


def stage_times(seg: TaskSegmenter, image: np.ndarray, caption: str, reps: int) -> dict[str, tuple]:
    """``{stage: (cpu s, wall s)}`` of the naive frame's stages."""
    model, detr = seg.model, seg.model.detr
    batch, sizes = seg.preprocess([image])
    times = {}

    def record(name, fn):
        cpu, wall, result = timed(fn, reps)
        times[name] = (cpu, wall)
        return result

    record("preprocess (resize, normalise)", lambda: seg.preprocess([image]))

    def backbone():
        levels, pos = detr.backbone(batch)
        return levels, pos, detr.input_proj(levels[-1][0])

    levels, pos, src_proj = record("image backbone (ResNet-101 + proj)", backbone)
    text = record("text encoder (RoBERTa + resizer)", lambda: model.encode_text([caption]))

    def transformer():
        memory = detr.transformer.encode(src_proj, levels[-1][1], pos, detr.query_embed.weight, text)
        memory["features"], memory["src_proj"] = [f for f, _ in levels], src_proj
        return memory, detr.decoder_states(memory)

    memory, hs = record("transformer (6 enc + 6 dec)", transformer)

    def heads():
        out = detr.predict_heads(hs, memory, aux=False)
        return 1 - out["pred_logits"].softmax(-1)[..., NO_OBJECT_INDEX]

    record("heads (class, box, score)", heads)
    mask_logits = record("mask head, 100 queries", lambda: model.predict_masks(memory, hs[-1]))
    kept = hs[-1][:, :10]
    record("mask head, 10 queries", lambda: model.predict_masks(memory, kept))

    def upsample():
        logits = F.interpolate(mask_logits, size=sizes[0], mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False).sigmoid() > 0.5

    record("mask upsampling, 100 masks", upsample)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per measurement (after 1 warm-up)")
    parser.add_argument("--kept", type=int, default=10, help="instances kept by the fast path (max_instances)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    start = time.perf_counter()
    cfg = preset("paper_segm")
    cfg.text.tokenizer = "builtin:tiny"  # offline; token ids differ from roberta-base, cost does not
    fp32 = TaskSegmenter.from_config(cfg, device="cpu", seed=0, task=2,
                                     inference=InferenceConfig(score_threshold=0.0, max_instances=args.kept))
    bf16 = TaskSegmenter(fp32.model, device="cpu", task=2,
                         inference=InferenceConfig(score_threshold=0.0, max_instances=args.kept, precision="bf16"))
    caption = fp32.task_state.caption
    image = np.random.default_rng(0).integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)
    print(f"paper_segm model, random weights, {args.width}x{args.height} RGB -> "
          f"{tuple(fp32.preprocess([image])[0].tensors.shape[-2:])} network input; caption {caption!r}; "
          f"{torch.get_num_threads()} CPU threads; median of {args.reps} after 1 warm-up "
          f"(build {time.perf_counter() - start:.1f} s)")

    print("\nStages of the naive fp32 frame (per frame):        CPU s    wall s")
    for name, (cpu, wall) in stage_times(fp32, image, caption, args.reps).items():
        print(f"  {name:46s} {cpu:8.3f}  {wall:8.3f}")

    paths = {
        "naive fp32 (text + 100 masks per frame)": lambda: naive_frame(fp32, image, caption),
        "predictor fp32 (cached text, kept masks)": lambda: fp32.predict(image),
        "predictor bf16 autocast": lambda: bf16.predict(image),
    }
    results = {name: fn() for name, fn in paths.items()}  # warm-up
    cpu = {name: [] for name in paths}
    wall = {name: [] for name in paths}
    for _ in range(args.reps):  # interleaved rounds: every path sees the same machine load
        for name, fn in paths.items():
            c0, w0 = time.process_time(), time.perf_counter()
            results[name] = fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    naive = "naive fp32 (text + 100 masks per frame)"
    n_scores, n_boxes, _ = results[naive]
    base_cpu, base_wall = statistics.median(cpu[naive]), statistics.median(wall[naive])
    print(f"\nPer frame, kept instances = {args.kept}:               CPU s  speed-up   wall s  speed-up")
    for name in paths:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        line = f"  {name:44s} {c:8.3f}  {base_cpu / c:6.2f}x  {w:8.3f}  {base_wall / w:6.2f}x"
        if name != naive:
            pred = results[name]
            box_diff = float(np.abs(pred.boxes - n_boxes[pred.queries]).max())
            score_diff = float(np.abs(pred.scores - n_scores[pred.queries]).max())
            line += f"   max |box diff| {box_diff:.4f} px, max |score diff| {score_diff:.2e}"
        print(line)
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
