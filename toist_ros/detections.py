"""``vision_msgs/Detection2DArray`` beside ``TaskInstances`` (``output.detections``).

vision_msgs is the ecosystem's detection message (RViz plugins, trackers, Foxglove read it) but
has no masks and no task: each instance becomes a ``Detection2D`` with its box (centre and size in
original image pixels), one hypothesis whose ``class_id`` is the task's caption (what the object
affords) and whose ``score`` is the instance's, the 3D centroid in the hypothesis pose when depth
gave one (else a zero pose, covariance -1 on the position diagonal: unknown), and ``id`` empty: vision_msgs
keeps ``id`` for one object across messages (trackers key on it), which a rank is not (two objects
whose scores swap swap ranks); the rank is the array's order. vision_msgs is not a dependency: it is imported only when the
output is asked for (ROS 2 Humble and later: vision_msgs 4.x, ``bbox.center.position``).
"""

from __future__ import annotations

from typing import Any, Sequence


class DetectionsUnavailable(RuntimeError):
    """``output.detections`` is true but vision_msgs cannot be imported."""


def detection_array_type() -> type:
    """``vision_msgs.msg.Detection2DArray``, or :class:`DetectionsUnavailable` saying what to install."""
    try:
        from vision_msgs.msg import Detection2DArray
    except ImportError as exc:
        raise DetectionsUnavailable(
            f"output.detections is true but vision_msgs cannot be imported ({exc}): install it (sudo apt install "
            "ros-$ROS_DISTRO-vision-msgs) or set output.detections false") from None
    return Detection2DArray


def detection_array(header: Any, instances: Sequence[Any], label: str) -> Any:
    """The ``Detection2DArray`` of one frame's ``toist_ros/Instance`` messages (ranked), all of
    the task ``label`` (its caption)."""
    from vision_msgs.msg import Detection2D, ObjectHypothesisWithPose

    array = detection_array_type()()
    array.header = header
    for instance in instances:
        x0, y0, x1, y1 = (float(v) for v in instance.box)
        detection = Detection2D()
        detection.header = header
        detection.id = ""   # (no identity across frames; the rank is the order in the array)
        detection.bbox.center.position.x = (x0 + x1) / 2.0
        detection.bbox.center.position.y = (y0 + y1) / 2.0
        detection.bbox.size_x = x1 - x0
        detection.bbox.size_y = y1 - y0
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = label
        hypothesis.hypothesis.score = float(instance.score)
        if instance.has_3d:
            hypothesis.pose.pose.position = instance.centroid
        else:   # not a point at the camera's centre: no position at all
            hypothesis.pose.covariance[0] = hypothesis.pose.covariance[7] = hypothesis.pose.covariance[14] = -1.0
        detection.results.append(hypothesis)
        array.detections.append(detection)
    return array


__all__ = ["DetectionsUnavailable", "detection_array", "detection_array_type"]
