"""Reading and validating COCO-Tasks annotation files (``task_{k}_{split}.json``).

A COCO-Tasks file is a COCO detection file whose annotations carry two category fields:
``COCO_category_id`` (the COCO class, 62 = chair) and ``category_id`` in {0, 1}, where 1 marks
an object *preferred* for the file's task (its ``categories`` list, :data:`PREFERENCE_CATEGORIES`
in the real and synthetic files, names the two). Every object of an image is listed; images
without a preferred object are part of the set.

Validation is strict: a malformed file, a missing field or a field of the wrong type raises
:class:`DataError` naming the file, the record (list position and id) and the field. Nothing
is skipped silently. The checks are one pass over the records (a real task file is ~23 MB with
~30k annotations), so reading stays dominated by ``json.load``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from toist_core.data.rle import counts_problem


NUMBER_TYPES = frozenset((int, float))  # exact types: JSON true/false (bool), strings and null are not numbers
COCOEVAL_MAX_AREA = 1e10  # COCOeval's area range "all" ends there, [0, 1e5 ** 2]: a larger area is ignored
# pycocotools' frPyObjects takes a list whose FIRST polygon has 4 values for boxes (and fails with
# an unnamed TypeError); later polygons of 2 points are rasterised like the others (the reference
# loads them, so real files may hold them).
_MIN_FIRST_POLYGON_VALUES = 6
_MIN_POLYGON_VALUES = 4
# Polygon coordinates must lie in [-side, 2 * side], side = the longer side of their image. Real
# annotations stray a pixel or so outside; pycocotools clips to the image anyway, but rasterises
# the whole outline first, so a far-off point costs memory and time (a NaN crashes it).
_POLYGON_MARGIN = 1.0
_FILE_NAME = re.compile(r"^task_(\d+)_([A-Za-z0-9]+)\.json$")

Segmentation = Union[list, dict]  # COCO polygons [[x1, y1, ...], ...] or an RLE {"size", "counts"}
# ``categories`` of a COCO-Tasks file: the meaning of ``category_id`` (as the real and synthetic
# files). The evaluation's COCO ground truth needs the list; a file without one gets this.
PREFERENCE_CATEGORIES = ({"id": 0, "name": "non_preferred"}, {"id": 1, "name": "preferred"})


class DataError(ValueError):
    """A dataset file or record is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ImageRecord:
    """One entry of ``images``."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class AnnotationRecord:
    """One entry of ``annotations`` (one COCO object of an image).

    bbox: ``(x, y, w, h)`` in pixels, as in the file.
    category_id: 1 = preferred for the task, 0 = not.
    coco_category_id: the COCO class of the object (names in ``coco_id2name.json``).
    """

    id: int
    image_id: int
    bbox: tuple[float, float, float, float]
    segmentation: Segmentation
    area: float
    iscrowd: int
    category_id: int
    coco_category_id: int

    @property
    def is_preferred(self) -> bool:
        return self.category_id == 1


@dataclass
class TaskFile:
    """A parsed ``task_{k}_{split}.json``.

    ``images`` keeps the file's order; ``annotations`` maps an image id to its objects in file
    order (images without objects map to an empty list).
    """

    path: Path
    task_id: int
    split: str
    images: list[ImageRecord]
    annotations: dict[int, list[AnnotationRecord]] = field(default_factory=dict)
    raw: Optional[dict] = field(default=None, repr=False)  # the parsed JSON, kept only on request

    def image_annotations(self, image_id: int) -> list[AnnotationRecord]:
        return self.annotations.get(image_id, [])

    @property
    def num_annotations(self) -> int:
        return sum(len(v) for v in self.annotations.values())


def parse_task_file_name(path: Union[str, Path]) -> tuple[int, str]:
    """``task_7_train.json`` -> ``(7, "train")``; the task id comes from the file name, as in the reference."""
    name = Path(path).name
    match = _FILE_NAME.match(name)
    if match is None:
        raise DataError(f"{path}: file name must look like task_<k>_<split>.json (k: a task id, 1, 2, ...)")
    task_id = int(match.group(1))
    if task_id < 1:
        raise DataError(f"{path}: task id {task_id} in the file name must be 1 or more")
    return task_id, match.group(2)


def task_file_path(root: Union[str, Path], task_id: int, split: str) -> Path:
    """``<root>/annotations/task_{k}_{split}.json`` (the COCO-Tasks layout)."""
    return Path(root) / "annotations" / f"task_{task_id}_{split}.json"


def written_by(path: Union[str, Path], start: bytes) -> bool:
    """Whether the file at ``path`` begins with ``start``: how the task files a toist tool writes
    (``toist synth``, ``toist convert-coco``) are told from others before they are replaced."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(start)) == start
    except OSError:  # e.g. a folder of that name: not ours
        return False


