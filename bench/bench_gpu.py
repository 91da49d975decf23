"""GPU figures of the paper-size segmentation model, in one unattended run (about 8 minutes on
an H100): inference per precision and optimisation, the TensorRT path when there is one, and
a few training updates under torchrun with NCCL and AMP.

    python bench/bench_gpu.py                         # needs CUDA; exits with a message without it
    python bench/bench_gpu.py --checkpoint toist.pth  # trained weights instead of random ones
    python bench/bench_gpu.py --quick --device cpu    # every code path, tiny sizes, on CPU (no GPU figures)

Inference: ``TaskSegmenter.from_config("paper_segm")`` (random weights, the packaged tiny
tokenizer: roberta-base's is not needed for timing) or ``--checkpoint``, one 640x480 image
resized to an 800 px short side, all queries scored, ``--kept`` instances (default 5) through
the mask head. Paths: fp32, fp16, bf16 (``InferenceConfig.precision``); each precision also
with ``torch.compile`` (``--compile-modes``, default "reduce-overhead", which uses CUDA graphs;
"max-autotune" compiles for minutes) of the backbone + transformer, as long as the run is under
``--compile-budget-s``; and ``InferenceConfig(backend="tensorrt")`` when
``InferenceConfig`` has a ``backend`` field and the model directory (``--model-dir``) has its
ONNX files, else "not available". Per path: end-to-end FPS (wall, synchronised), per-stage ms
from ``torch.cuda.Event`` pairs (preprocess, encode, decoder + heads, masks, post-process),
peak GPU memory (``torch.cuda.max_memory_allocated``, reset per path).

Training: ``toist synth`` writes a small synthetic COCO-Tasks set (COCO-sized images), then
``torchrun --standalone --nproc_per_node N`` runs ``toist train`` with the pronoun stage's
configuration (``training/configs/pronoun.yaml``: paper model, batch 6 per GPU) with random
weights, NCCL and bf16 AMP, for ``--train-steps`` updates; updates/s over the updates after
the first ``--train-warmup`` (an optimizer step hook, synchronised) and the peak memory of
each rank.

Every section runs in its own try/except: an error is printed and the run goes on. A table
closes the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TRAIN_TAG = "BENCH_GPU_TRAIN "


# ----------------------------------------------------------------------------- helpers

class Timer:
    """Per-stage times: CUDA events on a GPU (read after one synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def stages(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            out[name] = start.elapsed_time(end) if self.cuda else 1000.0 * (end - start)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _section(name: str, rows: list, func, *args, **kwargs):
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = func(*args, **kwargs)
    except Exception as exc:  # keep going: the run is unattended
        traceback.print_exc()
        rows.append({"path": name, "error": f"{type(exc).__name__}: {exc}"[:160]})
        result = None
    print(f"=== {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


# ----------------------------------------------------------------------------- inference

def _frame_impl(seg, image, kept, timer):
    """One predict() frame, stage by stage (the calls TaskSegmenter.predict_batch makes)."""
    from toist_core.inference import postprocess
    from toist_core.inference import segmenter as seg_module

    state = seg.task_state
    with torch.inference_mode(), seg_module.eval_mode(seg.model):
        timer.mark("start")
        batch, resized = seg.preprocess([image])
        timer.mark("preprocess")
        with seg._autocast_context():
            memory = seg.model.encode(batch, text=state.text)
            if state.uses_ccr:
                memory = seg._replace_pronoun_rows(memory, state)
            timer.mark("encode")
            detector = seg.model.detector
            hs = detector.decoder_states(memory)
            out = detector.predict_heads(hs, memory, aux=False)
        scores = 1.0 - out["pred_logits"].float().softmax(-1)[..., seg_module.NO_OBJECT_INDEX]
        boxes_all = out["pred_boxes"].float()
        timer.mark("decoder+heads")
        keep = seg_module.select(scores[0], 0.0, kept)
        masks = None
        if seg.has_masks and keep.numel():
            with seg._autocast_context():
                logits = seg.model.predict_masks(postprocess.image_memory(memory, 0), hs[-1][0:1, keep])
            masks = postprocess.masks_at_original(logits, resized[0], batch.tensors.shape[-2:], image.shape[:2],
                                                  seg.inference.mask_threshold)
        timer.mark("masks")
        boxes = seg_module.to_pixels(boxes_all[0, keep], image.shape[:2], clip=seg.processing.clip_boxes)
        result = (boxes.cpu().numpy(), scores[0, keep].cpu().numpy(), masks)
        timer.mark("post")
    return result


def _build_segmenter(args, device, precision: str, backend=None):
    from toist_core.config import InferenceConfig, preset
    from toist_core.inference import TaskSegmenter

    kwargs = dict(short_side=args.short_side, max_size=args.max_size, precision=precision,
                  score_threshold=0.0, max_instances=args.kept)
    if backend is not None:
        kwargs["backend"] = backend
    inference = InferenceConfig(**kwargs)
    if args.model_dir or args.checkpoint:
        seg = TaskSegmenter.from_pretrained(args.model_dir or args.checkpoint, device=str(device),
                                            inference=inference, text_encoder=args.text_encoder)
    else:
        cfg = preset(args.preset)
        cfg.text.tokenizer = args.text_encoder or "builtin:tiny"  # offline; cost as roberta-base's
        seg = TaskSegmenter.from_config(cfg, device=str(device), inference=inference, seed=0)
    seg.set_task(1)
    return seg


def compile_image_path(seg, mode: str) -> None:
    """torch.compile the image path's heavy modules (backbone + transformer) in place."""
    model = seg.model
    detector = getattr(model, "detector", model)
    compiled = []
    for name in ("backbone", "transformer"):
        for owner in (model, detector):
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module) and name not in compiled:
                setattr(owner, name, torch.compile(module, mode=mode, dynamic=False))
                compiled.append(name)
    if not compiled:  # fall back to the whole encode step
        model.encode = torch.compile(model.encode, mode=mode, dynamic=False)
        compiled.append("encode")
    print(f"torch.compile(mode={mode!r}) on {', '.join(compiled)}", flush=True)


def _predict_frame(seg, image, kept, timer):
    """Fallback: predict() end to end (no stage split)."""
    timer.mark("start")
    seg.predict(image, score_threshold=0.0, max_instances=kept)
    timer.mark("predict")


def _time_path(seg, image, args, device, label: str) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    frame = _frame_impl
    try:  # the stage split follows TaskSegmenter's internals; if they moved, time predict() whole
        frame(seg, image, args.kept, Timer(device))
    except Exception as exc:
        print(f"stage split failed ({type(exc).__name__}: {exc}); timing predict() end to end", flush=True)
        frame = _predict_frame
    for _ in range(args.warmup):
        frame(seg, image, args.kept, Timer(device))
    _sync(device)
    warm_s = time.perf_counter() - started
    stage_runs, walls = [], []
    for _ in range(args.reps):
        timer = Timer(device)
        _sync(device)
        t0 = time.perf_counter()
        frame(seg, image, args.kept, timer)
        _sync(device)
        walls.append(time.perf_counter() - t0)
        stage_runs.append(timer.stages())
    stages = {k: statistics.median(r[k] for r in stage_runs) for k in stage_runs[0]}
    wall_ms = 1000.0 * statistics.median(walls)
    row = {"path": label, "fps": 1000.0 / wall_ms, "ms": wall_ms, "peak_mib": _peak_mib(device),
           "warmup_s": warm_s, **{f"ms_{k}": v for k, v in stages.items()}}
    print(json.dumps(row), flush=True)
    return row


def inference_sections(args, device, rows: list) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    precisions = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    if args.quick and device.type != "cuda":
        precisions = ["fp32"]
    for precision in precisions:
        def eager(precision=precision):
            seg = _build_segmenter(args, device, precision)
            rows.append(_time_path(seg, image, args, device, f"{precision} eager"))
            return seg
        seg = _section(f"inference {precision} eager", rows, eager)
        if args.no_compile or seg is None:
            continue
        for mode in args.compile_modes:
            spent = time.perf_counter() - args.started
            if spent > args.compile_budget_s:
                print(f"torch.compile {precision} {mode}: skipped, {spent:.0f} s spent (--compile-budget-s)")
                rows.append({"path": f"{precision} compile:{mode}", "error": "skipped (time budget)"})
                continue

            def compiled(precision=precision, mode=mode):
                seg = _build_segmenter(args, device, precision)
                compile_image_path(seg, mode)
                rows.append(_time_path(seg, image, args, device, f"{precision} compile:{mode}"))
            _section(f"inference {precision} torch.compile {mode}", rows, compiled)
        del seg
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _section("inference tensorrt", rows, _tensorrt, args, device, image, rows)


def _tensorrt(args, device, image, rows) -> None:
    from toist_core.config import InferenceConfig

    fields = {f.name for f in dataclasses.fields(InferenceConfig)}
    if "backend" not in fields:
        print("TensorRT path: not available (InferenceConfig has no 'backend' field in this tree)")
        rows.append({"path": "tensorrt", "error": "not available (no InferenceConfig.backend)"})
        return
    if not args.model_dir:
        print("TensorRT path: not available (needs --model-dir: a model directory with ONNX files, `toist export`)")
        rows.append({"path": "tensorrt", "error": "not available (no --model-dir)"})
        return
    if device.type != "cuda":
        print("TensorRT path: not available on CPU")
        rows.append({"path": "tensorrt", "error": "not available on CPU"})
        return
    for precision in ("fp16", "fp32"):
        def run(precision=precision):
            seg = _build_segmenter(args, device, precision, backend="tensorrt")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # The backend may not expose the torch stages: time predict() end to end.
            for _ in range(args.warmup):
                seg.predict(image, score_threshold=0.0, max_instances=args.kept)
            walls = []
            for _ in range(args.reps):
                _sync(device)
                t0 = time.perf_counter()
                seg.predict(image, score_threshold=0.0, max_instances=args.kept)
                _sync(device)
                walls.append(time.perf_counter() - t0)
            ms = 1000.0 * statistics.median(walls)
            row = {"path": f"tensorrt {precision}", "fps": 1000.0 / ms, "ms": ms, "peak_mib": _peak_mib(device)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        _section(f"tensorrt {precision}", rows, run)


# ----------------------------------------------------------------------------- training

def training_section(args, device, rows: list) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="toist_bench_gpu_"))
    data = workdir / "synth"
    if not (data / "annotations").is_dir():
        synth = [sys.executable, "-m", "toist_core.cli", "synth", str(data), "--tasks", "1", "2",
                 "--splits", "train", "--images-per-split", str(args.train_images),
                 "--min-size", str(args.train_min_size), "--max-size", str(args.train_max_size)]
        print(" ".join(synth), flush=True)
        subprocess.run(synth, check=True, cwd=ROOT)
    nproc = args.nproc or (torch.cuda.device_count() if device.type == "cuda" else 1)
    config = "training/configs/tiny_pronoun.yaml" if args.quick else "training/configs/pronoun.yaml"
    overrides = [f"data.root={data}", "data.tasks=[1,2]", f"output_dir={workdir / 'run'}",
                 f"schedule.max_steps={args.train_steps}", "schedule.epochs=1", "checkpoint.every_steps=0",
                 "eval.every_epochs=1000", "eval.holdout_fraction=0.25", "runtime.progress=false",
                 "runtime.tensorboard=false",
                 "runtime.deterministic=false", "loader.num_workers=2", "init.load=null",
                 f"runtime.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
    if device.type == "cuda":
        overrides += [f"runtime.amp={args.amp}", "distributed.backend=nccl"]
    if not args.quick:
        overrides += ["model.text.tokenizer=builtin:tiny"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--train-worker", str(args.train_warmup), "--",
           "--config", config, *overrides]
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.train_timeout)
    wall = time.perf_counter() - started
    results = [json.loads(line[len(TRAIN_TAG):]) for line in proc.stdout.splitlines() if line.startswith(TRAIN_TAG)]
    if proc.returncode != 0 or not results:
        print(proc.stdout[-4000:], proc.stderr[-6000:], sep="\n")
        raise RuntimeError(f"torchrun exited with {proc.returncode} after {wall:.0f} s")
    print(proc.stderr[-1500:])
    per_rank = sorted(results, key=lambda r: r["rank"])
    rate = statistics.median(r["updates_per_s"] for r in per_rank)
    row = {"path": f"train {Path(config).stem} x{nproc} {args.amp if device.type == 'cuda' else 'fp32'}",
           "updates_per_s": rate, "images_per_s": rate * per_rank[0]["batch_size"] * nproc,
           "peak_mib": max(r["peak_mib"] for r in per_rank), "steps": per_rank[0]["steps"], "wall_s": wall}
    print(json.dumps(row), flush=True)
    rows.append(row)


def train_worker(warmup: int, train_argv: list[str]) -> int:
    """Runs under torchrun: ``toist train`` in this process, optimizer steps timed by a hook."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from training.train import add_arguments, run

    stamps: list[float] = []
    batch_size = [0]

    def hook(optimizer, args, kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(hook)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(train_argv)
    code = run(parsed)
    for arg in train_argv:
        if arg.startswith("loader.batch_size="):
            batch_size[0] = int(arg.split("=", 1)[1])
    if not batch_size[0]:
        import yaml
        config = next(train_argv[i + 1] for i, a in enumerate(train_argv) if a == "--config")
        batch_size[0] = int(yaml.safe_load((ROOT / config).read_text()).get("loader", {}).get("batch_size", 6))
    timed = stamps[warmup:]
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) >= 2 else float("nan")
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    print(TRAIN_TAG + json.dumps({
        "rank": int(os.environ.get("RANK", "0")), "steps": len(stamps), "updates_per_s": rate,
        "batch_size": batch_size[0],
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else float("nan")}), flush=True)
    return int(code or 0)


# ----------------------------------------------------------------------------- main

def _table(rows: list, device: torch.device) -> str:
    lines = [f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (no GPU figures)'}; "
             f"torch {torch.__version__}",
             "| path | FPS | ms/frame | preprocess | encode | decoder+heads | masks | post | peak MiB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | | | | | | | | | {r['error']} |")
        elif "updates_per_s" in r:
            lines.append(f"| {r['path']} | | | | | | | | {r['peak_mib']:.0f} | {r['updates_per_s']:.2f} updates/s, "
                         f"{r['images_per_s']:.1f} img/s, {r['steps']} steps, {r['wall_s']:.0f} s wall |")
        else:
            stages = [r.get(f"ms_{k}") for k in ("preprocess", "encode", "decoder+heads", "masks", "post")]
            if "ms_predict" in r:
                stages[1] = r["ms_predict"]  # end to end only (stage split unavailable)
            cells = " | ".join("" if v is None else f"{v:.1f}" for v in stages)
            lines.append(f"| {r['path']} | {r['fps']:.1f} | {r['ms']:.1f} | {cells} | {r['peak_mib']:.0f} | "
                         f"{'warm-up %.0f s' % r['warmup_s'] if 'warmup_s' in r else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-worker"]:
        rest = argv[1:]
        warmup = int(rest[0])
        return train_worker(warmup, rest[2:] if rest[1:2] == ["--"] else rest[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu only with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, every code path (CPU check)")
    parser.add_argument("--checkpoint", default=None, help="weights to load instead of random ones")
    parser.add_argument("--model-dir", default=None, help="a model directory (toist export): also the TensorRT path")
    parser.add_argument("--text-encoder", default=None, help="tokenizer for official .pth files")
    parser.add_argument("--preset", default="paper_segm")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--kept", type=int, default=5, help="instances through the mask head")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--compile-modes", nargs="+", default=["reduce-overhead"],
                        help='torch.compile modes ("max-autotune", "reduce-overhead" = CUDA graphs, "default")')
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-budget-s", type=float, default=300,
                        help="no further torch.compile section starts after this many seconds of the run")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--nproc", type=int, default=None, help="torchrun processes (default: all GPUs)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-warmup", type=int, default=5, help="updates left out of updates/s")
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--train-min-size", type=int, default=480)
    parser.add_argument("--train-max-size", type=int, default=640)
    parser.add_argument("--train-timeout", type=int, default=300)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available on this machine (torch.cuda.is_available() is False); "
              "nothing measured. Run it on a GPU machine, or `--quick --device cpu` to check the code paths.",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.quick:
        print("bench_gpu: a CPU run gives no GPU figures; use --quick --device cpu to check the code paths",
              file=sys.stderr)
        return 2
    if args.quick:
        args.preset = "tiny_segm" if not (args.checkpoint or args.model_dir) else args.preset
        args.short_side, args.max_size, args.width, args.height = 128, 224, 160, 120
        args.warmup, args.reps = 1, 2
        args.train_steps, args.train_warmup, args.train_images = 4, 1, 16
        args.train_min_size, args.train_max_size = 96, 128
        if device.type != "cuda":
            args.compile_modes = ["default"]  # CPU inductor: checks the path, no CUDA graphs
        print("QUICK run: tiny model and sizes; the figures below are NOT GPU figures.", flush=True)
    rows: list = []
    started = args.started = time.perf_counter()
    inference_sections(args, device, rows)
    if not args.no_train:
        _section("training (torchrun)", rows, training_section, args, device, rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
    print(_table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
