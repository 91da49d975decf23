"""Draw predictions on images (numpy + OpenCV), for the CLI and the ROS node; read image files
(torch only for JPEG, PNG, GIF and WebP files: :func:`load_rgb`).

Everything works on RGB ``H x W x 3`` uint8 arrays; only :func:`save_rgb` converts to the
BGR order OpenCV writes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np

from toist_core.data.tiff_orientation import tiff_orientation_problem

# Distinct, saturated RGB colours; instance i gets PALETTE[i % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)


def instance_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def box_pixels(box) -> tuple[int, int, int, int]:
    """The first and last pixel (x0, y0, x1, y1, inclusive) a box ``(x1, y1, x2, y2)`` in pixel
    edges covers (columns 10 to 19 are ``10 .. 20``): what ``cv2.rectangle`` takes. Drawn to the
    edge itself, a box's right and bottom lines were a pixel outside it (outside the image for a
    box over the whole frame: not drawn at all)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = math.floor(x1), math.floor(y1)
    return left, top, max(left, math.ceil(x2) - 1), max(top, math.ceil(y2) - 1)


def draw_instances(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   masks: Optional[np.ndarray] = None, title: Optional[str] = None,
                   alpha: float = 0.45, thickness: int = 2) -> np.ndarray:
    """A copy of ``image`` (RGB uint8) with masks blended in, boxes, scores and a title.

    boxes ``[N, 4]`` (x1, y1, x2, y2 pixels), scores ``[N]``, masks ``[N, H, W]`` bool, or 0/1
    integers (what ``pycocotools.mask.decode`` returns for ``toist predict``'s RLEs), or None.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_instances: expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    canvas = image.copy()
    if masks is not None and len(masks):
        masks = np.asarray(masks)
        if masks.dtype != np.bool_:
            # Integer 0/1 masks index rows 0 and 1 (numpy's integer indexing), not the mask.
            if not (np.issubdtype(masks.dtype, np.integer) and masks.min() >= 0 and masks.max() <= 1):
                raise ValueError(f"draw_instances: masks must be bool or 0/1 integers, got {masks.dtype} "
                                 f"values {masks.min()}..{masks.max()}")
            masks = masks.astype(bool)
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"draw_instances: masks {masks.shape} do not match the image {image.shape[:2]}")
        overlay = canvas.astype(np.float32)
        for i, mask in enumerate(masks):
            color = np.array(instance_color(i), dtype=np.float32)
            overlay[mask] = overlay[mask] * (1.0 - alpha) + color * alpha
        canvas = overlay.round().clip(0, 255).astype(np.uint8)
    bar_width = bar_height = 0   # the title's bar, drawn last: a score label under it was hidden
    if title:
        title, title_scale = _fitted(title, canvas.shape[1] - 8)
        (title_w, title_h), title_base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, title_scale, 1)
        bar_width, bar_height = title_w + 8, title_h + title_base + 8
    for i, (box, score) in enumerate(zip(boxes, scores)):
        color = instance_color(i)
        x1, y1, x2, y2 = box_pixels(box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        label = f"{float(score):.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        tx = min(max(x1, 0), max(0, canvas.shape[1] - tw))  # inside the image: a box at its right edge
        top = bar_height + 1 if tx <= bar_width else 0       # below the title's bar where it would be under it
        ty = max(y1, top + th + base)
        cv2.rectangle(canvas, (tx, ty - th - base), (tx + tw, ty), color, -1)
        cv2.putText(canvas, label, (tx, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
    if title:
        cv2.rectangle(canvas, (0, 0), (bar_width, bar_height), (0, 0, 0), -1)
        cv2.putText(canvas, title, (4, title_h + 4), cv2.FONT_HERSHEY_SIMPLEX, title_scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return canvas


def _fitted(text: str, width: int, scale: float = 0.6, smallest: float = 0.4) -> tuple[str, float]:
    """``text`` and a font scale at which it fits ``width`` pixels: smaller type down to
    ``smallest``, then the end cut off and marked ``...`` (a caption longer than a narrow image)."""
    import cv2

    def text_width(candidate: str, size: float) -> int:
        return cv2.getTextSize(candidate, cv2.FONT_HERSHEY_SIMPLEX, size, 1)[0][0]

    scale = max(smallest, min(scale, scale * width / max(1, text_width(text, scale))))
    if text_width(text, scale) <= width:
        return text, scale
    while len(text) > 1 and text_width(text + "...", scale) > width:
        text = text[:-1]
    return text.rstrip() + "...", scale


def draw_prediction(image: np.ndarray, prediction, title: Optional[str] = None, **kwargs) -> np.ndarray:
    """:func:`draw_instances` for a :class:`toist_core.inference.Prediction` (title = its caption)."""
    return draw_instances(image, prediction.boxes, prediction.scores, prediction.masks,
                          title=prediction.caption if title is None else title, **kwargs)


def _opencv_knows_the_format(path: Union[str, Path]) -> bool:
    """Whether OpenCV has a reader for the file's signature (False for a name that is not UTF-8,
    which OpenCV's own file reader cannot open)."""
    import cv2

    name = str(path)
    try:
        name.encode("utf-8")
        return bool(cv2.haveImageReader(name))
    except (UnicodeEncodeError, cv2.error):
        return False


