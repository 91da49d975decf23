"""The paper's COCO-Tasks metric: one pycocotools COCOeval per task, then the mean over tasks.

Per task (reference ``datasets/coco_eval.py`` + ``main.py``): ground truth = the task's
annotation file; ``params.catIds = [1]`` (only preferred objects are targets; detections of
other objects are false positives), ``useCats`` left at 1, default IoU thresholds, area ranges
and ``maxDets = [1, 10, 100]``; every image of the file is evaluated, including images without
a preferred object (all their detections are false positives). Every detection has
``category_id = 1``. The reported number is ``stats[1]`` = AP at IoU 0.5 (area all, 100
detections); ``mAP^box`` / ``mAP^mask`` = arithmetic mean of the per-task values. AP@[.5:.95]
(``stats[0]``) is reported as well.

A task without a result, -1 (:data:`NO_RESULT`), is left out of the means: pycocotools gives
-1 to a task whose evaluated images hold no preferred object, and a task with no evaluated
image at all gets -1 here without running COCOeval (pycocotools reads an empty image list
as "every image"). A mean over no task with a result is NaN (reported as n/a). Every COCO-Tasks
test task has targets, so the paper's means are unchanged.

Precision-recall curves (IoU 0.5) come from ``COCOeval.eval["precision"]`` for all images and
for the images with at least one target; the second set reuses the per-image matching of the
first (pycocotools' ``accumulate(p)`` mis-indexes a subset of images, so the per-image records
are selected here).

Two interchangeable COCOeval implementations (``backend=``): ``"faster-coco-eval"`` (the
``faster-coco-eval`` package's C++ per-image matching and accumulation; the default when it is
installed) and ``"pycocotools"`` (the reference's own, kept as the reference). Both read the
same pycocotools ground truth; the faster path builds the detections object with array
operations (the records, ids and ``area`` values of ``loadRes``) and keeps faster-coco-eval's
per-image records (``separate_eval``) for the "with targets" subset. Area ranges, crowd
handling, ``maxDets`` and the 12 summary numbers agree: ``tests/test_eval_backends.py`` checks
the two against each other to 1e-6, ``bench/bench_evaluate.py`` times them side by side.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from toist_core.data.schema import PREFERENCE_CATEGORIES, DataError, parse_task_data, parse_task_file_name, read_json
from toist_core.eval.predictions import ImagePredictions, PredictionSet, check_image_predictions
from toist_core.listing import listing
from toist_core.tasks import TASK_PHRASES

IOU_TYPES = ("bbox", "segm")
NO_RESULT = -1.0   # pycocotools' AP of a task without ground truth; also a task without images
BACKENDS = ("faster-coco-eval", "pycocotools")
PREFERRED = 1
_RECALL_POINTS = 101


@dataclass
class PRCurve:
    """Precision at the 101 COCO recall thresholds, IoU 0.5, area all, 100 detections (NaN = undefined)."""

    recall: np.ndarray               # [101]
    precision_all: np.ndarray        # [101] all images
    precision_with_targets: np.ndarray  # [101] images with >= 1 target


@dataclass
class TaskResult:
    """Metrics of one task; AP values are fractions in [0, 1], or -1 (:data:`NO_RESULT`) where the
    task has none: no target in its evaluated images (pycocotools' value), or no evaluated image."""

    task_id: int
    num_images: int
    num_images_with_targets: int
    num_targets: int
    ap50: dict[str, float] = field(default_factory=dict)               # iou type -> stats[1]
    ap: dict[str, float] = field(default_factory=dict)                 # iou type -> stats[0]
    ap50_with_targets: dict[str, float] = field(default_factory=dict)  # AP@0.5 on images with targets
    stats: dict[str, list[float]] = field(default_factory=dict)        # iou type -> the 12 COCO stats
    curves: dict[str, PRCurve] = field(default_factory=dict)
    log: str = ""                                                      # pycocotools' printed output


@dataclass
class EvaluationResult:
    """Per-task results (sorted by task id) and their means, as in the paper's tables."""

    tasks: list[TaskResult]
    iou_types: tuple[str, ...]
    # Task id -> phrase for the tables (None: the COCO-Tasks phrases); a model's own vocabulary
    # sets it (``toist evaluate --checkpoint``).
    phrases: Optional[dict[int, str]] = None

    def phrase(self, task_id: int) -> str:
        """The task's verb phrase for tables and plots ("" when unknown)."""
        return (self.phrases if self.phrases is not None else TASK_PHRASES).get(task_id, "").strip()

    def mean_ap50(self, iou_type: str) -> float:
        """``mAP^box`` (iou_type "bbox") / ``mAP^mask`` ("segm"): mean of per-task AP@0.5 over the
        tasks with a result; NaN when none has one."""
        return _mean_of_results([t.ap50[iou_type] for t in self.tasks])

    def mean_ap(self, iou_type: str) -> float:
        return _mean_of_results([t.ap[iou_type] for t in self.tasks])

    def mean_ap50_with_targets(self, iou_type: str) -> float:
        return _mean_of_results([t.ap50_with_targets[iou_type] for t in self.tasks])

    def tasks_without_result(self, iou_type: str) -> list[int]:
        """Ids of the tasks left out of the means (AP@0.5 = -1)."""
        return [t.task_id for t in self.tasks if t.ap50[iou_type] == NO_RESULT]

    def task(self, task_id: int) -> TaskResult:
        for result in self.tasks:
            if result.task_id == task_id:
                return result
        raise KeyError(f"task {task_id} was not evaluated")


def faster_coco_eval_available() -> bool:
    """Whether the ``faster-coco-eval`` package can be imported."""
    try:
        import faster_coco_eval.core.faster_eval_api  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend() -> str:
    """``"faster-coco-eval"`` when installed (same numbers, several times quicker), else ``"pycocotools"``."""
    return "faster-coco-eval" if faster_coco_eval_available() else "pycocotools"


def resolve_backend(backend: Optional[str]) -> str:
    """Check ``backend`` (None = :func:`default_backend`) and return its name."""
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}; expected one of {BACKENDS}")
    if backend == "faster-coco-eval" and not faster_coco_eval_available():
        raise ImportError("evaluation backend 'faster-coco-eval' needs the faster-coco-eval package "
                          "(pip install faster-coco-eval), or use backend='pycocotools'")
    return backend


