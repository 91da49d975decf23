"""``toist predict``: run a model on image files; write overlays (PNG) and results (JSON).

    toist predict --checkpoint toist_seg.pth --task 2 img1.jpg img2.jpg --out results/
    toist predict --preset tiny --task "open parcel with" demo.jpg --out /tmp/demo
    toist predict --task 2 scene.png --out /tmp/default     # the embedded default model

Without ``--checkpoint`` or ``--preset`` it runs the embedded default model
(``toist_core/assets/default_model``), which was trained on synthetic scenes only, and says so
on stderr: on real images its instances mean nothing.

Per image ``<out>/<stem>.png`` (masks, boxes, scores, caption drawn on the image) and
``<out>/<stem>.json`` (``<stem>_2``, ... for a second image of that stem, or when one of these
files is an input image or another file that is not an earlier toist result: those are never
overwritten, and stderr says where the results went). An image that cannot be read is skipped
and named on stderr; the others are processed and the command then exits with code 2. A path
that is not a file stops it before the model loads::

    {"image": ..., "height": H, "width": W, "caption": ..., "task_id": 2,
     "instances": [{"box": [x1, y1, x2, y2], "score": s, "query": q,
                    "segmentation": {"size": [H, W], "counts": "<COCO RLE>"}}, ...]}

(``segmentation`` only for segmentation models; RLE from ``pycocotools.mask.encode``.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arg_types import TEXT_ENCODER_HELP, count, duplicate_iou, image_side, resize_problem, score


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment the objects an image offers for a task",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint",
                        help="official TOIST/MDETR .pth file, toist training checkpoint or model directory "
                             "(default: the embedded default model, trained on synthetic scenes only)")
    source.add_argument("--preset", help="random weights from a model preset (tiny, tiny_segm, paper, ...)")
    p.add_argument("--task", required=True, help="task id (COCO-Tasks: 1-14; a model's own vocabulary: its ids), task name, "
                                                    "or free text")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-encoder", default=None, help=TEXT_ENCODER_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--score-threshold", type=score, default=0.5)
    p.add_argument("--max-instances", type=count, default=100)
    p.add_argument("--duplicate-iou", type=duplicate_iou, default=0.7,
                   help="drop an instance whose mask (box, without a mask head) overlaps a better one by more "
                        "than this IoU: one object found twice (default 0.7; 0 keeps them)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--short-side", type=image_side, default=None,
                   help="resize: short side (default: the size the model was trained at; official .pth 800)")
    p.add_argument("--max-size", type=image_side, default=None,
                   help="resize: long side cap (default: the model's; 1333)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (--preset)")
    p.set_defaults(func=run)


def rle_encode(mask) -> dict:
    """COCO RLE of a ``[H, W]`` bool mask, JSON-ready (``counts`` as str)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def prediction_to_json(prediction, image_path: str) -> dict:
    height, width = prediction.image_size
    instances = []
    for i in range(len(prediction)):
        item = {"box": [round(float(v), 2) for v in prediction.boxes[i]],
                "score": round(float(prediction.scores[i]), 5),
                "query": int(prediction.queries[i])}
        if prediction.masks is not None:
            item["segmentation"] = rle_encode(prediction.masks[i])
        instances.append(item)
    return {"image": image_path, "height": height, "width": width, "caption": prediction.caption,
            "task_id": prediction.task_id, "instances": instances}


def output_files(out: Path, name: str) -> tuple[Path, Path]:
    """The overlay and the JSON written for one image."""
    return out / f"{name}.png", out / f"{name}.json"


def output_name(stem: str, out: Path, used: set, inputs: set) -> str:
    """The name of an image's outputs in ``out``: its ``stem``, else ``<stem>_2``, ``<stem>_3``, ...
    when an earlier image of the run took it or when one of its files must not be overwritten
    (``inputs``: resolved paths of the run's images, e.g. the image itself when ``out`` is its
    folder; or a file that is not an earlier toist result, e.g. another photo ``<stem>.png``)."""
    name, k = stem, 1
    while name in used or not _replaceable(out, name, inputs):
        k += 1
        name = f"{stem}_{k}"
    return name