def load_rgb(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]`` (ValueError naming the file if it cannot be read).

    JPEG, PNG, GIF and WebP give the pixels training and evaluation read
    (:func:`toist_core.data.pixels.decode_rgb`: the stored pixel grid, an EXIF orientation tag
    ignored, 16-bit samples reduced to 8 bits by dropping the low byte; a file cut short is
    refused); other formats OpenCV reads (BMP, TIFF, ...) are read by OpenCV, the same way (8- and
    16-bit samples; float pixels, e.g. PFM or float TIFF, refused).
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the image: {exc.strerror or exc}") from None
    if not head:   # (not "not a format toist reads": it is no format at all)
        raise ValueError(f"{path}: cannot read the image: the file is empty")
    from toist_core.data.pixels import decode_rgb, decodes

    _refuse_huge_or_turned(path)
    if decodes(head):
        return np.ascontiguousarray(decode_rgb(path).permute(1, 2, 0).numpy())
    import cv2

    # As stored: IMREAD_COLOR would turn float pixels (PFM, HDR, float TIFF) into 8 bits its own
    # way per format, NaN into black, without a word.
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        try:
            str(path).encode("utf-8")
            stored = cv2.imread(str(path), flags)   # reads no more than the signature of a file it cannot decode
        except UnicodeEncodeError:
            # A file name that is not UTF-8 (Linux allows any bytes in one) crashes OpenCV's own file
            # reader (segmentation fault): the bytes are read here and decoded.
            data = np.fromfile(path, dtype=np.uint8)
            stored = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:   # e.g. a header claiming more pixels than OpenCV decodes: a traceback
        # "OpenCV(5.0.0) <source>:79: error: (-215:Assertion failed) <check> in function '<name>'"
        found = re.search(r"error: \([^)]*\) (.*?)(?: in function .*)?$", str(exc).strip().splitlines()[-1])
        raise ValueError(f"{path}: cannot decode the image: OpenCV refused it "
                         f"({found.group(1) if found else str(exc).strip()})") from None
    if stored is None:
        if _opencv_knows_the_format(path):   # a BMP or TIFF cut short was said to be of no format toist reads
            raise ValueError(f"{path}: cannot decode the image: damaged or cut short, or a variant of its format "
                             "that OpenCV does not decode (OpenCV reads the format)")
        raise ValueError(f"{path}: cannot read the image (not a format toist reads: JPEG, PNG, GIF, WebP, or what "
                         "OpenCV reads, e.g. BMP and TIFF)")
    if stored.dtype == np.uint16:
        stored = (stored >> 8).astype(np.uint8)  # as decode_rgb: the low byte dropped
    elif stored.dtype != np.uint8:
        raise ValueError(f"{path}: {stored.dtype} pixels; toist reads 8- and 16-bit images (convert it, e.g. to PNG, "
                         "choosing how its values map to 0-255)")
    if stored.ndim == 2 or stored.shape[2] <= 2:  # grey, or grey + alpha
        grey = stored if stored.ndim == 2 else stored[..., 0]
        return np.repeat(grey[..., None], 3, axis=2)
    return np.ascontiguousarray(stored[..., 2::-1])  # BGR or BGRA (alpha dropped, as IMREAD_COLOR did)


# Largest picture `load_rgb` decodes: a few kilobytes of PNG can declare 40000 x 40000 pixels, and
# decoding one that big ended the process for want of memory, without a word (~18 bytes a pixel
# by the time it is a model input). Pillow's own decompression-bomb limit: a 108-megapixel phone
# photo is read (~2 GB), a 200-megapixel one is refused.
MAX_IMAGE_PIXELS = 178_956_970


def _refuse_huge_or_turned(path: Union[str, Path]) -> None:
    """ValueError for a picture whose header declares more than :data:`MAX_IMAGE_PIXELS`, or a
    TIFF stored turned (:mod:`toist_core.data.tiff_orientation`); the header alone is read, and
    what Pillow cannot identify is left to the decoders to name."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    too_many = (f"more than the {MAX_IMAGE_PIXELS:,} pixels toist decodes (a decompression bomb, or a picture to "
                "downscale first)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # (ours is below)
            with Image.open(path) as image:
                width, height = image.size
                problem = tiff_orientation_problem(image)   # (BigTIFF too: by Pillow's reading, not a signature)
    except Image.DecompressionBombError as exc:   # (Pillow's own limit, above ours)
        raise ValueError(f"{path}: the image declares {too_many}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError):
        return
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path}: the image declares {width}x{height} pixels, {too_many}")
    if problem:
        raise ValueError(f"{path}: {problem}")


def save_rgb(path: Union[str, Path], image: np.ndarray) -> None:
    """Write an RGB uint8 image, in the format its suffix names, as a whole (an interrupted write
    leaves the old file or none, never half a picture)."""
    import cv2

    from .atomic_file import atomic_write

    suffix = Path(path).suffix or ".png"
    try:
        ok, encoded = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"{path}: cannot write the image (format {suffix!r})")
    atomic_write(path, lambda handle: handle.write(encoded.tobytes()))


__all__ = ["PALETTE", "box_pixels", "draw_instances", "draw_prediction", "instance_color", "load_rgb", "save_rgb"]
