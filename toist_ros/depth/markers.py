"""``visualization_msgs/MarkerArray`` for RViz: a box and a label per instance with 3D.

Every array starts with a DELETEALL marker, so the markers of the previous frame disappear even
when this frame has fewer instances; all markers carry the colour image's header (RViz places
them through TF at ``header.stamp``). Colours are the debug overlay's, by rank. Markers expire
after ``lifetime_s`` (:func:`marker_lifetime_s`: a few of the camera's result periods), so that when no next
array comes (the camera stopped, frames fail or are skipped as stale, ``output.markers`` turned
off) RViz does not show the last objects for ever.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from toist_core.visualize import instance_color

MIN_SIZE_M = 0.01         # a flat surface (extent 0 on one axis) still shows as a thin box
LABEL_HEIGHT_M = 0.04     # text height
LABEL_GAP_M = 0.02        # label this far above the box (optical frame: -y is up in the image)
BOX_ALPHA = 0.45
NAMESPACE_BOXES, NAMESPACE_LABELS = "toist_boxes", "toist_labels"
MIN_LIFETIME_S = 1.0      # markers live at least this long ...
LIFETIME_PERIODS = 3      # ... and at least this many result periods of the camera, so they never blink


def marker_lifetime_s(inference_p95_ms: float, output_hz: float = 0.0) -> float:
    """How long a frame's markers stay in RViz without a newer array: three periods of the
    camera's results, the longer of the model's time (p95; NaN: no frame timed yet) and the time
    between the camera's results (``output_hz``; 0: unknown). Cameras share the model in turn, and
    a slow camera sends seldom, so a camera's next array can come several model times later."""
    period_s = inference_p95_ms / 1000.0 if math.isfinite(inference_p95_ms) else 0.0
    if math.isfinite(output_hz) and output_hz > 0:
        period_s = max(period_s, 1.0 / output_hz)
    return max(MIN_LIFETIME_S, LIFETIME_PERIODS * period_s)


def instance_markers(header: Any, instances: Sequence[Any], task: str, lifetime_s: float = MIN_LIFETIME_S):
    """The MarkerArray of ``instances`` (``toist_ros/Instance`` messages; those without 3D are
    skipped), each marker expiring after ``lifetime_s``."""
    from builtin_interfaces.msg import Duration
    from visualization_msgs.msg import Marker, MarkerArray

    nanoseconds = int(round(lifetime_s * 1e9))
    lifetime = Duration(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)
    clear = Marker()
    clear.header = header
    clear.action = Marker.DELETEALL
    markers = [clear]
    for instance in instances:
        if not instance.has_3d:
            continue
        r, g, b = (c / 255.0 for c in instance_color(int(instance.rank)))
        box = Marker()
        box.header = header
        box.ns, box.id = NAMESPACE_BOXES, int(instance.rank)
        box.type, box.action = Marker.CUBE, Marker.ADD
        box.pose.position = instance.box_center  # the box extent measures (the centroid is not its middle)
        box.pose.orientation.w = 1.0
        box.scale.x = max(instance.extent.x, MIN_SIZE_M)
        box.scale.y = max(instance.extent.y, MIN_SIZE_M)
        box.scale.z = max(instance.extent.z, MIN_SIZE_M)
        box.color.r, box.color.g, box.color.b, box.color.a = r, g, b, BOX_ALPHA
        box.lifetime = lifetime
        label = Marker()
        label.header = header
        label.ns, label.id = NAMESPACE_LABELS, int(instance.rank)
        label.type, label.action = Marker.TEXT_VIEW_FACING, Marker.ADD
        label.pose.position.x = instance.box_center.x
        label.pose.position.y = instance.box_center.y - box.scale.y / 2 - LABEL_GAP_M
        label.pose.position.z = instance.box_center.z
        label.pose.orientation.w = 1.0
        label.scale.z = LABEL_HEIGHT_M
        label.color.r, label.color.g, label.color.b, label.color.a = r, g, b, 1.0
        label.text = f"#{instance.rank} {instance.score:.2f} {task}"
        label.lifetime = lifetime
        markers += [box, label]
    return MarkerArray(markers=markers)


__all__ = ["instance_markers", "marker_lifetime_s"]