def load_ground_truth(path: Union[str, Path]) -> COCO:
    """pycocotools COCO object of a task file; ``source_path`` names the file in later error
    messages.

    The file passes the dataset's schema first (:func:`~toist_core.data.schema.parse_task_data`,
    on the one parsed JSON), so the evaluation refuses what training refuses with a
    :class:`DataError` naming file, record and field: pycocotools would take duplicate ids,
    annotations of unknown images, a ``category_id`` other than 0 / 1 or an RLE that is not a
    mask of its image, and mis-score them or fail with a bare AssertionError. A file without
    ``categories`` (the dataset does not need it) gets the COCO-Tasks pair
    :data:`~toist_core.data.schema.PREFERENCE_CATEGORIES`, as the real files have it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    data = read_json(path, "annotation file")
    try:
        task_id, split = parse_task_file_name(path)
    except DataError:  # any name will do here; the schema only names the file
        task_id, split = 0, ""
    parse_task_data(data, path, task_id, split)
    if _unsafe_annotation_ids(data.get("annotations", ())):
        # COCOeval marks a detection by the id of the target it matched, 0 meaning "none": a
        # target of id 0 (exporters that count from 0) was found and scored as missed
        # (cocodataset/cocoapi#331); faster-coco-eval scores targets of negative ids or ids past
        # 2**64 as never found. The ids serve the matching only: numbered 1..N instead.
        data["annotations"] = [dict(annotation, id=number) for number, annotation in enumerate(data["annotations"], 1)]
    if "categories" not in data:
        data["categories"] = [dict(c) for c in PREFERENCE_CATEGORIES]
    coco = COCO()
    coco.dataset = data
    with _prints_into(io.StringIO()):
        coco.createIndex()
    coco.source_path = str(path)
    return coco


def detections_to_coco(predictions: Mapping[int, ImagePredictions], iou_type: str,
                       image_ids: Optional[set] = None) -> list[dict]:
    """COCO result records (``category_id = 1``) of the images in ``image_ids`` (all if None)."""
    records: list[dict] = []
    for image_id, pred in predictions.items():
        if image_ids is not None and image_id not in image_ids:
            continue
        scores = pred.scores.tolist()
        if iou_type == "bbox":
            xywh = pred.boxes.copy()
            xywh[:, 2:] -= xywh[:, :2]
            for box, score in zip(xywh.tolist(), scores):
                records.append({"image_id": image_id, "category_id": PREFERRED, "bbox": box, "score": score})
        else:
            for rle, score in zip(pred.masks, scores):
                records.append({"image_id": image_id, "category_id": PREFERRED,
                                "segmentation": rle, "score": score})
    return records


def evaluate_task(ground_truth: Union[str, Path, COCO], predictions: Mapping[int, ImagePredictions],
                  iou_types: Optional[Sequence[str]] = None, image_ids: Optional[Sequence[int]] = None,
                  task_id: Optional[int] = None, backend: Optional[str] = None) -> TaskResult:
    """Evaluate one task's predictions ``{image_id: ImagePredictions}``.

    Python's cyclic garbage collector is held off while it runs (see :func:`_collector_held`).

    Raises :class:`DataError` (naming task, image and field) for predictions of images not in
    the file, NaN / inf scores or boxes, and (segm) masks whose size is not the image's or
    whose RLE counts are not a mask of that size.

    Args:
        ground_truth: the task's annotation file (its name gives the task id) or a COCO object.
        iou_types: subset of ("bbox", "segm"); default: both when every prediction has masks.
        image_ids: images to evaluate (default: every image of the file). Images without a
            predictions entry count as images with no detections.
        backend: ``"faster-coco-eval"`` or ``"pycocotools"`` (None: :func:`default_backend`);
            the numbers are the same. A file with image ids beyond 2**53 is scored by pycocotools
            (faster-coco-eval holds ids as doubles).
    """
    with _collector_held():
        return _evaluate_task(ground_truth, predictions, iou_types, image_ids, task_id, backend)


_STDOUT_SWAP = threading.RLock()


@contextlib.contextmanager
def _prints_into(buffer: io.StringIO):
    """pycocotools' prints (its progress lines, the summary) into ``buffer`` for the block.
    ``redirect_stdout`` swaps the process-wide ``sys.stdout``: evaluations in two threads
    interleaved their swaps, lost each other's summaries from their logs and could leave
    ``sys.stdout`` a discarded buffer (every later print of the process gone). One swap at a
    time; what another thread prints meanwhile still lands in ``buffer``."""
    with _STDOUT_SWAP, contextlib.redirect_stdout(buffer):
        yield buffer


@contextlib.contextmanager
def _collector_held():
    """Python's cyclic garbage collector off for the block, back on after (if it was on).

    A task's evaluation builds some 10^5 small dicts and lists (records, the COCO index,
    per-image results) next to none of which form reference cycles (pycocotools leaves a few
    hundred per task, collected once the collector is back on); but every 700 allocations it
    runs, and its full passes walk every object the process holds (a COCO-Tasks-sized prediction
    set is ~10^6): measured, 0.6-1 s of a task's 2.4-2.8 s. Acyclic objects are freed by reference
    counting as before; the collector is process-wide, so a concurrent block elsewhere only runs
    with it off for a while."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _evaluate_task(ground_truth, predictions, iou_types, image_ids, task_id, backend) -> TaskResult:
    backend = resolve_backend(backend)
    if not isinstance(ground_truth, COCO):
        if task_id is None:
            task_id = parse_task_file_name(ground_truth)[0]
        gt_name = str(ground_truth)
        ground_truth = load_ground_truth(ground_truth)
    else:
        gt_name = getattr(ground_truth, "source_path", "ground truth")
    task_id = 0 if task_id is None else task_id
    unsafe = _unsafe_annotation_ids(ground_truth.dataset.get("annotations", ()))
    if unsafe:  # a COCO object built elsewhere (load_ground_truth renumbers them)
        raise DataError(f"task {task_id}: {gt_name}: annotation ids {listing(unsafe)} are not 1..2**53: COCOeval "
                        "takes 0 for 'matched nothing' and faster-coco-eval mis-scores negative ones, so their "
                        "targets would count as missed; load the file with load_ground_truth (it numbers them 1..N)")
    gt_image_ids = ground_truth.getImgIds()
    if backend != "pycocotools" and any(abs(i) > _EXACT_DOUBLE_INT for i in gt_image_ids):
        # faster-coco-eval holds image ids as doubles: ids beyond 2**53 (nanosecond timestamps)
        # collide and it fails. pycocotools, which gives the same numbers, keeps them as ints.
        backend = "pycocotools"
    known = set(gt_image_ids)
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise DataError(f"task {task_id}: predictions for image ids not in {gt_name}: {unknown[:10]}"
                        + (" ..." if len(unknown) > 10 else ""))
    if image_ids is None:
        selected = sorted(gt_image_ids)
    else:
        selected = sorted(set(int(i) for i in image_ids))
        missing = sorted(set(selected) - known)
        if missing:
            raise DataError(f"task {task_id}: image ids not in {gt_name}: {missing[:10]}")
    # Masks are looked at only where they may be scored: boxes asked for alone are scored whatever
    # masks some images carry.
    has_masks = _all_have_masks({task_id: predictions}) if iou_types is None or "segm" in iou_types else False
    if iou_types is None:
        iou_types = IOU_TYPES if has_masks and predictions else ("bbox",)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
        if iou_type == "segm" and not has_masks:
            without = [i for i, p in predictions.items() if p.masks is None][:10]
            raise DataError(f"task {task_id}: segm evaluation needs masks; images without masks: {without}")
    segm = "segm" in iou_types
    for image_id, pred in predictions.items():
        info = ground_truth.imgs[image_id]
        # Masks (their sizes: the file's image sizes, and RLE counts) matter only for segm.
        size = (info["height"], info["width"]) if segm else None
        check_image_predictions(pred, f"task {task_id}: image {image_id}", size, check_masks=segm)

    if not selected:
        return _without_images(task_id, iou_types)
    targets = ground_truth.getAnnIds(imgIds=selected, catIds=[PREFERRED], iscrowd=False)
    with_targets = sorted({ground_truth.anns[a]["image_id"] for a in targets})
    result = TaskResult(task_id, len(selected), len(with_targets), len(targets))
    logs = []
    selected_set = set(selected)
    for iou_type in iou_types:
        log = io.StringIO()
        with _prints_into(log):
            if backend == "pycocotools":
                records = detections_to_coco(predictions, iou_type, selected_set)
                detections = ground_truth.loadRes(records) if records else COCO()
            else:
                detections = _results_coco(ground_truth, predictions, iou_type, selected_set)
            coco_eval = _run_cocoeval(backend, ground_truth, detections, iou_type, selected)
            coco_eval.summarize()
        logs.append(f"[task {task_id} {iou_type}]\n{log.getvalue()}")
        stats = [float(s) for s in coco_eval.stats]
        result.stats[iou_type] = stats
        result.ap[iou_type], result.ap50[iou_type] = stats[0], stats[1]
        precision_all = _pr_precision(coco_eval.eval["precision"])
        subset = _accumulate_subset(coco_eval, with_targets)
        precision_targets = _pr_precision(subset) if subset is not None else np.full(_RECALL_POINTS, np.nan)
        result.ap50_with_targets[iou_type] = _ap(precision_targets)
        result.curves[iou_type] = PRCurve(np.asarray(coco_eval.params.recThrs, dtype=np.float64),
                                          precision_all, precision_targets)
    result.log = "".join(logs)
    return result


