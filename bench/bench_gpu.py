"""GPU figures of the paper-size segmentation model, in one unattended run (about 4 minutes on
an H100 as bench/gpu_device_run.sh runs it: --compile-budget-s bounds the compiled rows):
inference per precision and optimisation, a few training updates under torchrun with NCCL and
AMP, and the TensorRT path when there is one.

    python bench/bench_gpu.py                         # needs CUDA; exits with a message without it
    python bench/bench_gpu.py --checkpoint toist.pth  # trained weights instead of random ones
    python bench/bench_gpu.py --quick --device cpu    # every code path, tiny sizes, on CPU (no GPU figures)

Inference: the ``paper_segm`` preset with random weights (the packaged tiny tokenizer:
roberta-base's is not needed for timing; built once, copied per row) or ``--checkpoint`` /
``--model-dir``; one 640x480 image resized to an 800 px short side (800 x 1066, padded to
800 x 1088), all queries scored, ``--kept`` instances (default 5) through the mask head.
Random weights are made fp16-safe, for the bench only: the last BatchNorm scale of each
residual block of the backbone is multiplied by ``--residual-scale`` (0.1). Without trained
BatchNorm statistics the residual stream of ResNet-101 grows block after block and overflows
fp16 (inf / NaN from layer3 on); the scaled model has the same layers, shapes and kernels.

The frame is ``TaskSegmenter.predict``'s (stage by stage, as ``predict_batch`` runs it) with
duplicate removal off (``duplicate_iou=None``, every row, TensorRT too): with random weights all
masks look alike and duplicate removal would run the mask head on query after query looking for
distinct instances, which a trained model does not pay (the CPU bench does the same). The
finiteness checks of ``predict`` (scores, boxes, mask logits) are part of the frame.

Rows, in this order (the important ones first, so that a time limit cuts the least useful):

* ``bf16`` / ``fp16`` / ``fp32`` eager (``InferenceConfig.precision``; fp32 on a GPU runs its
  convolutions in TF32 with torch's default flags, printed in the header);
* ``bf16 eager cudnn.benchmark`` (a fixed camera size: cuDNN may pick faster kernels);
  ``--cudnn-benchmark all`` turns it on for every row instead, ``off`` drops the row;
* training: ``toist synth`` writes a small synthetic COCO-Tasks set (COCO-sized images), then
  ``torchrun --standalone --nproc_per_node N`` runs ``toist train`` with the pronoun stage's
  configuration (``training/configs/pronoun.yaml``: paper model, batch 6 per GPU) with random
  weights, NCCL (gloo on CPU) and bf16 AMP, for ``--train-steps`` updates, evaluation and
  checkpoint writes off; one process also creates the process group and wraps the model in DDP
  (training/distributed.py), and the row says what ran (backend, DDP). updates/s over the
  updates after the first ``--train-warmup`` (an optimizer step hook, synchronised), the peak
  memory of each rank;
* ``torch.compile`` rows (``--compile-modes``, default "reduce-overhead" = CUDA graphs) in the
  order bf16, fp16, fp32 (the first of them, the FPS goal's best chance, runs before training;
  the others after it), of the backbone, the transformer's encoder and decoder, and with masks
  ``bbox_attention`` and ``mask_head`` (the glue between them stays eager). A row starts only
  when the run's time so far plus the last compiled row's build + warm-up (``--compile-estimate-s``
  before the first) fits in ``--compile-budget-s``. The row gives the graphs compiled, graph
  breaks and CUDA-graph skips (torch._dynamo counters; the skip reasons are logged);
* ``InferenceConfig(backend="tensorrt")`` when onnxruntime has the TensorRT provider and
  ``--model-dir`` names a model directory with ONNX files, else the reason it is not available.

Per row: end-to-end FPS (wall, synchronised; median), per-stage ms from ``torch.cuda.Event``
pairs (preprocess, encode, decoder + heads, masks, post-process), GPU memory allocated before
the row's model was built, after it, and the peak (``torch.cuda.max_memory_allocated``, reset
per row; each row's model, compiled code and CUDA-graph pools are freed before the next).

Every section runs in its own try/except: an error is printed and the run goes on. Each row is
printed as JSON when it is measured and the table after every section, so a run stopped by a
time limit keeps what it measured; SIGTERM (the shell's ``timeout``) stops the training job's
whole process tree and prints the table. Exit status: 0 when every row that ran was measured
(rows skipped for the budget or an absent TensorRT are no failure), 1 when a row failed or none
was measured, 2 without CUDA, 143 after SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

# The run's time counts from here, before torch and CUDA start (10-20 s on a cold machine): the
# compiled rows' budget is of the whole process's time limit.
PROCESS_STARTED = time.perf_counter()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpu_training import training_section  # noqa: E402  (bench/ is sys.path[0])

GOAL_FPS = 60.0


class Terminated(BaseException):
    """SIGTERM (the shell's ``timeout``): a BaseException, so that no section's ``except
    Exception`` swallows it; ``finally`` blocks stop the training job, main prints the table."""


def _on_sigterm(signum, frame):
    raise Terminated()


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


def _allocated_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _free(device: torch.device) -> None:
    """Drop what the previous row left behind: its segmenter (once unreferenced), compiled code
    and CUDA-graph memory pools (dynamo's reset frees the cudagraph trees) and the allocator's
    cached blocks, so that the next row's memory figures are its own."""
    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception as exc:  # an older / newer torch: the figures say what was left
        print(f"torch._dynamo.reset() failed: {type(exc).__name__}: {exc}", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Report:
    """The rows measured so far; each printed as JSON when added, the table on demand."""

    def __init__(self, device: torch.device, args):
        self.device, self.args = device, args
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def table(self) -> str:
        device = self.device
        lines = [f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (no GPU figures)'}; "
                 f"torch {torch.__version__}",
                 "| path | FPS | ms/frame | preprocess | encode | decoder+heads | masks | post | peak MiB | "
                 "MiB before / model | note |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            if "updates_per_s" in r:
                lines.append(f"| {r['path']} | | | | | | | | {r['peak_mib']:.0f} | | {r['note']} |")
            elif "fps" not in r:
                lines.append(f"| {r['path']} | | | | | | | | | | {r.get('error', '')} |")
            else:
                stages = [r.get(f"ms_{k}") for k in ("preprocess", "encode", "decoder+heads", "masks", "post")]
                if "ms_predict" in r:
                    stages[1] = r["ms_predict"]  # end to end only (stage split unavailable)
                cells = " | ".join("" if v is None else f"{v:.1f}" for v in stages)
                memory = f"{r.get('mib_before', float('nan')):.0f} / {r.get('mib_model', float('nan')):.0f}"
                lines.append(f"| {r['path']} | {r['fps']:.1f} | {r['ms']:.1f} | {cells} | {r['peak_mib']:.0f} | "
                             f"{memory} | {r.get('note', '')} |")
        return "\n".join(lines)

    def failed(self) -> list[str]:
        """The rows that failed: not the ones skipped for --compile-budget-s or an absent
        TensorRT, nor the row a SIGTERM's stop adds (its exit status says so)."""
        return [r["path"] for r in self.rows if r.get("error") and r["path"] != "(run stopped)"
                and not r["error"].startswith(("skipped:", "not available:"))]

    def goal(self) -> str:
        fps = [r for r in self.rows if "fps" in r]
        if not fps:
            return "goal: no inference row was measured"
        best = max(fps, key=lambda r: r["fps"])
        if self.device.type != "cuda" or self.args.quick:
            return f"goal (>= {GOAL_FPS:.0f} FPS at 800 px on a GPU): not assessed on this run (no GPU figures)"
        verdict = "met" if best["fps"] >= GOAL_FPS else "NOT met"
        return (f"goal >= {GOAL_FPS:.0f} FPS end to end at {self.args.short_side} px with masks for "
                f"{self.args.kept} kept instances: best {best['fps']:.1f} FPS ({best['path']}): {verdict}")


def _section(name: str, report: Report, func, *args, **kwargs):
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = func(*args, **kwargs)
    except Exception as exc:  # keep going: the run is unattended
        traceback.print_exc()
        report.add({"path": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        result = None
    print(f"=== {name}: {time.perf_counter() - started:.1f} s", flush=True)
    # The table so far after every section: a run killed by its time limit keeps its figures.
    print(report.table() + "\n", flush=True)
    return result


def header(args, device: torch.device) -> str:
    lines = [f"torch {torch.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                     f"capability {props.major}.{props.minor}; {torch.cuda.device_count()} GPU(s); CUDA "
                     f"{torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")
    # What "fp32" means on a GPU: with torch's defaults cuDNN convolutions run in TF32 and
    # matmuls in full fp32; cudnn.benchmark is off (see the cudnn.benchmark row).
    lines.append(f"flags: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
                 f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} "
                 f"float32_matmul_precision={torch.get_float32_matmul_precision()} "
                 f"cudnn.benchmark={torch.backends.cudnn.benchmark} "
                 f"cudnn.deterministic={torch.backends.cudnn.deterministic} (--cudnn-benchmark {args.cudnn_benchmark})")
    weights = (f"weights {args.checkpoint or args.model_dir}" if (args.checkpoint or args.model_dir) else
               f"preset {args.preset}, random weights (seed 0), residual branches scaled by {args.residual_scale} "
               "for fp16 range")
    lines.append(f"{weights}; image {args.width}x{args.height} -> short side {args.short_side} (max {args.max_size}); "
                 f"{args.kept} kept instances, duplicate_iou=None; warm-up {args.warmup}, {args.reps} timed frames")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inference

def damp_residual_branches(model: torch.nn.Module, scale: float) -> int:
    """Multiply the last BatchNorm scale of each residual block (ResNet ``bn3`` / ``bn2``,
    MobileNetV2's last norm of a residual block) by ``scale``, in place; returns the blocks.

    For random weights only, in this bench: a trained backbone's BatchNorm statistics keep its
    activations in range, random ones do not: each block adds a branch about as large as its
    input and ResNet-101's 23-block layer3 overflows fp16 (the zero-init-residual idea, scaled).
    Same layers and shapes, so the same kernels and times."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = 0
    with torch.no_grad():
        for module in model.modules():
            norm = None
            if isinstance(module, Bottleneck):
                norm = module.bn3
            elif isinstance(module, BasicBlock):
                norm = module.bn2
            elif isinstance(module, InvertedResidual) and module.use_res_connect:
                norm = module.conv[-1]
            if norm is not None and getattr(norm, "weight", None) is not None:
                norm.weight.mul_(scale)
                blocks += 1
    return blocks


def _template(args):
    """The random-weight model, built once (seeded) on the CPU and damped; each row gets a copy
    (a fresh ``from_config`` per row costs seconds of random initialisation)."""
    if getattr(args, "_template", None) is None:
        from toist_core.config import preset
        from toist_core.model import build_model, load_tokenizer

        cfg = preset(args.preset)
        cfg.text.tokenizer = args.text_encoder or "builtin:tiny"  # offline; cost as roberta-base's
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
        blocks = damp_residual_branches(model, args.residual_scale)
        print(f"random-weight {args.preset} model built; {blocks} residual blocks scaled by {args.residual_scale}",
              flush=True)
        args._template = (cfg, model)
    return args._template


def _build_segmenter(args, device, precision: str, backend=None):
    from toist_core.config import InferenceConfig
    from toist_core.inference import TaskSegmenter
    from toist_core.inference.device import prepared

    # duplicate_iou=None: see the module doc (every row, TensorRT included).
    kwargs = dict(short_side=args.short_side, max_size=args.max_size, precision=precision,
                  score_threshold=0.0, max_instances=args.kept, duplicate_iou=None)
    if backend is not None:
        kwargs["backend"] = backend
    inference = InferenceConfig(**kwargs)
    if args.model_dir or args.checkpoint:
        seg = TaskSegmenter.from_pretrained(args.model_dir or args.checkpoint, device=str(device),
                                            inference=inference, text_encoder=args.text_encoder)
    else:
        # As TaskSegmenter.from_config builds its model: prepared() moves, folds BatchNorm and
        # converts to channels-last, here on a copy of the one template.
        cfg, template = _template(args)
        seg = TaskSegmenter(prepared(copy.deepcopy(template), device, inference), device=device,
                            inference=inference, config=cfg)
    seg.set_task(1)
    return seg


def compile_image_path(seg, mode: str) -> list[str]:
    """torch.compile the modules of a frame's image path in place; returns their names.

    ``Transformer`` itself has no ``forward``: the model calls its ``encode`` / ``decode``
    methods, which run ``encoder`` / ``decoder``, so those two are compiled, with the backbone
    and, with masks, ``bbox_attention`` and ``mask_head``. The glue between them (token
    concatenation, heads, selection) stays eager. (bench/bench_inference.py --compile uses this
    too.)"""
    model = seg.model
    detector = getattr(model, "detector", model)
    transformer = detector.transformer
    targets = [("backbone", detector, "backbone"), ("transformer.encoder", transformer, "encoder"),
               ("transformer.decoder", transformer, "decoder"),
               ("bbox_attention", model, "bbox_attention"), ("mask_head", model, "mask_head")]
    compiled = []
    for label, owner, name in targets:
        module = getattr(owner, name, None)
        if isinstance(module, torch.nn.Module) and not hasattr(module, "_orig_mod"):
            setattr(owner, name, torch.compile(module, mode=mode, dynamic=False))
            compiled.append(label)
    if not compiled:  # a model of another shape: the whole encode step
        model.encode = torch.compile(model.encode, mode=mode, dynamic=False)
        compiled.append("encode")
    print(f"torch.compile(mode={mode!r}, dynamic=False) on {', '.join(compiled)}", flush=True)
    return compiled


def _compile_counters() -> dict:
    """Dynamo / inductor counters (defaultdicts: a name this torch lacks reads 0)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def _frame_impl(seg, image, kept, timer, compiled=False):
    """One predict() frame, stage by stage (the calls TaskSegmenter.predict_batch makes with
    duplicate_iou=None, its finiteness checks included)."""
    from toist_core.inference import postprocess
    from toist_core.inference import segmenter as seg_module
    from toist_core.inference.finite import check_outputs, checked_masks

    if compiled:  # CUDA graphs: a new frame may overwrite the last frame's graph outputs
        torch.compiler.cudagraph_mark_step_begin()
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
        run, reduced = seg._network_run()
        check_outputs(scores, boxes_all, run, reduced)
        timer.mark("decoder+heads")
        keep = seg_module.select(scores[0], 0.0, kept)
        masks = None
        if seg.has_masks and keep.numel():
            def mask_logits(b, queries):
                with seg._autocast_context():
                    return seg.model.predict_masks(postprocess.image_memory(memory, b), hs[-1][b:b + 1, queries])
            logits = checked_masks(mask_logits, run, reduced)(0, keep)
            masks = postprocess.masks_at_original(logits, resized[0], batch.tensors.shape[-2:], image.shape[:2],
                                                  seg.inference.mask_threshold)
        timer.mark("masks")
        boxes = seg_module.to_pixels(boxes_all[0, keep], image.shape[:2], clip=seg.processing.clip_boxes)
        result = (boxes.cpu().numpy().astype(np.float32), scores[0, keep].cpu().numpy().astype(np.float32),
                  keep.cpu().numpy(), masks)
        timer.mark("post")
    return result


def _predict_frame(seg, image, kept, timer, compiled=False):
    """Fallback: predict() end to end (no stage split)."""
    if compiled:
        torch.compiler.cudagraph_mark_step_begin()
    timer.mark("start")
    seg.predict(image, score_threshold=0.0, max_instances=kept)
    timer.mark("predict")


def measure_row(report: Report, args, device, image, label: str, precision: str, compile_mode=None,
                note: str = "", backend=None) -> dict:
    """Build a segmenter, (compile,) warm up, time ``args.reps`` frames; add the row. Another
    ``backend`` (TensorRT) does not expose the torch stages: its ``predict()`` is timed whole.
    Whatever the row leaves is freed at its end, failed or not (:func:`_free`)."""
    mib_before = _allocated_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seg = None
    try:
        started = time.perf_counter()
        seg = _build_segmenter(args, device, precision, backend=backend)
        mib_model = _allocated_mib(device)
        build_s = time.perf_counter() - started
        compiled, counters0 = None, None
        if compile_mode is not None:
            counters0 = _compile_counters()
            compiled = compile_image_path(seg, compile_mode)
        frame = _frame_impl if backend is None else _predict_frame
        first = time.perf_counter()
        try:  # the stage split follows TaskSegmenter's internals; if they moved, time predict() whole
            frame(seg, image, args.kept, Timer(device), compiled is not None)
        except (AttributeError, TypeError, ImportError, NameError) as exc:
            if frame is _predict_frame:
                raise
            print(f"stage split failed ({type(exc).__name__}: {exc}); timing predict() end to end", flush=True)
            frame = _predict_frame
            frame(seg, image, args.kept, Timer(device), compiled is not None)
        _sync(device)
        first_s = time.perf_counter() - first
        for _ in range(args.warmup):
            frame(seg, image, args.kept, Timer(device), compiled is not None)
        _sync(device)
        warm_s = time.perf_counter() - started
        stage_runs, walls = [], []
        for _ in range(args.reps):
            timer = Timer(device)
            _sync(device)
            t0 = time.perf_counter()
            frame(seg, image, args.kept, timer, compiled is not None)
            _sync(device)
            walls.append(time.perf_counter() - t0)
            stage_runs.append(timer.stages())
        stages = {k: statistics.median(r[k] for r in stage_runs) for k in stage_runs[0]}
        wall_ms = 1000.0 * statistics.median(walls)
        notes = [note] if note else []
        row = {"path": label, "fps": 1000.0 / wall_ms, "ms": wall_ms,
               "ms_p90": 1000.0 * float(np.percentile(walls, 90)), "peak_mib": _peak_mib(device),
               "mib_before": mib_before, "mib_model": mib_model, "build_s": build_s, "first_frame_s": first_s,
               "warmup_s": warm_s, **{f"ms_{k}": v for k, v in stages.items()}}
        if compiled is not None:
            counters = _compile_counters()
            stats = {k: counters[k] - counters0[k] for k in counters}
            row.update(compiled=compiled, **stats)
            notes.append(f"{stats['graphs']} graphs, {stats['graph_breaks']} graph breaks, "
                         f"{stats['cudagraph_skips']} cudagraph skips; compile+warm-up {warm_s:.0f} s")
        else:
            notes.append(f"warm-up {warm_s:.0f} s")
        row["note"] = "; ".join(notes)
        report.add(row)
        return row
    finally:
        del seg
        _free(device)


def eager_sections(args, device, report: Report, image) -> None:
    precisions = ["bf16", "fp16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"]
    for precision in precisions:
        _section(f"inference {precision} eager", report, measure_row, report, args, device, image,
                 f"{precision} eager", precision)
    if args.cudnn_benchmark == "row":
        precision = precisions[0]

        def benchmarked():
            torch.backends.cudnn.benchmark = True
            try:
                measure_row(report, args, device, image, f"{precision} eager cudnn.benchmark", precision,
                            note="cudnn.benchmark on")
            finally:
                torch.backends.cudnn.benchmark = False
        _section(f"inference {precision} eager, cudnn.benchmark", report, benchmarked)


def compile_sections(args, device, report: Report, image, first: bool) -> None:
    """The compiled rows: the first one (``first``: the first mode's first precision, the row most
    likely to reach the FPS goal, run before training) or all the others."""
    precisions = ["bf16", "fp16", "fp32"] if device.type == "cuda" else ["fp32"]
    rows = [(mode, precision) for mode in args.compile_modes for precision in precisions]
    estimate = getattr(args, "compile_estimate", args.compile_estimate_s)
    # The first row runs before training: it must leave training its time (a compile that took
    # the budget left the training row to the time limit's SIGTERM).
    reserve = args.train_reserve_s if first and not args.no_train else 0.0
    for mode, precision in (rows[:1] if first else rows[1:]):
        label = f"{precision} compile:{mode}"
        spent = time.perf_counter() - args.started
        if spent + estimate + reserve > args.compile_budget_s:
            message = (f"skipped: {spent:.0f} s spent + ~{estimate:.0f} s to compile"
                       f"{f' + {reserve:.0f} s kept for training' if reserve else ''} > "
                       f"--compile-budget-s {args.compile_budget_s:.0f}")
            print(f"torch.compile {label}: {message}", flush=True)
            report.add({"path": label, "error": message})
            continue
        began = time.perf_counter()
        row = _section(f"inference {label}", report, measure_row, report, args, device, image, label,
                       precision, mode)
        # The next compile of this model costs about what this one did (a failed one: at
        # least the time it took to fail).
        estimate = (row["warmup_s"] + args.reps * row["ms"] / 1000.0 if row is not None
                    else max(estimate, time.perf_counter() - began))
    args.compile_estimate = estimate   # the rows after training start from what the first cost


def _tensorrt(args, device, image, report: Report) -> None:
    from toist_core.config import InferenceConfig

    fields = {f.name for f in dataclasses.fields(InferenceConfig)}
    reasons = []
    if "backend" not in fields:
        reasons.append("InferenceConfig has no 'backend' field in this tree")
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
        if "TensorrtExecutionProvider" not in providers:
            reasons.append(f"TensorRT / onnxruntime-gpu not installed (onnxruntime {onnxruntime.__version__} "
                           f"providers: {', '.join(providers)})")
    except ImportError:
        reasons.append("TensorRT / onnxruntime-gpu not installed (no onnxruntime)")
    if device.type != "cuda":
        reasons.append("needs CUDA")
    if not args.model_dir:
        reasons.append("needs --model-dir: a model directory with ONNX files (`toist export --onnx`)")
    if reasons:
        message = "not available: " + "; ".join(reasons)
        print(f"TensorRT path: {message}", flush=True)
        report.add({"path": "tensorrt", "error": message})
        return
    # The TensorRT backend runs its own fp16 engine (InferenceConfig.precision does not apply);
    # its first frame builds (or loads) the engines.
    measure_row(report, args, device, image, "tensorrt (fp16 engine)", "fp32", backend="tensorrt",
                note="predict() end to end (torch-side memory only)")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu only with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, every code path (CPU check)")
    parser.add_argument("--checkpoint", default=None, help="weights to load instead of random ones")
    parser.add_argument("--model-dir", default=None, help="a model directory (toist export): also the TensorRT path")
    parser.add_argument("--text-encoder", default=None, help="tokenizer for official .pth files")
    parser.add_argument("--preset", default="paper_segm")
    parser.add_argument("--residual-scale", type=float, default=0.1,
                        help="random weights: scale of each residual block's last BatchNorm (fp16 range; 1 = none)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--kept", type=int, default=5, help="instances through the mask head")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--cudnn-benchmark", default="row", choices=["off", "row", "all"],
                        help="row: one extra eager row with cudnn.benchmark on; all: on for every row")
    parser.add_argument("--compile-modes", nargs="+", default=["reduce-overhead"],
                        help='torch.compile modes ("max-autotune", "reduce-overhead" = CUDA graphs, "default")')
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-budget-s", type=float, default=900,
                        help="a torch.compile row starts only if the run's time so far plus its expected "
                             "compile + timing time stays under this many seconds")
    parser.add_argument("--compile-estimate-s", type=float, default=100,
                        help="expected compile + timing time of the first compiled row (later: the last one's)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--nproc", type=int, default=None, help="torchrun processes (default: all GPUs)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-warmup", type=int, default=5, help="updates left out of updates/s")
    parser.add_argument("--train-images", type=int, default=0,
                        help="synthetic images per task (0: enough for --train-steps in one epoch)")
    parser.add_argument("--train-min-size", type=int, default=480)
    parser.add_argument("--train-max-size", type=int, default=640)
    parser.add_argument("--train-workers", type=int, default=None,
                        help="DataLoader workers per process (default: min(8, CPUs per process - 2))")
    parser.add_argument("--train-timeout", type=float, default=300,
                        help="training's own limit (cut to what --compile-budget-s leaves when it starts)")
    parser.add_argument("--train-reserve-s", type=float, default=90,
                        help="seconds of --compile-budget-s the first compiled row leaves to training after it")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `toist train` override (repeatable), e.g. loader.batch_size=4")
    parser.add_argument("--workdir", default=None, help="keep the training data and run here (default: a "
                                                        "temporary directory, deleted)")
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
        args.train_steps, args.train_warmup = 4, 1
        args.train_min_size, args.train_max_size = 96, 128
        if device.type != "cuda":
            args.compile_modes = ["default"]  # CPU inductor: checks the path, no CUDA graphs
        print("QUICK run: tiny model and sizes; the figures below are NOT GPU figures.", flush=True)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        if args.cudnn_benchmark == "all":
            torch.backends.cudnn.benchmark = True
        try:  # CUDA-graph skips and other inductor performance hints, with their reasons, in the log
            torch._logging.set_logs(perf_hints=True)
        except Exception:
            pass
    signal.signal(signal.SIGTERM, _on_sigterm)
    print(header(args, device), flush=True)
    report = Report(device, args)
    started = time.perf_counter()
    args.started = PROCESS_STARTED   # the compile budget counts the imports and CUDA's start too
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    code = 0
    try:
        # The most wanted rows first: a time limit then cuts the later compiled rows, not the eager
        # ones, the first compiled row (CUDA graphs in bf16: the FPS goal's best chance) or training.
        eager_sections(args, device, report, image)
        if not args.no_compile:
            compile_sections(args, device, report, image, first=True)
        if not args.no_train:
            _section("training (torchrun)", report, training_section, args, device, report)
        if not args.no_compile:
            compile_sections(args, device, report, image, first=False)
        _section("inference tensorrt", report, _tensorrt, args, device, image, report)
    except Terminated:
        print(f"\nSIGTERM after {time.perf_counter() - started:.0f} s (a time limit): the table holds the rows "
              "finished so far", flush=True)
        report.add({"path": "(run stopped)", "error": f"SIGTERM after {time.perf_counter() - started:.0f} s: "
                                                       "the section in progress was cut"})
        code = 143
    finally:
        print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
        print(report.table())
        print(report.goal(), flush=True)
    return exit_status(report, code)


def exit_status(report: Report, code: int) -> int:
    """``code`` (143 after SIGTERM), else 1 when a row failed or none was measured, else 0. Each
    section keeps going past a failure (the run is unattended); the status still says it, for
    gpu_device_run.sh's steps.txt (a run whose every row failed exited 0: a good run, read there)."""
    failed = report.failed()
    if code == 0 and (failed or not any("fps" in r for r in report.rows)):
        print(f"bench_gpu: failed: {', '.join(failed) or 'no inference row was measured'}", file=sys.stderr,
              flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
