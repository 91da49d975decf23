"""Where an instance is in 3D: its mask, a registered depth image and the colour camera's intrinsics.

numpy and a numba-compiled kernel (toist_ros/depth/geometry_kernel.py, steps 1-6 below in a few
loops over the instance's window), no ROS. Conventions (REP 103 optical frame, the frame of
the colour image's header): x right, y down, z forward along the optical axis, metres. Pixel
centres sit at integer coordinates, as in ``sensor_msgs/CameraInfo``'s K.

Back-projection of depth pixel (u, v) with depth Z (pinhole, distortion ignored: feed rectified
or nearly distortion-free images, as RGB-D cameras publish for the registered pair)::

    X = (u - cx) Z / fx        Y = (v - cy) Z / fy

A depth image registered to the colour camera but of another size sees the same view through
intrinsics scaled by s = W_depth / W_colour (t = H_depth / H_colour)::

    fx' = s fx    cx' = s (cx + 0.5) - 0.5        (likewise fy', cy' with t)

and the colour pixel under depth pixel (u, v) is (floor((u + 0.5) / s), floor((v + 0.5) / t)).

Per instance (:func:`instance_3d`), over the depth pixels whose colour pixel is in the mask (for
a large instance, every ``step``-th depth pixel in both directions, so that its window holds about
``WINDOW_PIXELS``: the cost stays bounded, the extents below grow by one step's footprint where
they grew by one pixel's, and a pixel's neighbours are the grid's):

1. usable: depth within ``[min_m, max_m]`` (0 = no measurement in both encodings; NaN, inf out);
2. not behind a depth edge: a pixel farther, by more than ``max(EDGE_JUMP_M + EDGE_JUMP_FRACTION
   * Z, EDGE_JUMP_SIGMAS * sigma)`` (sigma: the depth noise of step 5), than the surface its
   neighbours continue in one of the 8 directions (the neighbour's depth plus the slope of the
   two pixels behind it, so a steep surface is not an edge) may be a "flying pixel" mixing the
   object and what lies behind it; dropped, unless that leaves fewer than ``min_points``. Only
   the farther side of a jump is dropped: the object's outline pixels, whose neighbour is the
   background, stay (they hold its extreme points);
3. one surface: sorted depths split into runs where consecutive ones are more than ``GAP_M +
   GAP_FRACTION * Z`` apart (found on at most ``MAX_SAMPLES`` of them); the object is the nearest
   run holding at least ``NEAREST_SHARE`` of the depths (the largest run if none does). A mask
   that spills onto what lies behind (even onto more pixels than the object's), or a hole that
   shows another surface, is left out, stray flying pixels make runs too small to count, and a
   surface spanning a wide range of depths (a box's side, a tilted tray) stays whole;
4. centroid: the mean of the inlier points, the centre of the visible surface as the image sees
   it (each pixel counts once, so a side seen at a grazing angle counts for the few pixels it
   covers; for a surface facing the camera it is the surface's centre);
5. extent: per axis, the inliers' range; on x and y plus one grid step's footprint (step x
   median Z / f: points are sample centres, so a surface n samples wide spans n, not n - 1, steps); on z
   less the widening by the depth noise, in quadrature: ``sqrt(max(0, range^2 - (2 k sigma)^2))``
   with ``k = sqrt(2 ln N)`` (about the largest of N normal deviates) and sigma estimated from
   second differences along rows, of three pixels of one surface (consecutive depths within the
   gap of step 3: across a thin object's outline they measure the jump to what lies behind)
   (``1.4826 MAD / sqrt(6)``: a second difference cancels a
   surface's slope and has variance 6 sigma^2 for independent noise); the box it measures is
   centred on the middle of the ranges (``box_center``), which for a tilted or many-sided surface
   is not the centroid;
6. surface point: the ray through the centroid, scaled to the median depth of the inliers within
   ``SURFACE_WINDOW_PX`` depth pixels of the centroid's projection (the nearest inlier pixel's
   depth when none is that close: a ring seen through its hole).

All of it describes the visible surface: one view does not see an object's back. Accuracy,
measured by tests/test_depth_geometry.py on rendered scenes: docs/ros.md ("3D instances").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

EDGE_JUMP_M = 0.005         # a pixel behind its neighbours' surface by 5 mm + 1 % of Z marks a jump
EDGE_JUMP_FRACTION = 0.01   # (a surface at 60 degrees steps ~3 mm per pixel at 1 m, and the slope
                            # is continued anyway), or by 8 noise sigmas if more (the difference to
EDGE_JUMP_SIGMAS = 8.0      # an extrapolation from two noisy pixels has sigma sqrt(6) sigma)
EDGE_SLOPE_LIMITS = 4.0     # two neighbours further apart than 4 limits are not one surface
GAP_M = 0.03                # depths 3 cm + 2 % of Z apart (consecutive, sorted) are different surfaces
GAP_FRACTION = 0.02
NEAREST_SHARE = 0.25        # the nearest surface holding this share of the mask's depths is the object
SURFACE_WINDOW_PX = 2       # the surface point's depth: inliers within this many depth pixels
MAX_SAMPLES = 2048          # the depth range of a surface is found on at most this many of its pixels
NOISE_SAMPLES = 1024        # the noise sigma is estimated on at most ~this many second differences
WINDOW_PIXELS = 40_000      # an instance is read on a grid of at most ~this many depth pixels


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of a ``width`` x ``height`` image (from CameraInfo's P or K)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def scaled(self, width: int, height: int) -> "Intrinsics":
        """The same camera seen in an image resized to ``width`` x ``height``."""
        if (width, height) == (self.width, self.height):
            return self
        s, t = width / self.width, height / self.height
        return Intrinsics(self.fx * s, self.fy * t, s * (self.cx + 0.5) - 0.5, t * (self.cy + 0.5) - 0.5,
                          int(width), int(height))

    def check(self) -> Optional[str]:
        """Why these intrinsics cannot be used (None when they can)."""
        values = (self.fx, self.fy, self.cx, self.cy)
        if not all(math.isfinite(v) for v in values):
            return f"a non-finite entry (fx {self.fx}, fy {self.fy}, cx {self.cx}, cy {self.cy})"
        if self.fx <= 0 or self.fy <= 0:
            return f"fx {self.fx}, fy {self.fy}: focal lengths must be > 0 (an uncalibrated camera publishes 0)"
        if self.width <= 0 or self.height <= 0:
            return f"size {self.width}x{self.height}: width and height must be > 0"
        return None


@dataclass(frozen=True)
class DepthLimits:
    """Which depths count as measurements, and how many an instance needs for a 3D result."""

    min_m: float = 0.1
    max_m: float = 10.0
    min_points: int = 10


@dataclass(frozen=True)
class Instance3D:
    """The 3D summary of one instance; metres in the colour camera's optical frame."""

    valid: bool                 # False: too few usable depth pixels; the vectors are zeros
    centroid: np.ndarray        # [3] x, y, z: centre of the visible surface
    extent: np.ndarray          # [3] axis-aligned size of the visible surface
    surface_point: np.ndarray   # [3] where the ray through the centroid meets the surface
    box_center: np.ndarray      # [3] centre of the axis-aligned box ``extent`` measures
    points: int                 # usable depth pixels of the mask (inliers and outliers)
    fraction: float             # points / mask pixels seen by the depth image (0 when none)