def _all_have_masks(predictions: PredictionSet) -> bool:
    """Whether every image has masks; some with and some without is refused (scoring boxes only
    would drop the mask AP of every task without a word)."""
    without = [(task, image) for task, images in sorted(predictions.items())
               for image, pred in sorted(images.items()) if pred.masks is None]
    count = sum(len(images) for images in predictions.values())
    if without and len(without) < count:
        listed = ", ".join(f"task {task} image {image}" for task, image in without[:5])
        raise DataError(f"predictions: {len(without)} of {count} images have no masks ({listed}"
                        f"{' ...' if len(without) > 5 else ''}) while the others have: give masks for "
                        "every image, or none to score boxes only")
    return not without


def evaluate_tasks(ground_truths: Mapping[int, Union[str, Path, COCO]], predictions: PredictionSet,
                   iou_types: Optional[Sequence[str]] = None,
                   image_ids: Optional[Mapping[int, Sequence[int]]] = None,
                   backend: Optional[str] = None) -> EvaluationResult:
    """Evaluate every task of ``predictions`` against ``ground_truths[task_id]``
    (``backend``: see :func:`evaluate_task`)."""
    backend = resolve_backend(backend)
    missing = sorted(set(predictions) - set(ground_truths))
    if missing:
        raise DataError(f"no annotation file given for predicted task(s) {missing}")
    if iou_types is None:   # masks when every image has them, and there is an image (none got a mask AP of 0)
        has_images = any(predictions.values())
        iou_types = IOU_TYPES if _all_have_masks(predictions) and has_images else ("bbox",)
    results = [evaluate_task(ground_truths[task_id], predictions[task_id], iou_types,
                             None if image_ids is None else image_ids.get(task_id), task_id=task_id,
                             backend=backend)
               for task_id in sorted(predictions)]
    return EvaluationResult(results, tuple(iou_types))


