"""``toist convert-coco``: a plain COCO file + a task specification -> COCO-Tasks task files."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-coco",
        help="turn a COCO instance-segmentation file (every object with a segmentation) into COCO-Tasks files "
             "(own data)",
        description=__doc__ + " See docs/data.md, 'Own data'.")
    parser.add_argument("--coco", required=True, help="COCO file of one split, e.g. instances_train.json")
    parser.add_argument("--split", required=True, help="split name of the written files (train, test, ...)")
    parser.add_argument("--tasks", required=True,
                        help="task specification YAML (tasks: [{id, preferred_categories, preferred_instances}])")
    parser.add_argument("--out", required=True, help="dataset root; files go to <out>/annotations/")
    parser.add_argument("--copy-images-from", default=None,
                        help="folder the images' file_name are relative to: copy them to <out>/<image-dir>")
    parser.add_argument("--image-dir", default=None,
                        help="where the images are copied, relative to --out (default images/<split>); "
                             "only with --copy-images-from")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace task files convert-coco did not write (its own are replaced anyway) and "
                             "images at the copy's destination that are other pictures")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from toist_core.data.convert_coco import convert_coco

    summary = convert_coco(args.coco, args.split, args.tasks, args.out,
                           copy_images_from=args.copy_images_from, image_dir=args.image_dir,
                           overwrite=args.overwrite)
    print(f"wrote {len(summary.tasks)} task files of split {summary.split!r} from {summary.source}")
    for task in summary.tasks:
        print(f"  task {task.task_id:3d}: {task.images} images, {task.annotations} objects, "
              f"{task.preferred} preferred in {task.images_with_preferred} images -> {task.path}")
    if summary.image_dir is not None:
        relative = os.path.relpath(summary.image_dir, args.out)
        print(f"copied {summary.images_copied} images to {summary.image_dir}: set image_dirs: "
              f"{{{summary.split}: {relative}}} in the data config")
    else:
        print(f"images were not copied: set image_dirs: {{{summary.split}: <folder of the images' file_name>}} "
              f"in the data config (relative to --out, or absolute)")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
