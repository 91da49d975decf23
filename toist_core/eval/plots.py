"""Precision-recall curves (IoU 0.5) per task: all images vs. images with at least one target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from toist_core.eval.evaluator import NO_RESULT, EvaluationResult, TaskResult  # noqa: E402
from toist_core.atomic_file import atomic_write  # noqa: E402

_IOU_LABEL = {"bbox": "box", "segm": "mask"}
PLOT_SOFTWARE = "toist evaluate"  # the PNG's Software text


def plot_task_pr(task: TaskResult, path: Union[str, Path], phrase: str = "") -> Path:
    """One PNG with a panel per IoU type, two curves each; ``phrase`` the task's, in the title."""
    path = Path(path)
    iou_types = list(task.curves)
    fig, axes = plt.subplots(1, len(iou_types), figsize=(5 * len(iou_types), 4.2), squeeze=False)
    for ax, iou in zip(axes[0], iou_types):
        curve = task.curves[iou]
        ax.plot(curve.recall, curve.precision_all, label=f"all images (AP50 {_percent(task.ap50[iou])})")
        ax.plot(curve.recall, curve.precision_with_targets, linestyle="--",
                label=f"images with targets (AP50 {_percent(task.ap50_with_targets[iou])})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{_IOU_LABEL[iou]}, IoU 0.5")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    # The phrase as written: matplotlib reads text between two "$" as a formula ("pay $5 or
    # $10 with" drawn as maths; "$x_$" failed the whole run's plots with its parser's error).
    fig.suptitle(f"Task {task.task_id}: {phrase} ({task.num_images} images, "
                 f"{task.num_images_with_targets} with targets)", parse_math=False)
    try:
        fig.tight_layout()
        metadata = {"Software": PLOT_SOFTWARE}  # how a later run tells its own plots from a user's files
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=90, metadata=metadata))
    finally:
        plt.close(fig)
    return path


def foreign_plot_files(out_dir: Union[str, Path], tasks: Optional[Sequence[int]] = None) -> list[Path]:
    """The ``pr_task_<k>.png`` in ``out_dir`` (of ``tasks``; None: every one) that
    :func:`plot_task_pr` did not write."""
    from PIL import Image, UnidentifiedImageError

    out_dir = Path(out_dir)
    paths = (sorted(out_dir.glob("pr_task_*.png")) if tasks is None
             else [out_dir / f"pr_task_{task}.png" for task in tasks if (out_dir / f"pr_task_{task}.png").exists()])
    foreign = []
    for path in paths:
        try:
            with Image.open(path) as image:
                ours = image.format == "PNG" and image.info.get("Software") == PLOT_SOFTWARE
        except (OSError, UnidentifiedImageError):  # a folder of that name, a text file, ...
            ours = False
        if not ours:
            foreign.append(path)
    return foreign


def _percent(ap: float) -> str:
    return "n/a" if ap == NO_RESULT else f"{100 * ap:.1f}"


def plot_pr_curves(result: EvaluationResult, out_dir: Union[str, Path]) -> list[Path]:
    """``pr_task_<k>.png`` for every task in ``result``; returns the written paths."""
    out_dir = Path(out_dir)
    return [plot_task_pr(task, out_dir / f"pr_task_{task.task_id}.png", result.phrase(task.task_id))
            for task in result.tasks]
