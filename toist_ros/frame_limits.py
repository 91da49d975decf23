"""Bounds on what an incoming image may be before anything is decoded or handed to the model.

A 95 KB PNG that declares 10000x10000 pixels decodes to 300 MB (the node once reached 9.7 GB
RSS and stopped answering), and a 4000x1 strip resized to the model's input becomes a strip of
zero pixels that fails inside the model. Both are refused here with an ``ImageError`` whose
``reason`` is the counter key:

* ``too_large``: width x height over ``input.max_pixels``. Raw images are checked from their
  ``width`` / ``height`` fields, compressed ones from their header (Pillow reads only the
  header), before any pixel is decoded;
* ``aspect``: at the model's input size (short side ``short_side``, long side at most
  ``max_side``) the image's short side would be under ``MIN_MODEL_SIDE`` pixels;
* ``stamp``: ``header.stamp`` before 1970 (negative seconds): no time ROS can compute an age or a
  latency with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from toist_core.data.tiff_orientation import tiff_orientation_problem
from toist_ros.conversions import ImageError, compressed_to_rgb, image_to_rgb

# Under half the backbone's 32-pixel stride the feature map of the short side is a single row
# (or none: a 4000x1 frame at long side 1333 is 0.3 px high and fails inside the model).
MIN_MODEL_SIDE = 16


@dataclass(frozen=True)
class FrameLimits:
    """``max_pixels``: the largest width x height accepted; ``short_side`` / ``max_side``: the
    model's input resize (what ``TaskSegmenter.inference`` resolved)."""

    max_pixels: int
    short_side: int
    max_side: int

    def check_size(self, width: int, height: int) -> None:
        """Raise ImageError when a ``width`` x ``height`` image must not reach the model."""
        pixels = int(width) * int(height)
        if pixels > self.max_pixels:
            raise ImageError("too_large", f"image is {width}x{height} = {pixels} pixels, more than input.max_pixels "
                                          f"{self.max_pixels}")
        short, long = sorted((int(width), int(height)))
        if short <= 0:
            return  # the converters say "empty" with their own message
        scale = min(self.short_side / short, self.max_side / long)
        if short * scale < MIN_MODEL_SIDE:
            raise ImageError("aspect", f"image is {width}x{height}: resized for the model (short side "
                                       f"{self.short_side}, long side at most {self.max_side}) its short side would be "
                                       f"{short * scale:.1f} px, under {MIN_MODEL_SIDE} px; aspect ratios up to "
                                       f"{self.max_side / MIN_MODEL_SIDE:.0f}:1 are accepted")

    def image_to_rgb(self, msg: Any) -> np.ndarray:
        """``conversions.image_to_rgb`` after the stamp and size checks."""
        check_stamp(msg.header.stamp)
        self.check_size(int(msg.width), int(msg.height))
        return image_to_rgb(msg)

    def compressed_to_rgb(self, msg: Any) -> np.ndarray:
        """``conversions.compressed_to_rgb`` after the stamp check and the size checks on the image's header."""
        check_stamp(msg.header.stamp)
        width, height = compressed_size(msg)
        self.check_size(width, height)
        return compressed_to_rgb(msg)


def check_stamp(stamp: Any) -> None:
    """Raise ImageError for a ``builtin_interfaces/Time`` with negative seconds (rclpy's ``Time``
    refuses it: the frame would fail in the inference thread instead of being counted here)."""
    if int(stamp.sec) < 0:
        raise ImageError("stamp", f"header.stamp is {stamp.sec} s {stamp.nanosec} ns: negative seconds (before "
                                  "1970) is no time; stamp frames with the capture time, or leave the stamp 0")


def compressed_size(msg: Any) -> tuple[int, int]:
    """(width, height) a compressed image declares in its header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    data = bytes(memoryview(msg.data).cast("B"))
    if not data:
        raise ImageError("empty", f"compressed image has no data (format {msg.format!r})")
    try:
        with warnings.catch_warnings():
            # Pillow warns (or refuses) above its own pixel limit; ours is input.max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                problem = tiff_orientation_problem(image)
                size = image.size
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"compressed image declares too many pixels ({exc})") from None
    # A decoder's own RuntimeError too (Pillow's AVIF plugin on a garbled file: it reached the
    # node's callback as an internal error, traceback and all, not a rejected frame).
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise ImageError("decode", f"cannot read the header of the {len(data)} bytes of compressed image "
                                   f"(format {msg.format!r}, first bytes {data[:8].hex()}): {exc}") from None
    if problem:
        raise ImageError("decode", f"compressed image (format {msg.format!r}): {problem}")
    return size


__all__ = ["FrameLimits", "MIN_MODEL_SIDE", "check_stamp", "compressed_size"]
