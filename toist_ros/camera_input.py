"""Camera input: one image subscription per camera into its latest-frame slot, and the warnings
that say why nothing arrives (QoS mismatch, wrong remap, large images over best-effort UDP).

Image callbacks run in their own reentrant callback group. They only validate and convert the
image to RGB (numpy/OpenCV: no torch, no cv_bridge), put it into the camera's slot and return;
a frame that was still waiting is replaced and counted as dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image

from toist_ros.conversions import ImageError, compressed_to_rgb, image_to_rgb
from toist_ros.diagnostics import Counters, RateMeter
from toist_ros.frame_slot import FrameSlots
from toist_ros.msg import TaskInstances


@dataclass
class Frame:
    header: Any
    rgb: np.ndarray          # [H, W, 3] uint8
    arrival: Time            # node clock at arrival (age fallback for unstamped images)


class Camera:
    """One input topic and its outputs (``image`` -> ``instances``; ``front/image`` -> ``front/instances``)."""

    def __init__(self, index: int, topic: str) -> None:
        self.index = index
        self.topic = topic
        self.prefix = topic[: topic.rfind("/") + 1]  # "" for "image", "front/" for "front/image"
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self.subscription = None
        self.subscribed_name = ""
        self._last_sequence: dict[Any, int] = {}
        self._sequence_lock = threading.Lock()
        self.instances_pub = None
        self.debug_pub = None

    def lost_before(self, info: Any) -> int:
        """Messages a publisher sent that never reached this subscription (gaps in its sequence numbers).

        The image subscription keeps only the newest message (depth 1), so DDS itself drops
        what the executor did not take in time; this makes those drops visible too.
        """
        sequence = info.get("publication_sequence_number") if info else None
        if not sequence:
            return 0
        gid = info.get("publisher_gid")
        key = bytes(gid["data"]) if isinstance(gid, dict) and "data" in gid else repr(gid)
        with self._sequence_lock:
            last = self._last_sequence.get(key)
            self._last_sequence[key] = max(sequence, last or 0)
        return max(0, sequence - last - 1) if last is not None else 0


class CameraInputs:
    """The node's cameras (``input.topics``), their latest-frame ``slots`` and input counters.

    ``settings``: the start-up values; the ``input.*`` parameters read here cannot change
    while the node runs.
    """

    def __init__(self, node: Node, settings: Any, counters: Counters, callback_group: Any) -> None:
        self._node = node
        self._settings = settings
        self._counters = counters
        self._group = callback_group
        self.cameras = [Camera(i, topic) for i, topic in enumerate(settings["input.topics"])]
        self.slots = FrameSlots(len(self.cameras))

    def open(self) -> None:
        """Subscribe every camera and create its outputs (``instances``, ``debug_image``); log each."""
        node, settings = self._node, self._settings
        qos = _image_qos(settings["input.reliable"])
        events = self._qos_events()
        for camera in self.cameras:
            if settings["input.compressed"]:
                name, kind, convert = _compressed_topic(node, camera.topic), CompressedImage, compressed_to_rgb
            else:
                name, kind, convert = camera.topic, Image, image_to_rgb
            camera.subscription = node.create_subscription(
                kind, name, _image_callback(self._on_image, camera, convert), qos,
                callback_group=self._group, event_callbacks=events)
            kind = f"sensor_msgs/{kind.__name__}"
            camera.subscribed_name = camera.subscription.topic_name
            camera.instances_pub = node.create_publisher(TaskInstances, camera.prefix + "instances",
                                                         QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
            camera.debug_pub = node.create_publisher(Image, camera.prefix + "debug_image",
                                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            node.get_logger().info(f"input {camera.subscribed_name} ({kind}, QoS {_qos_text(qos)}) -> "
                                   f"{camera.instances_pub.topic_name}, {camera.debug_pub.topic_name}")

    def receiving(self) -> bool:
        """Whether any camera delivered images recently."""
        return any(c.input_rate.rate() > 0 for c in self.cameras)

    def _on_image(self, msg: Any, camera: Camera, convert: Any, info: Any = None) -> None:
        camera.input_rate.tick()
        lost = camera.lost_before(info)
        if lost:
            self._counters.add("lost_in_transport", lost)
        try:
            rgb = convert(msg)
        except ImageError as exc:
            self._reject(camera, exc)
            return
        self._accept(camera, msg.header, rgb)

    def _accept(self, camera: Camera, header: Any, rgb: np.ndarray) -> None:
        self._counters.add("received")
        if self.slots.put(camera.index, Frame(header, rgb, self._node.get_clock().now())):
            self._counters.add("dropped_replaced")

    def _reject(self, camera: Camera, exc: ImageError) -> None:
        self._counters.add("rejected")
        self._counters.add(f"rejected_{exc.reason}")
        self._node.get_logger().warning(f"rejected an image on {camera.subscribed_name}: {exc}",
                                        throttle_duration_sec=5.0)

    def warn_no_image(self) -> None:
        """For each camera that got nothing: one warning with the publishers on its topic and their QoS."""
        settings = self._settings
        for camera in self.cameras:
            if self.slots.received[camera.index] or self._counters.get("rejected"):
                continue
            self._counters.add("no_image_warnings")
            publishers = self._node.get_publishers_info_by_topic(camera.subscribed_name)
            offered = "; ".join(f"{p.node_namespace.rstrip('/')}/{p.node_name} offers {_qos_text(p.qos_profile)}"
                                for p in publishers) or "no publisher on this topic (check the remapping)"
            hint = ""
            if publishers and not settings["input.reliable"]:
                hint = ("; if the QoS match, large raw images over best-effort UDP may be lost entirely (one VGA "
                        f"frame is 0.9 MB, this machine's UDP receive buffer is {_receive_buffer_text()}): use "
                        "input.reliable:=true with a reliable camera, input.compressed:=true, or a DDS set-up for "
                        "large data (Fast DDS: FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA)")
            self._node.get_logger().warning(
                f"no image on {camera.subscribed_name} after {settings['input.no_image_warning_s']:.0f} s; "
                f"this node asks for {_qos_text(_image_qos(settings['input.reliable']))}; {offered}{hint}")

    def _qos_events(self):
        """Warn when a publisher's QoS cannot match ours (the classic "runs but receives nothing")."""
        from rclpy.event_handler import SubscriptionEventCallbacks

        def incompatible(event: Any) -> None:
            policy = str(getattr(event.last_policy_kind, "name", event.last_policy_kind)).replace("RMW_QOS_POLICY_", "")
            self._counters.add("qos_incompatible")
            self._node.get_logger().warning(
                f"an image publisher's QoS is incompatible with this subscription (policy {policy}); "
                f"set input.reliable:={'false' if self._settings['input.reliable'] else 'true'} to match it",
                throttle_duration_sec=10.0)

        return SubscriptionEventCallbacks(incompatible_qos=incompatible)