def task_files(root: Union[str, Path], tasks: Sequence[int], split: str = "test") -> dict[int, Path]:
    """``{task_id: <root>/annotations/task_{k}_{split}.json}``."""
    return {t: Path(root) / "annotations" / f"task_{t}_{split}.json" for t in tasks}


# ----------------------------------------------------------------------------- helpers

def _mean_of_results(values: Sequence[float]) -> float:
    kept = [v for v in values if v != NO_RESULT]
    return float(np.mean(kept)) if kept else float("nan")


def _without_images(task_id: int, iou_types: Sequence[str]) -> TaskResult:
    """The result of a task none of whose images is evaluated: no AP (-1), undefined curves."""
    result = TaskResult(task_id, 0, 0, 0)
    undefined = np.full(_RECALL_POINTS, np.nan)
    for iou_type in iou_types:
        result.stats[iou_type] = [NO_RESULT] * 12
        result.ap[iou_type] = result.ap50[iou_type] = result.ap50_with_targets[iou_type] = NO_RESULT
        result.curves[iou_type] = PRCurve(np.linspace(0.0, 1.0, _RECALL_POINTS), undefined, undefined.copy())
    result.log = "".join(f"[task {task_id} {iou_type}]\nno image evaluated: no result\n" for iou_type in iou_types)
    return result


