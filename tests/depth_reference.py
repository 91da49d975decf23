"""The numpy implementation of :func:`toist_ros.depth.geometry.instance_3d`, as it was before the
compiled kernel (toist_ros/depth/geometry_kernel.py) replaced it: the reference the kernel must
equal (tests/test_depth_kernel.py) and the "old" column of bench/bench_ros_latency.py.

The algorithm is geometry's module docstring; here each step is a few numpy passes over the
instance's window (and OpenCV's min filter), which is what made it slow (docs/performance.md).
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

from toist_ros.depth.geometry import (EDGE_JUMP_FRACTION, EDGE_JUMP_M, EDGE_JUMP_SIGMAS, EDGE_SLOPE_LIMITS,
                                      GAP_FRACTION, GAP_M, MAX_SAMPLES, NEAREST_SHARE, NOISE_SAMPLES,
                                      SURFACE_WINDOW_PX, DepthLimits, Instance3D, Intrinsics, depth_window, invalid_3d)


def instance_3d(mask_crop: np.ndarray, roi: tuple[int, int, int, int], depth: np.ndarray, depth_scale: float,
                colour: Intrinsics, limits: DepthLimits = DepthLimits()) -> Instance3D:
    """The 3D summary of one instance (the steps in the module docstring).

    mask_crop [h, w] bool at ``roi`` = (x, y, w, h) in the colour image (whose intrinsics are
    ``colour``, at the colour image's size); depth [Hd, Wd] registered to the colour image, raw
    (uint16 millimetres or float32 metres), metres = value * ``depth_scale``.
    """
    window = depth_window(roi, depth.shape, colour)  # shared with the kernel's caller: plain Python
    if mask_crop is None or window is None:
        return invalid_3d()
    x0, y0 = int(roi[0]), int(roi[1])
    cam, s, t, u0, u1, v0, v1, step = (window.camera, window.s, window.t, window.u0, window.u1, window.v0, window.v1,
                                       window.step)
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

    box_center = np.array([(x.max() + x.min()) / 2.0, (y.max() + y.min()) / 2.0,
                           (float(col_near[cols].min()) + float(col_far[cols].max())) / 2.0])
    surface = _surface_point(centroid, z, kept, u0, v0, step, cam)
    return Instance3D(True, centroid, extent, surface, box_center, points, fraction)


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
    """Depth noise sigma (metres) from second differences along rows over ``chosen`` pixels of
    one surface (consecutive depths within the gap of step 3; on every k-th row, enough for
    ~``NOISE_SAMPLES`` of them)."""
    every = max(1, z.shape[0] * z.shape[1] // (4 * NOISE_SAMPLES))
    z, chosen = z[::every], chosen[::every]
    gap = np.float32(GAP_M) + np.float32(GAP_FRACTION) * z[:, 1:-1]
    with np.errstate(invalid="ignore"):   # inf - inf where pixels are not chosen: masked out below
        one_surface = (np.abs(z[:, 1:-1] - z[:, :-2]) <= gap) & (np.abs(z[:, 2:] - z[:, 1:-1]) <= gap)
    both = chosen[:, :-2] & chosen[:, 1:-1] & chosen[:, 2:] & one_surface
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
