"""The compiled 3D kernel (toist_ros/depth/geometry_kernel.py) gives the numbers of the numpy
implementation it replaced (tests/depth_reference.py): on the rendered scenes of
test_depth_geometry and on the edge cases, the same validity, point counts and fractions, and the
same vectors to 1e-12 relative (its float64 sums add in another order than numpy's pairwise sums;
sums of float32 depths come out exact either way, and on these scenes every number is bit for bit
the same).
"""

import numpy as np
import pytest

import depth_reference
from test_depth_geometry import CENTRED, OFF_CENTRE, scene_instances
from toist_ros.depth.geometry import WINDOW_PIXELS, DepthLimits, instance_3d, warm_up
from toist_ros.depth.scenes import degrade, plane, render


def assert_same(inputs, cam, limits=DepthLimits()):
    """instance_3d(*inputs, cam, limits) by the kernel and by the reference agree; the kernel's result."""
    new = instance_3d(*inputs, cam, limits)
    old = depth_reference.instance_3d(*inputs, cam, limits)
    assert (new.valid, new.points, new.fraction) == (old.valid, old.points, old.fraction)
    for field in ("centroid", "extent", "surface_point", "box_center"):
        np.testing.assert_allclose(getattr(new, field), getattr(old, field), rtol=1e-12, atol=1e-12, err_msg=field)
    return new


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
@pytest.mark.parametrize("half", [False, True], ids=["depth_full", "depth_half"])
@pytest.mark.parametrize("name", ["facing", "tilted", "box"])
def test_equals_the_numpy_reference_on_the_rendered_scenes(name, half, encoding, seed):
    """Noise, 10 % holes, flying pixels, masks spilling onto the wall; 0.5 to 3 m; two cameras."""
    for z, cam in ((0.5, CENTRED), (1.0, OFF_CENTRE), (3.0, OFF_CENTRE)):
        for inputs in scene_instances(name, z, cam, half, encoding, seed):
            assert assert_same(inputs, cam).valid


def _plate(objects, cam, seed=None, spill=0):
    """(mask crop, roi, depth [H, W] float64 metres) of the first object (its mask grown by
    ``spill`` px on each side), depth with a sensor's faults when ``seed`` is given."""
    depth, labels = render(objects, cam, background_m=4.0)
    if seed is not None:
        depth = degrade(depth, np.random.default_rng(seed))
    rows, cols = np.nonzero(labels == 0)
    x0, y0, x1, y1 = cols.min() - spill, rows.min() - spill, cols.max() + spill + 1, rows.max() + spill + 1
    crop = np.ones((y1 - y0, x1 - x0), bool) if spill else (labels == 0)[y0:y1, x0:x1]
    return crop, (x0, y0, x1 - x0, y1 - y0), depth


def test_equals_the_reference_on_a_large_instance_read_on_a_grid():
    crop, roi, depth = _plate([plane([0.0, 0.0, 1.0], 0.9, 0.6, yaw_deg=20)], CENTRED, seed=3)
    assert roi[2] * roi[3] > 2 * WINDOW_PIXELS  # a grid step of 2 or more
    assert assert_same((crop, roi, np.round(depth * 1000).astype(np.uint16), 0.001), CENTRED).valid


def test_equals_the_reference_on_a_mask_spilling_mostly_onto_a_wall():
    crop, roi, depth = _plate([plane([0.0, 0.0, 1.0], 0.2, 0.2), plane([0.0, 0.0, 1.5], 2.0, 2.0)], CENTRED,
                              seed=4, spill=40)
    assert assert_same((crop, roi, depth.astype(np.float32), 1.0), CENTRED).valid


def test_equals_the_reference_with_depth_larger_than_colour():
    """Colour at 320 x 240, depth at 640 x 480: two depth pixels under each colour pixel."""
    small = CENTRED.scaled(320, 240)
    objects = [plane([0.05, -0.02, 0.9], 0.2, 0.15, yaw_deg=30)]
    crop, roi, _ = _plate(objects, small)
    depth = degrade(render(objects, CENTRED, background_m=4.0)[0], np.random.default_rng(5))
    assert assert_same((crop, roi, np.round(depth * 1000).astype(np.uint16), 0.001), small).valid


def test_equals_the_reference_on_small_and_odd_masks_and_limits():
    crop, roi, depth = _plate([plane([0.0, 0.0, 1.0], 0.2, 0.2, pitch_deg=40)], OFF_CENTRE, seed=6)
    raw = np.round(depth * 1000).astype(np.uint16)
    x0, y0, w, h = roi
    cases = [(crop[:1, :1], (x0, y0, 1, 1)),                         # 1 pixel: too few points
             (crop[:3, :4], (x0, y0, 4, 3)),                         # 12 pixels, ~10 with depth
             (crop[:, :1], (x0, y0, 1, h)),                          # one column: no noise estimate
             (crop[:2, :], (x0, y0, w, 2)),                          # two rows
             (crop.astype(np.uint8), roi),                           # a 0/1 mask
             (np.zeros_like(crop), roi),                             # an empty mask
             (crop, (700, y0, w, h))]                                # outside the depth image
    for mask, box in cases:
        assert_same((mask, box, raw, 0.001), OFF_CENTRE)
    plate = assert_same((crop, roi, raw, 0.001), OFF_CENTRE)
    for limits in (DepthLimits(0.0, 10.0), DepthLimits(0.95, 1.05), DepthLimits(0.1, 10.0, 0)):
        assert_same((crop, roi, raw, 0.001), OFF_CENTRE, limits)
    # min_points close to the points: where dropping the flying pixels would leave too few, they
    # stay (the centroid moves ~0.5 mm), and closer still too few are on the surface (invalid).
    kept_flying = [assert_same((crop, roi, raw, 0.001), OFF_CENTRE, DepthLimits(0.1, 10.0, plate.points - below))
                   for below in range(400)]
    assert any(r.valid and not np.array_equal(r.centroid, plate.centroid) for r in kept_flying)
    assert not kept_flying[0].valid


def test_equals_the_reference_without_usable_depth_and_without_noise():
    crop, roi, depth = _plate([plane([0.05, -0.03, 1.0], 0.2, 0.1)], OFF_CENTRE)
    assert assert_same((crop, roi, depth.astype(np.float32), 1.0), OFF_CENTRE).extent[2] == 0.0  # noise-free
    sparse = np.zeros(depth.shape, np.uint16)
    sparse[roi[1], roi[0]:roi[0] + 5] = 1000
    for raw, scale in ((np.zeros(depth.shape, np.uint16), 0.001), (np.full(depth.shape, np.nan, np.float32), 1.0),
                       (np.full(depth.shape, np.inf, np.float32), 1.0), (np.full(depth.shape, 20.0), 1.0),
                       (sparse, 0.001)):
        assert not assert_same((crop, roi, raw, scale), OFF_CENTRE).valid


def test_warm_up_loads_the_kernel():
    assert warm_up() > 0.0
