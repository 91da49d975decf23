"""Per-task result tables as in the paper (percent, one decimal) in Markdown and CSV.

The paper's per-task tables have one column per task and a "Mean" column; rows are the
metrics (AP@0.5 of boxes = mAP^box, of masks = mAP^mask). The Markdown file holds that wide
table plus a long per-task table with the image/target counts and AP@[.5:.95]; the CSV holds
the long table (one row per task and a final ``mean`` row), values in percent. A task without
a result (no target in its images, or no image) reads n/a and is left out of the mean; a mean
over no task is n/a.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Union

from toist_core.eval.evaluator import EvaluationResult
from toist_core.atomic_file import write_text_atomic
from toist_core.data.schema import written_by

_IOU_LABEL = {"bbox": "box", "segm": "mask"}


def _pct(value: float) -> float:
    return 100.0 * value if value >= 0 else float("nan")


def _fmt(value: float, decimals: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{decimals}f}"  # NaN -> n/a (pandas reads it as NaN)


def result_rows(result: EvaluationResult) -> list[dict]:
    """One dict per task plus a final mean row; AP columns in percent."""
    rows = []
    for task in result.tasks:
        row = {"task": task.task_id, "phrase": result.phrase(task.task_id),
               "images": task.num_images, "images_with_targets": task.num_images_with_targets,
               "targets": task.num_targets}
        for iou in result.iou_types:
            label = _IOU_LABEL[iou]
            row[f"AP50_{label}"] = _pct(task.ap50[iou])
            row[f"AP_{label}"] = _pct(task.ap[iou])
            row[f"AP50_{label}_with_targets"] = _pct(task.ap50_with_targets[iou])
        rows.append(row)
    mean = {"task": "mean", "phrase": "", "images": sum(t.num_images for t in result.tasks),
            "images_with_targets": sum(t.num_images_with_targets for t in result.tasks),
            "targets": sum(t.num_targets for t in result.tasks)}
    for iou in result.iou_types:
        label = _IOU_LABEL[iou]
        mean[f"AP50_{label}"] = _pct(result.mean_ap50(iou))
        mean[f"AP_{label}"] = _pct(result.mean_ap(iou))
        mean[f"AP50_{label}_with_targets"] = _pct(result.mean_ap50_with_targets(iou))
    rows.append(mean)
    return rows


def paper_table_markdown(result: EvaluationResult) -> str:
    """Wide table: metrics as rows, tasks 1..14 and Mean as columns (paper layout)."""
    header = ["Metric"] + [str(t.task_id) for t in result.tasks] + ["Mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for iou in result.iou_types:
        label = _IOU_LABEL[iou]
        for name, per_task, mean in (
                (f"AP@0.5 {label} (mAP^{label})", lambda t: t.ap50[iou], result.mean_ap50(iou)),
                (f"AP@[.5:.95] {label}", lambda t: t.ap[iou], result.mean_ap(iou))):
            cells = [_fmt(_pct(per_task(t))) for t in result.tasks] + [_fmt(_pct(mean))]
            lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text as one Markdown table cell: a phrase "cut | slice" added a column, a line break
    split the row."""
    return " ".join(text.split()).replace("|", "\\|")


def per_task_markdown(result: EvaluationResult) -> str:
    rows = result_rows(result)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c not in ("phrase",) else "---" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) if isinstance(v, float) else _cell(str(v)) for v in row.values()) + " |")
    return "\n".join(lines)


REPORT_TITLE = "COCO-Tasks evaluation"
TABLE_STEM = "results"   # write_tables' <stem>.md and <stem>.csv


def markdown_report(result: EvaluationResult, title: str = REPORT_TITLE) -> str:
    parts = [f"# {title}", ""]
    summary = ", ".join(f"mAP^{_IOU_LABEL[i]}@0.5 = {_fmt(_pct(result.mean_ap50(i)))}" for i in result.iou_types)
    parts += [summary, ""]
    for iou in result.iou_types:
        left_out = result.tasks_without_result(iou)
        if left_out:
            parts += [f"{_IOU_LABEL[iou]}: task(s) {', '.join(map(str, left_out))} have no result (no preferred "
                      f"object in their evaluated images, or no image): n/a, not in the mean of "
                      f"{len(result.tasks) - len(left_out)} task(s).", ""]
    parts += ["## Per task (paper layout, %)", "", paper_table_markdown(result), "",
              "## Details (%)", "", per_task_markdown(result), "",
              "AP@0.5 = COCOeval stats[1] with catIds=[1] on the evaluated images of the task file (column "
              "'images': all of them unless the run was limited, e.g. --max-images); "
              "'with_targets' = the same on the images with at least one preferred object.", ""]
    return "\n".join(parts)


def csv_text(result: EvaluationResult) -> str:
    rows = result_rows(result)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (_fmt(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def foreign_table_files(out_dir: Union[str, Path], stem: str = TABLE_STEM) -> list[Path]:
    """The files :func:`write_tables` would replace in ``out_dir`` that it did not write (its
    ``.md`` starts with the report's title line, its ``.csv`` with the table's header)."""
    out_dir = Path(out_dir)
    starts = {out_dir / f"{stem}.md": f"# {REPORT_TITLE}\n", out_dir / f"{stem}.csv": "task,phrase,"}
    return [path for path, start in starts.items() if path.exists() and not written_by(path, start.encode())]


def write_tables(result: EvaluationResult, out_dir: Union[str, Path],
                 stem: str = TABLE_STEM) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    write_text_atomic(md_path, markdown_report(result))
    write_text_atomic(csv_path, csv_text(result))
    return md_path, csv_path
