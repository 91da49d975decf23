"""The per-instance work of :func:`toist_ros.depth.geometry.instance_3d`, compiled by numba.

Steps 1-6 of geometry's module docstring as a few loops over the instance's window, where numpy
made dozens of passes of 3-16 µs each (docs/performance.md, "3D step"). The arithmetic is the
numpy version's, operation for operation (float32 where it was float32: depths, jump limits, slope
continuation, gaps; float64 for sums and coordinates), so the results are the same numbers;
tests/test_depth_kernel.py checks that against that version (tests/depth_reference.py).

Compiled when this module is first imported, for one signature (C-contiguous float32 depths, the
caller converts; read-only arrays too), so that no frame triggers a compile. numba caches the
machine code in ``__pycache__`` (or its per-user cache where that is not writable): the first
import on a machine compiles (~10 s), later ones load it (under a second); the node does it at
start-up (geometry.warm_up). All the compiled code is in this one file because numba renews that
cache when the file of the cached function changes, not when a function it calls from another
file does.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types

from toist_ros.depth.geometry import (EDGE_JUMP_FRACTION, EDGE_JUMP_M, EDGE_JUMP_SIGMAS, EDGE_SLOPE_LIMITS,
                                      GAP_FRACTION, GAP_M, MAX_SAMPLES, NEAREST_SHARE, NOISE_SAMPLES,
                                      SURFACE_WINDOW_PX)

CHOSEN, EDGE, KEPT, MAYBE = 1, 2, 3, 4  # per window pixel: in the mask with a usable depth; behind a jump;
                                       # the object's; for the slope test
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, -1), (-1, 0), (-1, -1), (-1, 1))  # (row, column) steps


def _signature():
    """measure's argument types (C-contiguous arrays, read-only or not: a writable one converts)."""
    mask = types.Array(types.bool_, 2, "C", readonly=True)
    depth = types.Array(types.float32, 2, "C", readonly=True)
    return (mask, depth) + (types.int64,) * 5 + (types.float64,) * 9 + (types.int64,)


# --- Step 1: usable depths under the mask -------------------------------------------------------------

@njit
def _read_window(mask, depth, x0, y0, u0, v0, step, s, t, scale, min_m, max_m, far, state):
    """Step 1: ``far`` [H + 4, W + 4] gets the window's usable depths (metres, float32) inside
    its border of 2 (inf there and where a depth is not usable); ``state`` [H, W] gets CHOSEN
    where the colour pixel is in ``mask`` too. Returns (mask pixels seen, chosen pixels)."""
    h, w = depth.shape
    on_mask = _mask_on_window(mask, x0, y0, u0, v0, step, s, t, h, w)
    low, high, factor = np.float32(max(min_m, 1e-6)), np.float32(max_m), np.float32(scale)  # factor 1: z as is
    inf = np.float32(np.inf)
    seen = points = 0
    for i in range(h):
        for j in range(w):  # no branches: vectorised
            z = np.float32(depth[i, j]) * factor
            usable = (z >= low) & (z <= high) & (z < inf)  # 0 is never >= low; NaN fails all
            far[i + 2, j + 2] = z if usable else inf
            chosen = on_mask[i, j] & usable
            state[i, j] = chosen  # CHOSEN is 1
            seen += on_mask[i, j]
            points += chosen
    return seen, points


@njit
def _mask_on_window(mask, x0, y0, u0, v0, step, s, t, h, w):
    """[H, W] bool: whether the colour pixel under window pixel (i, j), i.e. depth pixel
    (u0 + step j, v0 + step i), lies in ``mask`` [h, w] (the crop placed at x0, y0)."""
    mask_h, mask_w = mask.shape
    cols = np.empty(w, np.int64)  # the crop column under each window column
    first, stop = w, 0            # the window columns over the crop
    consecutive = True            # those see consecutive crop columns (same size, every pixel)
    for j in range(w):
        cols[j] = math.floor((u0 + j * step + 0.5) / s) - x0
        if 0 <= cols[j] < mask_w:
            consecutive &= stop == 0 or cols[j] == cols[j - 1] + 1
            first, stop = min(first, j), j + 1
    on = np.zeros((h, w), np.bool_)
    for i in range(h if stop else 0):
        row = math.floor((v0 + i * step + 0.5) / t) - y0
        if not 0 <= row < mask_h:
            continue
        if consecutive:  # a copy, not a gather (5x faster)
            on[i, first:stop] = mask[row, cols[first]:cols[first] + stop - first]
        else:
            for j in range(first, stop):
                on[i, j] = mask[row, cols[j]]
    return on


