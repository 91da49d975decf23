"""``sensor_msgs/Image`` / ``CompressedImage`` <-> numpy, without cv_bridge and without torch.

The readers (``image_to_rgb``, ``compressed_to_rgb``, ``mask_from_image``) only read the
message's fields, so they accept any object that has them. Every problem with an incoming
image raises ``ImageError`` whose ``reason`` is a short counter key ("encoding", "empty",
"step", "truncated", "decode") and whose text says what was wrong and by how much.

The builders (``image_from_array``, ``mask_to_image``) import ``sensor_msgs`` lazily and
fill ``data`` with an ``array.array('B')`` (the generated setter checks a list element by
element, which costs ~100 ms for a VGA frame).
"""

from __future__ import annotations

import array
from typing import Any, Optional

import cv2
import numpy as np

# Encoding -> channels of the 8-bit encodings the node accepts (REP 104 / sensor_msgs names).
CHANNELS: dict[str, int] = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
SUPPORTED_ENCODINGS = tuple(CHANNELS)
# OpenCV type names, read as cv_bridge reads them: ``cv2_to_imgmsg(frame)`` (encoding
# "passthrough") labels an OpenCV frame, BGR(A) or grey, "8UC3" / "8UC4" / "8UC1".
_OPENCV_TYPES = {"8uc3": "bgr8", "8uc4": "bgra8", "8uc1": "mono8"}

# cv2 colour conversion from each encoding to RGB (None: already RGB).
_TO_RGB = {
    "rgb8": None,
    "bgr8": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
}
_FROM_RGB = {
    "rgb8": None,
    "bgr8": cv2.COLOR_RGB2BGR,
    "rgba8": cv2.COLOR_RGB2RGBA,
    "bgra8": cv2.COLOR_RGB2BGRA,
    "mono8": cv2.COLOR_RGB2GRAY,
}


