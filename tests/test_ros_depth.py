"""The node with depth.enabled over real rclpy and DDS on loopback: colour + depth + CameraInfo in,
3D fields and RViz markers out; missing, unsynced and bad depth counted, 2D results kept.

The model is the random `tiny` one (its masks are arbitrary shapes), so the scene's depth is a
flat wall facing the camera at a known distance: whatever a mask covers, its 3D centroid must be
the back-projection of the mask's own pixels at that distance, which the test computes from the
received mask and the CameraInfo it sent. Depth is published at half the colour resolution, so
the CameraInfo scaling is on the path too.
"""

import math
import threading

import numpy as np
import pytest

from ros_support import random_model_dir, wait_for
from test_ros_node import OVERRIDES, Probe, _photo, ros  # noqa: F401  (ros: the module-scoped session fixture)

pytestmark = pytest.mark.ros

WIDTH, HEIGHT = 320, 240
FX, FY, CX, CY = 300.0, 305.0, 171.0, 112.0     # principal point off the middle
WALL_M = 1.25


@pytest.fixture(scope="module")
def node(ros, tmp_path_factory):
    from rclpy.parameter import Parameter
    from toist_ros.perception_node import PerceptionNode

    overrides = dict(OVERRIDES, checkpoint=random_model_dir(tmp_path_factory.mktemp("model") / "tiny_random"),
                     **{"depth.enabled": True, "depth.max_dt_s": 0.01, "depth.wait_s": 0.05})
    perception = PerceptionNode(context=ros.context,
                                parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    ros.add(perception)
    return perception


class DepthProbe(Probe):
    def __init__(self, ros):
        super().__init__(ros)
        from sensor_msgs.msg import CameraInfo, Image
        from visualization_msgs.msg import MarkerArray

        self.markers = []
        self.depth_pub = self.node.create_publisher(Image, "depth", 10)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", 10)
        self.node.create_subscription(MarkerArray, "markers", self._keep(self.markers), 10)
        assert wait_for(lambda: self.depth_pub.get_subscription_count() > 0 and
                        self.info_pub.get_subscription_count() > 0), "depth inputs not discovered"

    def camera_info(self, frame_id=""):
        """The colour camera's CameraInfo, unstamped (a static one). In no frame by default: the
        tests name each colour frame apart (``frame_id`` identifies its result), and a CameraInfo
        in another frame than the colour image's is refused."""
        from sensor_msgs.msg import CameraInfo

        info = CameraInfo()
        info.header.frame_id = frame_id
        info.width, info.height = WIDTH, HEIGHT
        info.k = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
        info.d = [0.0] * 5
        info.distortion_model = "plumb_bob"
        return info

    def depth(self, header, encoding="16UC1", offset_s=0.0, size=(WIDTH // 2, HEIGHT // 2), depth_frame=None):
        """The wall at WALL_M at half resolution (or ``size``), stamped ``offset_s`` after ``header``
        (in its frame, or ``depth_frame``)."""
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import Image

        msg = Image()
        ns = header.stamp.sec * 10**9 + header.stamp.nanosec + int(offset_s * 1e9)
        msg.header.stamp = Time(sec=ns // 10**9, nanosec=ns % 10**9)
        msg.header.frame_id = header.frame_id if depth_frame is None else depth_frame
        (msg.width, msg.height), msg.encoding = size, encoding
        if encoding == "16UC1":
            pixels = np.full((msg.height, msg.width), int(WALL_M * 1000), np.uint16)
        else:
            pixels = np.full((msg.height, msg.width), 7, np.uint8)
        msg.step = msg.width * pixels.itemsize
        msg.data = pixels.tobytes()
        return msg

    def frame(self, frame_id, depth_offset_s=None, encoding="16UC1", tries=3, info_frame="", **depth):
        """Publish CameraInfo (in ``info_frame``), a colour frame and (unless None) its depth
        (``depth``: more arguments of :meth:`depth`); the result for it."""
        for _ in range(tries):
            colour = self.image(_photo(WIDTH, HEIGHT), frame_id, encoding="rgb8")
            self.info_pub.publish(self.camera_info(info_frame))
            if depth_offset_s is not None:
                self.depth_pub.publish(self.depth(colour.header, encoding, depth_offset_s, **depth))
            self.image_pub.publish(colour)
            result = self.result_for(colour.header, timeout=8.0)
            if result is not None:
                return result
        raise AssertionError(f"no result for {frame_id}")

    def counter(self, key):
        with self.lock:
            for array in reversed(self.diagnostics):
                for status in array.status:
                    for item in status.values:
                        if item.key == key:
                            return int(item.value)
        return None


@pytest.fixture(scope="module")
def probe(ros, node):
    return DepthProbe(ros)


def _expected_centroid(instance):
    """Mean back-projection of the mask's pixels whose depth pixel (half resolution) sits under them."""
    from toist_ros.instances import full_mask

    mask = full_mask(instance, WIDTH, HEIGHT)
    # Depth pixel (u, v) at half resolution covers colour pixel (2u + 1, 2v + 1) (pixel centres).
    on_depth = mask[1::2, 1::2]
    rows, cols = np.nonzero(on_depth)
    fx, fy = FX / 2, FY / 2
    cx, cy = (CX + 0.5) / 2 - 0.5, (CY + 0.5) / 2 - 0.5
    return np.array([np.mean((cols - cx) / fx), np.mean((rows - cy) / fy), 1.0]) * WALL_M, rows.size


def test_a_frame_before_any_depth_keeps_its_2d_result_and_says_depth_missing(node, probe):
    from toist_ros.msg import TaskInstances

    result = probe.frame("depth_missing_frame", depth_offset_s=None)
    assert result.depth_status == TaskInstances.DEPTH_MISSING and math.isnan(result.depth_offset_ms)
    assert result.instances and not any(inst.has_3d for inst in result.instances)
    assert all(inst.mask.width > 0 for inst in result.instances)  # the 2D result is all there


def test_paired_depth_gives_each_instance_its_3d_centroid_extent_and_surface_point(node, probe):
    from toist_ros.msg import TaskInstances

    result = probe.frame("depth_paired_frame", depth_offset_s=0.0)
    assert result.depth_status == TaskInstances.DEPTH_PAIRED and result.depth_offset_ms == pytest.approx(0.0)
    measured = 0
    for inst in result.instances:
        expected, points = _expected_centroid(inst)
        if points < 10:
            assert not inst.has_3d
            continue
        measured += 1
        assert inst.has_3d and inst.depth_points == points and inst.depth_fraction == pytest.approx(1.0)
        got = np.array([inst.centroid.x, inst.centroid.y, inst.centroid.z])
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert inst.extent.z == pytest.approx(0.0, abs=1e-3)  # a flat wall has no depth
        assert inst.surface_point.z == pytest.approx(WALL_M, abs=1e-3)
        # x extent: the mask's columns on the depth grid, at the wall, plus one depth pixel.
        cols = np.nonzero(np.any(_mask_on_depth(inst), axis=0))[0]
        assert inst.extent.x == pytest.approx((cols.max() - cols.min() + 1) * WALL_M / (FX / 2), rel=1e-3)
        # The box extent measures is centred on the middle of those columns, not on the centroid.
        middle = (cols.min() + cols.max()) / 2.0
        assert inst.box_center.x == pytest.approx((middle - ((CX + 0.5) / 2 - 0.5)) * WALL_M / (FX / 2), abs=1e-6)
        assert inst.box_center.z == pytest.approx(WALL_M, abs=1e-3)
    assert measured >= 1, "no instance large enough to measure: the test saw nothing"


def _mask_on_depth(instance):
    from toist_ros.instances import full_mask

    return full_mask(instance, WIDTH, HEIGHT)[1::2, 1::2]


def test_markers_carry_a_box_and_a_label_per_3d_instance(node, probe):
    from visualization_msgs.msg import Marker

    with probe.lock:
        probe.markers.clear()
    result = probe.frame("depth_marker_frame", depth_offset_s=0.0)

    def for_frame():
        with probe.lock:
            return [m for m in probe.markers if m.markers and m.markers[-1].header.frame_id == "depth_marker_frame"
                    and m.markers[-1].header.stamp == result.header.stamp]
    assert wait_for(lambda: bool(for_frame()), timeout=10), "no markers for the frame"
    array = for_frame()[0].markers
    assert array[0].action == Marker.DELETEALL
    with_3d = [inst for inst in result.instances if inst.has_3d]
    boxes = [m for m in array if m.type == Marker.CUBE]
    labels = [m for m in array if m.type == Marker.TEXT_VIEW_FACING]
    assert len(boxes) == len(labels) == len(with_3d) >= 1
    for inst, cube, label in zip(with_3d, boxes, labels):
        assert cube.header == result.header and cube.pose.position == inst.box_center
        assert cube.scale.x == pytest.approx(max(inst.extent.x, 0.01)) and cube.scale.z == pytest.approx(0.01)
        assert label.text.startswith(f"#{inst.rank} {inst.score:.2f} ")
        # They expire (a stopped camera's last markers used to stay in RViz for ever), never
        # before a few inference periods have passed.
        for marker in (cube, label):
            lifetime = marker.lifetime.sec + marker.lifetime.nanosec * 1e-9
            assert lifetime >= max(1.0, 3 * node.inference_ms.quantiles(0.95)[0] / 1000) - 0.5


def test_marker_lifetime_covers_a_few_inference_periods():
    from toist_ros.depth.markers import marker_lifetime_s

    assert marker_lifetime_s(float("nan")) == 1.0     # nothing timed yet
    assert marker_lifetime_s(40.0) == 1.0              # fast model: the floor
    assert marker_lifetime_s(2500.0) == pytest.approx(7.5)   # 2.5 s a frame on a CPU: three periods
    # Four cameras sharing a 0.5 s model get a result every 2 s each: markers lived 1.5 s and blinked.
    assert marker_lifetime_s(500.0, output_hz=0.5) == pytest.approx(6.0)
    assert marker_lifetime_s(500.0, output_hz=10.0) == pytest.approx(1.5)  # the model is the slower
    assert marker_lifetime_s(float("nan"), output_hz=0.0) == 1.0            # nothing known yet


def test_depth_too_far_apart_in_time_is_unsynced_and_counted(node, probe):
    from toist_ros.msg import TaskInstances

    before = node.counters.get("depth_unsynced")
    # 200 ms early (> depth.max_dt_s 0.01); stamped in the past, so that no later frame of this
    # module can pair with it.
    result = probe.frame("depth_unsynced_frame", depth_offset_s=-0.2)
    assert result.depth_status == TaskInstances.DEPTH_UNSYNCED
    # The closest buffered depth: this frame's, 200 ms early, or an earlier frame's, further than 10 ms.
    assert 10.0 < abs(result.depth_offset_ms) <= 260.0
    assert not any(inst.has_3d for inst in result.instances) and result.instances
    assert node.counters.get("depth_unsynced") > before
    assert wait_for(lambda: (probe.counter("depth_unsynced") or 0) > before, timeout=10)


def test_a_bad_depth_encoding_is_rejected_and_counted(node, probe):
    result = probe.frame("depth_bad_encoding_frame", depth_offset_s=0.0, encoding="mono8")
    assert not any(inst.has_3d for inst in result.instances)
    assert wait_for(lambda: (probe.counter("depth_rejected_encoding") or 0) >= 1, timeout=10)
    assert probe.counter("depth_rejected") >= 1 and probe.counter("depth_paired") >= 1
    assert probe.counter("depth_missing") >= 1
    # Per camera too (the level is judged per camera).
    assert probe.counter("/image depth missing") >= 1 and probe.counter("/image depth paired") >= 1


def test_depth_of_another_aspect_ratio_is_refused_not_stretched(node, probe, capfd):
    """The raw depth stream wired instead of the registered one (848x480 beside 640x480 colour)
    was stretched onto the colour image: 3D results, 2.5 cm off, without a word."""
    from toist_ros.msg import TaskInstances

    result = probe.frame("depth_aspect_frame", depth_offset_s=0.0, size=(WIDTH // 2 + 40, HEIGHT // 2))
    assert result.depth_status == TaskInstances.DEPTH_MISSING
    assert result.instances and not any(inst.has_3d for inst in result.instances)
    assert node.counters.get("depth_rejected_aspect") >= 1
    assert wait_for(lambda: (probe.counter("depth_rejected_aspect") or 0) >= 1, timeout=10)
    logged = capfd.readouterr().err
    assert "the depth image is 200x120 and the colour image 320x240: another aspect ratio" in logged
    # The same camera at another resolution of the same view is read as before.
    assert any(inst.has_3d for inst in probe.frame("depth_after_aspect", depth_offset_s=0.0).instances)


def test_depth_in_another_frame_is_refused_unless_same_frame_is_off(node, probe, capfd):
    """RealSense's raw depth (camera_depth_optical_frame) wired instead of the aligned stream, at the
    colour image's size: taken as registered, 3D positions centimetres off, one warning per process
    (none for a second camera wired the same way)."""
    from toist_ros.msg import TaskInstances

    before = node.counters.get("depth_rejected_frame")
    result = probe.frame("camera_color_optical_frame", depth_offset_s=0.0, size=(WIDTH, HEIGHT),
                         depth_frame="camera_depth_optical_frame", info_frame="camera_color_optical_frame")
    assert result.depth_status == TaskInstances.DEPTH_MISSING
    assert result.instances and not any(inst.has_3d for inst in result.instances)
    assert node.counters.get("depth_rejected_frame") == before + 1
    assert wait_for(lambda: (probe.counter("depth_rejected_frame") or 0) >= 1, timeout=10)
    logged = capfd.readouterr().err
    assert ("no 3D for /image: the depth image's frame 'camera_depth_optical_frame' is not the colour image's "
            "'camera_color_optical_frame'") in logged and "depth.same_frame:=false" in logged
    # A driver that labels its registered depth with its own frame: switched off, used, said once.
    [ok] = probe.set_parameters(node.get_fully_qualified_name(), depth__same_frame=False)
    try:
        assert ok.successful
        for _ in range(2):
            result = probe.frame("camera_color_optical_frame", depth_offset_s=0.0,
                                 depth_frame="camera_depth_optical_frame")
            assert result.depth_status == TaskInstances.DEPTH_PAIRED
        assert node.counters.get("depth_rejected_frame") == before + 1
        logged = capfd.readouterr().err
        assert logged.count("(used anyway: depth.same_frame is false)") == 1, logged[-2000:]
    finally:
        probe.set_parameters(node.get_fully_qualified_name(), depth__same_frame=True)


def test_a_frame_whose_depth_the_buffer_dropped_is_counted_as_evicted(node, probe, capfd):
    """More depth images than the buffer holds arrive after a frame's own (a slow model, large
    depth): the frame's depth is gone when its turn comes. Said as such, not as unsynced depth."""
    from toist_ros.depth.pairing import MAX_FRAMES
    from toist_ros.msg import TaskInstances

    import time

    buffer = node._depth.buffers[0]
    before = node.counters.get("depth_evicted")
    # The buffer's clock at a tenth of the speed: the frame goes ~3 s after its depth arrived, and
    # only depth the cap dropped within 1.5 s of its arrival is "evicted" (older depth would have
    # aged out anyway); in the buffer's time it then went 0.3 s after.
    began = time.monotonic()
    buffer._clock = lambda: began + 0.1 * (time.monotonic() - began)
    try:
        # Stamped 3 s ahead, so that the depth sent first is not too old for the frame when it goes.
        colour = probe.image(_photo(WIDTH, HEIGHT), "depth_evicted_frame", encoding="rgb8", age_s=-3.0)
        probe.info_pub.publish(probe.camera_info())
        for k in range(MAX_FRAMES + 6):   # its own, then more than the buffer keeps, 10 ms apart
            received = buffer.received
            probe.depth_pub.publish(probe.depth(colour.header, offset_s=0.01 * k))
            assert wait_for(lambda: buffer.received > received, timeout=5)
        stamp_ns = colour.header.stamp.sec * 10**9 + colour.header.stamp.nanosec
        assert wait_for(lambda: probe.node.get_clock().now().nanoseconds > stamp_ns, timeout=10)
        probe.image_pub.publish(colour)
        result = probe.result_for(colour.header, timeout=10.0)
        assert result is not None and result.depth_status == TaskInstances.DEPTH_UNSYNCED
        assert node.counters.get("depth_evicted") == before + 1
        assert "its depth image was dropped from the buffer" in capfd.readouterr().err
    finally:
        buffer._clock = time.monotonic
        buffer.clear()   # the later tests' frames are paired afresh, not among these future stamps


def test_3d_without_publishing_masks_and_min_max_checked_together(node, probe):
    [ok] = probe.set_parameters(node.get_fully_qualified_name(), output__masks=False)
    try:
        assert ok.successful
        result = probe.frame("depth_no_masks_frame", depth_offset_s=0.0)
        assert result.instances and all(inst.mask.width == 0 and inst.mask_area == 0 for inst in result.instances)
        assert any(inst.has_3d for inst in result.instances)  # the masks were computed for 3D all the same
    finally:
        probe.set_parameters(node.get_fully_qualified_name(), output__masks=True)
    [bad] = probe.set_parameters(node.get_fully_qualified_name(), depth__min_m=20.0)  # above depth.max_m 10
    assert not bad.successful and "depth.max_m 10.0 must be greater than depth.min_m 20.0" in bad.reason


def _calibration(width=WIDTH, height=HEIGHT):
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5)
    info.k = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
    return info


def test_a_camera_info_published_once_and_latched_is_received(ros):
    """A calibration published once with transient-local durability (a static CameraInfo
    publisher, `ros2 topic pub --once --qos-durability transient_local`): the best-effort volatile
    subscription never received it, and every frame stayed DEPTH_MISSING. Latched before the node
    subscribes, and latched by a publisher that appears later; a volatile publisher joining turns
    the subscription back to best effort volatile (which matches both)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo
    from toist_ros.depth.inputs import DepthInputs
    from toist_ros.diagnostics import Counters

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    publisher_node = ros.node("latched_calibration")
    host = ros.node("depth_inputs_host")
    settings = {"input.reliability": "auto", "depth.topics": ["/latched_test/a/depth", "/latched_test/b/depth"],
                "depth.camera_info_topics": ["/latched_test/a/camera_info", "/latched_test/b/camera_info"],
                "depth.buffer_mb": 16}
    before = publisher_node.create_publisher(CameraInfo, "/latched_test/a/camera_info", latched)
    before.publish(_calibration())
    counters = Counters()
    inputs = DepthInputs(host, settings, counters, callback_group=None)
    assert wait_for(lambda: host.count_publishers("/latched_test/a/camera_info") == 1, timeout=10)
    inputs.subscribe()
    try:
        assert wait_for(lambda: len(inputs.buffers[0]._cameras) == 1, timeout=10), \
            "a CameraInfo latched before the subscription never arrived"
        assert inputs._info_latched == [True, False]

        later = publisher_node.create_publisher(CameraInfo, "/latched_test/b/camera_info", latched)
        later.publish(_calibration())
        assert wait_for(lambda: inputs._info_latched == [True, True], timeout=10), \
            "the CameraInfo subscription did not follow a latching publisher that came later"
        assert len(inputs.buffers[1]._cameras) >= 1 and counters.snapshot().get("qos_switches") == 1

        volatile = publisher_node.create_publisher(CameraInfo, "/latched_test/b/camera_info", 1)
        assert wait_for(lambda: inputs._info_latched == [True, False], timeout=10)
        assert wait_for(lambda: volatile.get_subscription_count() == 1, timeout=10)
        sent = _calibration()
        sent.header.stamp.sec = 7
        volatile.publish(sent)
        assert wait_for(lambda: any(stamp == 7 * 10**9 for stamp, _ in inputs.buffers[1]._cameras), timeout=10)
    finally:
        inputs.unsubscribe()
    assert inputs._info_subscriptions == [None, None] and inputs._timer is None