def load_task_file(path: Union[str, Path], keep_raw: bool = False) -> TaskFile:
    """Read and validate one COCO-Tasks annotation file.

    Raises :class:`DataError` for a missing file, invalid JSON, a record with a missing or
    ill-typed field, a non-finite ``bbox`` / ``area`` / polygon coordinate, a first polygon of
    fewer than 3 points (2 for the others) or a coordinate more than one image side outside its image, an RLE
    whose ``size`` is not its image's or whose ``counts`` are not a mask of that size, a duplicate
    id, an annotation whose ``image_id`` is not an image of the file, or a ``categories`` field
    that is not a list of ``{"id": int, ...}`` records (the field may be absent).
    """
    path = Path(path)
    task_id, split = parse_task_file_name(path)
    return parse_task_data(read_json(path, "annotation file"), path, task_id, split, keep_raw=keep_raw)


def read_json(path: Union[str, Path], what: str) -> Any:
    """The parsed JSON of ``path``; a missing file or invalid JSON is a :class:`DataError`
    naming the file (``what`` it should have been)."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"{path}: not valid {what}: nested too deeply to read") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise DataError(f"{path}: not valid {what}: {exc}") from None


def parse_task_data(data: Any, path: Union[str, Path], task_id: int, split: str,
                    keep_raw: bool = False) -> TaskFile:
    """Validate already-parsed JSON ``data``; ``path`` is only used in error messages."""
    path = Path(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing top-level field {key!r}")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: field {key!r} must be a list, got {type(data[key]).__name__}")

    _check_categories(path, data.get("categories"))
    images = [_image(path, i, rec) for i, rec in enumerate(data["images"])]
    annotations: dict[int, list[AnnotationRecord]] = {}
    extents: dict[int, _Extent] = {}
    for image in images:
        if image.id in annotations:
            raise DataError(f"{path}: images: duplicate image id {image.id}")
        annotations[image.id] = []
        extents[image.id] = _extent(image)

    seen_ids: set[int] = set()
    for i, rec in enumerate(data["annotations"]):
        ann = _annotation(path, i, rec, extents)
        if ann.id in seen_ids:
            raise DataError(f"{path}: annotations[{i}] (id {ann.id}): duplicate annotation id")
        seen_ids.add(ann.id)
        bucket = annotations.get(ann.image_id)
        if bucket is None:
            raise DataError(f"{path}: annotations[{i}] (id {ann.id}): field 'image_id': "
                            f"{ann.image_id} is not the id of an image in this file")
        bucket.append(ann)
    return TaskFile(path, task_id, split, images, annotations, data if keep_raw else None)


# ----------------------------------------------------------------------------- record checks

def _check_categories(path: Path, categories: Any) -> None:
    """``categories`` is optional (the dataset does not read it; the evaluation supplies
    :data:`PREFERENCE_CATEGORIES` when it is absent), but pycocotools indexes a present one by
    ``id``: a malformed list would crash the evaluation with a bare KeyError / TypeError."""
    if categories is None:
        return
    if not isinstance(categories, list):
        raise DataError(f"{path}: field 'categories': expected a list of {{id, name}} records, "
                        f"got {type(categories).__name__}")
    seen: set[int] = set()
    for index, rec in enumerate(categories):
        where = _where(path, "categories", index, rec)
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
        cat_id = _field(where, rec, "id", "int")
        if cat_id in seen:
            raise DataError(f"{where}: duplicate category id {cat_id}")
        seen.add(cat_id)


def _where(path: Path, section: str, index: int, rec: Any) -> str:
    rec_id = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}: {section}[{index}]" + (f" (id {rec_id})" if rec_id is not None else "")


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``"\\ud800"`` escape, which is no
    character; in a ``file_name`` it stands for a byte of a name that is not UTF-8, as Python's
    ``os.fsdecode`` writes it): it cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_KINDS = {
    "int": (lambda v: type(v) is int, "an integer"),
    "number": (lambda v: type(v) in NUMBER_TYPES, "a number"),
    "str": (lambda v: type(v) is str and v != "", "a non-empty string"),
}


def _field(where: str, rec: dict, name: str, kind: str):
    try:
        value = rec[name]
    except KeyError:
        raise DataError(f"{where}: missing field {name!r}") from None
    check, expected = _KINDS[kind]
    if not check(value):
        raise DataError(f"{where}: field {name!r}: expected {expected}, got {value!r}")
    return value


def _image(path: Path, index: int, rec: Any) -> ImageRecord:
    where = _where(path, "images", index, rec)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    record = ImageRecord(
        id=_field(where, rec, "id", "int"),
        file_name=_field(where, rec, "file_name", "str"),
        height=_field(where, rec, "height", "int"),
        width=_field(where, rec, "width", "int"),
    )
    if record.height <= 0 or record.width <= 0:
        raise DataError(f"{where}: fields 'height'/'width' must be positive, got "
                        f"{record.height}x{record.width}")
    return record


def _annotation(path: Path, index: int, rec: Any, extents: dict[int, "_Extent"]) -> AnnotationRecord:
    """One record; ``extents``: image id -> polygon coordinate range of the file's images (an
    unknown ``image_id`` is the caller's error to raise)."""
    where = _where(path, "annotations", index, rec)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    bbox = rec.get("bbox")
    if "bbox" not in rec:
        raise DataError(f"{where}: missing field 'bbox'")
    if type(bbox) is not list or len(bbox) != 4 or not NUMBER_TYPES.issuperset(map(type, bbox)):
        raise DataError(f"{where}: field 'bbox': expected [x, y, w, h] (4 numbers), got {bbox!r}")
    if not _all_finite(bbox):  # a NaN box would be dropped as degenerate, unnoticed
        raise DataError(f"{where}: field 'bbox': expected finite numbers, got {bbox!r}")
    category_id = _field(where, rec, "category_id", "int")
    if category_id not in (0, 1):
        raise DataError(f"{where}: field 'category_id': expected 0 (not preferred) or 1 (preferred), "
                        f"got {category_id!r}")
    iscrowd = _field(where, rec, "iscrowd", "int")
    if iscrowd not in (0, 1):
        raise DataError(f"{where}: field 'iscrowd': expected 0 or 1, got {iscrowd!r}")
    if "segmentation" not in rec:
        raise DataError(f"{where}: missing field 'segmentation'")
    segmentation = rec["segmentation"]
    image_id = _field(where, rec, "image_id", "int")
    _check_segmentation(where, segmentation, extents.get(image_id))
    return AnnotationRecord(
        id=_field(where, rec, "id", "int"),
        image_id=image_id,
        bbox=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
        segmentation=segmentation,
        area=_target_area(where, rec),
        iscrowd=iscrowd,
        category_id=category_id,
        coco_category_id=_field(where, rec, "COCO_category_id", "int"),
    )


