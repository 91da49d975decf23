"""Depth input of the node: per camera, the registered depth image and the colour CameraInfo.

Callbacks only check the message and put it into the camera's :class:`DepthBuffer` (no copy for
native-byte-order depth; the conversion to metres happens per instance, on its window only).
Bad depth images are counted like bad colour images (``depth_rejected``,
``depth_rejected_<reason>``); a CameraInfo that cannot be used is counted as
``camera_info_rejected`` and keeps the previous one.

Reliability follows ``input.reliability`` as the colour image does (auto: match the publishers,
looked at again every ``QOS_CHECK_PERIOD_S``). CameraInfo is small and read best effort, which
matches every publisher, and volatile, unless every publisher on its topic offers reliable
transient-local (a calibration published once and latched): then the subscription is made
reliable transient-local, which alone receives what was published before it; looked at again
every ``QOS_CHECK_PERIOD_S`` whatever ``input.reliability`` says.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from toist_ros.camera_input import (QOS_CHECK_PERIOD_S, every_publisher_offers, image_qos, qos_text,
                                   wanted_reliable)
from toist_ros.steady_timer import steady_timer
from toist_ros.depth.images import DepthError, depth_from_image, has_distortion, intrinsics_from_camera_info
from toist_ros.depth.pairing import CameraModel, DepthBuffer, stamp_ns
from toist_ros.diagnostics import Counters


class DepthInputs:
    """One depth subscription and one CameraInfo subscription per camera; ``buffers[i]`` pairs
    camera i's colour frames."""

    def __init__(self, node: Node, settings: Any, counters: Counters, callback_group: Any) -> None:
        self._node = node
        self._counters = counters
        self._group = callback_group
        self._mode = settings["input.reliability"]
        self._depth_topics: Sequence[str] = settings["depth.topics"]
        self._info_topics: Sequence[str] = settings["depth.camera_info_topics"]
        self.buffers = [DepthBuffer(max_bytes=int(settings["depth.buffer_mb"]) * 1024 * 1024)
                        for _ in self._depth_topics]
        self._subscriptions: list = [None] * len(self.buffers)
        self._reliable = [False] * len(self.buffers)
        self._names = [""] * len(self.buffers)
        self._info_subscriptions: list = [None] * len(self.buffers)
        self._info_latched = [False] * len(self.buffers)
        self._info_names = [""] * len(self.buffers)
        self._distortion_warned: set[int] = set()  # cameras whose distortion was warned about
        self._timer = None
        # The QoS check (spinning thread) re-creates subscriptions; a lifecycle deactivate (a pool
        # thread) destroys them: one at a time, and no re-creation once unsubscribed.
        self._subscriptions_lock = threading.Lock()
        self._subscribed = False

    def subscribe(self) -> None:
        """The depth and CameraInfo subscriptions, and the check of their publishers' QoS."""
        node = self._node
        with self._subscriptions_lock:   # (a QoS check left over from an earlier activation waits)
            self._subscribed = True
            for index, (depth_topic, info_topic) in enumerate(zip(self._depth_topics, self._info_topics)):
                self._names[index] = node.resolve_topic_name(depth_topic)
                self._subscribe(index, wanted_reliable(node, self._names[index], self._mode, current=False))
                self._info_names[index] = node.resolve_topic_name(info_topic)
                self._subscribe_info(index, latched_info(node, self._info_names[index], current=False))
                node.get_logger().info(
                    f"depth input {self._names[index]} (sensor_msgs/Image 16UC1 mm or 32FC1 m, QoS "
                    f"{qos_text(image_qos(self._reliable[index]))}) with {self._info_names[index]} "
                    f"(sensor_msgs/CameraInfo, QoS {qos_text(info_qos(self._info_latched[index]))})")
            self._timer = steady_timer(node, QOS_CHECK_PERIOD_S, self._check_qos, self._group)

    def unsubscribe(self) -> None:
        """Stop taking depth (lifecycle deactivate); the buffers forget what they held."""
        node = self._node
        with self._subscriptions_lock:
            self._subscribed = False
            if self._timer is not None:
                node.destroy_timer(self._timer)
                self._timer = None
            for subscriptions in (self._subscriptions, self._info_subscriptions):
                for index, subscription in enumerate(subscriptions):
                    if subscription is not None:
                        node.destroy_subscription(subscription)
                        subscriptions[index] = None
        for buffer in self.buffers:
            buffer.clear()

    def _subscribe(self, index: int, reliable: bool) -> None:
        if self._subscriptions[index] is not None:
            self._node.destroy_subscription(self._subscriptions[index])
        self._subscriptions[index] = self._node.create_subscription(
            Image, self._names[index], lambda msg, i=index: self._on_depth(msg, i), image_qos(reliable),
            callback_group=self._group)
        self._reliable[index] = reliable

    def _subscribe_info(self, index: int, latched: bool) -> None:
        if self._info_subscriptions[index] is not None:
            self._node.destroy_subscription(self._info_subscriptions[index])
        self._info_subscriptions[index] = self._node.create_subscription(
            CameraInfo, self._info_names[index], lambda msg, i=index: self._on_info(msg, i), info_qos(latched),
            callback_group=self._group)
        self._info_latched[index] = latched

    def _check_qos(self) -> None:
        with self._subscriptions_lock:
            if self._subscribed:   # not unsubscribed meanwhile (lifecycle deactivate)
                self._match_publishers()

    def _match_publishers(self) -> None:
        for index, name in enumerate(self._names):
            wanted = wanted_reliable(self._node, name, self._mode, self._reliable[index])
            if wanted != self._reliable[index]:
                self._subscribe(index, wanted)
                self._counters.add("qos_switches")
            latched = latched_info(self._node, self._info_names[index], self._info_latched[index])
            if latched != self._info_latched[index]:
                self._subscribe_info(index, latched)
                self._counters.add("qos_switches")
                self._node.get_logger().info(
                    f"the publishers on {self._info_names[index]} now all offer "
                    f"{'reliable transient local (latched)' if latched else 'volatile or best effort'}: CameraInfo "
                    f"subscription re-created as {qos_text(info_qos(latched))}")

    def _on_depth(self, msg: Any, index: int) -> None:
        try:
            depth = depth_from_image(msg)
        except DepthError as exc:
            self._counters.add("depth_rejected")
            self._counters.add(f"depth_rejected_{exc.reason}")
            self._node.get_logger().warning(f"rejected a depth image on {self._names[index]}: {exc}",
                                            throttle_duration_sec=5.0)
            return
        self._counters.add("depth_received")
        self.buffers[index].put(stamp_ns(msg.header.stamp), depth)

    def _on_info(self, msg: Any, index: int) -> None:
        try:
            intrinsics = intrinsics_from_camera_info(msg)
        except DepthError as exc:
            self._counters.add("camera_info_rejected")
            self._node.get_logger().warning(f"camera {index}: {exc}", throttle_duration_sec=10.0)
            return
        distorted = has_distortion(msg)
        if distorted and index not in self._distortion_warned:
            self._distortion_warned.add(index)
            self._node.get_logger().warning(
                f"the CameraInfo of camera {index} has distortion coefficients {list(msg.d)[:5]}: the 3D step "
                "reads the images as rectified, through P (image_geometry's convention), and ignores them; "
                "feed the rectified colour and depth images (image_proc's image_rect) unless the distortion is "
                "as small as RGB-D colour cameras' (docs/ros.md)")
        self.buffers[index].set_camera(CameraModel(intrinsics, str(msg.header.frame_id), distorted),
                                       stamp_ns(msg.header.stamp))


def latched_info(node: Node, topic: str, current: bool) -> bool:
    """Whether the CameraInfo subscription to ``topic`` should be reliable transient-local now:
    when every publisher offers that (``current`` while nobody publishes)."""
    return every_publisher_offers(
        node, topic, lambda qos: (qos.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                  and qos.reliability == ReliabilityPolicy.RELIABLE), current)


def info_qos(latched: bool) -> QoSProfile:
    """Keep last 1: best effort volatile (the images' sensor-data QoS: matches every publisher), or
    reliable transient-local (receives a CameraInfo latched before the subscription; matches only
    such publishers)."""
    if latched:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    return image_qos(reliable=False)


__all__ = ["DepthInputs", "info_qos", "latched_info"]
