"""Synthetic COCO-Tasks: images and ``task_{k}_{split}.json`` files in the exact real schema.

Each image shows a few objects of 14 classes mapped to real COCO categories (so noun
captions are real words: "sit comfortably on couch"). A class has its own convex shape,
colour and texture; instances vary in size, aspect, rotation and colour, and later objects
occlude earlier ones. The segmentation of an object is the exact polygon geometry of its
*visible* part (its shape minus the shapes drawn over it, as convex pieces), so a mask
rasterised from the annotation matches the drawn pixels up to pixel-boundary rounding.

Each task ranks a few classes (``TASK_PREFERENCES``, loosely modelled on COCO-Tasks: a couch
before a chair to sit on); in an image the preferred objects (``category_id = 1``) are all
instances of the best-ranked class present, the other objects are listed with
``category_id = 0``, and an image without any ranked class has no preferred object.

Layout (the real one): ``<root>/annotations/task_{k}_{split}.json``,
``<root>/images/train2014/COCO_train2014_<id:012d>.jpg`` (train) and
``<root>/images/val2014/COCO_val2014_<id:012d>.jpg`` (test). Every split has one pool of
images that all task files of that split share (like COCO images shared by tasks); image and
annotation ids are unique over the whole generated set and an object keeps its id across
tasks. Everything is a deterministic function of ``seed`` (an image depends only on seed,
split and index, so generating fewer tasks or splits yields the same images).

:func:`generate` refuses a root holding task files or a ``synth.json`` it did not write (its
task files start with ``{"info":"COCO-Tasks Dataset. (synthetic: toist synth)"``, its
``synth.json`` records the seed, the classes and the preferences) unless told to overwrite;
every JSON file is written to a temporary name and renamed into place. ``synth.json`` also
records, per split, the settings that drew its images (:data:`DRAWING_SETTINGS`): a run that
redraws a split with other settings refuses to leave synth's task files of that split's other
tasks behind (they would describe the old images), and removes them when told to overwrite.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from toist_core.atomic_file import write_text_atomic
from toist_core.listing import listing
from toist_core.data.schema import PREFERENCE_CATEGORIES, DataError, parse_task_file_name, written_by
from toist_core.tasks import NUM_TASKS

SPLIT_FOLDERS = {"train": "train2014", "test": "val2014"}
_SPLIT_CODES = {"train": 0, "test": 1}
_ID_STRIDE = 1_000_000        # image id = (split code + 1) * stride + index
_MAX_OBJECTS = 99             # annotation id = image id * 100 + object index
_MAX_SIDE = 4096              # pixels: synthetic scenes need no more (a typo of 100000 ran out of memory)
_MIN_VISIBLE_FRACTION = 0.35  # objects hidden more than this are left out
SYNTH_INFO = "COCO-Tasks Dataset. (synthetic: toist synth)"  # "info" of every task file synth writes
# How a task file synth wrote begins (its first key, compact separators): checked without
# parsing, since a real task file that must not be overwritten is 23 MB.
_TASK_FILE_START = json.dumps({"info": SYNTH_INFO}, separators=(",", ":"))[:-1].encode()
_META_NAME = "synth.json"
_META_KEYS = frozenset(("seed", "classes", "task_preferences"))  # what every synth.json records
# The arguments an image depends on (with its split and index): a split's task files describe
# its images only if they were written with the same values (synth.json's "splits" records them).
DRAWING_SETTINGS = ("seed", "min_size", "max_size", "min_objects", "max_objects")


@dataclass(frozen=True)
class SynthClass:
    """How instances of one COCO class are drawn."""

    coco_id: int
    name: str
    shape: str                       # rectangle | trapezoid | triangle | hexagon | ellipse | half_disc | diamond | pentagon
    aspect: float                    # width / height of the shape's box before rotation
    colour: tuple[int, int, int]     # RGB
    texture: str                     # solid | stripes | checker | dots


SYNTH_CLASSES: tuple[SynthClass, ...] = (
    SynthClass(63, "couch", "rectangle", 2.0, (190, 40, 40), "solid"),
    SynthClass(62, "chair", "trapezoid", 0.9, (140, 90, 40), "stripes"),
    SynthClass(15, "bench", "rectangle", 3.2, (40, 120, 40), "checker"),
    SynthClass(86, "vase", "hexagon", 0.6, (60, 60, 200), "solid"),
    SynthClass(44, "bottle", "rectangle", 0.35, (30, 170, 70), "stripes"),
    SynthClass(47, "cup", "trapezoid", 0.8, (235, 235, 235), "dots"),
    SynthClass(51, "bowl", "half_disc", 2.0, (235, 160, 40), "solid"),
    SynthClass(46, "wine glass", "triangle", 0.7, (170, 215, 250), "stripes"),
    SynthClass(48, "fork", "rectangle", 0.18, (150, 150, 160), "checker"),
    SynthClass(50, "spoon", "ellipse", 0.45, (215, 205, 60), "solid"),
    SynthClass(49, "knife", "triangle", 0.2, (90, 90, 110), "solid"),
    SynthClass(87, "scissors", "diamond", 0.8, (215, 60, 160), "dots"),
    SynthClass(84, "book", "rectangle", 0.75, (40, 40, 140), "stripes"),
    SynthClass(39, "baseball bat", "pentagon", 0.3, (185, 135, 75), "checker"),
)

# Task id -> classes suitable for the task, best first. Unlisted classes are never preferred.
TASK_PREFERENCES: dict[int, tuple[str, ...]] = {
    1: ("chair", "bench", "couch"),                    # step on
    2: ("couch", "chair", "bench"),                    # sit comfortably on
    3: ("vase", "bottle", "cup"),                      # place flowers in
    4: ("fork", "spoon", "knife"),                     # get potatoes out of fire with
    5: ("bottle", "cup", "bowl"),                      # water plant with
    6: ("spoon", "fork", "knife"),                     # get lemon out of tea with
    7: ("spoon", "knife", "fork"),                     # dig hole with
    8: ("knife", "scissors", "fork"),                  # open bottle of beer with
    9: ("scissors", "knife", "fork"),                  # open parcel with
    10: ("wine glass", "cup", "bowl"),                 # serve wine with
    11: ("spoon", "cup", "bowl"),                      # pour sugar with
    12: ("knife", "spoon", "fork"),                    # smear butter with
    13: ("bottle", "bowl", "vase"),                    # extinguish fire with
    14: ("baseball bat", "book", "chair"),             # pound carpet with
}


@dataclass(frozen=True)
class SynthObject:
    """One drawn object: its class and the convex pieces of its visible region."""

    class_index: int
    pieces: tuple[np.ndarray, ...]   # each [k, 2] float (x, y) vertices, counter-clockwise


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    annotation_files: list[Path] = field(default_factory=list)
    num_images: dict[str, int] = field(default_factory=dict)             # per split (pool size)
    images_with_preferred: dict[tuple[int, str], int] = field(default_factory=dict)
    num_preferred: dict[tuple[int, str], int] = field(default_factory=dict)


def preferred_class_indices(task_id: int, class_indices: Sequence[int]) -> set[int]:
    """Classes whose instances are preferred for ``task_id`` among objects of ``class_indices``
    (the best-ranked class present, or none)."""
    present = {SYNTH_CLASSES[i].name for i in class_indices}
    for name in TASK_PREFERENCES[task_id]:
        if name in present:
            return {i for i, c in enumerate(SYNTH_CLASSES) if c.name == name}
    return set()


def generate(root: Union[str, Path], tasks: Iterable[int] = range(1, NUM_TASKS + 1),
             splits: Sequence[str] = ("train", "test"), images_per_split: int = 24,
             images_per_task: Optional[int] = None, empty_fraction: Optional[float] = None, seed: int = 0,
             min_size: int = 160, max_size: int = 320, min_objects: int = 1, max_objects: int = 5,
             image_format: str = "jpg", overwrite: bool = False) -> SynthSummary:
    """Write a synthetic COCO-Tasks tree under ``root``.

    Args:
        tasks: task ids to write files for.
        splits: any of "train", "test".
        images_per_split: size of each split's shared image pool.
        images_per_task: images listed per task file (a seeded subset of the pool); None = all.
        empty_fraction: None = a task file lists every pool image (most then have no preferred
            object: a task ranks 3 of 14 classes); a value f in [0, 1) lists every image with a
            preferred object plus a seeded share of the others, so that about f of the file's
            images have none (COCO-Tasks images were chosen to show task-relevant objects).
        min_size, max_size: image height and width are drawn in this range (pixels).
        min_objects, max_objects: objects drawn per image (before hidden ones are dropped).
        image_format: "jpg" (quality 95, the real file names) or "png" (lossless).
        overwrite: write even into a root holding task files or a ``synth.json`` that synth did
            not write (otherwise :class:`FileExistsError` naming them, before anything is
            written), and remove synth's own task files of a redrawn split that this run does not
            rewrite (otherwise :class:`FileExistsError`, see :func:`stale_task_files`). A root of
            synth's own files drawn with the same settings is always rewritten (e.g. to add a
            split or a task).
    """
    tasks = sorted(set(int(t) for t in tasks))
    for task in tasks:
        if task not in TASK_PREFERENCES:
            raise ValueError(f"tasks: {task} is not a COCO-Tasks task id (1..{NUM_TASKS})")
    for split in splits:
        if split not in _SPLIT_CODES:
            raise ValueError(f"splits: unknown split {split!r}; expected 'train' or 'test'")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 0 < images_per_split < _ID_STRIDE:
        raise ValueError(f"images_per_split must be in 1..{_ID_STRIDE - 1}, got {images_per_split}")
    if not 1 <= min_objects <= max_objects <= _MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}")
    if empty_fraction is not None and not 0.0 <= empty_fraction < 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1), got {empty_fraction}")
    if not 16 <= min_size <= max_size <= _MAX_SIDE:
        raise ValueError(f"need 16 <= min_size <= max_size <= {_MAX_SIDE}, got {min_size}, {max_size}")
    if images_per_task is not None and not 1 <= images_per_task:
        raise ValueError(f"images_per_task must be >= 1 (or None: every image of the pool), got {images_per_task}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in 0..2**32-1 (numpy's seed range), got {seed}")

    root = Path(root)
    if not overwrite:
        _check_foreign_files(root)
    drawing = dict(seed=seed, min_size=min_size, max_size=max_size, min_objects=min_objects, max_objects=max_objects)
    stale = stale_task_files(root, tasks, splits, drawing)
    if stale and not overwrite:
        raise FileExistsError(
            f"{root}: {listing(stale)} were written with other (or unrecorded) drawing settings than this run's "
            f"({_settings_text(drawing)}), and the images of their split are redrawn now: they would describe images "
            "that are no longer there. Generate those tasks too (--tasks), choose another folder, or pass "
            "--overwrite (overwrite=True) to remove them")
    recorded = _recorded_splits(root)
    for path in stale:  # overwrite: synth's own files that no longer match the images
        path.unlink()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    meta = {"seed": seed, "images_per_split": images_per_split, "images_per_task": images_per_task,
            "empty_fraction": empty_fraction,
            "classes": [{"coco_id": c.coco_id, "name": c.name, "shape": c.shape,
                         "colour": list(c.colour), "texture": c.texture} for c in SYNTH_CLASSES],
            "task_preferences": {str(k): list(v) for k, v in TASK_PREFERENCES.items()}}
    summary = SynthSummary(root)
    for split in splits:
        before = recorded.get(split)
        if before is None or any(before.get(key) != drawing[key] for key in DRAWING_SETTINGS):
            # Unrecorded while it is redrawn otherwise: a run cut short leaves its other tasks'
            # files described as drawn by an unknown run (refused as stale), not by the run before.
            # (Drawn as before, its images come out the same: the record stands.)
            recorded.pop(split, None)
            _write_meta(root, meta, recorded)
        folder = SPLIT_FOLDERS[split]
        image_dir = root / "images" / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        pool = []
        for index in range(images_per_split):
            image_id = (_SPLIT_CODES[split] + 1) * _ID_STRIDE + index
            file_name = f"COCO_{folder}_{image_id:012d}.{image_format}"
            pixels, objects = scene(split, index, seed, min_size, max_size, min_objects, max_objects)
            _write_image(image_dir / file_name, pixels, image_format)
            record = {"id": image_id, "file_name": file_name,
                      "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}
            pool.append((record, _annotations(image_id, objects, pixels.shape[:2])))
        summary.num_images[split] = len(pool)
        for task in tasks:
            path, with_preferred, preferred = _write_task_file(root, task, split, pool, images_per_task,
                                                               empty_fraction, seed)
            summary.annotation_files.append(path)
            summary.images_with_preferred[(task, split)] = with_preferred
            summary.num_preferred[(task, split)] = preferred
        # (splits this run does not draw keep their record, if synth wrote the previous synth.json)
        recorded[split] = dict(drawing, images_per_split=images_per_split, image_format=image_format)
        _write_meta(root, meta, recorded)
    return summary


def _write_meta(root: Path, meta: dict, recorded: dict[str, dict]) -> None:
    """``synth.json``: the run's settings and how each split now on disk was drawn."""
    write_text_atomic(root / _META_NAME, json.dumps({**meta, "splits": {split: recorded[split]
                                                                       for split in sorted(recorded)}}, indent=1))


