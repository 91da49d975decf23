"""Per-frame CPU time of the paper-size TOIST segmentation model (random weights): the
reference-equivalent frame against ``TaskSegmenter.predict``, per precision / optimisation.

    python bench/bench_inference.py [--reps 3] [--kept 5] [--width 640 --height 480]
                                    [--stage-reps 1] [--nchw] [--no-int8] [--no-stages] [--compile]

One run with the defaults takes about 2-3 minutes on the 2-core Zen 4 VM (docs/performance.md;
on a CPU without bf16 instructions bf16 runs emulated and is the slow path).

The model is the ``paper_segm`` preset (ResNet-101, RoBERTa-base-size text encoder, 6 + 6
transformer layers, 100 queries, mask head) with random weights. Its tokenizer is the packaged
tiny one (``builtin:tiny``) on the paper-size text encoder: roberta-base's tokenizer is not
available offline here; the token count of the caption differs slightly, the cost does not
(the text is encoded once per task in the predictor anyway).

Frame paths, all on the same 640x480 image, resized to an 800 px short side (800 x 1066,
padded to 800 x 1088), timed interleaved round by round so that they see the same machine load:

* ``reference``: what the reference evaluation computes per frame: the text re-encoded, aux
  outputs (heads on all 6 decoder layers), the mask head on all 100 queries, masks upsampled to
  the *padded* input size, cropped to the resized image, upsampled to the original size and
  thresholded (``PostProcessSegm``); contiguous (NCHW) model with its FrozenBatchNorms, as the
  reference runs it, under ``torch.no_grad``.
* ``predict`` (``TaskSegmenter.predict``, text cached per task, heads on the last layer, mask
  head and mask upsampling on the N kept instances only; ``--kept``, default 5), in fp32 with
  each exact optimisation added in turn (``--nchw``: NCHW with its BatchNorms; channels-last, as
  before issue 18; BatchNorm folded into the convolutions, which ``from_pretrained`` /
  ``from_config`` now do), in bf16 autocast and, approximate,
  with int8 dynamic quantisation of the ``nn.Linear`` layers (the transformer's, the heads', and
  the text encoder's, which the cached text does not run per frame),
  ``--compile``: with ``torch.compile`` (inductor, fixed input size) of the backbone, the
  transformer's encoder and decoder and the mask head (``bench_gpu.compile_image_path``; the
  first frame compiles). The ONNX Runtime paths need an exported model directory:
  ``bench/bench_cpu_paths.py``.

Printed: per-stage milliseconds of the reference frame and of the fastest exact and bf16
predictor; per-frame time of each path and its speed-up over the reference (CPU time of this
process, all threads, and wall time; medians, with each path's spread over the rounds and a
warning when it exceeds ``SPREAD_WARNING`` of the median: a loaded machine); the largest score / box (px) difference and the
smallest mask IoU of each predictor path against the reference on the kept queries.

Random weights score every query alike, so "kept" is fixed by ``max_instances``. Figures on a
shared machine are indicative; the ratios, measured side by side, are what to compare.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from toist_core.config import InferenceConfig, preset  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.inference.device import prepared  # noqa: E402
from toist_core.model import build_model, load_tokenizer  # noqa: E402
from toist_core.model.fold_batchnorm import count_folded  # noqa: E402
from toist_core.tokens import NO_OBJECT_INDEX  # noqa: E402

REFERENCE = "reference frame (fp32, NCHW, text + aux + 100 masks)"


# ----------------------------------------------------------------------------- reference frame

def reference_frame(seg: TaskSegmenter, image: np.ndarray, caption: str) -> dict:
    """The reference evaluation's work for one frame (see the module doc), all 100 queries."""
    with torch.no_grad():
        height, width = image.shape[:2]
        batch, sizes = seg.preprocess([image])
        model = seg.model
        memory = model.encode(batch, [caption])
        out = model.decode(memory, aux=True)
        scores = 1 - out["pred_logits"][0].softmax(-1)[:, NO_OBJECT_INDEX]
        cx, cy, w, h = out["pred_boxes"][0].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # toist clips (the reference does not)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        masks = postprocess_segm(out["pred_masks"], sizes[0], tuple(batch.tensors.shape[-2:]), (height, width))
        return {"scores": scores.numpy(), "boxes": boxes.numpy(), "masks": masks}


