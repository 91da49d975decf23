"""Where an instance is in 3D: its mask, a registered depth image and the colour camera's intrinsics.

Plain numpy (and OpenCV's min filter), no ROS. Conventions (REP 103 optical frame, the frame of
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
   second differences along rows (``1.4826 MAD / sqrt(6)``: a second difference cancels a
   surface's slope and has variance 6 sigma^2 for independent noise);
6. surface point: the ray through the centroid, scaled to the median depth of the inliers within
   ``SURFACE_WINDOW_PX`` depth pixels of the centroid's projection (the nearest inlier pixel's
   depth when none is that close: a ring seen through its hole).

All of it describes the visible surface: one view does not see an object's back. Accuracy,
measured by tests/test_depth_geometry.py on rendered scenes: docs/ros.md ("3D instances").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import cv2
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
    """Pinhole intrinsics of a ``width`` x ``height`` image (from CameraInfo's K)."""

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
            return f"K has a non-finite entry (fx {self.fx}, fy {self.fy}, cx {self.cx}, cy {self.cy})"
        if self.fx <= 0 or self.fy <= 0:
            return f"K has fx {self.fx}, fy {self.fy}: focal lengths must be > 0 (an uncalibrated camera publishes 0)"
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
    points: int                 # usable depth pixels of the mask (inliers and outliers)
    fraction: float             # points / mask pixels seen by the depth image (0 when none)


def invalid_3d(points: int = 0, fraction: float = 0.0) -> Instance3D:
    zero = np.zeros(3, dtype=np.float64)
    return Instance3D(False, zero, zero, zero, int(points), float(fraction))


def instance_3d(mask_crop: np.ndarray, roi: tuple[int, int, int, int], depth: np.ndarray, depth_scale: float,
                colour: Intrinsics, limits: DepthLimits = DepthLimits()) -> Instance3D:
    """The 3D summary of one instance (the steps in the module docstring).

    mask_crop [h, w] bool at ``roi`` = (x, y, w, h) in the colour image (whose intrinsics are
    ``colour``, at the colour image's size); depth [Hd, Wd] registered to the colour image, raw
    (uint16 millimetres or float32 metres), metres = value * ``depth_scale``.
    """
    x0, y0, w, h = (int(v) for v in roi)
    if mask_crop is None or w <= 0 or h <= 0:
        return invalid_3d()
    depth_h, depth_w = depth.shape
    cam = colour.scaled(depth_w, depth_h)
    s, t = depth_w / colour.width, depth_h / colour.height
    # Depth pixels whose colour pixel lies in the roi (two more on each side for the edge test).
    u0, u1 = max(0, math.floor(x0 * s) - 2), min(depth_w, math.ceil((x0 + w) * s) + 2)
    v0, v1 = max(0, math.floor(y0 * t) - 2), min(depth_h, math.ceil((y0 + h) * t) + 2)
    if u1 <= u0 or v1 <= v0:
        return invalid_3d()
    # Large instances are read on a grid of every step-th depth pixel (cost ~ WINDOW_PIXELS).
    step = max(1, math.ceil(math.sqrt((u1 - u0) * (v1 - v0) / WINDOW_PIXELS)))
    on_mask = _mask_on_depth(mask_crop, x0, y0, np.arange(u0, u1, step), np.arange(v0, v1, step), s, t)
    seen = int(np.count_nonzero(on_mask))
    if seen == 0:
        return invalid_3d()

    z = depth[v0:v1:step, u0:u1:step].astype(np.float32)
    if depth_scale != 1.0:
        z *= np.float32(depth_scale)
    with np.errstate(invalid="ignore"):
        # 0 is "no measurement" in both encodings, even with min_m 0; NaN fails both tests.
        usable = (z >= max(limits.min_m, 1e-6)) & (z <= limits.max_m)
    chosen = on_mask & usable
    points = int(np.count_nonzero(chosen))
    fraction = points / seen
    if points < limits.min_points:
        return invalid_3d(points, fraction)

    noise = _depth_noise(z, chosen)
    edges = _depth_edges(z, usable, chosen, noise)
    if edges is not None and points - int(np.count_nonzero(edges)) >= limits.min_points:
        chosen &= ~edges
    # The range is found on a sample (a grid of the window with ~MAX_SAMPLES chosen pixels);
    # points within one gap of it are connected to it too.
    every = max(1, int(math.sqrt(points / MAX_SAMPLES)))
    sample = z[::every, ::every][chosen[::every, ::every]]
    if sample.size < limits.min_points:
        sample = z[chosen]
    low, high, z_mid = _depth_cluster(sample)
    kept = chosen & (z >= np.float32(low - _gap(low))) & (z <= np.float32(high + _gap(high)))
    count = int(np.count_nonzero(kept))
    if count < limits.min_points:
        return invalid_3d(points, fraction)

    # Sums and extremes by rows and columns of the window: X = (u - cx) Z / fx is linear in Z
    # within a column, so a column's extreme X lie at its nearest and farthest kept depths.
    us = u0 + step * np.arange(z.shape[1], dtype=np.float64)                  # [W] depth pixel columns
    vs = v0 + step * np.arange(z.shape[0], dtype=np.float64)                  # [H] depth pixel rows
    kept_z = np.where(kept, z, np.float32(0))
    col_sum, row_sum = kept_z.sum(axis=0, dtype=np.float64), kept_z.sum(axis=1, dtype=np.float64)
    z_sum = float(col_sum.sum())
    centroid = np.array([(col_sum @ us - cam.cx * z_sum) / cam.fx, (row_sum @ vs - cam.cy * z_sum) / cam.fy,
                         z_sum]) / count
    nearest = np.where(kept, z, np.float32(np.inf))
    col_near, col_far = nearest.min(axis=0), kept_z.max(axis=0)   # kept depths are > 0
    row_near, row_far = nearest.min(axis=1), kept_z.max(axis=1)
    cols, rows = col_sum > 0, row_sum > 0
    x = np.concatenate([(us[cols] - cam.cx) / cam.fx * col_near[cols], (us[cols] - cam.cx) / cam.fx * col_far[cols]])
    y = np.concatenate([(vs[rows] - cam.cy) / cam.fy * row_near[rows], (vs[rows] - cam.cy) / cam.fy * row_far[rows]])
    extent = np.array([x.max() - x.min() + step * z_mid / cam.fx, y.max() - y.min() + step * z_mid / cam.fy,
                       float(col_far[cols].max() - col_near[cols].min())])
    widening = 2.0 * math.sqrt(2.0 * math.log(max(count, 2))) * noise
    extent[2] = math.sqrt(max(0.0, extent[2] ** 2 - widening ** 2))

    surface = _surface_point(centroid, z, kept, u0, v0, step, cam)
    return Instance3D(True, centroid, extent, surface, points, fraction)


def _mask_on_depth(mask_crop: np.ndarray, x0: int, y0: int, us: np.ndarray, vs: np.ndarray,
                   s: float, t: float) -> np.ndarray:
    """[len(vs), len(us)] bool: whether the colour pixel under depth pixel (us[j], vs[i]) is in
    ``mask_crop`` [h, w] (placed at x0, y0); s, t: depth size / colour size."""
    h, w = mask_crop.shape
    out = np.zeros((vs.size, us.size), dtype=bool)
    if s == 1.0 and t == 1.0 and (us.size < 2 or us[1] - us[0] == 1) and (vs.size < 2 or vs[1] - vs[0] == 1):
        # Same size, every pixel: the crop itself, placed (the common case, no gather).
        cx0, cy0 = max(0, x0 - int(us[0])), max(0, y0 - int(vs[0]))
        mx0, my0 = max(0, int(us[0]) - x0), max(0, int(vs[0]) - y0)
        cw, ch = min(w - mx0, us.size - cx0), min(h - my0, vs.size - cy0)
        if cw > 0 and ch > 0:
            out[cy0:cy0 + ch, cx0:cx0 + cw] = mask_crop[my0:my0 + ch, mx0:mx0 + cw]
        return out
    cols = np.floor((us + 0.5) / s).astype(np.int64) - x0
    rows = np.floor((vs + 0.5) / t).astype(np.int64) - y0
    col_in = (cols >= 0) & (cols < w)
    row_in = (rows >= 0) & (rows < h)
    out[np.ix_(row_in, col_in)] = mask_crop[np.ix_(rows[row_in], cols[col_in])]
    return out


def _depth_noise(z: np.ndarray, chosen: np.ndarray) -> float:
    """Depth noise sigma (metres) from second differences along rows over ``chosen`` pixels
    (on every k-th row, enough for ~``NOISE_SAMPLES`` of them)."""
    every = max(1, z.shape[0] * z.shape[1] // (4 * NOISE_SAMPLES))
    z, chosen = z[::every], chosen[::every]
    both = chosen[:, :-2] & chosen[:, 1:-1] & chosen[:, 2:]
    if np.count_nonzero(both) < 10:
        return 0.0
    second = (z[:, :-2] - 2.0 * z[:, 1:-1] + z[:, 2:])[both]
    second = second[:: max(1, second.size // NOISE_SAMPLES)]
    return 1.4826 * _median(np.abs(second - _median(second))) / math.sqrt(6.0)


def _median(values: np.ndarray) -> float:
    """The (upper) median of a non-empty 1-D array: one partition, none of np.median's checks."""
    middle = values.size // 2
    return float(np.partition(values, middle)[middle])


_KERNEL = np.ones((3, 3), np.uint8)
_DIRECTIONS = np.array([(0, 1), (1, 0), (1, 1), (1, -1), (0, -1), (-1, 0), (-1, -1), (-1, 1)])  # [8, 2]


def _depth_edges(z: np.ndarray, usable: np.ndarray, chosen: np.ndarray, noise: float) -> Optional[np.ndarray]:
    """[H, W] bool: the ``chosen`` pixels behind a depth jump (module docstring, step 2), or None.

    Only a pixel farther than its nearest 8-neighbour by J > limit can be behind a jump. With J >
    (EDGE_SLOPE_LIMITS + 1) limit it is, whatever the slope (a continued slope is at most
    EDGE_SLOPE_LIMITS limits): outlines and spill, decided at once. The slope test runs on the
    few pixels in between (steep surfaces, noise).
    """
    far = np.where(usable, z, np.float32(np.inf))  # no depth: never the nearest, never "behind"
    nearest = cv2.erode(far, _KERNEL, borderType=cv2.BORDER_REPLICATE)
    with np.errstate(invalid="ignore"):
        limit = np.maximum(EDGE_JUMP_M + EDGE_JUMP_FRACTION * nearest, np.float32(EDGE_JUMP_SIGMAS * noise))
        jump = z - nearest
        edges = chosen & (jump > (EDGE_SLOPE_LIMITS + 1.0) * limit)
        rows, cols = np.nonzero(chosen & (jump > limit) & ~edges)
        if rows.size:
            padded = cv2.copyMakeBorder(far, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=float("inf"))
            width = padded.shape[1]
            flat = padded.ravel()
            centre = (rows + 2) * width + cols + 2                                    # [N]
            offsets = _DIRECTIONS[:, 0] * width + _DIRECTIONS[:, 1]                     # [8]
            near = flat[centre[:, None] - offsets]                                    # [N, 8] one step back
            slope = near - flat[centre[:, None] - 2 * offsets]                        # minus two steps back
            own = limit[rows, cols][:, None]                                          # [N, 1]
            # Continue the surface's slope where the two pixels behind lie on one surface; a
            # neighbour without depth (inf) predicts nothing (z - inf is never > own).
            predicted = np.where(np.abs(slope) <= EDGE_SLOPE_LIMITS * own, near + slope, near)
            behind = (z[rows, cols][:, None] - predicted > own).any(axis=1)
            edges[rows[behind], cols[behind]] = True
    return edges if edges.any() else None


def _depth_cluster(zs: np.ndarray) -> tuple[float, float, float]:
    """(low, high, median) of the object's depths (module docstring, step 3): the nearest run of
    sorted depths without a gap that holds at least ``NEAREST_SHARE`` of them (else the largest run)."""
    order = np.sort(zs)
    ends = np.flatnonzero(np.diff(order) > _gap(order[1:]))  # a run ends at order[end]
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends + 1, [order.size]])
    sizes = stops - starts
    large = np.flatnonzero(sizes >= NEAREST_SHARE * order.size)
    run = int(large[0]) if large.size else int(np.argmax(sizes))
    start, stop = int(starts[run]), int(stops[run])
    return float(order[start]), float(order[stop - 1]), float(order[(start + stop) // 2])


def _gap(z):
    return GAP_M + GAP_FRACTION * z


def _surface_point(centroid: np.ndarray, z: np.ndarray, kept: np.ndarray, u0: int, v0: int, step: int,
                   cam: Intrinsics) -> np.ndarray:
    """The point of the ray through ``centroid`` at the surface's depth around its projection:
    the median of the ``kept`` [H, W] depths of the window ``z`` (whose pixel (0, 0) is depth
    pixel (u0, v0), sampled every ``step``) within ``SURFACE_WINDOW_PX`` grid steps of it, or the
    nearest kept depth."""
    col = int(round((cam.fx * centroid[0] / centroid[2] + cam.cx - u0) / step))
    row = int(round((cam.fy * centroid[1] / centroid[2] + cam.cy - v0) / step))
    r0, c0 = max(0, row - SURFACE_WINDOW_PX), max(0, col - SURFACE_WINDOW_PX)
    near = z[r0:row + SURFACE_WINDOW_PX + 1, c0:col + SURFACE_WINDOW_PX + 1][
        kept[r0:row + SURFACE_WINDOW_PX + 1, c0:col + SURFACE_WINDOW_PX + 1]]
    if near.size:
        depth = _median(near)
    else:
        rows, cols = np.nonzero(kept)
        nearest = np.argmin((rows - row) ** 2 + (cols - col) ** 2)
        depth = float(z[rows[nearest], cols[nearest]])
    return centroid * (depth / centroid[2])


__all__ = ["DepthLimits", "Instance3D", "Intrinsics", "instance_3d", "invalid_3d"]