def stale_task_files(root: Union[str, Path], tasks: Iterable[int], splits: Sequence[str],
                     drawing: dict) -> list[Path]:
    """synth's own task files under ``root`` that a run writing ``tasks`` of ``splits`` with the
    :data:`DRAWING_SETTINGS` ``drawing`` would leave describing redrawn images: those of the
    other tasks of a split that ``synth.json`` records as drawn with other values, or does not
    record (a ``synth.json`` of an older toist, or none). A run that rewrites every task file of
    a split, or draws it as before, leaves none. Files synth did not write are not listed."""
    root, tasks = Path(root), set(tasks)
    recorded = _recorded_splits(root)
    stale = []
    for split in splits:
        before = recorded.get(split)
        if before is not None and all(before.get(key) == drawing[key] for key in DRAWING_SETTINGS):
            continue
        for path in sorted((root / "annotations").glob(f"task_*_{split}.json")):
            try:
                task, file_split = parse_task_file_name(path)
            except DataError:  # not a task file name: not synth's
                continue
            if file_split == split and task not in tasks and _synth_task_file(path):
                stale.append(path)
    return stale


def _recorded_splits(root: Path) -> dict[str, dict]:
    """synth.json's per-split settings ({} when synth did not write it, or an older synth did)."""
    meta = root / _META_NAME
    if not _synth_meta(meta):
        return {}
    splits = json.loads(meta.read_text(encoding="utf-8")).get("splits")
    return {k: v for k, v in splits.items() if isinstance(v, dict)} if isinstance(splits, dict) else {}


