"""A camera stand-in: publishes real photos (scikit-image's sample images) over DDS.

    python -m toist_ros.camera_standin --ros-args -r image:=/camera/image   # 5 Hz, forever
    python -m toist_ros.camera_standin --rate 30 --count 100 --compressed

Each frame is stamped with the publishing time and ``frame_id`` (default ``standin_camera``);
``CameraStandIn.sent`` maps each stamp to the photo it carried (the last ``SENT_KEPT``), so a
client can match the results. The photos cycle through the supported encodings (rgb8, bgr8, rgba8, bgra8; the
grayscale photo as mono8) unless one encoding is asked for. Given ``depth`` (name -> 16UC1
millimetres and the camera's intrinsics), a frame that has depth is preceded by its CameraInfo and
its depth image, with the same stamp and frame, as an RGB-D driver publishes them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
from typing import Optional, Sequence

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from toist_ros.arg_types import at_least, positive_rate
from toist_ros.camera_input import compressed_topic
from toist_ros.conversions import compressed_from_array, image_from_array

DEFAULT_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera")
SENT_KEPT = 1000   # stamps remembered in ``sent``: results come back within seconds, not minutes
_COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8")


def load_photos(names: Sequence[str] = DEFAULT_PHOTOS) -> list[tuple[str, np.ndarray]]:
    """(name, [H, W, 3] or [H, W] uint8) of scikit-image sample photos shipped inside its wheel."""
    import skimage.data

    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"scikit-image has no sample image {name!r}")
        pixels = np.asarray(loader())
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise ValueError(f"sample image {name!r} is {pixels.dtype} {pixels.shape}, not an 8-bit photo")
        out.append((name, pixels[:, :, :3] if pixels.ndim == 3 else pixels))
    return out


def fit(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The photo scaled and centre-cropped to exactly ``width`` x ``height``."""
    import cv2

    h, w = pixels.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(pixels, (max(width, round(w * scale)), max(height, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    y = (resized.shape[0] - height) // 2
    x = (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[y:y + height, x:x + width])


class CameraStandIn(Node):
    """Publishes ``photos`` in turn on ``topic`` at ``rate_hz``; stops after ``count`` frames (None: never)."""

    def __init__(self, photos: list[tuple[str, np.ndarray]], topic: str = "image", rate_hz: float = 5.0,
                 count: Optional[int] = None, frame_id: str = "standin_camera", encoding: Optional[str] = None,
                 compressed: bool = False, reliable: bool = False, start: bool = True,
                 depth: Optional[dict] = None, depth_topic: str = "depth", camera_info_topic: str = "camera_info",
                 **node_kwargs) -> None:
        super().__init__("camera_standin", **node_kwargs)
        if not photos:
            raise ValueError("no photos to publish")
        self.frame_id = frame_id
        self.count = count
        self.compressed = compressed
        self.sent: dict[tuple[int, int], str] = {}
        self.published = 0
        self.done = threading.Event()
        self._messages = itertools.cycle(self._prepare(photos, encoding, compressed))
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)
        from sensor_msgs.msg import CompressedImage, Image

        kind = CompressedImage if compressed else Image
        # The node's name for the compressed stream (image_transport's): after remapping ``image``.
        self.publisher = self.create_publisher(kind, compressed_topic(self, topic) if compressed else topic, qos)
        self._depth = {name: (_depth_image(depth_mm), _camera_info(camera)) for name, (depth_mm, camera)
                       in (depth or {}).items()}
        if self._depth:
            from sensor_msgs.msg import CameraInfo

            self.depth_publisher = self.create_publisher(Image, depth_topic, qos)
            self.info_publisher = self.create_publisher(CameraInfo, camera_info_topic, qos)
        self._period = 1.0 / rate_hz
        self._timer = None
        if start:
            self.start()

    def start(self) -> None:
        """Begin publishing (once)."""
        if self._timer is None:
            self._timer = self.create_timer(self._period, self.publish_next)
            self.get_logger().info(f"publishing on {self.publisher.topic_name} at {1.0 / self._period:g} Hz")

    @staticmethod
    def _prepare(photos, encoding, compressed):
        prepared = []
        colour = itertools.cycle(_COLOUR_ENCODINGS)
        for name, pixels in photos:
            if compressed:
                rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
                prepared.append((name, compressed_from_array(rgb, "jpeg")))
            else:
                enc = encoding or ("mono8" if pixels.ndim == 2 else next(colour))
                prepared.append((name, image_from_array(pixels, enc)))
        return prepared

    def publish_next(self) -> None:
        if self.count is not None and self.published >= self.count:
            if self._timer is not None:
                self._timer.cancel()
            self.done.set()
            return
        name, msg = next(self._messages)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.frame_id
        self.sent[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = name
        if len(self.sent) > SENT_KEPT:  # "forever" at 30 Hz grew 18 MiB an hour
            del self.sent[next(iter(self.sent))]
        if name in self._depth:
            depth, info = self._depth[name]
            depth.header = info.header = msg.header
            self.info_publisher.publish(info)
            self.depth_publisher.publish(depth)
        self.publisher.publish(msg)
        self.published += 1


def _depth_image(depth_mm: np.ndarray):
    from sensor_msgs.msg import Image

    depth_mm = np.ascontiguousarray(depth_mm, dtype=np.uint16)
    return Image(height=depth_mm.shape[0], width=depth_mm.shape[1], encoding="16UC1", step=2 * depth_mm.shape[1],
                 is_bigendian=0, data=depth_mm.tobytes())


def _camera_info(camera):
    """A plumb_bob CameraInfo without distortion for ``camera`` (toist_ros.depth.geometry.Intrinsics)."""
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(width=camera.width, height=camera.height, distortion_model="plumb_bob", d=[0.0] * 5)
    info.k = [camera.fx, 0.0, camera.cx, 0.0, camera.fy, camera.cy, 0.0, 0.0, 1.0]
    info.p = [camera.fx, 0.0, camera.cx, 0.0, 0.0, camera.fy, camera.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    return info


def main(argv: Optional[list[str]] = None) -> int:
    from rclpy.utilities import remove_ros_args

    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(prog="camera_standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", default="image")
    parser.add_argument("--rate", type=positive_rate, default=5.0, help="frames per second")
    parser.add_argument("--count", type=at_least(1), default=None, help="stop after this many frames")
    parser.add_argument("--photos", nargs="+", default=list(DEFAULT_PHOTOS), help="scikit-image sample names")
    parser.add_argument("--size", default="", help="WxH: scale and crop every photo to this size")
    parser.add_argument("--encoding", default=None, choices=_COLOUR_ENCODINGS + ("mono8",),
                        help="one encoding for every photo (default: cycle)")
    parser.add_argument("--compressed", action="store_true", help="publish sensor_msgs/CompressedImage (JPEG)")
    parser.add_argument("--reliable", action="store_true", help="reliable QoS (default best effort)")
    parser.add_argument("--frame-id", default="standin_camera")
    args = parser.parse_args(remove_ros_args(argv)[1:])
    try:
        photos = load_photos(args.photos)
    except ValueError as exc:
        parser.error(f"--photos: {exc}")
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            parser.error(f"--size: expected WIDTHxHEIGHT such as 640x480, got {args.size!r}")
        if min(width, height) < 1:
            parser.error(f"--size: width and height must be >= 1, got {args.size!r}")
        photos = [(name, fit(pixels, width, height)) for name, pixels in photos]
    rclpy.init(args=argv)
    node = CameraStandIn(photos, args.topic, args.rate, args.count, args.frame_id, args.encoding, args.compressed,
                         args.reliable)
    try:
        while rclpy.ok() and not node.done.is_set():
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):  # Ctrl-C / SIGTERM: rclpy shuts the context down
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
