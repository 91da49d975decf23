"""CPU inference paths of issue 18 side by side: PyTorch fp32 against ONNX Runtime fp32 and ONNX
Runtime int8 *static* (calibrated, QDQ) quantisation of the detector graph.

    python bench/bench_cpu_paths.py [--reps 3] [--kept 5] [--work-dir /tmp/bench_cpu_paths]
                                    [--variants conv,conv+matmul] [--reduce-range] [--weight-type s8|u8]
                                    [--calibration minmax|entropy|percentile] [--exclude NAME,...] [--profile]
    python bench/bench_cpu_paths.py --accuracy [--images 0] [--variants conv] [same int8 options]

Speed (default): the ``paper_segm`` model (ResNet-101, RoBERTa-base-size text encoder, 6 + 6
layers, 100 queries, mask head) with seeded random weights and the ``builtin:tiny`` tokenizer,
the 640x480 noise image at an 800 px short side (padded 800 x 1088), as
``bench/bench_inference.py`` builds them (its reference frame and comparison are imported from
there). Paths, timed interleaved round by round after one warm-up frame each:

* the reference frame (``bench_inference.reference_frame``: NCHW, text + aux + 100 masks);
* ``predict`` on the torch backend (channels-last, BatchNorm folded: today's default);
* ``predict`` on the ``onnxruntime`` backend: the model directory's ``detector.onnx`` and
  ``mask_head.onnx`` as ``export_onnx`` writes them (CPUExecutionProvider, ``--threads``
  intra-op threads, graph optimisation ORT_ENABLE_ALL, the SessionOptions default);
* the same with ``detector.onnx`` int8 static quantised
  (``onnx_int8``: QDQ, uint8 activations, per-channel int8 weights,
  MinMax calibration on ``--calib-synth`` synthetic training scenes and ``--calib-noise`` noise
  images of other seeds than the timed one), one path per ``--variants`` entry (``conv``:
  only ``Conv`` nodes; ``conv+act``: ``Conv`` and the ``Clip`` / ``Relu`` activations, which
  ONNX Runtime then removes; ``conv+matmul``: ``Conv`` and ``MatMul``; the mask head stays fp32).

The paper model's directory, its ONNX graphs and the int8 graphs are cached under
``--work-dir`` (the weights are checked by digest; a rerun re-exports only when they differ).

Accuracy (``--accuracy``): the embedded default model (MobileNetV2) as
``bench/bench_precision_accuracy.py`` scores it (the same test split, helpers imported from
there): fp32 torch against ORT fp32 and each int8 variant, calibrated on the first
``--calib-train`` images of the recipe's synthetic *train* split (never the test images),
box / mask mAP@0.5 differences and the same-top share; criterion: |diff| <= 0.01 and the same
top instance on >= 95 % of the frames.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_inference import REFERENCE, reference_frame, time_rounds  # noqa: E402
from toist_core.config import InferenceConfig, preset  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.inference.device import prepared  # noqa: E402
from toist_core.inference.onnx_backend import OnnxNetwork  # noqa: E402
from toist_core.inference.onnx_export import (DETECTOR_FILE, MASK_HEAD_FILE, META_PREFIX, export_onnx,  # noqa: E402
                                              model_digest)
from onnx_int8 import describe, detector_feeds, quantize_detector  # noqa: E402
from toist_core.inference.postprocess import masks_at_original, select  # noqa: E402
from toist_core.tokens import NO_OBJECT_INDEX  # noqa: E402

def short(name: str) -> str:
    return {TORCH: "torch fp32", ORT_FP32: "ORT fp32"}.get(name, name.replace("predict ORT int8 static (", "ORT int8 ").rstrip(")"))


TORCH = "predict fp32 torch (ch-last + BN folded)"
ORT_FP32 = "predict onnxruntime fp32"
# conv+act: the activations after the convolutions (MobileNetV2's ReLU6 = Clip, ResNet's Relu)
# quantised too, which lets ONNX Runtime drop them and quantise each convolution's output on the
# activation's range (otherwise the convolution's output is quantised on its own, negative part
# included, before the activation clips it: far coarser steps where they matter).
VARIANTS = {"conv": ("Conv",), "conv+act": ("Conv", "Clip", "Relu"), "conv+matmul": ("Conv", "MatMul")}
INT8_META = "int8.json"


# ----------------------------------------------------------------------------- caching

def ensure_exported(model, cfg, directory: Path, exporter: str) -> dict:
    """``directory``: ``model``'s model directory with its ONNX graphs; rebuilt unless the cached
    one holds the same weights (tensor digest) and both graphs, exported by ``exporter`` (a
    torchscript export was reused for ``--exporter dynamo``, silently)."""
    from toist_core.checkpoint.integrity import tensor_digest
    from toist_core.checkpoint.model_dir import save_model_dir

    digest = tensor_digest(model.state_dict())
    if ((directory / DETECTOR_FILE).is_file() and (directory / MASK_HEAD_FILE).is_file()
            and (directory / "model.safetensors").is_file() and model_digest(directory) == digest
            and all(_graph_exporter(directory / name) == exporter for name in (DETECTOR_FILE, MASK_HEAD_FILE))):
        return {"cached": True, "digest": digest}
    start = time.perf_counter()
    save_model_dir(model, directory, cfg, source="bench_cpu_paths")
    saved = time.perf_counter() - start
    start = time.perf_counter()
    export_onnx(model, directory, exporter=exporter)
    exported = time.perf_counter() - start
    remove_derived(directory)
    return {"cached": False, "digest": digest, "save_s": saved, "export_s": exported,
            "detector_mb": (directory / DETECTOR_FILE).stat().st_size / 2**20,
            "mask_head_mb": (directory / MASK_HEAD_FILE).stat().st_size / 2**20}


def _graph_exporter(path: Path) -> str:
    """The exporter a toist graph records in its metadata ("" when none). Reads the whole graph
    (its weights are inside the file): ~0.3 s for 200 MB, once per cached graph and bench run."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return next((p.value for p in props if p.key == META_PREFIX + "exporter"), "")


