"""Fill the 3D fields of one frame's ``TaskInstances`` from its paired depth image.

The glue between the message and :func:`toist_ros.depth.geometry.instance_3d`: the colour
camera's intrinsics are scaled to the colour frame's size (a CameraInfo for another resolution
of the same camera still fits), each ranked instance's mask crop is measured in the depth image,
and the frame's ``depth_status`` / ``depth_offset_ms`` say how the pairing went.
"""

from __future__ import annotations

from typing import Any, Sequence

from toist_ros.depth.geometry import DepthLimits, instance_3d
from toist_ros.depth.pairing import MISSING, PAIRED, UNSYNCED, Pairing

_STATUS = {PAIRED: 1, MISSING: 2, UNSYNCED: 3}  # TaskInstances.DEPTH_* values
# How a driver may round the size of a resized or binned stream: down, up or to the nearest pixel
# (the same way on both axes): the interval the true size lies in, relative to the integer size.
_ROUNDINGS = ((0.0, 1.0), (-1.0, 0.0), (-0.5, 0.5))


def _same_view(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether ``other`` (width, height) is ``size`` scaled by one factor and rounded to whole pixels.
    A relative aspect tolerance would have to be loose for small images (101x75 halved is 50x37,
    0.35 % off) and then let through RealSense's raw depth (848x480 beside 1280x720 colour, 0.6 %)."""
    (width, height), (other_width, other_height) = size, other
    for low, high in _ROUNDINGS:
        smallest = max((other_width + low) / width, (other_height + low) / height)
        largest = min((other_width + high) / width, (other_height + high) / height)
        if smallest <= largest:
            return True
    return False


def registration_problem(colour_size: tuple[int, int], depth_size: tuple[int, int],
                         camera_size: tuple[int, int]) -> str:
    """Why a depth image of ``depth_size`` or intrinsics of ``camera_size`` cannot be registered to a
    colour frame of ``colour_size`` (all (width, height)); "" when both can. Another resolution of the
    same view is read through scaled intrinsics; another aspect ratio is another view (the raw depth
    stream instead of the aligned one, a crop) and would stretch every instance's geometry."""
    width, height = colour_size
    for what, (other_width, other_height) in (("depth image", depth_size), ("CameraInfo", camera_size)):
        if not _same_view(colour_size, (other_width, other_height)):
            return (f"the {what} is {other_width}x{other_height} and the colour image {width}x{height}: another "
                    "aspect ratio, so not registered to the colour image (depth: the aligned/registered stream, "
                    "e.g. aligned_depth_to_color; CameraInfo: the colour camera's)")
    return ""


def frame_problem(colour_frame: str, depth_frame: str, camera_frame: str) -> str:
    """Why the depth image (``depth_frame``) or the CameraInfo (``camera_frame``) is not in the colour
    image's optical frame; "" when they are, or when a ``frame_id`` is empty (nothing to compare).
    Compared as tf2 compares frames (a leading "/" of ROS 1 bags does not count)."""
    colour = colour_frame.lstrip("/")
    for what, frame, advice in (
            ("depth image", depth_frame, "the 3D step reads depth registered to the colour image; wire the "
                                         "aligned/registered stream (e.g. aligned_depth_to_color)"),
            ("CameraInfo", camera_frame, "3D points are computed with the colour camera's intrinsics; wire the "
                                         "colour camera's CameraInfo")):
        if colour and frame and frame.lstrip("/") != colour:
            return f"the {what}'s frame {frame!r} is not the colour image's {colour_frame!r}: {advice}"
    return ""


def add_3d(msg: Any, ranked: Sequence[Any], pairing: Pairing, limits: DepthLimits) -> int:
    """Set ``msg.depth_status``, ``msg.depth_offset_ms`` and, when paired, each instance's 3D
    fields (``msg.instances[i]`` belongs to ``ranked[i]``). Returns how many instances got 3D."""
    msg.depth_status = _STATUS[pairing.status]
    msg.depth_offset_ms = float(pairing.offset_s) * 1000.0
    if pairing.status != PAIRED:
        return 0
    colour = pairing.camera.intrinsics.scaled(int(msg.image_width), int(msg.image_height))
    depth = pairing.depth
    valid = 0
    for item, instance in zip(ranked, msg.instances):
        if item.mask_crop is None:
            continue
        result = instance_3d(item.mask_crop, item.roi, depth.raw, depth.scale, colour, limits)
        instance.depth_points = result.points
        instance.depth_fraction = float(result.fraction)
        if not result.valid:
            continue
        valid += 1
        instance.has_3d = True
        instance.centroid.x, instance.centroid.y, instance.centroid.z = (float(v) for v in result.centroid)
        instance.extent.x, instance.extent.y, instance.extent.z = (float(v) for v in result.extent)
        instance.box_center.x, instance.box_center.y, instance.box_center.z = (float(v) for v in result.box_center)
        point = instance.surface_point
        point.x, point.y, point.z = (float(v) for v in result.surface_point)
    return valid


__all__ = ["add_3d", "frame_problem", "registration_problem"]