class ImageError(ValueError):
    """An incoming image cannot be used; ``reason`` is the counter key for diagnostics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def image_header(msg: Any, what: str, error: type = ImageError) -> tuple[int, int, int, str]:
    """(height, width, step, encoding) of an image message; a zero size raises ``error`` "empty"."""
    height, width, step, encoding = int(msg.height), int(msg.width), int(msg.step), str(msg.encoding)
    if height == 0 or width == 0:
        raise error("empty", f"{what} has zero size ({width}x{height}, encoding {encoding!r})")
    return height, width, step, encoding


def checked_rows(msg: Any, row_bytes: int, unit: str, error: type = ImageError) -> memoryview:
    """The bytes of an image message whose rows need ``row_bytes`` each (``unit``: what a pixel
    is, for the message), after checking ``step`` and the data length; raises ``error`` with
    reason "step" or "truncated"."""
    height, width, step, encoding = int(msg.height), int(msg.width), int(msg.step), str(msg.encoding)
    if step < row_bytes:
        raise error("step", f"step {step} is less than width {width} x {unit} = {row_bytes} bytes ({encoding})")
    data = memoryview(msg.data).cast("B")
    needed = step * height
    if data.nbytes < needed:
        raise error("truncated", f"image data has {data.nbytes} bytes, but step {step} x height {height} "
                                 f"= {needed} ({width}x{height} {encoding})")
    return data


def image_to_rgb(msg: Any) -> np.ndarray:
    """A ``sensor_msgs/Image`` as a C-contiguous ``[H, W, 3]`` uint8 RGB array.

    Rows may be padded (``step > width * channels``); extra bytes after ``step * height``
    are ignored, as cv_bridge does. For ``rgb8`` without padding the array is a view of
    the message's buffer (no copy).
    """
    height, width, step, encoding = image_header(msg, "image", ImageError)
    name = _OPENCV_TYPES.get(encoding.lower(), encoding.lower())
    channels = CHANNELS.get(name)
    if channels is None:
        raise ImageError("encoding", f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
                                     f"(and OpenCV's 8UC3 / 8UC4 / 8UC1, read as bgr8 / bgra8 / mono8)")
    row_bytes = width * channels
    data = checked_rows(msg, row_bytes, f"{channels} channels", ImageError)
    rows = np.frombuffer(data, dtype=np.uint8, count=step * height).reshape(height, step)[:, :row_bytes]
    pixels = rows.reshape(height, width, channels)
    conversion = _TO_RGB[name]
    if conversion is None:
        return np.ascontiguousarray(pixels)
    if channels == 1:
        pixels = pixels[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG, PNG, ... as OpenCV reads them) as ``[H, W, 3]`` RGB.

    image_transport's compressed plugin writes colour images in BGR byte order whatever its
    ``format`` string says ("rgb8; jpeg compressed bgr8"), which is what ``cv2.imdecode`` returns.
    """
    data = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8)
    if data.size == 0:
        raise ImageError("empty", f"compressed image has no data (format {msg.format!r})")
    # The stored pixel grid, as training and `toist predict` read it (OpenCV would apply an EXIF
    # orientation: one JPEG, two grids, boxes that disagree between the topic and the service).
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.size == 0:
        raise ImageError("decode", f"OpenCV cannot decode the {data.size} bytes of compressed image "
                                   f"(format {msg.format!r}, first bytes {bytes(data[:8]).hex()})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_from_array(pixels: np.ndarray, encoding: str = "rgb8", header: Optional[Any] = None,
                     source_order: str = "rgb"):
    """A ``sensor_msgs/Image`` with ``encoding`` from an ``[H, W, 3]`` uint8 array.

    ``source_order`` is the channel order of ``pixels`` ("rgb" or "bgr"); ``mono8`` takes
    ``[H, W]`` or ``[H, W, 3]``.
    """
    from sensor_msgs.msg import Image

    encoding = encoding.lower()
    if encoding not in CHANNELS:
        raise ValueError(f"cannot build an image with encoding {encoding!r}; "
                         f"supported: {', '.join(SUPPORTED_ENCODINGS)}")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be [H, W, 3] (or [H, W]), got shape {tuple(pixels.shape)}")
    if source_order == "bgr":
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif source_order != "rgb":
        raise ValueError(f"source_order must be 'rgb' or 'bgr', got {source_order!r}")
    conversion = _FROM_RGB[encoding]
    out = np.ascontiguousarray(pixels if conversion is None else cv2.cvtColor(np.ascontiguousarray(pixels), conversion))
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(out.shape[0]), int(out.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * CHANNELS[encoding]
    msg.data = _byte_array(out)
    return msg


def compressed_from_array(rgb: np.ndarray, fmt: str = "jpeg", header: Optional[Any] = None, quality: int = 90):
    """A ``sensor_msgs/CompressedImage`` (jpeg or png) of an ``[H, W, 3]`` RGB array, as image_transport writes it."""
    from sensor_msgs.msg import CompressedImage

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be 'jpeg' or 'png', got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, encoded = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {tuple(rgb.shape)} image as {fmt}")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = f"rgb8; {fmt} compressed bgr8"
    msg.data = _byte_array(encoded)
    return msg


def mask_to_image(mask: np.ndarray, header: Optional[Any] = None):
    """A mono8 0/255 ``sensor_msgs/Image`` of a boolean ``[h, w]`` mask (cv_bridge-decodable)."""
    from sensor_msgs.msg import Image

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [h, w], got shape {tuple(mask.shape)}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(mask.shape[0]), int(mask.shape[1])
    msg.encoding = "mono8"
    msg.is_bigendian = 0
    msg.step = msg.width
    msg.data = _byte_array(np.where(mask, np.uint8(255), np.uint8(0)))
    return msg


def mask_from_image(msg: Any) -> np.ndarray:
    """The boolean ``[h, w]`` mask of a mono8 mask image (non-zero = object); ``[0, 0]`` when empty."""
    if int(msg.height) == 0 or int(msg.width) == 0:
        return np.zeros((int(msg.height), int(msg.width)), dtype=bool)
    if str(msg.encoding).lower() != "mono8":
        raise ImageError("encoding", f"a mask must be mono8, got {msg.encoding!r}")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = memoryview(msg.data).cast("B")
    if step < width or data.nbytes < step * height:
        raise ImageError("truncated", f"mask data has {data.nbytes} bytes, expected step {step} x height {height}")
    rows = np.frombuffer(data, dtype=np.uint8, count=step * height).reshape(height, step)
    return rows[:, :width] > 0


def _byte_array(pixels: np.ndarray) -> array.array:
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(pixels).tobytes())
    return out