def _check_segmentation(where: str, seg: Any, extent: Optional["_Extent"]) -> None:
    """Types and shape of a segmentation; with its image's ``extent``, also the range of its
    polygon coordinates, or an RLE's size."""
    prefix = f"{where}: field 'segmentation'"
    if isinstance(seg, dict):  # RLE: {"size": [h, w], "counts": str | [int, ...]}
        _check_rle(prefix, seg, extent)
        return
    if not isinstance(seg, list) or not seg:
        raise DataError(f"{prefix}: expected a non-empty list of polygons or an RLE object, got {seg!r}")
    for k, poly in enumerate(seg):
        least = _MIN_FIRST_POLYGON_VALUES if k == 0 else _MIN_POLYGON_VALUES
        if not isinstance(poly, list) or len(poly) < least or len(poly) % 2:
            raise DataError(f"{prefix}[{k}]: a polygon must be a flat list [x1, y1, x2, y2, ...] of an even number "
                            f"(>= {least}: {least // 2} points{'; the first one of an annotation' if k == 0 else ''}) "
                            f"of coordinates, got "
                            f"{poly if not isinstance(poly, list) else f'{len(poly)} values'}")
        if not NUMBER_TYPES.issuperset(map(type, poly)):  # C-speed; a real file has ~1M coordinates
            bad = next(v for v in poly if type(v) not in NUMBER_TYPES)
            raise DataError(f"{prefix}[{k}]: polygon coordinates must be numbers, got {bad!r}")
        if extent is None:
            continue
        low, high, height, width = extent
        # C-speed pass. NaN compares False, so min/max can step over it; the sum catches it (the
        # values are in range by then, so the sum cannot overflow).
        if low <= min(poly) and max(poly) <= high and not math.isnan(sum(poly)):
            continue
        j, bad = next((j, v) for j, v in enumerate(poly) if not low <= v <= high)
        raise DataError(f"{prefix}[{k}][{j}]: coordinate {bad!r} is not finite or not within "
                        f"[{low:g}, {high:g}] (image {width}x{height}: a coordinate may "
                        f"lie at most one image side outside it)")


