"""Known 3D objects seen by a pinhole camera: depth images with their exact answers.

Used by the tests of :mod:`toist_ros.depth.geometry` and by the demo (which publishes depth for
its synthetic scenes). Objects are flat rectangles, discs and boxes (rectangles for faces) in
the camera's optical frame (x right, y down, z forward, metres); rendering casts one ray per
pixel centre. The truth of an object (:meth:`SceneObject.truth`), independent of the image's
pixels:

* centroid: the mean of its visible surface points over the part of the image it covers (what a
  mean of back-projected depth pixels estimates; computed on a grid ``SUPERSAMPLE`` times finer
  than the camera's, so it is the continuous integral to ~0.1 mm). For a surface facing the
  camera it is the surface's centre; a side seen at a grazing angle counts for the image area it
  covers, not for its area;
* extent: the axis-aligned bounds of its visible faces (from the shapes: exact);
* surface point: where the ray through that centroid meets the object (exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from toist_ros.depth.geometry import Intrinsics


@dataclass(frozen=True)
class Patch:
    """A flat rectangle (or, ``disc``, the ellipse inside it): ``centre`` + a ``u`` + b ``v`` for
    |a|, |b| <= 1 (a^2 + b^2 <= 1 for a disc); ``u``, ``v`` are half-side vectors."""

    centre: np.ndarray
    u: np.ndarray
    v: np.ndarray
    disc: bool = False

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.u, self.v)
        return n / np.linalg.norm(n)

    def facing(self) -> bool:
        """Whether the camera (at the origin) sees this side of it."""
        return float(np.dot(self.normal, -self.centre)) > 0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self.disc:  # an ellipse's half-extent on axis k is sqrt(u_k^2 + v_k^2)
            half = np.sqrt(self.u ** 2 + self.v ** 2)
            return self.centre - half, self.centre + half
        corners = np.array([self.centre + a * self.u + b * self.v for a in (-1, 1) for b in (-1, 1)])
        return corners.min(axis=0), corners.max(axis=0)

    def hit(self, rays: np.ndarray) -> np.ndarray:
        """Depth Z at which each ray [N, 3] (z = 1) meets the patch; inf where it misses."""
        n = np.cross(self.u, self.v)
        along = rays @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.where(np.abs(along) > 1e-12, float(np.dot(n, self.centre)) / along, np.inf)
        points = rays * lam[:, None] - self.centre
        a = points @ self.u / float(np.dot(self.u, self.u))
        b = points @ self.v / float(np.dot(self.v, self.v))
        inside = (a * a + b * b <= 1.0) if self.disc else (np.abs(a) <= 1.0) & (np.abs(b) <= 1.0)
        return np.where(inside & (lam > 0), lam, np.inf)


SUPERSAMPLE = 4


@dataclass(frozen=True)
class Truth:
    centroid: np.ndarray        # [3]
    extent: np.ndarray          # [3]
    surface_point: np.ndarray   # [3]
    box_center: np.ndarray      # [3] centre of the box ``extent`` measures


@dataclass(frozen=True)
class SceneObject:
    patches: tuple[Patch, ...]

    def visible(self) -> list[Patch]:
        return [p for p in self.patches if p.facing()]

    def truth(self, cam: Intrinsics) -> "Truth":
        """Centroid, extent and surface point of what ``cam`` sees of this object (module docstring)."""
        fine = cam.scaled(cam.width * SUPERSAMPLE, cam.height * SUPERSAMPLE)
        rays = _rays(fine)
        z = self.hit(rays)
        seen = np.isfinite(z)
        if not np.any(seen):
            raise ValueError("the camera does not see this object")
        centroid = (rays[seen] * z[seen, None]).mean(axis=0)
        lows, highs = zip(*(p.bounds() for p in self.visible()))
        ray = centroid / centroid[2]
        surface = ray * float(self.hit(ray[None])[0])
        low, high = np.min(lows, axis=0), np.max(highs, axis=0)
        return Truth(centroid, high - low, surface, (low + high) / 2.0)

    def hit(self, rays: np.ndarray) -> np.ndarray:
        return np.min([p.hit(rays) for p in self.visible()], axis=0)


def plane(centre: Sequence[float], width: float, height: float, yaw_deg: float = 0.0, pitch_deg: float = 0.0,
          disc: bool = False) -> SceneObject:
    """A rectangle (or disc) of ``width`` x ``height`` facing the camera, turned by ``yaw`` about
    the y axis and ``pitch`` about the x axis."""
    rot = _rotation(yaw_deg, pitch_deg)
    u, v = rot @ np.array([width / 2, 0.0, 0.0]), rot @ np.array([0.0, height / 2, 0.0])
    patch = Patch(np.asarray(centre, float), u, v, disc)
    if not patch.facing():
        patch = Patch(patch.centre, v, u, disc)
    return SceneObject((patch,))


def box(centre: Sequence[float], size: Sequence[float], yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> SceneObject:
    """A box of ``size`` (x, y, z) turned by ``yaw`` / ``pitch``; six outward-facing rectangles."""
    rot = _rotation(yaw_deg, pitch_deg)
    c = np.asarray(centre, float)
    half = [rot[:, k] * size[k] / 2 for k in range(3)]
    patches = []
    for k in range(3):
        i, j = [m for m in range(3) if m != k]
        for sign in (-1.0, 1.0):
            u, v = half[i], half[j]
            if np.dot(np.cross(u, v), sign * half[k]) < 0:
                u, v = v, u  # normal points out of the box
            patches.append(Patch(c + sign * half[k], u, v))
    return SceneObject(tuple(patches))


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    y, p = np.radians(yaw_deg), np.radians(pitch_deg)
    about_y = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    about_x = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return about_y @ about_x


def render(objects: Sequence[SceneObject], cam: Intrinsics, background_m: Optional[float] = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(depth [H, W] float64 metres, 0 where nothing is hit; labels [H, W] int: object index, -1 none)."""
    rays = _rays(cam)
    depth = np.full(len(rays), np.inf)
    labels = np.full(len(rays), -1)
    for index, obj in enumerate(objects):
        z = obj.hit(rays)
        nearer = z < depth
        depth[nearer], labels[nearer] = z[nearer], index
    if background_m is not None:
        labels[~np.isfinite(depth)] = -1
        depth[~np.isfinite(depth)] = background_m
    depth[~np.isfinite(depth)] = 0.0
    return depth.reshape(cam.height, cam.width), labels.reshape(cam.height, cam.width)