def remove_derived(directory: Path) -> None:
    """The int8 directories and calibration caches derived from ``directory``'s old weights."""
    for stale in directory.parent.glob(directory.name + "_int8_*"):
        shutil.rmtree(stale)
    for stale in directory.parent.glob(f"calib_{directory.name}_*.json"):
        stale.unlink()


def int8_options(args) -> dict:
    return dict(per_channel=not args.per_tensor, reduce_range=args.reduce_range, weight_type=args.weight_type,
                exclude=args.exclude, method=args.calibration)


def ensure_int8(source: Path, variant: str, args, feeds_fn, calibration: str) -> tuple[Path, dict]:
    """The int8 sibling directory of ``source`` for ``variant`` (cached: same description, the
    same source digest and the same ``calibration`` frames, e.g. ``"train64"``; ONNX Runtime
    also reuses its calibration file whenever it exists, so that file is named by them too)."""
    options = int8_options(args)
    suffix = ("_rr" if args.reduce_range else "") + ("_u8" if args.weight_type == "u8" else "") + \
        ("_pt" if args.per_tensor else "") + ("" if args.calibration == "minmax" else "_" + args.calibration) + \
        ("_x" + hashlib.sha1("|".join(args.exclude).encode()).hexdigest()[:8] if args.exclude else "")
    target = source.parent / f"{source.name}_int8_{variant.replace('+', '_')}{suffix}"
    desc = describe(VARIANTS[variant], **options)
    digest = model_digest(source)
    meta_file = target / INT8_META
    if meta_file.is_file() and (target / DETECTOR_FILE).is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("description") == desc and meta.get("digest") == digest and meta.get("calibration") == calibration:
            return target, {**meta, "cached": True}
    cache = source.parent / f"calib_{source.name}_{variant.replace('+', '_')}_{args.calibration}_{calibration}.json"
    start = time.perf_counter()
    feeds = feeds_fn()
    feeds_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = quantize_detector(source, target, feeds, op_types=VARIANTS[variant], calibration_cache=cache, **options)
    info.update(digest=digest, calibration=calibration, feeds_s=feeds_s, calibration_frames=len(feeds),
                ops=op_census(target / DETECTOR_FILE))
    meta_file.write_text(json.dumps(info, indent=1))
    return target, {**info, "cached": False}