def _check_rle(prefix: str, seg: dict, extent: Optional["_Extent"]) -> None:
    """An RLE of its image's size (when ``extent`` is known) whose counts are a mask of that size:
    pycocotools decodes whatever it is given, from memory past the counts if need be."""
    size, counts = seg.get("size"), seg.get("counts")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"{prefix}: RLE 'size' must be [height, width], got {size!r}")
    if extent is not None and size != [extent.height, extent.width]:
        raise DataError(f"{prefix}: RLE size {size} differs from the size [{extent.height}, {extent.width}] "
                        "of its image (height, width): the mask is of another image, or the image record's "
                        "'height' / 'width' are wrong")
    if not isinstance(counts, (str, list)):
        raise DataError(f"{prefix}: RLE 'counts' must be a string or a list of integers, "
                        f"got {type(counts).__name__}")
    problem = counts_problem(counts, size[0], size[1])
    if problem is not None:
        raise DataError(f"{prefix} (RLE size {size}): {problem}")


class _Extent(NamedTuple):
    """Where an image's polygon coordinates may lie: [low, high] (:data:`_POLYGON_MARGIN`)."""

    low: float
    high: float
    height: int
    width: int


def _extent(image: ImageRecord) -> _Extent:
    side = max(image.height, image.width)
    return _Extent(-_POLYGON_MARGIN * side, (1.0 + _POLYGON_MARGIN) * side, image.height, image.width)


def _all_finite(values: list) -> bool:
    """Every number of ``values`` finite (fast path: their sum is)."""
    try:
        if math.isfinite(sum(values)):
            return True
    except OverflowError:  # an integer too large for a float
        pass
    return all(map(_is_finite, values))  # the sum of finite numbers can still overflow


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _target_area(where: str, rec: dict) -> float:
    """An annotation's ``area``: COCOeval ignores a target whose area is outside [0, 1e10] (its
    "all" range), and counted it in the task's table as a target all the same."""
    area = _finite_field(where, rec, "area")
    if not 0.0 <= area <= COCOEVAL_MAX_AREA:
        raise DataError(f"{where}: field 'area': {area!r} is outside [0, {COCOEVAL_MAX_AREA:.0e}], the range of "
                        "areas COCOeval scores (it would ignore this target)")
    return area


def _finite_field(where: str, rec: dict, name: str) -> float:
    value = _field(where, rec, name, "number")
    if not _is_finite(value):
        raise DataError(f"{where}: field {name!r}: expected a finite number, got {value!r}")
    return float(value)


def clipped_box(ann: AnnotationRecord, height: int, width: int) -> Optional[list[float]]:
    """``[x0, y0, x1, y1]`` of ``ann``'s box clipped to the image; None when that is degenerate.

    In float32, as the reference converts (its boxes become a float32 tensor before ``x + w`` and
    the test): a width below float32's resolution at ``x`` (``x=100, w=1e-6``) is a zero-width box,
    dropped, not a target of zero width."""
    x, y, w, h = (np.float32(v) for v in ann.bbox)
    zero = np.float32(0.0)
    x0, y0 = min(max(x, zero), np.float32(width)), min(max(y, zero), np.float32(height))
    x1, y1 = min(max(x + w, zero), np.float32(width)), min(max(y + h, zero), np.float32(height))
    return [float(x0), float(y0), float(x1), float(y1)] if x1 > x0 and y1 > y0 else None