# The largest magnitude up to which every integer is a double (faster-coco-eval's image ids).
_EXACT_DOUBLE_INT = 2 ** 53


def _unsafe_annotation_ids(annotations) -> list:
    """The annotation ids COCOeval cannot match by: 0 (its "none"), negative or past 2**53."""
    return [a["id"] for a in annotations if not 1 <= a["id"] <= _EXACT_DOUBLE_INT]


def _run_cocoeval(backend: str, ground_truth: COCO, detections: COCO, iou_type: str, image_ids: Sequence[int]):
    """COCOeval of ``backend`` with the paper's parameters (catIds=[1], the given images, defaults
    otherwise), evaluated and accumulated (not summarized). Prints as pycocotools does."""
    if backend == "pycocotools":
        coco_eval = COCOeval(ground_truth, detections, iouType=iou_type)
    else:
        # pycocotools COCO objects as they are. separate_eval keeps the per-image records
        # (a K x A x I list, pycocotools' layout) for the "with targets" subset.
        coco_eval = _faster_cocoeval_class()(ground_truth, detections, iouType=iou_type, print_function=print,
                                             separate_eval=True)
        # Mask IoUs come from pycocotools' C code on the compressed RLE strings (see
        # _faster_cocoeval_class), so faster-coco-eval need not convert every mask to its own RLE.
        coco_eval.params.compute_rle = False
    coco_eval.params.catIds = [PREFERRED]
    coco_eval.params.imgIds = list(image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    return coco_eval


_FASTER_CLASS = None


def _faster_cocoeval_class():
    """faster-coco-eval's ``COCOeval_faster`` (C++ per-image matching and accumulation) whose
    mask IoU is pycocotools' own: per image and category, the detections in pycocotools' order
    (score descending, stable, at most maxDets[-1]) against the ground truth converted by
    ``COCO.annToRLE``, with the crowd flags, through ``pycocotools.mask.iou``, i.e. the matrix
    pycocotools' ``computeIoU`` returns. Boxes keep faster-coco-eval's box IoU."""
    global _FASTER_CLASS
    if _FASTER_CLASS is not None:
        return _FASTER_CLASS
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster
    from pycocotools import mask as mask_utils

    class PycocotoolsMaskIoU(COCOeval_faster):
        def computeIoU(self, imgId, catId):
            params = self.params
            if params.iouType != "segm":
                return super().computeIoU(imgId, catId)
            cats = [catId] if params.useCats else params.catIds
            gts = self.gt_dataset.get_instances([imgId], cats, bool(params.useCats))[0][0]
            dts = self.dt_dataset.get_instances([imgId], cats, bool(params.useCats))[0][0]
            if len(gts) == 0 or len(dts) == 0:
                return []
            order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:params.maxDets[-1]]
            detections = [dts[i]["segmentation"] for i in order]
            targets = [self.cocoGt.annToRLE(g) for g in gts]
            return mask_utils.iou(detections, targets, [int(g.get("iscrowd", 0)) for g in gts])

    _FASTER_CLASS = PycocotoolsMaskIoU
    return _FASTER_CLASS


