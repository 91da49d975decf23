"""``toist evaluate``: the paper's COCO-Tasks metric for a checkpoint or a saved predictions file.

    toist evaluate --data DATA_ROOT --checkpoint CKPT [--out DIR] [--save-predictions FILE]
    toist evaluate --data DATA_ROOT --predictions FILE [--out DIR]

With a checkpoint, every image of each task's test file is run through
``TaskSegmenter`` with the reference's inference settings (pronoun caption, all queries
kept: score threshold 0, up to 100 instances). ``--protocol reference`` also processes images
and boxes exactly as the reference's evaluation (PIL resize of the uint8 image, padding to the
batch's largest image only, boxes not clipped; batches in ascending image id, the reference
loader's order, of the reference scripts' size unless ``--batch-size``: 8 for a detection model,
4 for a segmentation or distilled one), for a like-for-like comparison with the paper's tables; the default
``toist`` keeps toist's float resize, padding to a multiple of 32 and box clipping
(docs/inference.md gives their measured effect). Writes ``results.md`` / ``results.csv``
(per-task AP@0.5 and AP@[.5:.95], mean over tasks = mAP^box / mAP^mask) and one
precision-recall plot per task into ``--out``. Invalid predictions (NaN / inf scores or boxes:
the network's outputs are checked as they come, or masks not of the image's size), and
``--iou-types segm`` for a model without a mask head (refused before predicting), stop the
command with exit code 2 before it writes anything: ``--save-predictions`` is written after
the evaluation succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

from toist_core.cli.arg_types import TEXT_ENCODER_HELP, duplicate_iou, image_side, resize_problem
from toist_core.cli.synth import parse_task_list
from toist_core.config import PROTOCOLS
from toist_core.tasks import NUM_TASKS

REFERENCE_MAX_INSTANCES = 100  # the reference keeps all 100 queries
LOG_NAME = "cocoeval_log.txt"
EVAL_STAGING_PREFIX = ".eval-staging-"   # the folder inside --out a run writes its files into first
LOG_START = b"[task "  # how every task's part of that log begins (told from a user's file of that name)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("evaluate", help="COCO-Tasks AP@0.5 per task and mAP (paper metric)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model checkpoint (anything TaskSegmenter.from_pretrained reads)")
    source.add_argument("--predictions", help="predictions file written by --save-predictions (.json or .json.gz)")
    parser.add_argument("--data", required=True, help="COCO-Tasks root (annotations/, images/)")
    parser.add_argument("--split", default="test", help="annotation split to evaluate (default: test)")
    parser.add_argument("--image-dir", default=None,
                        help="image folder (default: <data>/images/val2014 for test, train2014 for train)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task ids (default: the tasks the checkpoint was trained on, else every task of its "
                             f"vocabulary (1-{NUM_TASKS} for COCO-Tasks), or those in the predictions file)")
    parser.add_argument("--iou-types", nargs="+", choices=["bbox", "segm"], default=None,
                        help="default: bbox, plus segm when the predictions have masks")
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate only the first N images of each task file (quick runs)")
    parser.add_argument("--out", default="eval_out", help="folder for tables and plots (default: eval_out)")
    parser.add_argument("--save-predictions", default=None, help="also write the predictions here")
    parser.add_argument("--device", default="auto", help="torch device for --checkpoint (auto, cpu, cuda)")
    parser.add_argument("--text-encoder", default=None, help=TEXT_ENCODER_HELP)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (--checkpoint; default 1, with --protocol reference the "
                             "reference scripts' batches: 8 for a detection model, 4 for a segmentation or "
                             "distilled one)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="toist",
                        help="pre/post-processing (--checkpoint): toist's (default: float resize, padding to a "
                             "multiple of 32, clipped boxes) or exactly the reference evaluation's (PIL resize, "
                             "padding to the batch's largest image, unclipped boxes; the reference scripts "
                             "evaluate in batches of 8 for detection, 4 for segmentation)")
    parser.add_argument("--short-side", type=image_side, default=None,
                        help="inference resize: short side (default: the size the model was trained at, which "
                             "an official .pth does not record: the reference's 800; smaller = quicker, not the "
                             "paper's)")
    parser.add_argument("--max-size", type=image_side, default=None,
                        help="inference resize: long side cap (default: the model's; official .pth 1333)")
    parser.add_argument("--duplicate-iou", type=duplicate_iou, default=0.0,
                        help="drop an instance whose mask (box) overlaps a better one by more than this IoU, "
                             "as the node and `toist predict` do (default 0: keep every query, the reference's "
                             "evaluation; --checkpoint, protocol toist)")
    parser.add_argument("--no-ccr", action="store_true",
                        help="leave a distilled model's memory bank unused (no cluster-centre replacement of the "
                             "pronoun; --checkpoint): for files trained with CCR off, such as the paper's Table 3 "
                             "rows 2-4 (toist's own such checkpoints are recognised without it)")
    parser.add_argument("--captions", choices=["auto", "pronoun", "noun"], default="auto",
                        help="what the model reads (--checkpoint): the task's pronoun caption, or each image's "
                             "noun caption, naming its preferred objects' classes: how a noun teacher (stage "
                             "noun) is trained and scored, the reference's eval_dete_noun.sh (a batch's captions "
                             "encoded together, padded to the longest), no cluster-centre replacement. auto "
                             "(default): noun for a file that records noun training (a toist checkpoint of stage "
                             "noun or grounding, an official file trained with --verb_noun_input, a model directory "
                             "exported from either), else pronoun")
    parser.add_argument("--no-plots", action="store_true", help="skip the precision-recall PNGs")


def run(args: argparse.Namespace) -> int:
    from toist_core.eval.evaluator import evaluate_tasks, load_ground_truth, task_files
    from toist_core.eval.plots import plot_pr_curves
    from toist_core.eval.predictions import load_prediction_file, save_predictions
    from toist_core.eval.tables import markdown_report, write_tables
    from toist_core.atomic_file import fsync_dir, staging_folder, write_text_atomic
    from toist_core.data.schema import DataError

    if args.max_images is not None and args.max_images <= 0:
        raise ValueError(f"--max-images must be positive, got {args.max_images}")
    if args.iou_types:   # "bbox bbox" evaluated and reported each twice
        args.iou_types = list(dict.fromkeys(args.iou_types))
    _refuse_replacing_other_files(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if resize_problem(args.short_side, args.max_size):
        raise ValueError(resize_problem(args.short_side, args.max_size))
    if args.predictions:
        # They change how predictions are made; a file's are scored as they are (a rerun "with
        # --protocol reference" gave the same numbers without a word).
        given = [option for option, value, default in _checkpoint_only_options(args) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --checkpoint (they say how the model predicts; "
                             f"{args.predictions}'s predictions are scored as they are)")
    if args.protocol == "reference" and args.duplicate_iou:
        raise ValueError(f"--duplicate-iou {args.duplicate_iou}: protocol toist only (--protocol reference keeps "
                         "every query, as the reference's evaluation does)")
    captions = args.captions
    if args.predictions:
        if args.save_predictions:
            raise ValueError("--save-predictions: only with --checkpoint (with --predictions the file already "
                             "holds them)")
        predictions_file = load_prediction_file(args.predictions)
        predictions, phrases = predictions_file.tasks, predictions_file.phrases
        if not predictions:
            raise ValueError(f"{args.predictions}: the file holds no task (field 'tasks' is empty)")
        tasks = parse_task_list(args.tasks, max_id=None) if args.tasks else sorted(predictions)
        absent = [t for t in tasks if t not in predictions]
        if absent:
            raise ValueError(f"{args.predictions}: no predictions for task(s) {absent}")
        predictions = {t: predictions[t] for t in tasks}
    else:
        segmenter = load_segmenter(args.checkpoint, args.device, args.text_encoder, args.short_side,
                                   args.max_size, protocol=args.protocol, duplicate_iou=args.duplicate_iou or None,
                                   ccr=not args.no_ccr)
        if "segm" in (args.iou_types or ()) and getattr(segmenter, "has_masks", None) is False:
            raise DataError(f"--iou-types segm: {args.checkpoint} is a detection model (no mask head): it predicts "
                            "boxes only; evaluate with --iou-types bbox")
        if captions == "auto":
            captions = getattr(segmenter, "captions", "pronoun")  # a segmenter that does not say: pronoun
            if captions == "noun":
                print(f"{args.checkpoint}: a noun teacher (or grounding run), scored as its training scored it: each "
                      "image is read with its own noun caption (--captions noun; --captions pronoun for the task "
                      "captions)", file=sys.stderr)
        batch_size = args.batch_size or default_batch_size(segmenter, args.protocol)
        if args.batch_size is None and batch_size > 1:
            print(f"--protocol reference: batches of {batch_size} images, the reference evaluation script's for "
                  f"this model (a batch is padded to its largest image; --batch-size to change it)", file=sys.stderr)
        # Default: the tasks the model was trained on, else every task of its vocabulary.
        tasks = (parse_task_list(args.tasks, max_id=None) if args.tasks
                 else sorted(segmenter.trained_tasks or segmenter.vocabulary.ids))
        for task in tasks:   # before the data is read: a missing task file hid the real reason
            if task not in segmenter.vocabulary:
                raise ValueError(f"--tasks: task {task} is not a task of {args.checkpoint}: "
                                 f"{segmenter.vocabulary.describe()} has ids 1..{segmenter.vocabulary.num_tasks}")
        predictions = None
        phrases = {entry.id: entry.phrase for entry in segmenter.vocabulary.entries}
    files = task_files(args.data, tasks, args.split)
    ground_truths = {t: load_ground_truth(path) for t, path in files.items()}
    image_ids = {t: gt.getImgIds() for t, gt in ground_truths.items()}
    if args.max_images is not None:
        image_ids = {t: [img["id"] for img in gt.dataset["images"][:args.max_images]]
                     for t, gt in ground_truths.items()}

    if predictions is None:
        image_dir = Path(args.image_dir) if args.image_dir else _default_image_dir(args.data, args.split)
        predictions = predict_tasks(segmenter, files, image_dir, image_ids, batch_size=batch_size,
                                    captions=captions,
                                    require_masks="segm" in (args.iou_types or ()))

    started = time.perf_counter()
    try:
        result = evaluate_tasks(ground_truths, predictions, args.iou_types, image_ids)
    except DataError as exc:  # name the predictions file too (the task files are named already)
        raise DataError(f"{args.predictions}: {exc}" if args.predictions else str(exc)) from None
    if args.predictions:
        # After the evaluation accepted the file: a file of another split was refused after a
        # warning per task that its images had no entries.
        for t in tasks:
            absent = [i for i in image_ids[t] if i not in predictions[t]]
            if absent:
                print(f"warning: task {t}: {len(absent)} of {len(image_ids[t])} evaluated images have no "
                      f"predictions entry; they counted as images without detections", file=sys.stderr)
    result.phrases = phrases  # None (a file without them): COCO-Tasks' phrases
    print(markdown_report(result))
    if args.save_predictions:  # only now: a refused evaluation leaves an existing file as it was
        print(f"predictions written to {save_predictions(args.save_predictions, predictions, phrases)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed into place together: a run stopped while its plots were drawn
    # left the new results.md beside the old results.csv, plots and log, nothing saying so.
    with staging_folder(out, EVAL_STAGING_PREFIX) as staging:
        staged = list(write_tables(result, staging))
        if not args.no_plots:
            staged += plot_pr_curves(result, staging)
        staged.append(write_text_atomic(staging / LOG_NAME, "\n".join(t.log for t in result.tasks)))
        written = [out / path.name for path in staged]
        for path, target in zip(staged, written):
            os.replace(path, target)
        fsync_dir(out)
    print(f"evaluated {len(result.tasks)} task(s) in {time.perf_counter() - started:.1f} s; "
          f"wrote {len(written)} files to {args.out}")
    stale = sorted(set(Path(args.out).glob("pr_task_*.png")) - set(map(Path, written)))
    if stale:  # an earlier run's, of tasks the tables above do not hold: left as they are
        print(f"note: {', '.join(p.name for p in stale)} in {args.out} are from an earlier run, not this one",
              file=sys.stderr)
    return 0


def _checkpoint_only_options(args: argparse.Namespace) -> list[tuple[str, object, object]]:
    """(option, value given, default) of the options that only say how a checkpoint predicts."""
    return [("--captions", args.captions, "auto"), ("--protocol", args.protocol, "toist"),
            ("--batch-size", args.batch_size, None),
            ("--short-side", args.short_side, None), ("--max-size", args.max_size, None),
            ("--duplicate-iou", args.duplicate_iou, 0.0), ("--image-dir", args.image_dir, None),
            ("--device", args.device, "auto"), ("--text-encoder", args.text_encoder, None),
            ("--no-ccr", args.no_ccr, False)]


def _refuse_saving_into_what_out_holds(saved: Path, out: Path) -> None:
    """``--save-predictions`` as ``--out`` itself or a folder above it (written, then --out failed
    as "File exists" or "Not a directory", after all the inference) or as a file evaluate writes
    into it (the table replaced the predictions, with rc 0)."""
    from toist_core.eval.tables import TABLE_STEM

    target, folder = saved.resolve(), out.resolve()
    written = {f"{TABLE_STEM}.md", f"{TABLE_STEM}.csv", LOG_NAME}
    if target == folder or target in folder.parents or (
            target.parent == folder and (target.name in written or re.fullmatch(r"pr_task_.*\.png", target.name))):
        what = ("the --out folder itself" if target == folder else f"a folder --out {out} is in"
                if target in folder.parents else f"a file toist evaluate writes into --out {out}")
        raise ValueError(f"--save-predictions {saved}: {what}; give another name (e.g. {out / 'predictions.json'})")


def _refuse_replacing_other_files(args: argparse.Namespace) -> None:
    """Before anything runs: ``--save-predictions`` and ``--out`` replace only what an earlier
    evaluation wrote (a ground-truth file given as --save-predictions was replaced by predictions)."""
    from toist_core.eval.predictions import is_prediction_file
    from toist_core.data.schema import written_by
    from toist_core.eval.plots import foreign_plot_files
    from toist_core.eval.tables import foreign_table_files

    from .output_paths import check_output_folder, check_output_parent

    check_output_folder("--out", args.out)   # found after hours of inference, as "[Errno 17] File exists"
    saved = Path(args.save_predictions) if args.save_predictions else None
    if saved is not None:
        check_output_parent("--save-predictions", saved)
        _refuse_saving_into_what_out_holds(saved, Path(args.out))
    if saved is not None and saved.exists() and not (saved.is_file() and saved.stat().st_size == 0) \
            and not is_prediction_file(saved):  # an empty file: a name reserved (mktemp)
        raise FileExistsError(f"--save-predictions {args.save_predictions}: exists and is not a toist predictions file; "
                              "nothing was replaced: give another file name")
    foreign = foreign_table_files(args.out)
    log = Path(args.out) / LOG_NAME
    if log.exists() and not written_by(log, LOG_START):
        foreign.append(log)
    if not args.no_plots:  # the plots of the tasks asked for (all, when the tasks come from the data)
        tasks = parse_task_list(args.tasks, max_id=None) if getattr(args, "tasks", None) else None
        foreign += foreign_plot_files(args.out, tasks)
    if foreign:
        raise FileExistsError(f"--out {args.out}: {', '.join(map(str, foreign))} exist and are not what toist evaluate "
                              "writes; nothing was replaced: give another folder")


def default_batch_size(segmenter, protocol: str) -> int:
    """Images per forward pass when ``--batch-size`` is not given: under the reference protocol
    a batch is padded to its largest image, so the batch is part of the protocol: the reference
    scripts' (eval_dete.sh and eval_dete_noun.sh 8, the latter's captions one per image, encoded
    together; eval_seg.sh, eval_seg_dis.sh and eval_dete_dis.sh 4). Otherwise one image."""
    if protocol != "reference":
        return 1
    return 4 if getattr(segmenter, "has_masks", False) or getattr(segmenter, "is_distilled", False) else 8


def _default_image_dir(root: str, split: str) -> Path:
    from toist_core.data.config import DataConfig

    data = DataConfig(root=root)
    if split not in data.image_dirs:  # the config field's message would name no option of this command
        defaults = ", ".join(f"{name}: <data>/{folder}" for name, folder in sorted(data.image_dirs.items()))
        raise ValueError(f"--split {split}: no default image folder for that split (defaults: {defaults}); "
                         "give it with --image-dir")
    folder = data.image_dir(split)
    if not folder.is_dir():  # own data keeps its images elsewhere: every image was "not found" in turn
        raise ValueError(f"--image-dir: not given, and the default image folder of --split {split}, {folder}, "
                         "does not exist; give the folder with --image-dir")
    return folder


def load_segmenter(checkpoint: str, device: str = "auto", text_encoder: Optional[str] = None,
                   short_side: Optional[int] = None, max_size: Optional[int] = None, protocol: str = "toist",
                   duplicate_iou: Optional[float] = None, ccr: bool = True):
    """``TaskSegmenter`` with the reference's evaluation settings: every query kept
    (score threshold 0, 100 instances, no duplicate removal unless ``duplicate_iou``), mask
    threshold 0.5, resize to the model's own size (official files: 800 / 1333) unless
    ``short_side`` / ``max_size`` say otherwise. ``protocol``: ``"toist"`` (toist's resize,
    padding and box clipping) or ``"reference"`` (the reference evaluation's exactly;
    ``InferenceConfig.protocol``). ``ccr``: ``InferenceConfig.ccr``."""
    from toist_core.inference import TaskSegmenter

    inference = evaluation_inference(short_side=short_side, max_size=max_size, protocol=protocol,
                                     duplicate_iou=duplicate_iou, ccr=ccr)
    return TaskSegmenter.from_pretrained(checkpoint, device=device, text_encoder=text_encoder,
                                         inference=inference)


def evaluation_inference(**settings):
    """The reference evaluation's ``InferenceConfig``: every query kept (score threshold 0, 100
    instances, no duplicate removal); ``settings`` (e.g. ``precision``, ``backend``) on top."""
    from toist_core.config import InferenceConfig

    return InferenceConfig(**{"score_threshold": 0.0, "max_instances": REFERENCE_MAX_INSTANCES, "duplicate_iou": None,
                              **settings})


def predict_tasks(segmenter, files: dict, image_dir: Path, image_ids: Optional[dict] = None,
                  batch_size: int = 1, log=None, require_masks: bool = False, captions: str = "pronoun") -> dict:
    """Run ``segmenter`` on the images of each task file -> ``{task: {image: ImagePredictions}}``.

    ``segmenter`` follows the ``TaskSegmenter`` API: ``set_task(task_id)`` and
    ``predict(rgb [H, W, 3] uint8, score_threshold=, max_instances=)`` (``predict_batch`` for
    ``batch_size > 1``) returning ``.boxes [N, 4]`` (xyxy pixels), ``.scores [N]`` and
    ``.masks [N, H, W]`` bool or None. Every query is kept, as in the reference.

    Under the reference protocol (``segmenter.inference.protocol``) a batch is padded to its
    largest image, so its members matter: images are then batched in ascending image id, the
    order of the reference's loader (torchvision's ``CocoDetection`` sorts the ids, sequential
    sampler); otherwise in the file's order. Progress lines go to ``log`` (default: the
    ``sys.stderr`` of the moment of the call). ``require_masks`` (a segm evaluation follows):
    the first image predicted without masks stops it with a :class:`DataError`, for a
    segmenter that does not tell whether it has a mask head. ``captions="noun"``: each image is
    read with its own noun caption (:func:`toist_core.inference.noun_captions.noun_caption_state`;
    ``segmenter.model`` encodes a batch's captions together, padded to the longest, as the
    reference's batches are).
    """
    from toist_core.data.coco_tasks import CocoTasksDataset
    from toist_core.data.schema import DataError
    from toist_core.eval.predictions import ImagePredictions, check_image_predictions
    from toist_core.inference import NonFiniteOutputError
    from toist_core.inference.noun_captions import noun_caption_state

    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if captions not in ("pronoun", "noun"):
        raise ValueError(f"captions {captions!r}: pronoun or noun")
    keep_all = dict(score_threshold=0.0, max_instances=REFERENCE_MAX_INSTANCES)
    reference_order = getattr(getattr(segmenter, "inference", None), "protocol", "toist") == "reference"
    predictions = {}
    vocabulary = getattr(segmenter, "vocabulary", None)  # noun captions: the model's own task phrases
    for task_id, path in sorted(files.items()):
        # In the mode of its captions: noun captions' class names are checked before predicting.
        dataset = CocoTasksDataset(path, image_dir, caption_mode=captions, check_images=True, vocabulary=vocabulary)
        wanted = None if image_ids is None else set(image_ids[task_id])
        indices = [i for i in range(len(dataset)) if wanted is None or dataset.sample_info(i)[1].id in wanted]
        if reference_order:
            indices.sort(key=lambda i: dataset.sample_info(i)[1].id)
        if captions == "pronoun":  # noun captions: a state of its own per image
            segmenter.set_task(task_id)
        started, task_preds = time.perf_counter(), {}
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = [dataset.load_image(i).permute(1, 2, 0).numpy() for i in chunk]
            try:
                if captions == "noun":   # each image its own caption; a batch's encoded together
                    state = noun_caption_state(segmenter.model, dataset, chunk, task_id)
                    outputs = segmenter.predict_batch(images, state, **keep_all)
                elif batch_size == 1:
                    outputs = [segmenter.predict(images[0], **keep_all)]
                else:
                    outputs = segmenter.predict_batch(images, **keep_all)
            except NonFiniteOutputError as exc:  # NaN predictions: exit code 2, naming the images
                ids = ", ".join(str(dataset.sample_info(i)[1].id) for i in chunk)
                raise NonFiniteOutputError(f"task {task_id}: image id(s) {ids}: {exc}") from None
            for index, image, out in zip(chunk, images, outputs):
                image_id = dataset.sample_info(index)[1].id
                if require_masks and out.masks is None:
                    raise DataError(f"task {task_id}: image {image_id}: the model predicted no masks: "
                                    "--iou-types segm needs a segmentation model (use --iou-types bbox)")
                pred = ImagePredictions.from_arrays(out.boxes, out.scores, out.masks)
                # Stop at the first bad image, not after predicting every task.
                check_image_predictions(pred, f"task {task_id}: image {image_id}", image.shape[:2])
                task_preds[image_id] = pred
        predictions[task_id] = task_preds
        print(f"task {task_id}: predicted {len(task_preds)} images in {time.perf_counter() - started:.1f} s",
              file=log or sys.stderr)
    return predictions
