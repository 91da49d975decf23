"""Predictions of a model on COCO-Tasks images: in memory and as a JSON file.

In memory a prediction set is ``{task_id: {image_id: ImagePredictions}}``. An image's entry
holds boxes ``[N, 4]`` (x0, y0, x1, y1 in original-image pixels), scores ``[N]`` and, for
segmentation models, N COCO compressed RLE masks at the original resolution.

File format (``.json``, or gzip-compressed when the name ends in ``.gz``)::

    {"format": "toist-predictions", "version": 1,
     "tasks": {"<task_id>": {"<image_id>": {"boxes": [[x0, y0, x1, y1], ...],
                                            "scores": [s, ...],
                                            "masks": [{"size": [h, w], "counts": "<rle>"}, ...]}}}}

``masks`` is omitted (or null) for box-only predictions. Scores and box coordinates must be
finite and every mask a valid compressed RLE of its ``size`` (:func:`check_image_predictions`):
saving, loading and evaluating refuse NaN / inf and counts that are not a mask of that size.
Errors name the file, task, image and field. An optional ``"phrases": {"<task_id>": "<verb
phrase>"}`` records the tasks' phrases of the model that predicted (its own vocabulary may not
be COCO-Tasks'), so that the tables and plots of a re-scored file name the tasks as the run did.
"""

from __future__ import annotations

import gzip
import itertools
import json
import operator
import re
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils

from toist_core.data.rle import first_bad_counts
from toist_core.data.schema import COCOEVAL_MAX_AREA, NUMBER_TYPES, DataError
from toist_core.atomic_file import atomic_write

FORMAT_NAME = "toist-predictions"
FORMAT_VERSION = 1

RLE = dict  # {"size": [h, w], "counts": str}
_MASK_FORMAT = "{'size': [h, w], 'counts': str}"