# pycocotools' area / toBbox of a list build their output array with a uint8 length (numpy 2
# raises above 255 objects), so lists are encoded in chunks of this size.
_RLE_CHUNK = 200


def _results_coco(ground_truth: COCO, predictions: Mapping[int, ImagePredictions], iou_type: str,
                  image_ids: set) -> COCO:
    """The COCO object ``ground_truth.loadRes(detections_to_coco(...))`` builds, made with array
    operations: same records in the same order (ids 1..N), same ``area`` values (box w * h in
    float64; mask pixel count from pycocotools), ``iscrowd`` 0. Box results get no polygon
    ``segmentation`` and mask results no ``bbox`` (the evaluation of their IoU type never reads them)."""
    from pycocotools import mask as mask_utils

    annotations: list[dict] = []
    for image_id, pred in predictions.items():
        if image_id not in image_ids or len(pred.scores) == 0:
            continue
        scores = pred.scores.tolist()
        if iou_type == "bbox":
            xywh = np.asarray(pred.boxes, dtype=np.float64).copy()
            xywh[:, 2:] -= xywh[:, :2]
            areas = (xywh[:, 2] * xywh[:, 3]).tolist()
            for box, area, score in zip(xywh.tolist(), areas, scores):
                annotations.append({"image_id": image_id, "category_id": PREFERRED, "bbox": box, "score": score,
                                    "area": area, "iscrowd": 0})
        else:
            rles = list(pred.masks)
            areas = []
            for start in range(0, len(rles), _RLE_CHUNK):
                areas.extend(mask_utils.area(rles[start:start + _RLE_CHUNK]).tolist())
            for rle, area, score in zip(rles, areas, scores):
                annotations.append({"image_id": image_id, "category_id": PREFERRED, "segmentation": rle,
                                    "score": score, "area": area, "iscrowd": 0})
    for number, ann in enumerate(annotations, start=1):
        ann["id"] = number
    results = COCO()
    results.dataset = {"images": list(ground_truth.dataset["images"]),
                       "categories": copy.deepcopy(ground_truth.dataset["categories"]),
                       "annotations": annotations}
    if not annotations:  # as the empty COCO() the pycocotools path uses
        results.dataset = {}
    results.createIndex()
    return results


def _pr_precision(precision: np.ndarray) -> np.ndarray:
    """[T, R, K, A, M] -> [R] at IoU 0.5, the single category, area all, maxDets 100; -1 -> NaN."""
    curve = np.asarray(precision[0, :, 0, 0, -1], dtype=np.float64).copy()
    curve[curve < 0] = np.nan
    return curve


def _ap(curve: np.ndarray) -> float:
    valid = curve[~np.isnan(curve)]
    return float(valid.mean()) if valid.size else NO_RESULT


def _accumulate_subset(coco_eval, image_ids: Sequence[int]) -> Optional[np.ndarray]:
    """``eval["precision"]`` restricted to ``image_ids``, reusing the per-image records of
    ``coco_eval`` (pycocotools' ``evalImgs``, or faster-coco-eval's ``_evalImgs_cpp``; both are
    K x A x I lists)."""
    if not image_ids:
        return None
    params = coco_eval._paramsEval
    wanted = set(image_ids)
    keep = [i for i, image_id in enumerate(params.imgIds) if image_id in wanted]
    num_images, num_areas = len(params.imgIds), len(params.areaRng)
    num_cats = len(params.catIds) if params.useCats else 1
    sub_params = copy.deepcopy(params)
    sub_params.imgIds = [params.imgIds[i] for i in keep]
    native = getattr(coco_eval, "_evalImgs_cpp", None)
    records = coco_eval.evalImgs if native is None else native
    selected = [records[k * num_areas * num_images + a * num_images + i]
                for k in range(num_cats) for a in range(num_areas) for i in keep]
    if native is not None:
        import faster_coco_eval.faster_eval_api_cpp as faster_cpp

        return np.asarray(faster_cpp.COCOevalAccumulate(sub_params, selected)["precision"])
    sub = copy.copy(coco_eval)
    sub.params = sub_params
    sub._paramsEval = copy.deepcopy(sub_params)
    sub.evalImgs = selected
    with _prints_into(io.StringIO()):
        sub.accumulate()
    return sub.eval["precision"]
