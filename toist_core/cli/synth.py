"""``toist synth``: write a synthetic COCO-Tasks tree (images + task JSON files)."""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

from toist_core.tasks import NUM_TASKS


def parse_task_list(text: Sequence[str], max_id: Optional[int] = NUM_TASKS) -> list[int]:
    """``["1-3", "7"]`` or ``["1,2", "5"]`` -> ``[1, 2, 3, 7]``; checks the ids (1..``max_id``;
    None: any positive id, e.g. an own vocabulary's tasks)."""
    tasks: set[int] = set()
    for chunk in text:
        for part in str(chunk).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part), int(part))
            except ValueError:
                raise ValueError(f"--tasks: cannot read {part!r} (use e.g. 1-14 or 2,5)") from None
            if lo > hi:  # range() would give no task, and the message "got none"
                raise ValueError(f"--tasks: {part!r} is an empty range (did you mean {hi}-{lo}?)")
            tasks.update(range(lo, hi + 1))
    bad = sorted(t for t in tasks if t < 1 or (max_id is not None and t > max_id))
    if bad or not tasks:
        allowed = f"1..{max_id}" if max_id is not None else "positive"
        raise ValueError(f"--tasks: ids must be {allowed}, got {bad or 'none'}")
    return sorted(tasks)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth", help="write a synthetic COCO-Tasks dataset (same layout and schema as the real one)",
        description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="output folder (annotations/ and images/ are created in it)")
    parser.add_argument("--tasks", nargs="+", default=[f"1-{NUM_TASKS}"], help=f"task ids, e.g. 1-14 or 2 5 7 (default 1-{NUM_TASKS})")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                        help="splits written (default both)")
    parser.add_argument("--images-per-split", type=int, default=24,
                        help="shared image pool per split (default %(default)s)")
    parser.add_argument("--images-per-task", type=int, default=None,
                        help="images listed per task file (seeded subset of the pool; default all)")
    parser.add_argument("--empty-fraction", type=float, default=None,
                        help="list every image with a preferred object and about this share without "
                             "(default: every pool image, most without)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the scenes (default %(default)s)")
    parser.add_argument("--min-size", type=int, default=160, help="smallest image side (px, default %(default)s)")
    parser.add_argument("--max-size", type=int, default=320, help="largest image side (px, default %(default)s)")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest objects per image (default %(default)s)")
    parser.add_argument("--max-objects", type=int, default=5, help="most objects per image (default %(default)s)")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg", dest="image_format",
                        help="jpg (quality 95, real file names; the default) or png (lossless)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write even into a folder holding task files or a synth.json that toist synth "
                             "did not write (they are replaced), and remove synth's task files of other tasks "
                             "of a split redrawn with other settings (seed, sizes, object counts)")


def run(args: argparse.Namespace) -> int:
    from toist_core.data.synth import generate

    started = time.perf_counter()
    summary = generate(args.root, tasks=parse_task_list(args.tasks), splits=tuple(args.splits),
                       images_per_split=args.images_per_split, images_per_task=args.images_per_task,
                       empty_fraction=args.empty_fraction, seed=args.seed, min_size=args.min_size, max_size=args.max_size,
                       min_objects=args.min_objects, max_objects=args.max_objects,
                       image_format=args.image_format, overwrite=args.overwrite)
    elapsed = time.perf_counter() - started
    print(f"wrote {len(summary.annotation_files)} task files and "
          f"{sum(summary.num_images.values())} images under {summary.root} in {elapsed:.1f} s")
    for (task, split), count in sorted(summary.images_with_preferred.items()):
        print(f"  task {task:2d} {split:5s}: {count} images with preferred objects, "
              f"{summary.num_preferred[(task, split)]} preferred objects")
    return 0