@dataclass
class ImagePredictions:
    """Detections of one image: ``boxes [N, 4]`` xyxy pixels (float64), ``scores [N]``, optional RLE masks."""

    boxes: np.ndarray
    scores: np.ndarray
    masks: Optional[list[RLE]] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")
        if self.masks is not None and len(self.masks) != len(self.scores):
            raise ValueError(f"{len(self.masks)} masks but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_arrays(cls, boxes, scores, masks=None) -> "ImagePredictions":
        """From array-likes (numpy or torch): masks ``[N, H, W]`` bool are RLE-encoded here."""
        boxes, scores = _numpy(boxes), _numpy(scores)
        if masks is None or (isinstance(masks, list) and (not masks or isinstance(masks[0], dict))):
            return cls(boxes, scores, masks)
        pred = cls(boxes, scores, encode_masks(_numpy(masks)))
        # pycocotools' encoder wrote these counts: valid for their sizes by construction, so an
        # evaluation need not decode them again (training evaluates ~100 masks an image).
        _remember_valid(pred, *_mask_fields(pred.masks, "encoded masks"))
        return pred


PredictionSet = dict[int, dict[int, ImagePredictions]]  # task id -> image id -> predictions


@dataclass
class PredictionFile:
    """A predictions file's content: the predictions and, when it records them, the task phrases."""

    tasks: PredictionSet
    phrases: Optional[dict[int, str]] = None


def check_image_predictions(pred: ImagePredictions, where: str,
                            image_size: Optional[tuple[int, int]] = None, check_masks: bool = True) -> None:
    """Refuse what pycocotools would take silently: :class:`DataError` ``"<where>: scores[2] is nan"``.

    A NaN score ranks last and a NaN / inf box matches nothing, so the AP would look normal;
    a mask whose RLE size is not the image's gets IoU -1 (no match), and one whose counts are
    not a mask of its size makes pycocotools read past the string or loop for ever
    (:mod:`toist_core.data.rle`). ``where`` names the task and image (and file); masks are
    checked against ``image_size`` = (height, width) when given, and not at all without
    ``check_masks`` (a box evaluation never reads them).
    """
    for name, values in (("scores", pred.scores), ("boxes", pred.boxes)):
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            k = int(bad[0][0])
            raise DataError(f"{where}: {name}[{k}] is {values[k].tolist()}")
    # An inverted box has a negative area, outside COCOeval's area range: it would be ignored
    # instead of counted as a false positive (AP goes up). xywh boxes written as xyxy show so too.
    inverted = np.argwhere((pred.boxes[:, 2] < pred.boxes[:, 0]) | (pred.boxes[:, 3] < pred.boxes[:, 1])) \
        if len(pred.boxes) else []
    if len(inverted):
        k = int(inverted[0][0])
        raise DataError(f"{where}: boxes[{k}] is {pred.boxes[k].tolist()}: x1 < x0 or y1 < y0 (boxes are "
                        "x0, y0, x1, y1 in pixels)")
    # So is a box above COCOeval's largest area, 1e10 px^2 (coordinates in other units, a huge
    # finite value): one wrong false positive per image raised the AP from 12.6 to 25.1.
    areas = (pred.boxes[:, 2].astype(np.float64) - pred.boxes[:, 0]) * (pred.boxes[:, 3].astype(np.float64)
                                                                         - pred.boxes[:, 1]) \
        if len(pred.boxes) else np.zeros(0)
    huge = np.argwhere(~(areas <= COCOEVAL_MAX_AREA))
    if len(huge):
        k = int(huge[0][0])
        raise DataError(f"{where}: boxes[{k}] is {pred.boxes[k].tolist()}: an area of {areas[k]:.3g} px^2, above "
                        f"COCOeval's largest ({COCOEVAL_MAX_AREA:.0e}), where a detection is ignored, not counted "
                        "(boxes are x0, y0, x1, y1 in pixels)")
    if pred.masks is not None and check_masks:
        _check_masks(pred, where, image_size)


def _check_masks(pred: ImagePredictions, where: str, image_size: Optional[tuple[int, int]]) -> None:
    """Each mask ``{"size": [h, w], "counts": str}`` (bytes in memory), of the image's size when
    given, its counts a compressed RLE of exactly h * w pixels (all masks decoded in one pass).

    An image's masks are checked when read (or predicted) and again when evaluated. Strings are
    immutable, so the very string objects found valid at the same sizes, or encoded by
    :meth:`ImagePredictions.from_arrays`, are not decoded again (``pred._valid_rle``); any other
    string is."""
    sizes, counts = _mask_fields(pred.masks, where)
    if image_size is not None:
        expected = [int(v) for v in image_size]
        wrong = [k for k, size in enumerate(sizes) if size != expected]
        if wrong:
            raise DataError(f"{where}: masks[{wrong[0]}] has size {sizes[wrong[0]]}, "
                            f"the image is {expected} (height, width)")
    valid = getattr(pred, "_valid_rle", None)
    if (valid is not None and valid[1] == list(map(tuple, sizes)) and len(valid[0]) == len(counts)
            and all(map(operator.is_, counts, valid[0]))):
        return
    found = first_bad_counts(counts, [h * w for h, w in sizes])
    if found is not None:
        k, problem = found
        raise DataError(f"{where}: masks[{k}] (size {sizes[k]}): {problem}")
    _remember_valid(pred, sizes, counts)


def _remember_valid(pred: ImagePredictions, sizes: list[list[int]], counts: list) -> None:
    """Record that these very count strings are valid RLEs at these sizes (a copy of the sizes:
    a size list changed in place must not match)."""
    pred._valid_rle = (counts, list(map(tuple, sizes)))


def _mask_fields(masks: Sequence[Any], where: str) -> tuple[list[list[int]], list]:
    """The masks' sizes as ``[h, w]`` int lists and their counts; :class:`DataError` naming the
    first mask that is not ``{"size": [h, w], "counts": str}`` (h, w non-negative integers: what
    the file format holds, so that saving refuses what loading would). C-speed passes for the
    usual masks (lists of Python ints); the others get a look each."""
    try:
        sizes = [m["size"] for m in masks]
        counts = [m["counts"] for m in masks]
    except (TypeError, KeyError, IndexError):
        sizes = counts = None
    if (sizes is not None and set(map(type, counts)) <= {str, bytes} and set(map(type, sizes)) <= {list}
            and set(map(len, sizes)) <= {2}):
        values = [v for size in sizes for v in size]
        if set(map(type, values)) <= {int} and min(values, default=0) >= 0:
            return sizes, counts
    for k, m in enumerate(masks):
        if not _is_mask(m):
            shown = {key: m[key] for key in ("size", "counts") if key in m} if isinstance(m, dict) else m
            raise DataError(f"{where}: field 'masks[{k}]': expected {_MASK_FORMAT} (h, w non-negative "
                            f"integers, a compressed RLE string), got {_short(shown)}")
    return [[int(v) for v in m["size"]] for m in masks], [m["counts"] for m in masks]


def _is_mask(m: Any) -> bool:
    if not isinstance(m, dict) or type(m.get("counts")) not in (str, bytes):
        return False
    size = m.get("size")
    return type(size) in (list, tuple) and len(size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def encode_masks(masks: np.ndarray) -> list[RLE]:
    """``[N, H, W]`` bool/uint8 -> N compressed RLEs with string counts (JSON-ready)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# ----------------------------------------------------------------------------- file I/O

def save_predictions(path: Union[str, Path], predictions: PredictionSet,
                     phrases: Optional[dict[int, str]] = None) -> Path:
    """Write ``predictions`` to ``path`` (gzip when it ends in ``.gz``), atomically, with the
    ``phrases`` of their tasks when given (those of tasks without predictions are left out).

    Every entry is checked and serialized before the disk is touched: a refused set leaves no
    file behind and an existing file at ``path`` unchanged; so does a write cut short.
    """
    path = Path(path)
    tasks: dict[str, Any] = {}
    for task_id, images in sorted(predictions.items()):
        task_out = {}
        for image_id, pred in sorted(images.items()):
            check_image_predictions(pred, f"task {task_id}: image {image_id}")
            # Unrounded (float repr round-trips): re-scoring the file gives the run's numbers.
            entry: dict[str, Any] = {"boxes": pred.boxes.tolist(),
                                     "scores": [float(s) for s in pred.scores]}
            if pred.masks is not None:  # checked above: the file holds what loading accepts
                entry["masks"] = [{"size": [int(v) for v in m["size"]], "counts": _counts_str(m["counts"])}
                                  for m in pred.masks]
            task_out[str(image_id)] = entry
        tasks[str(task_id)] = task_out
    content: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tasks": tasks}
    if phrases is not None:
        content["phrases"] = {str(task_id): str(phrases[task_id]) for task_id in sorted(predictions)
                              if task_id in phrases}
    # ensure_ascii (the default): a phrase's non-ASCII letters are written as \u escapes.
    data = json.dumps(content, separators=(",", ":")).encode("ascii")
    if path.suffix == ".gz":
        def write(handle):
            with gzip.GzipFile(filename=path.name, mode="wb", fileobj=handle) as compressed:
                compressed.write(data)
    else:
        def write(handle):
            handle.write(data)
    return atomic_write(path, write)


def load_predictions(path: Union[str, Path]) -> PredictionSet:
    """Read a predictions file written by :func:`save_predictions`, validating every field."""
    return load_prediction_file(path).tasks


def is_prediction_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` starts as :func:`save_predictions` writes a file (its first bytes only)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            head = handle.read(64)
    except (OSError, EOFError, zlib.error):   # zlib.error: a damaged gzip stream
        return False
    return head.startswith(b'{"format":"' + FORMAT_NAME.encode() + b'"')


def load_prediction_file(path: Union[str, Path]) -> PredictionFile:
    """:func:`load_predictions`, with the task phrases the file records (None: it has none)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="ascii") as handle:
                data = json.load(handle, object_pairs_hook=_refuse_duplicate_keys)
        else:
            with open(path, "rb") as handle:
                data = json.load(handle, object_pairs_hook=_refuse_duplicate_keys)
    except FileNotFoundError:
        raise DataError(f"{path}: predictions file not found") from None
    except (json.JSONDecodeError, _DuplicateKey, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a valid predictions JSON file: {exc}") from None
    except (EOFError, zlib.error) as exc:   # a gzip file cut short, or damaged
        raise DataError(f"{path}: not a valid predictions file: damaged gzip data ({exc})") from None
    except RecursionError:
        raise DataError(f"{path}: not a valid predictions JSON file: nested too deeply to read") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise DataError(f"{path}: not a valid predictions JSON file: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: field 'format': expected {FORMAT_NAME!r}")
    if data.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: field 'version': expected {FORMAT_VERSION}, got {data.get('version')!r}")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        raise DataError(f"{path}: field 'tasks': expected an object task id -> images")
    result: PredictionSet = {}
    for task_key, images in tasks.items():
        task_id = _int_key(path, f"tasks.{task_key}", task_key)
        if task_id < 1:
            raise DataError(f"{path}: tasks.{task_key}: a task id is a positive integer, got {task_key!r}")
        if task_id in result:
            raise DataError(f"{path}: tasks: task {task_id} appears twice (key {task_key!r})")
        if not isinstance(images, dict):
            raise DataError(f"{path}: task {task_key}: expected an object image id -> predictions")
        result[task_id] = {}
        for image_key, entry in images.items():
            image_id = _int_key(path, f"task {task_key}: image {image_key}", image_key)
            if image_id in result[task_id]:  # "02000000" beside "2000000": one would replace the other
                raise DataError(f"{path}: task {task_key}: image {image_id} appears twice (key {image_key!r})")
            result[task_id][image_id] = _entry(path, f"task {task_key}: image {image_key}", entry)
    return PredictionFile(_no_detection_no_masks(result), _phrases(path, data.get("phrases")))


def _no_detection_no_masks(predictions: PredictionSet) -> PredictionSet:
    """In a file with masks, an image without detections may say ``"masks": null`` (nothing to
    give): it has no masks, ``[]``, rather than being a box-only image among mask images."""
    if not any(pred.masks is not None for images in predictions.values() for pred in images.values()):
        return predictions
    return {task: {image: replace(pred, masks=[]) if pred.masks is None and len(pred.scores) == 0
                   else pred for image, pred in images.items()} for task, images in predictions.items()}


def _phrases(path: Path, phrases: Any) -> Optional[dict[int, str]]:
    if phrases is None:
        return None
    if not isinstance(phrases, dict):
        raise DataError(f"{path}: field 'phrases': expected an object task id -> verb phrase")
    result = {}
    for key, phrase in phrases.items():
        task_id = _int_key(path, f"phrases.{key}", key)
        if not isinstance(phrase, str):
            raise DataError(f"{path}: field 'phrases.{key}': expected a string, got {phrase!r}")
        result[task_id] = phrase
    return result


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list) -> dict:
    """``json`` keeps the last of two equal keys: the first image's predictions would vanish."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


_INTEGER_KEY = re.compile(r"-?[0-9]+")


def _int_key(path: Path, where: str, key: str) -> int:
    # ASCII digits only: Python's int() also reads "2000_000", " 7" and other scripts' digits,
    # which no writer of ids means.
    if not _INTEGER_KEY.fullmatch(key):
        raise DataError(f"{path}: {where}: key must be an integer id, got {key!r}")
    return int(key)


def _entry(path: Path, where: str, entry: Any) -> ImagePredictions:
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where}: expected an object with 'boxes' and 'scores'")
    for name in ("boxes", "scores"):
        if name not in entry:
            raise DataError(f"{path}: {where}: missing field {name!r}")
    boxes = _numbers(path, where, "boxes", entry["boxes"], rows=True)
    scores = _numbers(path, where, "scores", entry["scores"], rows=False)
    if boxes.shape != (0,) and (boxes.ndim != 2 or boxes.shape[1] != 4):   # no box: [], not [[]]
        raise DataError(f"{path}: {where}: field 'boxes': expected [N, 4], got shape {boxes.shape}")
    if scores.ndim != 1 or len(scores) != len(boxes.reshape(-1, 4)):
        raise DataError(f"{path}: {where}: field 'scores': expected {len(boxes.reshape(-1, 4))} "
                        f"scores, got shape {scores.shape}")
    masks = entry.get("masks")
    if masks is not None and (not isinstance(masks, list) or len(masks) != len(scores)):
        raise DataError(f"{path}: {where}: field 'masks': expected a list of {len(scores)} RLEs")
    pred = ImagePredictions(boxes, scores, masks)
    # json reads NaN / Infinity tokens; masks: their fields and RLE counts against their size.
    check_image_predictions(pred, f"{path}: {where}")
    return pred


def _numbers(path: Path, where: str, name: str, value: Any, rows: bool) -> np.ndarray:
    """Field ``name``: a list of numbers (``rows``: of lists of numbers) as float64. numpy would
    read true as 1.0, "0.9" as 0.9 and null as NaN: refused, naming the first such value, as
    is an integer too large for a float. (Types are gathered per list, not per value in Python:
    a COCO-Tasks-sized file holds millions.)"""
    if type(value) is not list or (rows and not {list}.issuperset(map(type, value))):
        shape = "a list of [x1, y1, x2, y2] lists" if rows else "a list of numbers"
        raise DataError(f"{path}: {where}: field {name!r}: expected {shape}, got {_short(value)}")
    flat = list(itertools.chain.from_iterable(value)) if rows else value
    if not NUMBER_TYPES.issuperset(map(type, flat)):
        bad = next(v for v in flat if type(v) not in NUMBER_TYPES)
        raise DataError(f"{path}: {where}: field {name!r}: expected numbers, got {_short(bad)}")
    try:
        return np.asarray(value, dtype=np.float64)
    except OverflowError:
        bad = next(v for v in flat if type(v) is int and abs(v) > sys.float_info.max)
        raise DataError(f"{path}: {where}: field {name!r}: {_short(bad)} is too large for a number") from None
    except ValueError:  # rows of different lengths: the shape check below says which
        return np.asarray(value, dtype=object)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _counts_str(counts: Union[str, bytes]) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def merge_prediction_sets(sets: Sequence[PredictionSet]) -> PredictionSet:
    """Union of prediction sets (e.g. per-process shards); a (task, image) given twice is an error."""
    merged: PredictionSet = {}
    for pred_set in sets:
        for task_id, images in pred_set.items():
            bucket = merged.setdefault(task_id, {})
            for image_id, pred in images.items():
                if image_id in bucket:
                    raise ValueError(f"task {task_id}: image {image_id} predicted twice")
                bucket[image_id] = pred
    return merged
