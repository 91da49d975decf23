"""Depth images and CameraInfo messages -> numpy and :class:`Intrinsics`, checked, without cv_bridge.

REP 118 depth images: ``16UC1`` in millimetres (0 = no measurement) or ``32FC1`` in metres (0,
NaN or inf = no measurement). Anything else is refused with a :class:`DepthError` whose
``reason`` is the diagnostics counter key (``depth_rejected_<reason>``), as colour images are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toist_ros.conversions import ImageError, checked_rows, image_header
from toist_ros.depth.geometry import Intrinsics

# encoding -> (numpy dtype, metres per unit)
DEPTH_ENCODINGS: dict[str, tuple[str, float]] = {"16UC1": ("u2", 0.001), "32FC1": ("f4", 1.0)}


class DepthError(ImageError):
    """A depth image or CameraInfo that cannot be used; ``reason`` is the counter key."""


@dataclass(frozen=True)
class DepthImage:
    """A depth image as received: ``raw`` [H, W] (uint16 or float32, a view of the message's
    buffer where possible), the factor to metres and the header's ``frame_id``."""

    raw: np.ndarray
    scale: float
    frame_id: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return int(self.raw.shape[1]), int(self.raw.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of depth held (what the pairing ring's MAX_BYTES counts)."""
        return int(self.raw.nbytes)


def depth_from_image(msg: Any) -> DepthImage:
    """A ``sensor_msgs/Image`` depth image as a :class:`DepthImage`; raises :class:`DepthError`."""
    height, width, step, encoding = image_header(msg, "depth image", DepthError)
    known = DEPTH_ENCODINGS.get(encoding.upper())
    if known is None:
        raise DepthError("encoding", f"unsupported depth encoding {encoding!r}; supported: 16UC1 (millimetres), "
                                     "32FC1 (metres)")
    kind, scale = known
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    data = checked_rows(msg, width * dtype.itemsize, f"{dtype.itemsize} bytes", DepthError)
    # A view with the rows' byte stride (any step, padded or not; no copy).
    raw = np.ndarray((height, width), dtype=dtype, buffer=data, strides=(step, dtype.itemsize))
    if not dtype.isnative:
        raw = raw.astype(dtype.newbyteorder("="))
    return DepthImage(raw, scale, str(msg.header.frame_id))


def intrinsics_from_camera_info(msg: Any) -> Intrinsics:
    """The pinhole intrinsics of the image a ``sensor_msgs/CameraInfo`` describes; raises
    :class:`DepthError`.

    P's left 3x3 when P is set, as image_geometry and depth_image_proc read it: the camera of the
    rectified image (``image_rect``, what the node is told to be fed when the lens distorts), and K
    itself for an undistorted camera (the RGB-D drivers publish P = K); K when P is all zeros (a
    driver that fills K only). A region of interest (``roi``, a driver's or image_proc's crop) moves
    the principal point by its offset and gives the image's size before binning; binning
    (``binning_x``, ``binning_y``: one pixel per block of that many, each axis its own) divides the
    size and the focal length and maps the principal point as pixel centres map."""
    frame = msg.header.frame_id
    k, p = _matrix(msg.k, 9, "K", frame), _matrix(msg.p, 12, "P", frame)
    if any(p):
        fx, fy, cx, cy = p[0], p[5], p[2], p[6]
    else:
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
    width, height = int(msg.width), int(msg.height)
    roi = msg.roi
    if int(roi.width) > 0 and int(roi.height) > 0:
        cx, cy = cx - int(roi.x_offset), cy - int(roi.y_offset)
        width, height = int(roi.width), int(roi.height)
    bin_x, bin_y = max(1, int(msg.binning_x)), max(1, int(msg.binning_y))   # 0 means 1 (no binning)
    if bin_x > 1 or bin_y > 1:
        # Binned pixel j covers full-resolution pixels [b j, b j + b): centre b j + (b - 1) / 2.
        fx, cx, width = fx / bin_x, (cx + 0.5) / bin_x - 0.5, width // bin_x
        fy, cy, height = fy / bin_y, (cy + 0.5) / bin_y - 0.5, height // bin_y
    intrinsics = Intrinsics(fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height)
    problem = intrinsics.check()
    if problem:
        raise DepthError("camera_info", f"CameraInfo (frame {frame!r}) cannot be used: {problem} "
                                        f"({'P' if any(p) else 'K, P unset'})")
    return intrinsics


def _matrix(values: Any, size: int, name: str, frame: str) -> list[float]:
    entries = [float(v) for v in values]
    if len(entries) != size:
        raise DepthError("camera_info", f"CameraInfo (frame {frame!r}) {name} has {len(entries)} entries, "
                                        f"expected {size}")
    return entries


def has_distortion(msg: Any) -> bool:
    """Whether a CameraInfo carries non-zero distortion coefficients (which the geometry ignores);
    a NaN coefficient counts (``abs(nan) > 1e-6`` is False: it passed for none)."""
    return any(not abs(float(v)) <= 1e-6 for v in msg.d)


__all__ = ["DEPTH_ENCODINGS", "DepthError", "DepthImage", "depth_from_image", "has_distortion",
           "intrinsics_from_camera_info"]