def _replaceable(out: Path, name: str, inputs: set) -> bool:
    """Whether ``name``'s outputs may be written: neither is an input, and each is absent or an
    earlier run's result (a toist JSON, and the overlay beside such a JSON)."""
    overlay, result = output_files(out, name)
    if overlay.resolve() in inputs or result.resolve() in inputs:
        return False
    if not (overlay.exists() or result.exists()):
        return True
    return _is_toist_result(result)


def _is_toist_result(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"image", "instances", "caption"} <= set(data)


def default_checkpoint() -> str:
    """The embedded default model directory, announced on stderr (it knows synthetic scenes only)."""
    from ..checkpoint import default_model_note, require_default_model_dir

    directory = require_default_model_dir()
    print(f"toist predict: no --checkpoint: {default_model_note(directory)}", file=sys.stderr)
    return str(directory)


def run(args: argparse.Namespace) -> int:
    from ..atomic_file import write_text_atomic
    from ..checkpoint import show_load_summary
    from ..config import InferenceConfig
    from ..inference import NonFiniteOutputError, TaskSegmenter
    from ..visualize import draw_prediction, load_rgb, save_rgb
    from .output_paths import check_output_folder

    problem = resize_problem(args.short_side, args.max_size)
    if problem:
        print(f"toist predict: error: {problem}", file=sys.stderr)
        return 2
    inference = InferenceConfig(score_threshold=args.score_threshold, max_instances=args.max_instances,
                                duplicate_iou=args.duplicate_iou or None, precision=args.precision,
                                short_side=args.short_side, max_size=args.max_size)
    _check_paths(args.images)
    check_output_folder("--out", args.out)
    show_load_summary()  # one line: what the checkpoint held (mask head, memory bank, EMA, tokenizer)
    if args.preset:
        seg = TaskSegmenter.from_config(args.preset, device=args.device, text_encoder=args.text_encoder,
                                        inference=inference, seed=args.seed)
    else:
        seg = TaskSegmenter.from_pretrained(args.checkpoint or default_checkpoint(), device=args.device,
                                            text_encoder=args.text_encoder, inference=inference)
    seg.set_task(args.task)  # an id ("2", "task_2"), a task name or free text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    inputs = {Path(path).resolve() for path in args.images}
    unreadable: list[str] = []
    for path in args.images:
        try:
            image = load_rgb(path)
        except ValueError as exc:  # one bad file does not lose the others' results
            print(f"toist predict: skipped: {exc}", file=sys.stderr)
            unreadable.append(str(path))
            continue
        try:
            prediction = seg.predict(image)
        except NonFiniteOutputError as exc:  # name the file (exit code 2, as every error of the command)
            raise NonFiniteOutputError(f"{path}: {exc}") from None
        stem = Path(path).stem
        name = output_name(stem, out, used, inputs)
        if name != stem and stem not in used:
            print(f"toist predict: {out / stem}.png/.json is an input image or a file toist did not write, not "
                  f"overwritten: the results of {path} go to {out / name}.png/.json", file=sys.stderr)
        used.add(name)
        overlay, result = output_files(out, name)
        # The result first: a run stopped between the two leaves a result the next run replaces
        # (an overlay alone would look like someone else's picture, kept).
        write_text_atomic(result, json.dumps(prediction_to_json(prediction, str(path)), indent=1))
        save_rgb(overlay, draw_prediction(image, prediction))
        print(f"{path}: {len(prediction)} instance(s) for {prediction.caption!r} -> {out / name}.png/.json")
    if unreadable:
        raise ValueError(f"{len(unreadable)} of {len(args.images)} image(s) could not be read and have no results: "
                         f"{', '.join(unreadable)}")
    return 0


def _check_paths(images: list[str]) -> None:
    """Every image argument names a file: a typo is said before the model loads."""
    missing = [path for path in images if not Path(path).is_file()]
    if missing:
        raise ValueError(f"not a file: {', '.join(missing)} (image arguments must name files; nothing was written)")