def invalid_3d(points: int = 0, fraction: float = 0.0) -> Instance3D:
    zero = np.zeros(3, dtype=np.float64)
    return Instance3D(False, zero, zero, zero, zero, int(points), float(fraction))


def instance_3d(mask_crop: np.ndarray, roi: tuple[int, int, int, int], depth: np.ndarray, depth_scale: float,
                colour: Intrinsics, limits: DepthLimits = DepthLimits()) -> Instance3D:
    """The 3D summary of one instance (the steps in the module docstring).

    mask_crop [h, w] bool at ``roi`` = (x, y, w, h) in the colour image (whose intrinsics are
    ``colour``, at the colour image's size); depth [Hd, Wd] registered to the colour image, raw
    (uint16 millimetres or float32 metres), metres = value * ``depth_scale``.
    """
    # Imported here: numba (and loading the kernel) only for the 3D step's users, not for every
    # module that needs Intrinsics.
    from toist_ros.depth.geometry_kernel import measure

    window = depth_window(roi, depth.shape, colour)
    if mask_crop is None or window is None:
        return invalid_3d()
    # The kernel reads a C-contiguous float32 copy of the window (one compiled version; its loops
    # over it vectorise); float32(uint16 millimetres) is exact.
    pixels = np.ascontiguousarray(depth[window.v0:window.v1:window.step, window.u0:window.u1:window.step],
                                  dtype=np.float32)
    camera = window.camera
    points, seen, valid, vectors = measure(
        np.ascontiguousarray(mask_crop, dtype=bool), pixels, int(roi[0]), int(roi[1]), window.u0, window.v0,
        window.step, window.s, window.t, float(depth_scale), float(camera.fx), float(camera.fy), float(camera.cx),
        float(camera.cy), float(limits.min_m), float(limits.max_m), int(limits.min_points))
    if seen == 0:
        return invalid_3d()
    fraction = points / seen
    if not valid:
        return invalid_3d(points, fraction)
    return Instance3D(True, vectors[0:3], vectors[3:6], vectors[6:9], vectors[9:12], int(points), fraction)