def annotation_rle(ann: AnnotationRecord, height: int, width: int, path: Union[str, Path] = "") -> dict:
    """Compressed RLE of an annotation's segmentation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    seg = ann.segmentation
    where = f"{path}: annotation id {ann.id} (image id {ann.image_id}): field 'segmentation'"
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if list(seg["size"]) != [height, width]:
        raise DataError(f"{where}: RLE size {seg['size']} differs from the image size [{height}, {width}]")
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


# Formats OpenCV and PIL read (so ``toist predict`` takes them) but torchvision's ``decode_image``
# does not: refused by name when a COCO file is converted (which may not see the files; a
# dataset being built judges each file by its content, check_image_size).
UNDECODABLE_SUFFIXES = frozenset({".bmp", ".dib", ".tif", ".tiff", ".pbm", ".pgm", ".ppm", ".pnm",
                                  ".jp2", ".j2k", ".exr", ".hdr", ".avif", ".heic", ".heif"})


def check_decodable(path: Union[str, Path], where: str) -> None:
    """DataError when the image file ``path`` is named as a format training does not decode
    (by its suffix alone: convert-coco, which may not see the file)."""
    suffix = Path(path).suffix
    if suffix.lower() in UNDECODABLE_SUFFIXES:
        raise DataError(f"{path}: training and evaluation decode JPEG, PNG, GIF and WebP only "
                        f"(torchvision's decode_image), and a {suffix!r} file is named as another format; convert "
                        f"it, e.g. to PNG ({where})")


# EXIF orientations that turn the picture a quarter (their displayed width is the stored height).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def check_image_size(path: Union[str, Path], height: int, width: int, where: str) -> None:
    """DataError unless the file is of a format training decodes, by its first bytes (a BMP or
    TIFF saved as ``.jpg`` passes :func:`check_decodable`), and the record's ``height``/``width``
    are the stored picture's (the header alone is read): found when the sample is read, it was
    hours into a training run."""
    from PIL import Image, UnidentifiedImageError  # torchvision's dependency

    from toist_core.data.pixels import decodes  # (pixels imports this module)

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the header only: a big aerial tile is fine
    try:
        with Image.open(path) as picture:
            with open(path, "rb") as handle:
                head = handle.read(12)
            if not decodes(head):
                raise DataError(f"{path}: training and evaluation decode JPEG, PNG, GIF and WebP only "
                                f"(torchvision's decode_image); this file is {picture.format or 'of another format'}"
                                f"{f' although named {Path(path).suffix}' if Path(path).suffix else ''}: "
                                f"convert it, e.g. to PNG ({where})")
            if picture.format == "WEBP" and getattr(picture, "n_frames", 1) > 1:
                # (the size check passed it, and the first training read refused it)
                raise DataError(f"{path}: an animated WebP, which training and evaluation do not decode "
                                f"(torchvision's decode_image); save its first frame, e.g. as PNG ({where})")
            stored_width, stored_height = picture.size
            if (stored_height, stored_width) == (height, width):
                return
            orientation = _exif_orientation(picture)
    except DataError:   # (a ValueError: it was wrapped in "cannot read the image" by the clause below)
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # (PIL words an empty file "cannot identify image file": a copy that never happened; a
        # damaged header can raise ValueError / SyntaxError, e.g. "Truncated IHDR chunk")
        reason = "the file is empty" if Path(path).stat().st_size == 0 else exc
        raise DataError(f"{path}: cannot read the image ({where}): {reason}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    message = (f"{path}: image is {stored_height}x{stored_width} (height x width) but the record says "
               f"{height}x{width} (fields 'height'/'width' of {where})")
    if orientation in _QUARTER_TURNS and (stored_height, stored_width) == (width, height):
        message += (f"; the file's EXIF orientation ({orientation}) turns it a quarter when displayed, and the "
                    "annotations were drawn on the turned picture while training reads the stored pixels "
                    "(as COCO does): save the images turned (e.g. PIL.ImageOps.exif_transpose)")
    raise DataError(message)


def _exif_orientation(picture) -> Optional[int]:
    """The EXIF Orientation tag, or None (none, or unreadable: it only words a message)."""
    try:
        return picture.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a PNG may be decoded to find it, and fail
        return None
