"""Depth for the demo's held-out synthetic scenes, and where their objects truly are in 3D.

A synthetic scene is flat shapes layered on a background; the demo gives it a 3D layout: a
pinhole camera with focal length ``FOCAL_PER_WIDTH`` x the image width and its principal point
at the image centre, the background a wall at ``WALL_M``, and each object a plate facing the
camera, the first drawn (bottom) farthest: ``NEAREST_M + LAYER_M * (objects - 1 - k)`` for the
k-th. The depth image (16UC1 millimetres) holds exactly that (no sensor faults: the demo shows
the plumbing; tests/test_depth_geometry.py measures the geometry under faults).

The truth of an object is the mean of its visible surface points over the image, computed on a
grid ``SUPERSAMPLE`` times finer than the image (as toist_ros.depth.scenes defines it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from toist_ros.depth.geometry import Intrinsics

FOCAL_PER_WIDTH = 1.5
WALL_M = 2.5
NEAREST_M = 1.0
LAYER_M = 0.3
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneDepth:
    depth_mm: np.ndarray            # [H, W] uint16
    camera: Intrinsics
    centroids: np.ndarray           # [objects, 3] truth, metres (NaN for an object with no visible pixel)
    distances: np.ndarray           # [objects] metres


def _object_mask(pieces: Sequence[np.ndarray], height: int, width: int, scale: int = 1) -> np.ndarray:
    """[H * scale, W * scale] bool: pycocotools' rasterisation of the pieces (as the drawing's)."""
    from pycocotools import mask as mask_utils

    polygons = [(np.asarray(piece, np.float64) * scale).reshape(-1).tolist() for piece in pieces]
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height * scale, width * scale))
        return mask_utils.decode(rle).astype(bool)


def scene_depth(objects: Sequence, height: int, width: int) -> SceneDepth:
    """The depth image, camera and per-object truth of a synthetic scene (objects bottom to top,
    as ``toist_core.data.synth.scene`` returns them)."""
    focal = FOCAL_PER_WIDTH * width
    camera = Intrinsics(focal, focal, width / 2 - 0.5, height / 2 - 0.5, width, height)
    fine = camera.scaled(width * SUPERSAMPLE, height * SUPERSAMPLE)
    depth = np.full((height, width), WALL_M, np.float64)
    distances = np.array([NEAREST_M + LAYER_M * (len(objects) - 1 - k) for k in range(len(objects))])
    centroids = np.full((len(objects), 3), np.nan)
    for k, obj in enumerate(objects):  # bottom to top: later objects cover earlier ones
        depth[_object_mask(obj.pieces, height, width)] = distances[k]
        rows, cols = np.nonzero(_object_mask(obj.pieces, height, width, SUPERSAMPLE))
        if rows.size:
            z = distances[k]
            centroids[k] = [np.mean((cols - fine.cx) / fine.fx) * z, np.mean((rows - fine.cy) / fine.fy) * z, z]
    return SceneDepth(np.round(depth * 1000).astype(np.uint16), camera, centroids, distances)


__all__ = ["SceneDepth", "scene_depth", "WALL_M"]