# --- Step 2: flying pixels; step 5's noise sigma ------------------------------------------------------

@njit
def _depth_noise(far, state):
    """Step 5's sigma (metres): from second differences along rows over chosen pixels of one
    surface (consecutive depths within step 3's gap), on every k-th row (enough for
    ~NOISE_SAMPLES of them), then every m-th of them; 0 with fewer than 10."""
    h, w = state.shape
    every = max(1, h * w // (4 * NOISE_SAMPLES))
    second = np.empty(max(1, ((h + every - 1) // every) * (w - 2)), np.float32)
    count = 0
    two = np.float32(2.0)
    for i in range(0, h, every):
        for j in range(w - 2):
            if state[i, j] != 0 and state[i, j + 1] != 0 and state[i, j + 2] != 0:
                a, b, c = far[i + 2, j + 2], far[i + 2, j + 3], far[i + 2, j + 4]
                # A triplet across the object's outline measures the jump to the wall behind, not the
                # noise: on a thin upright object most of them do, and sigma grew 100-fold.
                gap = np.float32(GAP_M) + np.float32(GAP_FRACTION) * b
                if abs(b - a) <= gap and abs(c - b) <= gap:
                    second[count] = a - two * b + c
                    count += 1
    if count < 10:
        return 0.0
    second = second[:count:max(1, count // NOISE_SAMPLES)].copy()
    middle = _upper_median(second)
    return 1.4826 * np.float64(_upper_median(np.abs(second - middle))) / math.sqrt(6.0)


@njit
def _mark_edges(far, state, noise):
    """Step 2: marks EDGE the chosen pixels behind a depth jump; returns how many. Only a pixel
    farther than its nearest 8-neighbour by more than the limit can be; by more than
    EDGE_SLOPE_LIMITS + 1 limits it is whatever the slope, else the slope test decides (on the
    few pixels marked MAYBE by the first, branch-free pass)."""
    h, w = state.shape
    # across[a, j]: the minimum of far[a + 1, j + 1:j + 4]; a 3 x 3 minimum is that of 3 rows of it
    across = np.empty((h + 2, w), np.float32)
    for a in range(h + 2):
        for j in range(w):
            across[a, j] = min(min(far[a + 1, j + 1], far[a + 1, j + 2]), far[a + 1, j + 3])
    edges = maybe = 0
    for i in range(h):
        for j in range(w):
            limit, jump = _jump(far, across, i, j, noise)
            chosen = state[i, j] == CHOSEN
            edge = chosen & (jump > np.float32(EDGE_SLOPE_LIMITS + 1.0) * limit)
            slope_test = chosen & (jump > limit) & ~edge
            state[i, j] = EDGE if edge else (MAYBE if slope_test else state[i, j])
            edges += edge
            maybe += slope_test
    for i in range(h if maybe else 0):
        for j in range(w):
            if state[i, j] == MAYBE:
                behind = _behind_a_jump(far, i, j, _jump(far, across, i, j, noise)[0])
                state[i, j] = EDGE if behind else CHOSEN
                edges += behind
    return edges


@njit
def _jump(far, across, i, j, noise):
    """(limit, jump) of window pixel (i, j): how far it may lie behind its nearest 8-neighbour
    (float32: max(EDGE_JUMP_M + EDGE_JUMP_FRACTION nearest, EDGE_JUMP_SIGMAS noise)), how far it does."""
    nearest = min(min(across[i, j], across[i + 1, j]), across[i + 2, j])  # includes the pixel itself
    limit = max(np.float32(EDGE_JUMP_M) + np.float32(EDGE_JUMP_FRACTION) * nearest,
                np.float32(EDGE_JUMP_SIGMAS * noise))
    return limit, far[i + 2, j + 2] - nearest


@njit
def _behind_a_jump(far, i, j, limit):
    """Whether window pixel (i, j) lies more than ``limit`` behind the surface one of its 8
    neighbour pairs continues (the neighbour plus the slope of the pair, where the pair is one
    surface: its slope is at most EDGE_SLOPE_LIMITS limits; inf: no depth, predicts nothing)."""
    z = far[i + 2, j + 2]
    slope_limit = np.float32(EDGE_SLOPE_LIMITS) * limit
    for di, dj in _DIRECTIONS:
        near = far[i + 2 - di, j + 2 - dj]
        slope = near - far[i + 2 - 2 * di, j + 2 - 2 * dj]
        predicted = near + slope if abs(slope) <= slope_limit else near
        if z - predicted > limit:
            return True
    return False


# --- Step 3: the object's run of sorted depths, without sorting them ----------------------------------
# The bit patterns of positive float32 are ordered as their values, and their top 16 bits (the
# exponent and 7 mantissa bits) put each depth into a bin 1/128 of its octave wide. Two depths in
# one bin are less than 0.8 % of their value apart, less than any gap (GAP_M + GAP_FRACTION z),
# so the sorted depths can only break into runs between bins: between the largest depth of one
# non-empty bin and the smallest of the next. One pass gives each bin's count, minimum and
# maximum, hence the runs, their sizes and ends; the median is picked among the depths of one
# bin. The same numbers as sorting, at a fraction of the cost (for a typical instance's 3,000 to
# 8,000 depths numba's np.sort took ~500 µs, numpy's ~15 µs, this ~5-10 µs).

@njit
def _chosen_depths(far, state, every):
    """[N] float32: the depths of the CHOSEN pixels on the grid of every ``every``-th row and
    column of the window, in row order."""
    h, w = state.shape
    depths = np.empty(h * w, np.float32)
    count = 0
    for i in range(0, h, every):
        for j in range(0, w, every):
            if state[i, j] == CHOSEN:
                depths[count] = far[i + 2, j + 2]
                count += 1
    return depths[:count]


_BIN_SHIFT = 16  # float32 bits below a bin's: 23 mantissa bits less the 7 that split an octave into 128


@njit
def _nearest_surface(depths):
    """depths [N] float32 (N > 0, all positive and finite): (low, high, median) of the nearest
    run of sorted depths without a gap that holds at least NEAREST_SHARE of them (else of the
    largest run; the first of equals). median: the run's element at (start + stop) // 2."""
    keys = depths.view(np.uint32)
    first = keys.min() >> _BIN_SHIFT
    bins = (keys.max() >> _BIN_SHIFT) - first + 1
    count = np.zeros(bins, np.int64)
    low, high = np.full(bins, np.inf, np.float32), np.zeros(bins, np.float32)
    for k in range(depths.size):
        b = (keys[k] >> _BIN_SHIFT) - first
        count[b] += 1
        low[b], high[b] = min(low[b], depths[k]), max(high[b], depths[k])

    gap_m, gap_fraction = np.float32(GAP_M), np.float32(GAP_FRACTION)
    large = NEAREST_SHARE * depths.size
    best_first = best_last = best_start = best_stop = 0
    run_first, last, start, rank = -1, -1, 0, 0  # the run so far: bins run_first..last, ranks start..rank
    for b in range(bins + 1):
        if b < bins and count[b] == 0:
            continue
        if last >= 0 and (b == bins or low[b] - high[last] > gap_m + gap_fraction * low[b]):
            if rank - start >= large or rank - start > best_stop - best_start:
                best_first, best_last, best_start, best_stop = run_first, last, start, rank
                if rank - start >= large:
                    break
            run_first, start = b, rank
        if b == bins:
            break
        if run_first < 0:
            run_first = b
        rank += count[b]
        last = b
    median = _ranked(depths, keys, first, count, best_first, best_start, (best_start + best_stop) // 2)
    return low[best_first], high[best_last], median


@njit
def _ranked(depths, keys, first, count, b, rank, wanted):
    """The depth of sorted rank ``wanted``, counting from ``rank`` at the start of bin ``b``."""
    while rank + count[b] <= wanted:
        rank += count[b]
        b += 1
    inside = np.empty(count[b], np.float32)
    n = 0
    for k in range(depths.size):
        if (keys[k] >> _BIN_SHIFT) - first == b:
            inside[n] = depths[k]
            n += 1
    return _kth_smallest(inside, wanted - rank)


# --- Steps 4-6: the object's pixels summed up; the surface point's depth ------------------------------

@njit
def _keep(far, state, near_cut, far_cut):
    """Marks KEPT the chosen pixels with depths in [near_cut, far_cut] (the object: steps 3-5)
    and sums them up by columns and rows: (kept, column sums [W] float64, row sums [H] float64,
    column nearest [W], column farthest [W], row nearest [H], row farthest [H] float32; columns
    and rows without a kept pixel: sum 0, nearest inf, farthest 0)."""
    h, w = state.shape
    inf, zero = np.float32(np.inf), np.float32(0.0)
    col_sum, row_sum = np.zeros(w), np.zeros(h)
    col_near, col_far = np.full(w, inf, np.float32), np.zeros(w, np.float32)
    row_near, row_far = np.full(h, inf, np.float32), np.zeros(h, np.float32)
    kept = 0
    for i in range(h):
        total, near, farthest = 0.0, inf, zero
        for j in range(w):  # branch-free
            z = far[i + 2, j + 2]
            keep = (state[i, j] == CHOSEN) & (z >= near_cut) & (z <= far_cut)
            state[i, j] = KEPT if keep else state[i, j]
            kept += keep
            z_or_0, z_or_inf = (z, z) if keep else (zero, inf)
            col_sum[j] += np.float64(z_or_0)
            col_near[j], col_far[j] = min(col_near[j], z_or_inf), max(col_far[j], z_or_0)
            total += np.float64(z_or_0)
            near, farthest = min(near, z_or_inf), max(farthest, z_or_0)
        row_sum[i], row_near[i], row_far[i] = total, near, farthest
    return kept, col_sum, row_sum, col_near, col_far, row_near, row_far


@njit
def _surface_depth(far, state, row, col):
    """Step 6's depth at window pixel (row, col): the median of the KEPT depths within
    SURFACE_WINDOW_PX of it, or the depth of the nearest KEPT pixel (first in row order)."""
    h, w = state.shape
    near = np.empty((2 * SURFACE_WINDOW_PX + 1) ** 2, np.float32)
    count = 0
    for i in range(max(0, row - SURFACE_WINDOW_PX), min(h, row + SURFACE_WINDOW_PX + 1)):
        for j in range(max(0, col - SURFACE_WINDOW_PX), min(w, col + SURFACE_WINDOW_PX + 1)):
            if state[i, j] == KEPT:
                near[count] = far[i + 2, j + 2]
                count += 1
    if count:
        return np.float64(_upper_median(near[:count]))
    best, depth = -1, 0.0
    for i in range(h):
        for j in range(w):
            if state[i, j] == KEPT and (best < 0 or (i - row) ** 2 + (j - col) ** 2 < best):
                best, depth = (i - row) ** 2 + (j - col) ** 2, np.float64(far[i + 2, j + 2])
    return depth


# --- Medians ------------------------------------------------------------------------------------------
# numba's np.partition copies its input, sorts the kth indices and compares NaN-aware; the medians
# here (of depths, of second differences: never NaN) need none of that, and Wirth's quickselect is
# 2-3x faster on their 1,000-2,000 values. The value is np.partition's: the k-th smallest is one
# number, whatever the algorithm.

@njit
def _upper_median(values):
    """The (upper) median of a non-empty float32 array [N] (reordered in place)."""
    return _kth_smallest(values, values.size // 2)


@njit
def _kth_smallest(values, k):
    """values [N] (no NaN; reordered in place), 0 <= k < N: the k-th smallest, counting from 0."""
    low, high = 0, values.size - 1
    while low < high:
        pivot = values[k]
        i, j = low, high
        while i <= j:
            while values[i] < pivot:
                i += 1
            while pivot < values[j]:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        # now values[low..j] <= pivot <= values[i..high]: k lies in one part (or between: found)
        if j < k:
            low = i
        if k < i:
            high = j
    return values[k]


# --- The kernel (last: compiling it needs the functions above) ----------------------------------------

@njit([_signature()], cache=True)
def measure(mask, depth, x0, y0, u0, v0, step, s, t, scale, fx, fy, cx, cy, min_m, max_m, min_points):
    """Steps 1-6 for one instance: (points, seen, valid, [12] centroid, extent, surface point, box centre).

    mask [h, w] bool: the colour crop at (x0, y0); depth [H, W] float32 raw (metres = value *
    ``scale``): the instance's window of the depth image, its pixel (i, j) being depth pixel
    (u0 + step j, v0 + step i); s, t: depth size / colour size; fx, fy, cx, cy: the depth
    image's intrinsics; min_m, max_m, min_points: geometry.DepthLimits. ``points``: chosen
    pixels, ``seen``: mask pixels in the window; not ``valid``: too few depths (the vector is zeros).
    """
    h, w = depth.shape
    out = np.zeros(12)
    far = np.full((h + 4, w + 4), np.inf, np.float32)
    state = np.zeros((h, w), np.uint8)
    seen, points = _read_window(mask, depth, x0, y0, u0, v0, step, s, t, scale, min_m, max_m, far, state)
    if points == 0 or points < min_points:
        return points, seen, False, out

    noise = _depth_noise(far, state)
    edges = _mark_edges(far, state, noise)
    if edges and points - edges < min_points:  # never below min_points for the sake of flying pixels
        flat = state.ravel()
        for k in range(flat.size):
            if flat[k] == EDGE:
                flat[k] = CHOSEN

    # Step 3 on a sample: a grid of the window holding ~MAX_SAMPLES chosen pixels (all of them
    # if that grid has too few).
    depths = _chosen_depths(far, state, max(1, int(math.sqrt(points / MAX_SAMPLES))))
    if depths.size < min_points:
        depths = _chosen_depths(far, state, 1)
    if depths.size == 0:  # min_points 0 and no depth left
        return points, seen, False, out
    low, high, middle = _nearest_surface(depths)
    low64, high64, z_mid = np.float64(low), np.float64(high), np.float64(middle)
    near_cut = np.float32(low64 - (GAP_M + GAP_FRACTION * low64))
    far_cut = np.float32(high64 + (GAP_M + GAP_FRACTION * high64))

    kept, col_sum, row_sum, col_near, col_far, row_near, row_far = _keep(far, state, near_cut, far_cut)
    if kept < min_points:
        return points, seen, False, out

    # Steps 4-5 from the sums and extremes by columns and rows: X = (u - cx) Z / fx is linear in Z
    # within a column, so a column's extreme X lie at its nearest and farthest kept depths.
    z_sum = x_sum = y_sum = 0.0
    x_low = y_low = np.inf
    x_high = y_high = -np.inf
    z_near, z_far = np.float32(np.inf), np.float32(0.0)
    for j in range(w):
        if col_sum[j] > 0:
            u = u0 + step * np.float64(j)
            z_sum += col_sum[j]
            x_sum += col_sum[j] * u
            ray = (u - cx) / fx
            for x in (ray * np.float64(col_near[j]), ray * np.float64(col_far[j])):
                x_low, x_high = min(x_low, x), max(x_high, x)
            z_near, z_far = min(z_near, col_near[j]), max(z_far, col_far[j])
    for i in range(h):
        if row_sum[i] > 0:
            v = v0 + step * np.float64(i)
            y_sum += row_sum[i] * v
            ray = (v - cy) / fy
            for y in (ray * np.float64(row_near[i]), ray * np.float64(row_far[i])):
                y_low, y_high = min(y_low, y), max(y_high, y)
    out[0] = (x_sum - cx * z_sum) / fx / kept
    out[1] = (y_sum - cy * z_sum) / fy / kept
    out[2] = z_sum / kept
    out[3] = x_high - x_low + step * z_mid / fx
    out[4] = y_high - y_low + step * z_mid / fy
    z_range = np.float64(z_far - z_near)  # float32 difference, as numpy's
    widening = 2.0 * math.sqrt(2.0 * math.log(max(kept, 2))) * noise
    out[5] = math.sqrt(max(0.0, z_range ** 2 - widening ** 2))
    # The middle of the ranges: the box extent measures is centred there (the footprint and the
    # noise change each range at both ends alike), not on the centroid.
    out[9] = (x_low + x_high) / 2.0
    out[10] = (y_low + y_high) / 2.0
    out[11] = (np.float64(z_near) + np.float64(z_far)) / 2.0

    # Step 6: the centroid's projection, in window pixels (round: half to even, as Python's).
    col = round((fx * out[0] / out[2] + cx - u0) / step)
    row = round((fy * out[1] / out[2] + cy - v0) / step)
    depth_at = _surface_depth(far, state, row, col)
    for k in range(3):
        out[6 + k] = out[k] * (depth_at / out[2])
    return points, seen, True, out


__all__ = ["measure"]