def _settings_text(drawing: dict) -> str:
    return ", ".join(f"{key} {drawing[key]}" for key in DRAWING_SETTINGS)


def _check_foreign_files(root: Path) -> None:
    """FileExistsError naming the task files and ``synth.json`` under ``root`` that synth did
    not write (they would be overwritten, or mixed with synthetic ones)."""
    foreign = [path for path in sorted((root / "annotations").glob("task_*.json")) if not _synth_task_file(path)]
    meta = root / _META_NAME
    if meta.exists() and not _synth_meta(meta):
        foreign.append(meta)
    if foreign:
        raise FileExistsError(f"{root}: holds files toist synth did not write: {listing(foreign)}; refusing to "
                              "overwrite them. Choose another folder, or pass --overwrite (overwrite=True) to write "
                              "anyway")


def _synth_task_file(path: Path) -> bool:
    return written_by(path, _TASK_FILE_START)


def _synth_meta(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and _META_KEYS <= meta.keys()


# ----------------------------------------------------------------------------- files

def _write_image(path: Path, rgb: np.ndarray, image_format: str) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    # Encoded here and written by Python: OpenCV's own file writer crashes the process on a
    # folder name that is not UTF-8.
    ok, encoded = cv2.imencode(f".{image_format}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"{path}: could not encode the image as {image_format}")
    # Renamed in whole: a run cut short mid-write left a cut-off image that task files still named.
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(encoded.tobytes())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _annotations(image_id: int, objects: Sequence[SynthObject], hw: tuple[int, int]) -> list[dict]:
    """COCO records of an image's objects (``category_id`` is filled per task)."""
    height, width = hw
    records = []
    for k, obj in enumerate(objects):
        polygons = _coco_polygons(obj)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        xs = np.concatenate([p[:, 0] for p in obj.pieces])
        ys = np.concatenate([p[:, 1] for p in obj.pieces])
        x0, y0 = round(float(xs.min()), 2), round(float(ys.min()), 2)
        records.append({
            "id": image_id * 100 + k,
            "image_id": image_id,
            "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
            "segmentation": polygons,
            "area": float(mask_utils.area(rle)),
            "iscrowd": 0,
            "COCO_category_id": SYNTH_CLASSES[obj.class_index].coco_id,
            "category_id": 0,
            "_class_index": obj.class_index,
        })
    return records


def _write_task_file(root: Path, task: int, split: str, pool: list, images_per_task: Optional[int],
                     empty_fraction: Optional[float], seed: int) -> tuple[Path, int, int]:
    entries = pool
    if empty_fraction is not None:
        entries = _with_empty_fraction(pool, task, empty_fraction,
                                       np.random.default_rng([seed, 11, task, _SPLIT_CODES[split]]))
    if images_per_task is not None and images_per_task < len(entries):
        rng = np.random.default_rng([seed, 7, task, _SPLIT_CODES[split]])
        chosen = np.sort(rng.choice(len(entries), size=images_per_task, replace=False))
        entries = [entries[i] for i in chosen]
    images, annotations = [], []
    with_preferred = num_preferred = 0
    for record, anns in entries:
        images.append(dict(record))
        best = preferred_class_indices(task, [a["_class_index"] for a in anns])
        hits = 0
        for ann in anns:
            out = {k: v for k, v in ann.items() if k != "_class_index"}
            out["category_id"] = int(ann["_class_index"] in best)
            hits += out["category_id"]
            annotations.append(out)
        with_preferred += hits > 0
        num_preferred += hits
    data = {"info": SYNTH_INFO, "images": images, "annotations": annotations,
            "categories": [dict(c) for c in PREFERENCE_CATEGORIES]}
    path = root / "annotations" / f"task_{task}_{split}.json"
    if not images:   # (a dataset of it has no sample: nothing to train or score)
        warnings.warn(f"{path}: lists no image: none of the {len(pool)} images of the {split} split shows a "
                      f"preferred object of task {task}, and empty_fraction keeps images without one only beside "
                      "those; draw more images (images_per_split)", stacklevel=3)
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))
    return path, with_preferred, num_preferred