@dataclass(frozen=True)
class DepthWindow:
    """The depth pixels an instance is read on: (u0 + step j, v0 + step i) below (u1, v1)."""

    camera: Intrinsics  # the colour camera's intrinsics scaled to the depth image
    s: float            # depth width / colour width
    t: float            # depth height / colour height
    u0: int
    u1: int
    v0: int
    v1: int
    step: int


def depth_window(roi: tuple[int, int, int, int], depth_shape: tuple[int, int],
                 colour: Intrinsics) -> Optional[DepthWindow]:
    """The depth pixels under ``roi`` = (x, y, w, h) in the colour image, two more on each side
    for the edge test, every step-th of them for a large instance (about WINDOW_PIXELS in all);
    None when that is no pixel."""
    x0, y0, w, h = (int(v) for v in roi)
    depth_h, depth_w = depth_shape
    if w <= 0 or h <= 0:
        return None
    s, t = depth_w / colour.width, depth_h / colour.height
    u0, u1 = max(0, math.floor(x0 * s) - 2), min(depth_w, math.ceil((x0 + w) * s) + 2)
    v0, v1 = max(0, math.floor(y0 * t) - 2), min(depth_h, math.ceil((y0 + h) * t) + 2)
    if u1 <= u0 or v1 <= v0:
        return None
    step = max(1, math.ceil(math.sqrt((u1 - u0) * (v1 - v0) / WINDOW_PIXELS)))
    return DepthWindow(colour.scaled(depth_w, depth_h), s, t, u0, u1, v0, v1, step)


def warm_up() -> float:
    """Load the kernel (compiling it, the first time on a machine: seconds) and run it once on a
    tiny synthetic instance, a plate 1 m away, so that no frame waits for it; returns the seconds."""
    start = time.perf_counter()
    plate = np.full((12, 16), 1000, np.uint16)
    camera = Intrinsics(20.0, 20.0, 7.5, 5.5, 16, 12)
    if not instance_3d(np.ones((6, 6), bool), (5, 3, 6, 6), plate, 0.001, camera).valid:
        raise RuntimeError("the 3D kernel found no plate in its warm-up instance")
    return time.perf_counter() - start


__all__ = ["DepthLimits", "DepthWindow", "Instance3D", "Intrinsics", "depth_window", "instance_3d", "invalid_3d",
           "warm_up"]
