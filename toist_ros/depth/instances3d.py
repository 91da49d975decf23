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
ASPECT_TOLERANCE = 0.01  # relative; integer sizes of a binned or half-resolution stream differ by < 0.3 %


def registration_problem(colour_size: tuple[int, int], depth_size: tuple[int, int],
                         camera_size: tuple[int, int]) -> str:
    """Why a depth image of ``depth_size`` or intrinsics of ``camera_size`` cannot be registered to a
    colour frame of ``colour_size`` (all (width, height)); "" when both can. Another resolution of the
    same view is read through scaled intrinsics; another aspect ratio is another view (the raw depth
    stream instead of the aligned one, a crop) and would stretch every instance's geometry."""
    width, height = colour_size
    for what, (other_width, other_height) in (("depth image", depth_size), ("CameraInfo", camera_size)):
        if abs((other_width * height) / (other_height * width) - 1.0) > ASPECT_TOLERANCE:
            return (f"the {what} is {other_width}x{other_height} and the colour image {width}x{height}: another "
                    "aspect ratio, so not registered to the colour image (depth: the aligned/registered stream, "
                    "e.g. aligned_depth_to_color; CameraInfo: the colour camera's)")
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


__all__ = ["ASPECT_TOLERANCE", "add_3d", "registration_problem"]