def _with_empty_fraction(pool: list, task: int, fraction: float, rng: np.random.Generator) -> list:
    """Pool entries with a preferred object for ``task``, plus about ``fraction`` of entries
    without (pool order kept)."""
    has = [bool(preferred_class_indices(task, [a["_class_index"] for a in anns])) for _, anns in pool]
    empty = [i for i, h in enumerate(has) if not h]
    wanted = min(len(empty), int(round(fraction / (1.0 - fraction) * (len(pool) - len(empty)))))
    keep = set(i for i, h in enumerate(has) if h) | set(rng.choice(empty, size=wanted, replace=False).tolist())
    return [entry for i, entry in enumerate(pool) if i in keep]


# ----------------------------------------------------------------------------- drawing

def scene(split: str, index: int, seed: int = 0, min_size: int = 160, max_size: int = 320, min_objects: int = 1,
          max_objects: int = 5) -> tuple[np.ndarray, list[SynthObject]]:
    """Image ``index`` of ``split`` as :func:`generate` draws it with the same arguments:
    ``[H, W, 3]`` uint8 RGB and its visible objects (e.g. the held-out scenes of the demo)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split: unknown split {split!r}; expected 'train' or 'test'")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    return render_image(rng, min_size, max_size, min_objects, max_objects)


def object_box(obj: SynthObject) -> tuple[float, float, float, float]:
    """Box ``(x0, y0, x1, y1)`` of an object's visible part, in pixels (as its annotation)."""
    points = np.concatenate(obj.pieces)
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def render_image(rng: np.random.Generator, min_size: int, max_size: int, min_objects: int,
                 max_objects: int) -> tuple[np.ndarray, list[SynthObject]]:
    """One image ``[H, W, 3]`` uint8 RGB and its visible objects (bottom to top)."""
    height = int(rng.integers(min_size, max_size + 1))
    width = int(rng.integers(min_size, max_size + 1))
    image = _background(rng, height, width)
    count = int(rng.integers(min_objects, max_objects + 1))
    shapes = []
    for _ in range(count):
        class_index = int(rng.integers(len(SYNTH_CLASSES)))
        shapes.append((class_index, _place_shape(rng, SYNTH_CLASSES[class_index], height, width),
                       _jitter(rng, SYNTH_CLASSES[class_index].colour)))
    # Visible part of each shape = shape minus every kept shape above it (top to bottom).
    kept: list[tuple[int, np.ndarray, tuple, tuple[np.ndarray, ...]]] = []
    for class_index, polygon, colour in reversed(shapes):
        pieces = [polygon]
        for _, occluder, _, _ in kept:
            pieces = [part for piece in pieces for part in _subtract_convex(piece, occluder)]
        visible = sum(_polygon_area(p) for p in pieces)
        if visible >= _MIN_VISIBLE_FRACTION * _polygon_area(polygon):
            kept.append((class_index, polygon, colour, tuple(pieces)))
    kept.reverse()  # bottom to top
    for class_index, polygon, colour, _ in kept:
        _paint(image, polygon, colour, SYNTH_CLASSES[class_index].texture, rng)
    objects = [SynthObject(c, pieces) for c, _, _, pieces in kept]
    # An object whose mask covers no pixel (a thin one in the smallest images) is none: written,
    # it was a target with an empty mask (convert-coco warns of those in a user's files), and the
    # demo's held-out scenes must count the objects the task files hold.
    return image, [obj for obj in objects if _covers_a_pixel(obj, height, width)]


