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
    buffer where possible) and the factor to metres."""

    raw: np.ndarray
    scale: float

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return int(self.raw.shape[1]), int(self.raw.shape[0])


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
    return DepthImage(raw, scale)


def intrinsics_from_camera_info(msg: Any) -> Intrinsics:
    """The pinhole intrinsics of a ``sensor_msgs/CameraInfo`` (K); raises :class:`DepthError`."""
    k = [float(v) for v in msg.k]
    if len(k) != 9:
        raise DepthError("camera_info", f"CameraInfo K has {len(k)} entries, expected 9")
    intrinsics = Intrinsics(fx=k[0], fy=k[4], cx=k[2], cy=k[5], width=int(msg.width), height=int(msg.height))
    problem = intrinsics.check()
    if problem:
        raise DepthError("camera_info", f"CameraInfo (frame {msg.header.frame_id!r}) cannot be used: {problem}")
    return intrinsics


def has_distortion(msg: Any) -> bool:
    """Whether a CameraInfo carries non-zero distortion coefficients (which the geometry ignores);
    a NaN coefficient counts (``abs(nan) > 1e-6`` is False: it passed for none)."""
    return any(not abs(float(v)) <= 1e-6 for v in msg.d)


__all__ = ["DEPTH_ENCODINGS", "DepthError", "DepthImage", "depth_from_image", "has_distortion",
           "intrinsics_from_camera_info"]
