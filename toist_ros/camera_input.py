"""Camera input: one image subscription per camera into its latest-frame slot, and the warnings
that say why nothing arrives (QoS mismatch, wrong remap, large images over best-effort UDP).

Reliability (``input.reliability``): ``auto`` subscribes reliable when every publisher on the
topic offers reliable and best effort otherwise (best effort matches every publisher), and looks
again every ``QOS_CHECK_PERIOD_S``: when a publisher appears or leaves, the subscription is
re-created to match. A reliable subscription to a reliable camera loses nothing between
processes; best effort lost 41 of ~51 512x512 frames there.

Image callbacks run in their own reentrant callback group. They only validate and convert the
image to RGB (numpy/OpenCV: no torch, no cv_bridge), put it into the camera's slot and return;
a frame that was still waiting is replaced and counted as dropped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image

from toist_ros.conversions import ImageError
from toist_ros.depth.pairing import stamp_ns
from toist_ros.diagnostics import Counters, RateMeter
from toist_ros.frame_limits import FrameLimits
from toist_ros.frame_slot import OLDER, REPLACED, FrameSlots
from toist_ros.msg import TaskInstances
from toist_ros.params import output_prefix
from toist_ros.steady_timer import steady_timer

QOS_CHECK_PERIOD_S = 1.0      # auto reliability: how often the publishers on a topic are looked at
LOSS_WINDOW_S = 5.0           # "most frames lost in transport" is judged over this window
LOSS_WARNING_PERIOD_S = 30.0  # at most one such warning per camera in this time
PUBLISHERS_KEPT = 64          # publishers whose sequence numbers a camera remembers (the most recent)
REORDER_KEPT = 16             # sequence numbers counted lost that a late arrival may still take back
REMEDIES = ("input.compressed:=true (sensor_msgs/CompressedImage is ~10x smaller), "
            "input.reliability:=reliable with a reliable camera, or a DDS set-up for large data "
            "(Fast DDS: FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA; larger net.core.rmem_max; docs/ros.md); with "
            "the model on a CPU it may also take the cores DDS needs to read the frames (device:=cuda, or fewer "
            "torch threads: OMP_NUM_THREADS)")


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
        self.prefix = output_prefix(topic)  # "" for "image", "front/" for "front/image"
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self.subscription = None
        self.subscribed_name = ""
        self.reliable = False            # the subscription's reliability now
        self.rejected = 0                # images turned away (their warnings say why)
        self.skipped_stale = 0           # frames older than input.max_age_s when their turn came
        self.depth_outcomes = {"paired": 0, "missing": 0, "unsynced": 0}  # depth.enabled: frames by pairing
        self.window = [0, 0]             # (arrived, lost) since window_start
        self.arrived = 0                 # messages that reached the subscription, in all
        self.lost = 0                    # messages its publishers sent that never did (sequence gaps)
        self.window_start = time.monotonic()
        self.last_loss_warning = float("-inf")
        self._last_sequence: dict[Any, int] = {}
        self._missing: dict[Any, set[int]] = {}   # per publisher: recent sequence numbers counted lost
        self._sequence_lock = threading.Lock()
        self._arrival_lock = threading.Lock()   # arrive(): lost_before and the counts as one step
        self.instances_pub = None
        self.debug_pub = None
        self.detections_pub = None       # output.detections: vision_msgs/Detection2DArray
        self.markers_pub = None          # depth.enabled: visualization_msgs/MarkerArray

    def arrive(self, info: Any, count_lost: Callable[[int], Any]) -> int:
        """One message arrived with ``info``: :meth:`lost_before` and the counts, in one locked
        step (``count_lost(n)`` is called with the lost messages, when any, under the same lock):
        two pool threads decoding compressed images could otherwise count a take-back before the
        loss it takes back, and a report in between read -1."""
        with self._arrival_lock:
            lost = self.lost_before(info)
            self.count_arrival(lost)
            if lost:
                count_lost(lost)
        return lost

    def lost_before(self, info: Any) -> int:
        """Messages a publisher sent that never reached this subscription (gaps in its sequence numbers).

        The image subscription keeps only the newest message (depth 1), so DDS itself drops
        what the executor did not take in time; this makes those drops visible too. -1 for a
        message counted lost that came after all: compressed images are decoded on several pool
        threads, which can reach here out of order (10, 12, 11 counted 11 as lost).
        """
        sequence = info.get("publication_sequence_number") if info else None
        if not sequence:
            return 0
        gid = info.get("publisher_gid")
        key = bytes(gid["data"]) if isinstance(gid, dict) and "data" in gid else repr(gid)
        with self._sequence_lock:
            last = self._last_sequence.pop(key, None)
            self._last_sequence[key] = max(sequence, last or 0)  # re-inserted: the dict runs oldest first
            missing = self._missing.pop(key, set())
            if last is not None and sequence < last and sequence in missing:
                missing.discard(sequence)
                lost = -1
            else:
                lost = max(0, sequence - last - 1) if last is not None else 0
                if lost:   # the most recent gaps only: a message later than these is no reordering
                    missing.update(range(max(last + 1, sequence - REORDER_KEPT), sequence))
            if missing:
                self._missing[key] = {n for n in missing if n >= sequence - REORDER_KEPT}
            if len(self._last_sequence) > PUBLISHERS_KEPT:  # a driver restarted many times: drop the oldest
                oldest = next(iter(self._last_sequence))
                del self._last_sequence[oldest]
                self._missing.pop(oldest, None)
        return lost

    def count_arrival(self, lost: int) -> None:
        """One message arrived, ``lost`` before it did not (the loss window's counts; compressed
        images arrive on several pool threads at once)."""
        with self._sequence_lock:
            self.window[0] += 1
            self.window[1] += lost
            self.arrived += 1
            self.lost += lost

    def forget_arrivals(self) -> None:
        """A new subscription (after a lifecycle pause): what publishers sent while there was none
        was never meant to arrive, so the sequence numbers and the loss window start afresh."""
        with self._sequence_lock:
            self._last_sequence.clear()
            self._missing.clear()
            self.window, self.window_start = [0, 0], time.monotonic()

    def close_window(self, now: float) -> tuple[int, int]:
        """(arrived, lost) of the window that ends ``now``; the next one starts."""
        with self._sequence_lock:
            counts, self.window, self.window_start = tuple(self.window), [0, 0], now
        return counts


class CameraInputs:
    """The node's cameras (``input.topics``), their latest-frame ``slots`` and input counters.

    ``settings``: the start-up values; the ``input.*`` parameters read here cannot change
    while the node runs.
    """

    def __init__(self, node: Node, settings: Any, counters: Counters, callback_group: Any,
                 limits: FrameLimits) -> None:
        self._node = node
        self._settings = settings
        self._counters = counters
        self._group = callback_group
        self._limits = limits
        self.cameras = [Camera(i, topic) for i, topic in enumerate(settings["input.topics"])]
        self.slots = FrameSlots(len(self.cameras))
        self._timer = None
        # Held while subscriptions are made or destroyed: the QoS check (a timer callback) and a
        # lifecycle deactivate (another thread) ran together, and a check under way re-created a
        # subscription after unsubscribe had destroyed them (it outlived cleanup: frames twice).
        self._subscriptions_lock = threading.Lock()
        self._subscribed = False
        # Per camera (images received, rejected) when last subscribed: the no-image warning is
        # about the current subscription.
        self._subscribed_counts = [(0, 0)] * len(self.cameras)

    @property
    def reliability(self) -> str:
        return self._settings["input.reliability"]

    def create_outputs(self) -> None:
        """Each camera's outputs (``instances``, ``debug_image``): created once, when the node is
        configured; images are taken only between :meth:`subscribe` and :meth:`unsubscribe`."""
        node = self._node
        for camera in self.cameras:
            camera.subscribed_name = node.resolve_topic_name(self._input_topic(camera))
            camera.instances_pub = node.create_publisher(TaskInstances, camera.prefix + "instances",
                                                         QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
            camera.debug_pub = node.create_publisher(Image, camera.prefix + "debug_image",
                                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))

    def subscribe(self) -> None:
        """Subscribe every camera (log each with its outputs) and start the periodic QoS and loss
        check; the slots take frames again (after :meth:`unsubscribe`)."""
        node = self._node
        self._count_left_frames()
        self.slots.reopen()
        self._subscribed_counts = [(self.slots.received[c.index], c.rejected) for c in self.cameras]
        with self._subscriptions_lock:
            self._subscribed = True
            for camera in self.cameras:
                camera.forget_arrivals()
                self._subscribe(camera, self._wanted_reliable(camera, current=False))
                node.get_logger().info(f"input {camera.subscribed_name} ({self._kind().__name__}, QoS "
                                       f"{qos_text(image_qos(camera.reliable))}, input.reliability "
                                       f"{self.reliability}) -> {camera.instances_pub.topic_name}, "
                                       f"{camera.debug_pub.topic_name}")
            self._timer = steady_timer(node, QOS_CHECK_PERIOD_S, self.check, self._group)

    def unsubscribe(self) -> None:
        """Stop taking images (lifecycle deactivate): subscriptions and the QoS check go; a frame
        still waiting in a slot is dropped (the inference thread has stopped: :meth:`FrameSlots.close`)."""
        node = self._node
        with self._subscriptions_lock:
            self._subscribed = False
            if self._timer is not None:
                node.destroy_timer(self._timer)
                self._timer = None
            for camera in self.cameras:
                if camera.subscription is not None:
                    node.destroy_subscription(camera.subscription)
                    camera.subscription = None
        # Frames that came in before the subscriptions went: dropped now, counted now (a cleanup
        # next throws the slots away, and they were never counted: received ran ahead of the rest).
        self._count_left_frames()

    def _count_left_frames(self) -> None:
        """Drop the frames waiting in the slots, counted in the per-camera drops and their total,
        as any frame replaced unprocessed."""
        left = self.slots.drop_waiting()
        if left:
            self._counters.add("dropped_replaced", left)

    def destroy_outputs(self) -> None:
        """The publishers of :meth:`create_outputs` and any the node added per camera (lifecycle cleanup)."""
        for camera in self.cameras:
            for name in ("instances_pub", "debug_pub", "detections_pub", "markers_pub"):
                publisher = getattr(camera, name, None)
                if publisher is not None:
                    self._node.destroy_publisher(publisher)
                    setattr(camera, name, None)

    def _kind(self) -> type:
        return CompressedImage if self._settings["input.compressed"] else Image

    def _input_topic(self, camera: Camera) -> str:
        return compressed_topic(self._node, camera.topic) if self._settings["input.compressed"] else camera.topic

    def _subscribe(self, camera: Camera, reliable: bool) -> None:
        """(Re)create the camera's subscription with the given reliability."""
        node = self._node
        if camera.subscription is not None:
            node.destroy_subscription(camera.subscription)
        if self._settings["input.compressed"]:
            kind, convert = CompressedImage, self._limits.compressed_to_rgb
        else:
            kind, convert = Image, self._limits.image_to_rgb
        camera.subscription = node.create_subscription(
            kind, camera.subscribed_name, _image_callback(self._on_image, camera, convert), image_qos(reliable),
            callback_group=self._group, event_callbacks=self._qos_events())
        camera.reliable = reliable

    def _wanted_reliable(self, camera: Camera, current: bool) -> bool:
        return wanted_reliable(self._node, camera.subscribed_name, self.reliability, current)

    def check(self) -> None:
        """Timer: match the publishers' reliability (auto) and warn when most frames are lost."""
        for camera in self.cameras:
            if self.reliability == "auto":
                wanted = self._wanted_reliable(camera, camera.reliable)
                if wanted != camera.reliable:
                    with self._subscriptions_lock:
                        if not self._subscribed:  # unsubscribed meanwhile (lifecycle deactivate)
                            return
                        self._subscribe(camera, wanted)
                    self._counters.add("qos_switches")
                    self._node.get_logger().info(
                        f"the publishers on {camera.subscribed_name} now all offer "
                        f"{'reliable' if wanted else 'best effort or a mix'}: image subscription re-created as "
                        f"{qos_text(image_qos(wanted))} (input.reliability auto)")
            self._check_losses(camera)

    def _check_losses(self, camera: Camera) -> None:
        """One WARN (per ``LOSS_WARNING_PERIOD_S``) when, over the last window, most frames a
        publisher sent never arrived (gaps in its sequence numbers: Jazzy and later)."""
        now = time.monotonic()
        if now - camera.window_start < LOSS_WINDOW_S:
            return
        arrived, lost = camera.close_window(now)
        if lost > max(arrived, 2) and now - camera.last_loss_warning >= LOSS_WARNING_PERIOD_S:
            camera.last_loss_warning = now
            self._counters.add("loss_warnings")
            self._node.get_logger().warning(
                f"most images on {camera.subscribed_name} never reached the node: {lost} lost in transport, "
                f"{arrived} arrived in the last {LOSS_WINDOW_S:.0f} s (subscription "
                f"{qos_text(image_qos(camera.reliable))}); remedies: {REMEDIES}")

    def receiving(self) -> bool:
        """Whether any camera delivered images recently."""
        return any(c.input_rate.rate() > 0 for c in self.cameras)

    def _on_image(self, msg: Any, camera: Camera, convert: Any, info: Any = None) -> None:
        arrival = self._node.get_clock().now()  # before decoding: its time decides the frame's order
        camera.input_rate.tick()
        camera.arrive(info, lambda lost: self._counters.add("lost_in_transport", lost))
        try:
            rgb = convert(msg)
        except ImageError as exc:
            self._reject(camera, exc)
            return
        self._accept(camera, Frame(msg.header, rgb, arrival))

    def _accept(self, camera: Camera, frame: Frame) -> None:
        self._counters.add("received")
        order_ns = stamp_ns(frame.header.stamp) or frame.arrival.nanoseconds
        outcome = self.slots.put(camera.index, frame, order_ns)
        if outcome == REPLACED:
            self._counters.add("dropped_replaced")
        elif outcome == OLDER:
            # Compressed frames decode in parallel: a big one can finish after a newer, smaller one.
            self._counters.add("dropped_out_of_order")

    def _reject(self, camera: Camera, exc: ImageError) -> None:
        camera.rejected += 1
        self._counters.add("rejected")
        self._counters.add(f"rejected_{exc.reason}")
        self._node.get_logger().warning(f"rejected an image on {camera.subscribed_name}: {exc}",
                                        throttle_duration_sec=5.0)

    def warn_no_image(self) -> None:
        """For each camera that got nothing: one warning with the publishers on its topic and their QoS."""
        settings = self._settings
        for camera in self.cameras:
            received, rejected = self._subscribed_counts[camera.index]
            if self.slots.received[camera.index] > received or camera.rejected > rejected:  # its warnings said why
                continue
            self._counters.add("no_image_warnings")
            publishers = self._node.get_publishers_info_by_topic(camera.subscribed_name)
            offered = "; ".join(f"{p.node_namespace.rstrip('/')}/{p.node_name} offers {qos_text(p.qos_profile)}"
                                for p in publishers) or "no publisher on this topic (check the remapping)"
            hint = ""
            if publishers and not camera.reliable:
                hint = ("; if the QoS match, large raw images over best-effort UDP may be lost entirely (one VGA "
                        f"frame is 0.9 MB, this machine's UDP receive buffer is {_receive_buffer_text()}): use "
                        f"{REMEDIES}")
            self._node.get_logger().warning(
                f"no image on {camera.subscribed_name} after {settings['input.no_image_warning_s']:.0f} s; "
                f"this node asks for {qos_text(image_qos(camera.reliable))}; {offered}{hint}")

    def _qos_events(self):
        """Warn when a publisher's QoS cannot match ours (the classic "runs but receives nothing")."""
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # Humble: the module was renamed to event_handler in Iron
            from rclpy.qos_event import SubscriptionEventCallbacks

        def incompatible(event: Any) -> None:
            policy = str(getattr(event.last_policy_kind, "name", event.last_policy_kind)).replace("RMW_QOS_POLICY_", "")
            self._counters.add("qos_incompatible")
            if self.reliability == "auto":
                # A publisher with another reliability joined: the next check() (within
                # QOS_CHECK_PERIOD_S) re-creates the subscription to match every publisher.
                self._node.get_logger().info(f"an image publisher's QoS does not match (policy {policy}); "
                                             "re-subscribing to match it (input.reliability auto)")
                return
            self._node.get_logger().warning(
                f"an image publisher's QoS is incompatible with this subscription (policy {policy}, "
                f"input.reliability {self.reliability}); set input.reliability:=auto to match the publishers",
                throttle_duration_sec=10.0)

        return SubscriptionEventCallbacks(incompatible_qos=incompatible)