def postprocess_segm(pred_masks: torch.Tensor, size: tuple, padded: tuple, orig: tuple) -> np.ndarray:
    """``PostProcessSegm``: bilinear to the padded (batch max) size, crop to the resized image,
    bilinear to the original size, sigmoid > 0.5; ``[Q, H, W]`` bool."""
    logits = F.interpolate(pred_masks, size=padded, mode="bilinear", align_corners=False)
    logits = logits[:, :, :size[0], :size[1]]
    logits = F.interpolate(logits, size=orig, mode="bilinear", align_corners=False)
    return (logits[0].sigmoid() > 0.5).numpy()


# ----------------------------------------------------------------------------- timing

def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def timed(fn: Callable, reps: int):
    """(median CPU s, median wall s, last result) of ``fn()`` over ``reps`` runs (no warm-up:
    the whole-frame warm-up has run every module before)."""
    result = None
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = clock()
        result = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), result


def stage_times(seg: TaskSegmenter, image: np.ndarray, caption: str, reps: int, kept: int,
                reference: bool) -> dict[str, float]:
    """``{stage: CPU ms}`` of one frame of ``seg``: the reference frame's stages
    (``reference``) or the predictor's (cached text, last-layer heads, ``kept`` masks)."""
    model, detr = seg.model, seg.model.detector
    times: dict[str, float] = {}
    grad = torch.no_grad() if reference else torch.inference_mode()

    def record(name, fn):
        with grad, seg._autocast_context():
            cpu, _, result = timed(fn, reps)
        times[name] = 1000 * cpu
        return result

    batch, sizes = record("preprocess (resize, normalise, pad)", lambda: seg.preprocess([image]))
    padded = tuple(batch.tensors.shape[-2:])

    def backbone():
        levels, pos = detr.backbone(batch)
        return levels, pos, detr.input_proj(levels[-1][0])

    levels, pos, src_proj = record("image backbone (ResNet-101 + proj)", backbone)
    if reference:
        text = record("text encoder (RoBERTa + resizer)", lambda: model.encode_text([caption]))
    else:
        text = seg.task_state.text
        times["text encoder (RoBERTa + resizer)"] = 0.0

    def encoder():
        memory = detr.transformer.encode(src_proj, levels[-1][1], pos, detr.query_embed.weight, text)
        memory["features"], memory["src_proj"] = [f for f, _ in levels], src_proj
        return memory

    memory = record("transformer encoder (6 layers)", encoder)
    hs = record("transformer decoder (6 layers)", lambda: detr.decoder_states(memory))

    def heads():
        out = detr.predict_heads(hs, memory, aux=reference)
        return 1 - out["pred_logits"].float().softmax(-1)[..., NO_OBJECT_INDEX]

    record("heads (class, box, score; reference: + aux)", heads)
    queries = hs[-1] if reference else hs[-1][:, :kept]
    logits = record("mask head (reference: 100 queries, else kept)", lambda: model.predict_masks(memory, queries))
    record("mask upsample + threshold (100 / kept masks)",
           lambda: postprocess_segm(logits.float(), sizes[0], padded, image.shape[:2]))
    times["total (sum of stages)"] = sum(times.values())
    return times


# ----------------------------------------------------------------------------- paths