def int8_summary(info: dict, frames_from: str = "") -> str:
    """What ``ensure_int8`` did: its description and, unless cached, calibration times and frames."""
    if info["cached"]:
        return f"{info['description']}; cached"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in info["seconds"].items())
    source = f", {frames_from}" if frames_from else ""
    return (f"{info['description']}; calibration feeds {info['feeds_s']:.1f} s, {times} "
            f"({info['calibration_frames']} calibration frames{source})")


def op_census(path: Path) -> dict:
    """Op types of ``path`` after ONNX Runtime's extended optimisations (QDQ -> QLinear* fusion):
    which quantised ops run as integer kernels, and how many Q / DQ nodes are left."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        proto = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    keep = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear", "Conv",
            "FusedConv", "MatMul", "FusedMatMul", "Gemm")
    return {k: counts[k] for k in keep if k in counts}


# ----------------------------------------------------------------------------- images

def synthetic_images(count: int, seed: int, min_size: int, max_size: int, tasks=(2,)) -> list[np.ndarray]:
    """The first ``count`` scenes of a synthetic *train* split (RGB uint8)."""
    import cv2

    from toist_core.data.config import DataConfig
    from toist_core.data.synth import generate

    if count <= 0:
        return []
    with tempfile.TemporaryDirectory(prefix="toist_calib_") as tmp:
        generate(Path(tmp), tasks=list(tasks), splits=("train",), images_per_split=count, seed=seed,
                 min_size=min_size, max_size=max_size)
        folder = DataConfig(root=tmp).image_dir("train")
        return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.iterdir())[:count]]


# ----------------------------------------------------------------------------- stages

def predictor_stages(seg: TaskSegmenter, image: np.ndarray, kept: int) -> dict[str, float]:
    """CPU ms of one predict frame's steps on either backend: preprocess, network (backbone +
    transformer + heads: torch ``_detect`` / ORT ``detector.onnx``), mask head on the ``kept``
    best queries, mask upsample + threshold."""
    times = {}
    network = seg._detect if seg._onnx is None else seg._onnx.detect
    with torch.inference_mode():
        c0 = time.process_time()
        batch, sizes = seg.preprocess([image])
        times["preprocess"] = time.process_time() - c0
        c0 = time.process_time()
        logits, boxes, masks = network(batch, seg.task_state)
        times["network (backbone+transformer+heads)"] = time.process_time() - c0
        scores = 1.0 - logits[0].float().softmax(-1)[:, NO_OBJECT_INDEX]
        keep = select(scores, 0.0, kept)
        c0 = time.process_time()
        mask_logits = masks(0, keep)
        times[f"mask head ({kept} queries)"] = time.process_time() - c0
        c0 = time.process_time()
        masks_at_original(mask_logits, sizes[0], batch.tensors.shape[-2:], image.shape[:2], 0.5)
        times["mask upsample + threshold"] = time.process_time() - c0
    return {k: 1000 * v for k, v in times.items()}


def profile_detector(seg: TaskSegmenter, image: np.ndarray, threads: int) -> dict[str, float]:
    """ms per part of ``detector.onnx`` from ONNX Runtime's profiler (the last of three runs of
    one session with the same options: warm, as the timed paths are): backbone / encoder /
    decoder / other nodes, and the op types taking the most time."""
    import onnxruntime as ort

    path = seg._onnx.detector._model_path  # the detector.onnx the segmenter's session runs
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            batch, _ = seg.preprocess([image])
        from toist_core.inference.onnx_export import DETECTOR_INPUTS
        feeds = {"image": np.ascontiguousarray(batch.tensors.float().numpy()), "pad_mask": batch.mask.numpy(),
                 **OnnxNetwork.task_inputs(seg.task_state)}
        feeds = {k: feeds[k] for k in DETECTOR_INPUTS}
        for _ in range(3):   # a new session's first run was profiled: cold, unlike every timed path
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    last = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-1]
    parts: dict[str, float] = {}
    ops: dict[str, float] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if not last["ts"] <= event["ts"] <= last["ts"] + last["dur"]:   # the last run's nodes only
            continue
        name = event["name"].strip("/")
        part = name.split("/")[0] if name.split("/")[0] in ("backbone", "encoder", "decoder") else "other"
        parts[part] = parts.get(part, 0.0) + event["dur"] / 1000
        op = event.get("args", {}).get("op_name", "?")
        ops[op] = ops.get(op, 0.0) + event["dur"] / 1000
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    return {"parts": parts, "ops": top}


# ----------------------------------------------------------------------------- speed

def speed(args) -> None:
    import onnxruntime as ort

    from toist_core.model import build_model, load_tokenizer

    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = preset("paper_segm")
    cfg.text.tokenizer = "builtin:tiny"  # as bench_inference: offline; the cost does not change
    torch.manual_seed(args.seed)
    base = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
    built = time.perf_counter() - start
    exported = ensure_exported(base, cfg, work / "paper", args.exporter)
    print(f"paper_segm model built in {built:.0f} s; model directory + ONNX "
          + ("cached" if exported["cached"] else
             f"written: save {exported['save_s']:.0f} s, export_onnx ({args.exporter}) {exported['export_s']:.0f} s, "
             f"detector.onnx {exported['detector_mb']:.0f} MB, mask_head.onnx {exported['mask_head_mb']:.0f} MB"),
          flush=True)

    size = dict(short_side=args.short_side, max_size=1333)
    ref_seg = TaskSegmenter(base, device="cpu", task=2, inference=InferenceConfig(
        score_threshold=0.0, max_instances=100, channels_last=False, duplicate_iou=None, **size))
    import copy
    folded = prepared(copy.deepcopy(base), torch.device("cpu"), InferenceConfig())
    size["duplicate_iou"] = args.duplicate_iou
    torch_seg = TaskSegmenter(folded, device="cpu", task=2, inference=InferenceConfig(
        score_threshold=0.0, max_instances=args.kept, **size))
    state = torch_seg.task_state

    def ort_seg(directory: Path) -> TaskSegmenter:
        network = OnnxNetwork(directory, "onnxruntime", torch.device("cpu"), threads=args.threads)
        seg = TaskSegmenter(folded, device="cpu", onnx_network=network, inference=InferenceConfig(
            backend="onnxruntime", score_threshold=0.0, max_instances=args.kept, channels_last=False, **size))
        seg.set_task(2)   # the same text features as torch_seg's (one model)
        return seg

    paths = {REFERENCE: None, TORCH: torch_seg}
    if not args.no_fp32_ort:
        paths[ORT_FP32] = ort_seg(work / "paper")
    image = np.random.default_rng(0).integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)

    def calibration_feeds():
        images = synthetic_images(args.calib_synth, seed=11, min_size=min(args.height, args.width),
                                  max_size=max(args.height, args.width))
        images += [np.random.default_rng(100 + i).integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)
                   for i in range(args.calib_noise)]
        return detector_feeds(torch_seg, images, [state])

    for variant in args.variants:
        # (the calibration images' size is part of the graph's identity: another size calibrates anew)
        directory, info = ensure_int8(work / "paper", variant, args, calibration_feeds,
                                      f"synth{args.calib_synth}_noise{args.calib_noise}_{args.width}x{args.height}"
                                      f"_s{args.short_side}")
        paths[f"predict ORT int8 static ({variant})"] = ort_seg(directory)
        print(f"int8 {variant}: {int8_summary(info)}; detector.onnx {info['bytes'] / 2**20:.0f} MB; "
              f"quantised nodes {info['nodes']}; after ORT fusion {info['ops']}", flush=True)

    options = ort.SessionOptions()
    batch, sizes = ref_seg.preprocess([image])
    print(f"{args.width}x{args.height} RGB -> resized {sizes[0]}, padded {tuple(batch.tensors.shape[-2:])}; "
          f"{torch.get_num_threads()} torch threads; ORT {ort.__version__} CPUExecutionProvider, {args.threads} "
          f"intra-op threads, graph optimisation {options.graph_optimization_level.name} (SessionOptions default); "
          f"torch {torch.__version__}; set-up {time.perf_counter() - start:.0f} s", flush=True)

    caption = ref_seg.task_state.caption
    run = {name: (lambda: reference_frame(ref_seg, image, caption)) if seg is None else
           (lambda seg=seg: seg.predict(image)) for name, seg in paths.items()}
    results = {name: fn() for name, fn in run.items()}  # warm-up
    time_rounds(run, results, args.reps, args.kept)
    if not args.no_stages:
        names = [n for n, seg in paths.items() if seg is not None]
        columns = {name: predictor_stages(paths[name], image, args.kept) for name in names}
        print("\nPredictor stages, CPU ms (one frame each, after the rounds):")
        print(f"  {'stage':40s}" + "".join(f"{short(n):>22s}" for n in names))
        for stage in next(iter(columns.values())):
            print(f"  {stage:40s}" + "".join(f"{col[stage]:22.0f}" for col in columns.values()))
    if args.profile:
        print("\nORT profiler, detector.onnx, ms of node kernels (one run; threads as above):")
        for name, seg in paths.items():
            if seg is None or seg._onnx is None:
                continue
            prof = profile_detector(seg, image, args.threads)
            print(f"  {short(name):22s} parts: " + ", ".join(f"{k} {v:.0f}" for k, v in prof["parts"].items())
                  + f" (sum {sum(prof['parts'].values()):.0f}); top ops: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in prof["ops"].items()), flush=True)
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------- accuracy

def exported_default_model(work: Path, exporter: str = "torchscript") -> Path:
    """``work/default``: a copy of the embedded default model with its ONNX graphs (cached; made
    again, and the int8 directories derived from it removed, when the weights or the exporter
    changed)."""
    import bench_precision_accuracy as bpa
    from toist_core.inference.onnx_export import compare_backends, describe_check

    work.mkdir(parents=True, exist_ok=True)
    source = work / "default"
    if (not (source / DETECTOR_FILE).is_file() or not (source / MASK_HEAD_FILE).is_file()
            or model_digest(source) != model_digest(bpa.DEFAULT_MODEL)
            or any(_graph_exporter(source / name) != exporter for name in (DETECTOR_FILE, MASK_HEAD_FILE))):
        if source.exists():
            shutil.rmtree(source)
        remove_derived(source)
        shutil.copytree(bpa.DEFAULT_MODEL, source)
        from toist_core.checkpoint import load_pretrained
        t0 = time.perf_counter()
        export_onnx(load_pretrained(source).model, source, exporter=exporter)
        print(f"default model copied to {source} and exported ({exporter}) in {time.perf_counter() - t0:.0f} s; "
              f"{describe_check(compare_backends(source))}", flush=True)
    return source


def accuracy(args) -> None:
    import bench_precision_accuracy as bpa
    from toist_core.cli.evaluate import evaluation_inference

    torch.set_num_threads(args.accuracy_threads)
    started = time.perf_counter()
    settings = bpa.RecipeSettings()
    source = exported_default_model(Path(args.work_dir), args.exporter)
    inference = evaluation_inference()
    fp32 = TaskSegmenter.from_pretrained(source, device="cpu", inference=inference)

    def calibration_feeds():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states = [fp32.encode_task(task) for task in settings.tasks]
        images = synthetic_images(args.calib_train, seed=settings.data_seed, min_size=settings.min_size,
                                  max_size=settings.max_size, tasks=settings.tasks)
        return detector_feeds(fp32, images, states)

    segmenters = {"fp32": fp32,
                  "ort fp32": TaskSegmenter.from_pretrained(source, device="cpu",
                                                            inference=evaluation_inference(backend="onnxruntime"))}
    for variant in args.variants:
        directory, info = ensure_int8(source, variant, args, calibration_feeds, f"train{args.calib_train}")
        print(f"int8 {variant}: {int8_summary(info, 'synthetic train split')}"
              f"; quantised nodes {info['nodes']} ({len(info.get('excluded', []))} excluded); "
                f"after ORT fusion {info['ops']}", flush=True)
        segmenters[f"ort int8 {variant}"] = TaskSegmenter.from_pretrained(
            directory, device="cpu", inference=evaluation_inference(backend="onnxruntime"))

    with tempfile.TemporaryDirectory(prefix="toist_precision_") as tmp:
        root, files, ground_truths, image_ids = bpa.load_test_split(settings, Path(tmp), args.images)
        frames = sum(len(ids) for ids in image_ids.values())
        print(f"test split: tasks {settings.tasks}, {frames} frames ({'first ' + str(args.images) if args.images else 'all'}"
              f" images per task file); {torch.get_num_threads()} torch / ORT thread(s)", flush=True)
        results, predictions, seconds, tops = {}, {}, {}, {}
        for path, segmenter in segmenters.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predictions[path], tops[path], results[path], seconds[path] = bpa.score_on_split(
                    segmenter, (root, files, ground_truths, image_ids))

    bpa.print_verdicts(results, predictions, tops, seconds, frames, settings.tasks, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/bench_cpu_paths", help="cache of model directories and graphs")
    parser.add_argument("--variants", default="conv,conv+matmul",
                        help=f"int8 variants, comma-separated, of {', '.join(VARIANTS)} ('' = none)")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights (AVX2 without VNNI saturation)")
    parser.add_argument("--weight-type", choices=["s8", "u8"], default="s8", help="int8 weights: s8 (U8S8) or u8 (U8U8)")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    parser.add_argument("--exclude", default="", help="comma-separated substrings of Conv / MatMul node names "
                        "kept fp32 (e.g. input_proj)")
    parser.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], default="minmax")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (after 1 warm-up)")
    parser.add_argument("--kept", type=int, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the paper model's random weights")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and ORT intra-op threads (speed)")
    parser.add_argument("--calib-synth", type=int, default=4, help="paper model: synthetic train scenes to calibrate on")
    parser.add_argument("--calib-noise", type=int, default=2, help="paper model: noise images (other seeds) to calibrate on")
    parser.add_argument("--no-fp32-ort", action="store_true", help="skip the ORT fp32 path")
    parser.add_argument("--no-stages", action="store_true", help="skip the predictor stage table")
    parser.add_argument("--profile", action="store_true", help="ORT profiler: detector time per part and op type")
    parser.add_argument("--duplicate-iou", type=float, default=None,
                        help="predict's duplicate removal (InferenceConfig.duplicate_iou; default off: random "
                             "weights give near-identical masks, so with it on predict runs the mask head on "
                             "chunk after chunk of queries; 0.7 = InferenceConfig's default)")
    parser.add_argument("--accuracy", action="store_true", help="accuracy on the embedded default model instead")
    parser.add_argument("--images", type=int, default=0, help="accuracy: first N images of each task file (0 = all)")
    parser.add_argument("--calib-train", type=int, default=64, help="accuracy: synthetic train images to calibrate on")
    parser.add_argument("--accuracy-threads", type=int, default=1, help="accuracy: torch / ORT threads")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.exclude = [v.strip() for v in args.exclude.split(",") if v.strip()]
    for variant in args.variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}: expected {', '.join(VARIANTS)}")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.accuracy:
        accuracy(args)
        return
    torch.set_num_threads(args.threads)
    speed(args)


if __name__ == "__main__":
    main()