def wanted_reliable(node: Node, topic: str, mode: str, current: bool) -> bool:
    """Whether an image subscription to ``topic`` should be reliable now, for ``input.reliability``
    ``mode`` (auto: when every publisher offers reliable; ``current`` while nobody publishes)."""
    if mode != "auto":
        return mode == "reliable"
    return every_publisher_offers(node, topic, lambda qos: qos.reliability == ReliabilityPolicy.RELIABLE, current)


def every_publisher_offers(node: Node, topic: str, accept: Callable[[QoSProfile], bool], current: bool) -> bool:
    """Whether ``accept`` holds for the QoS of every publisher on ``topic`` now; ``current`` while
    nobody publishes (keep what we have until someone does)."""
    offered = [p.qos_profile for p in node.get_publishers_info_by_topic(topic)]
    if not offered:
        return current
    return all(accept(qos) for qos in offered)


def image_qos(reliable: bool) -> QoSProfile:
    """Sensor-data QoS (best effort, keep last 1) by default; reliable keep-last-1 on request."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


def qos_text(qos: Any) -> str:
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


def compressed_topic(node: Node, topic: str) -> str:
    """``<resolved image topic>/compressed`` (image_transport's name), unless ``<topic>/compressed`` is remapped."""
    name = topic.rstrip("/") + "/compressed"
    remapped = node.resolve_topic_name(name)
    if remapped != node.resolve_topic_name(name, only_expand=True):
        return remapped
    return node.resolve_topic_name(topic) + "/compressed"


__all__ = ["Camera", "CameraInputs", "Frame", "compressed_topic", "every_publisher_offers", "image_qos", "qos_text",
           "wanted_reliable"]