def _coco_polygons(obj: SynthObject) -> list[list[float]]:
    """The object's visible pieces as its annotation's ``segmentation`` (rounded to 0.01 px)."""
    return [[round(float(v), 2) for v in piece.reshape(-1)] for piece in obj.pieces]


def _covers_a_pixel(obj: SynthObject, height: int, width: int) -> bool:
    return bool(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(_coco_polygons(obj), height, width))))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    start, end = rng.integers(60, 200, size=3), rng.integers(60, 200, size=3)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    image = start * (1 - ramp) + end * ramp + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(np.broadcast_to(image, (height, width, 3)), 0, 255).astype(np.uint8)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    shifted = np.clip(np.array(colour) + rng.integers(-18, 19, size=3), 0, 255)
    return tuple(int(v) for v in shifted)


def _place_shape(rng: np.random.Generator, cls: SynthClass, height: int, width: int) -> np.ndarray:
    """Counter-clockwise convex polygon ``[k, 2]`` of one instance, inside the image."""
    extent = float(rng.uniform(0.25, 0.5)) * min(height, width)   # length of the longer side
    aspect = cls.aspect * float(rng.uniform(0.85, 1.15))
    w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
    unit = _unit_shape(cls.shape)                                  # in [-0.5, 0.5]^2
    angle = float(rng.uniform(-0.35, 0.35))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (unit * np.array([w, h])) @ rotation.T
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = hi - lo
    scale = min(1.0, (width - 2) / span[0], (height - 2) / span[1])  # always fits in the image
    points, lo, span = points * scale, lo * scale, span * scale
    cx = float(rng.uniform(1 - lo[0], width - 1 - lo[0] - span[0]))
    cy = float(rng.uniform(1 - lo[1], height - 1 - lo[1] - span[1]))
    return _counter_clockwise(points + np.array([cx, cy]))