def _image_qos(reliable: bool) -> QoSProfile:
    """Sensor-data QoS (best effort, keep last 1) by default; reliable keep-last-1 on request."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


def _qos_text(qos: Any) -> str:
    reliability = getattr(qos.reliability, "name", str(qos.reliability)).lower().replace("_", " ")
    durability = getattr(qos.durability, "name", str(qos.durability)).lower().replace("_", " ")
    depth = f", depth {qos.depth}" if qos.depth else ""  # discovery does not tell a publisher's depth
    return f"{reliability}, {durability}{depth}"


def _receive_buffer_text() -> str:
    try:
        with open("/proc/sys/net/core/rmem_default") as f:
            return f"{int(f.read()) // 1024} KiB (net.core.rmem_default)"
    except (OSError, ValueError):
        return "unknown"


def _image_callback(handler: Any, camera: Camera, convert: Any) -> Any:
    """The subscription callback; with message info (sequence numbers) where rclpy offers it (Jazzy+)."""
    from rclpy.subscription import Subscription

    if hasattr(Subscription, "CallbackType"):
        return lambda msg, info: handler(msg, camera, convert, info)
    return lambda msg: handler(msg, camera, convert)


def _compressed_topic(node: Node, topic: str) -> str:
    """``<resolved image topic>/compressed`` (image_transport's name), unless ``<topic>/compressed`` is remapped."""
    name = topic.rstrip("/") + "/compressed"
    remapped = node.resolve_topic_name(name)
    if remapped != node.resolve_topic_name(name, only_expand=True):
        return remapped
    return node.resolve_topic_name(topic) + "/compressed"


__all__ = ["Camera", "CameraInputs", "Frame"]