def _rays(cam: Intrinsics) -> np.ndarray:
    """[H * W, 3] rays (z = 1) through the pixel centres, row by row."""
    v, u = np.mgrid[0:cam.height, 0:cam.width]
    return np.stack([(u.ravel() - cam.cx) / cam.fx, (v.ravel() - cam.cy) / cam.fy, np.ones(u.size)], axis=1)


def degrade(depth: np.ndarray, rng: np.random.Generator, holes: float = 0.1, noise_per_m2: float = 0.002,
            flying: float = 0.5) -> np.ndarray:
    """A depth sensor's faults added to a rendered depth [H, W] metres: Gaussian noise with sigma
    ``noise_per_m2`` * Z^2 (stereo's error grows with the square of depth), a share ``holes`` of
    pixels without a measurement (0), and at depth edges a share ``flying`` of pixels replaced by a
    mix of the two sides (the "flying pixels" of stereo and ToF cameras)."""
    out = depth + rng.normal(size=depth.shape) * noise_per_m2 * depth ** 2
    padded = np.pad(depth, 1, mode="edge")
    neighbours = np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    far = neighbours.max(axis=0)
    edge = (far - depth > 0.05) & (depth > 0)
    mix = edge & (rng.random(depth.shape) < flying)
    weight = rng.random(depth.shape)
    out[mix] = (weight * depth + (1 - weight) * far)[mix]
    out[rng.random(depth.shape) < holes] = 0.0
    out[depth == 0] = 0.0
    return out


__all__ = ["Patch", "SceneObject", "Truth", "box", "degrade", "plane", "render"]