def _unit_shape(shape: str) -> np.ndarray:
    if shape == "rectangle":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "trapezoid":
        return np.array([[-0.3, -0.5], [0.3, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "triangle":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.0, 0.5]])
    if shape == "diamond":
        return np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]])
    if shape in ("hexagon", "pentagon", "ellipse"):
        sides = {"hexagon": 6, "pentagon": 5, "ellipse": 32}[shape]
        t = np.linspace(0, 2 * np.pi, sides, endpoint=False) - np.pi / 2
        return 0.5 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "half_disc":
        t = np.linspace(0, np.pi, 17)
        return np.stack([0.5 * np.cos(t), -0.5 + np.sin(t)], axis=1)
    raise ValueError(f"unknown synthetic shape {shape!r}")


def _paint(image: np.ndarray, polygon: np.ndarray, colour: tuple, texture: str,
           rng: np.random.Generator) -> None:
    """Fill the pixels that pycocotools rasterises for ``polygon`` (so masks match the drawing)."""
    height, width = image.shape[:2]
    rle = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], height, width)
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)[:, :, 0].astype(bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    base = np.array(colour, dtype=np.float32)
    shade = np.ones(ys.size, dtype=np.float32)
    period = float(rng.uniform(5, 9))
    if texture == "stripes":
        shade = np.where(((xs + ys) / period) % 2 < 1, 1.0, 0.6)
    elif texture == "checker":
        shade = np.where(((xs // period).astype(int) + (ys // period).astype(int)) % 2 == 0, 1.0, 0.55)
    elif texture == "dots":
        dx, dy = (xs % period) - period / 2, (ys % period) - period / 2
        shade = np.where(dx * dx + dy * dy < (period / 3.5) ** 2, 0.45, 1.0)
    image[ys, xs] = np.clip(base[None, :] * shade[:, None], 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- convex geometry

def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _counter_clockwise(points: np.ndarray) -> np.ndarray:
    return points if _polygon_area(points) >= 0 else points[::-1].copy()


def _clip(points: np.ndarray, a: np.ndarray, b: np.ndarray, keep_left: bool) -> np.ndarray:
    """Sutherland-Hodgman: the part of convex ``points`` left (or right) of the line a -> b."""
    if len(points) == 0:
        return points
    edge = b - a
    side = edge[0] * (points[:, 1] - a[1]) - edge[1] * (points[:, 0] - a[0])
    if not keep_left:
        side = -side
    out = []
    for i in range(len(points)):
        j = (i + 1) % len(points)
        p, q, sp, sq = points[i], points[j], side[i], side[j]
        if sp >= 0:
            out.append(p)
        if (sp >= 0) != (sq >= 0):
            out.append(p + (q - p) * (sp / (sp - sq)))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _subtract_convex(piece: np.ndarray, occluder: np.ndarray, min_area: float = 0.5) -> list[np.ndarray]:
    """Convex pieces covering ``piece`` minus the convex ``occluder`` (both counter-clockwise).

    The outside of a convex polygon with edges e_0..e_{m-1} is the disjoint union over k of
    {outside e_k, inside e_0..e_{k-1}}, so each piece is an intersection of half-planes.
    """
    parts = []
    remaining = piece
    m = len(occluder)
    for k in range(m):
        a, b = occluder[k], occluder[(k + 1) % m]
        outside = _clip(remaining, a, b, keep_left=False)
        if len(outside) >= 3 and abs(_polygon_area(outside)) >= min_area:
            parts.append(_counter_clockwise(outside))
        remaining = _clip(remaining, a, b, keep_left=True)
        if len(remaining) < 3:
            break
    return parts