def quantized_int8(model: nn.Module) -> nn.Module:
    """A copy with int8 dynamic quantisation of every ``nn.Linear`` layer (the transformer's, the
    heads', the resizer's and the text encoder's; the cached text runs the last once per task),
    except ``bbox_attention``'s (it reads its key weight as a conv kernel: kept fp32)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name, module in model.named_modules()
            if type(module) is nn.Linear and not name.startswith("bbox_attention")}
    return quantize_dynamic(copy.deepcopy(model), qconfig_spec=spec, inplace=False)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def compare(pred, ref: dict) -> str:
    q = pred.queries
    box = float(np.abs(pred.boxes - ref["boxes"][q]).max()) if len(q) else 0.0
    score = float(np.abs(pred.scores - ref["scores"][q]).max()) if len(q) else 0.0
    iou = float(mask_iou(pred.masks, ref["masks"][q]).min()) if len(q) else 1.0
    return f"|dscore| {score:.1e}  |dbox| {box:.1e} px  mask IoU >= {iou:.4f}"


SPREAD_WARNING = 0.20  # rounds of one path further apart than this (of the median): a loaded machine


def time_rounds(run: dict[str, Callable], results: dict, reps: int, kept: int) -> None:
    """Time every path of ``run`` in ``reps`` interleaved rounds (every path sees the same machine
    load; ``results`` holds each path's warm-up output and is updated), then print CPU and wall
    medians, speed-ups over the reference and each path's difference from the reference."""
    cpu = {name: [] for name in run}
    wall = {name: [] for name in run}
    for _ in range(reps):
        for name, fn in run.items():
            c0, w0 = clock()
            results[name] = fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    ref = results[REFERENCE]
    base_cpu, base_wall = statistics.median(cpu[REFERENCE]), statistics.median(wall[REFERENCE])
    print(f"\nPer frame, {reps} interleaved round(s) after 1 warm-up (median; spread = (max - min) / median "
          f"of the CPU times), kept = {kept}:")
    print(f"  {'path':46s} {'CPU ms':>8s} {'speed-up':>8s} {'wall ms':>8s} {'speed-up':>8s} {'spread':>7s}   "
          "vs reference")
    unsteady = []
    for name in run:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        spread = (max(cpu[name]) - min(cpu[name])) / c
        if spread > SPREAD_WARNING:
            unsteady.append(name)
        line = (f"  {name:46s} {1000 * c:8.0f} {base_cpu / c:7.2f}x {1000 * w:8.0f} {base_wall / w:7.2f}x "
                f"{100 * spread:6.0f}%")
        if name != REFERENCE:
            line += "   " + compare(results[name], ref)
        print(line, flush=True)
    if reps < 3:
        print(f"  note: {reps} round(s): one slow sample moves the median; use --reps 3 or more for figures")
    if unsteady:
        print(f"  WARNING: the rounds of {', '.join(unsteady)} differ by more than {100 * SPREAD_WARNING:.0f} % "
              "(a loaded machine?): these ratios are not figures to keep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="interleaved timed rounds of the frame paths "
                        "(after 1 warm-up); default 3")
    parser.add_argument("--stage-reps", type=int, default=1, help="timed repetitions per stage (after the frame "
                        "warm-up); default 1")
    parser.add_argument("--kept", type=int, default=5, help="instances kept by predict (max_instances)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 dynamic quantisation path")
    parser.add_argument("--nchw", action="store_true", help="also time predict on the NCHW model, BN unfolded "
                        "(the effect of channels-last alone)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage tables")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="also predict with torch.compile (inductor, this input size) of the folded model's "
                             "backbone and transformer; the compile time is printed apart")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch.ao")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")

    start = time.perf_counter()
    cfg = preset("paper_segm")
    cfg.text.tokenizer = "builtin:tiny"  # offline; token ids differ from roberta-base, cost does not
    torch.manual_seed(0)
    base = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
    size = dict(short_side=args.short_side, max_size=1333)

    def segmenter(model, channels_last=True, **kw):
        # duplicate_iou None: N kept queries, as the reference keeps every query. With random
        # weights all masks look alike, and duplicate removal would run the mask head on query
        # after query looking for N distinct ones (1.77x slower predict, not what a trained model pays).
        inference = InferenceConfig(score_threshold=0.0, max_instances=args.kept, channels_last=channels_last,
                                    duplicate_iou=None, **size, **kw)
        return TaskSegmenter(model, device="cpu", task=2, inference=inference)

    # toist's pre-processing on both sides, so that the last column compares like with like: the
    # reference pads a lone frame to itself (800 x 1066), 2 % fewer pixels than 800 x 1088 here.
    ref_seg = TaskSegmenter(base, device="cpu", task=2, inference=InferenceConfig(
        score_threshold=0.0, max_instances=100, channels_last=False, **size))
    channels_last = copy.deepcopy(base).to(memory_format=torch.channels_last)
    folded = prepared(copy.deepcopy(base), torch.device("cpu"), InferenceConfig())  # = from_config's model
    paths = {
        REFERENCE: None,
        "predict fp32, channels-last (before)": segmenter(channels_last),
        "predict fp32, channels-last + BN folded": segmenter(folded),
        "predict bf16 autocast (+ folded, ch-last)": segmenter(folded, precision="bf16"),
    }
    if args.nchw:
        paths = {REFERENCE: None, "predict fp32, NCHW, BN unfolded": segmenter(base, channels_last=False),
                 **{k: v for k, v in paths.items() if k != REFERENCE}}
    if not args.no_int8:
        paths["predict int8 dyn. Linear (+ folded)"] = segmenter(quantized_int8(folded))
    if args.compile:
        from bench_gpu import compile_image_path

        compiled = segmenter(copy.deepcopy(folded))
        compile_image_path(compiled, "default")
        paths["predict fp32 torch.compile (+ folded, ch-last)"] = compiled
    caption = ref_seg.task_state.caption
    image = np.random.default_rng(0).integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)
    batch, sizes = ref_seg.preprocess([image])
    print(f"paper_segm model, random weights (tokenizer builtin:tiny), {args.width}x{args.height} RGB -> "
          f"resized {sizes[0]}, padded {tuple(batch.tensors.shape[-2:])}; caption {caption!r} "
          f"({ref_seg.task_state.text.num_tokens} tokens); {count_folded(folded)} conv+BN pairs folded; "
          f"{torch.get_num_threads()} CPU threads; torch {torch.__version__}; build {time.perf_counter() - start:.0f} s")

    run = {name: (lambda: reference_frame(ref_seg, image, caption)) if seg is None else
           (lambda seg=seg: seg.predict(image)) for name, seg in paths.items()}
    results = {}
    for name, fn in run.items():  # warm-up (torch.compile compiles here)
        began = time.perf_counter()
        results[name] = fn()
        if "compile" in name:
            print(f"{name}: first frame (compilation) {time.perf_counter() - began:.0f} s", flush=True)
    if not args.no_stages:
        columns = {"reference": stage_times(ref_seg, image, caption, args.stage_reps, args.kept, reference=True),
                   "fp32 folded": stage_times(paths["predict fp32, channels-last + BN folded"], image, caption,
                                              args.stage_reps, args.kept, reference=False),
                   "bf16": stage_times(paths["predict bf16 autocast (+ folded, ch-last)"], image, caption,
                                       args.stage_reps, args.kept, reference=False)}
        print(f"\nStages, CPU ms per frame (median of {args.stage_reps}; "
              f"predictor: text cached, {args.kept} masks):")
        print(f"  {'stage':46s}" + "".join(f"{c:>13s}" for c in columns))
        for name in columns["reference"]:
            print(f"  {name:46s}" + "".join(f"{col[name]:13.0f}" for col in columns.values()))
        print(f"  (stages timed one by one; the frame totals below are timed whole)   "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)

    time_rounds(run, results, args.reps, args.kept)
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
