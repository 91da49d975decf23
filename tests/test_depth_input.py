"""Depth images, CameraInfo and stamp pairing (no DDS): what is accepted, what is refused and why."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from toist_ros.depth.geometry import Intrinsics
from toist_ros.depth.images import DepthError, depth_from_image, has_distortion, intrinsics_from_camera_info
from toist_ros.depth.pairing import HORIZON_S, MAX_FRAMES, MISSING, PAIRED, UNSYNCED, CameraModel, DepthBuffer


def _image(array: np.ndarray, encoding: str, big_endian: bool = False, pad: int = 0):
    data = array.astype(array.dtype.newbyteorder(">" if big_endian else "<"))
    rows = [row.tobytes() + bytes(pad) for row in data]
    return SimpleNamespace(height=array.shape[0], width=array.shape[1], encoding=encoding,
                           is_bigendian=int(big_endian), step=array.shape[1] * array.itemsize + pad,
                           data=b"".join(rows), header=SimpleNamespace(frame_id="camera_color_optical_frame"))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("pad", [0, 6])
def test_16uc1_millimetres_and_32fc1_metres(big_endian, pad):
    mm = np.array([[0, 1000, 65535], [250, 1, 4000]], np.uint16)
    depth = depth_from_image(_image(mm, "16UC1", big_endian, pad))
    np.testing.assert_array_equal(depth.raw, mm)
    assert depth.scale == 0.001 and depth.size == (3, 2)
    metres = np.array([[np.nan, 1.0, np.inf], [0.25, 0.0, 4.0]], np.float32)
    depth = depth_from_image(_image(metres, "32FC1", big_endian, pad))
    np.testing.assert_array_equal(depth.raw, metres)
    assert depth.scale == 1.0 and depth.raw.dtype.isnative


@pytest.mark.parametrize("change, reason, words", [
    (dict(encoding="mono8"), "encoding", "unsupported depth encoding 'mono8'"),
    (dict(encoding="rgb8"), "encoding", "16UC1 (millimetres), 32FC1 (metres)"),
    (dict(width=0), "empty", "zero size"),
    (dict(step=5), "step", "step 5"),
    (dict(data=bytes(10)), "truncated", "image data has 10 bytes, but step 6 x height 2 = 12"),
])
def test_bad_depth_images_are_refused_with_the_reason(change, reason, words):
    msg = _image(np.ones((2, 3), np.uint16), "16UC1")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(DepthError) as caught:
        depth_from_image(msg)
    assert caught.value.reason == reason and words in str(caught.value)


def _info(k, width=640, height=480, d=(0.0,) * 5, frame="camera_color_optical_frame", p=(0.0,) * 12, roi=None,
          binning=(0, 0)):
    roi = roi or SimpleNamespace(x_offset=0, y_offset=0, width=0, height=0)
    return SimpleNamespace(k=list(k), width=width, height=height, d=list(d), p=list(p), roi=roi,
                           binning_x=binning[0], binning_y=binning[1], header=SimpleNamespace(frame_id=frame))


def test_camera_info_gives_the_intrinsics_and_refuses_an_uncalibrated_camera():
    got = intrinsics_from_camera_info(_info([615.0, 0, 320.5, 0, 616.0, 241.0, 0, 0, 1]))
    assert got == Intrinsics(615.0, 616.0, 320.5, 241.0, 640, 480)
    with pytest.raises(DepthError, match="focal lengths must be > 0"):
        intrinsics_from_camera_info(_info([0.0] * 9))
    with pytest.raises(DepthError, match="size 0x480"):
        intrinsics_from_camera_info(_info([615.0, 0, 320.5, 0, 616.0, 241.0, 0, 0, 1], width=0))
    with pytest.raises(DepthError, match="non-finite"):
        intrinsics_from_camera_info(_info([float("nan"), 0, 320.5, 0, 616.0, 241.0, 0, 0, 1]))
    assert not has_distortion(_info([1] * 9)) and has_distortion(_info([1] * 9, d=(0.1, 0, 0, 0, 0)))
    assert has_distortion(_info([1] * 9, d=(float("nan"),) * 5)) and has_distortion(_info([1] * 9, d=(0, float("inf"))))


def test_the_rectified_images_projection_p_is_used_when_set():
    """A calibrated camera with distortion: image_rect (what docs/ros.md says to feed) is seen
    through P, not K; reading it through K placed objects 3 cm off at 1 m."""
    k = [600.0, 0, 330.0, 0, 605.0, 236.0, 0, 0, 1]
    p = [560.0, 0, 322.0, 0, 0, 570.0, 244.0, 0, 0, 0, 1, 0]
    assert intrinsics_from_camera_info(_info(k, p=p, d=(-0.3, 0.1, 0, 0, 0))) == Intrinsics(560.0, 570.0, 322.0, 244.0,
                                                                                            640, 480)
    assert intrinsics_from_camera_info(_info(k)) == Intrinsics(600.0, 605.0, 330.0, 236.0, 640, 480)  # P unset: K
    with pytest.raises(DepthError, match=r"focal lengths must be > 0 .*\(P\)$"):
        intrinsics_from_camera_info(_info(k, p=[0.0, 0, 322.0, 0, 0, 570.0, 244.0, 0, 0, 0, 1, 0]))
    with pytest.raises(DepthError, match="P has 9 entries, expected 12"):
        intrinsics_from_camera_info(_info(k, p=k))


def test_a_region_of_interest_moves_the_principal_point_and_sizes_the_image():
    """A driver's or image_proc's crop: the image is the ROI, K is the full sensor's. It was read
    as the full image scaled down (58 mm off, extents twice as large)."""
    k = [600.0, 0, 320.0, 0, 600.0, 240.0, 0, 0, 1]
    roi = SimpleNamespace(x_offset=100, y_offset=60, width=320, height=240)
    got = intrinsics_from_camera_info(_info(k, roi=roi))
    assert got == Intrinsics(600.0, 600.0, 220.0, 180.0, 320, 240)
    # The cropped image binned by 2 (160x120) is then read through the scaling, as any other size.
    assert got.scaled(160, 120) == Intrinsics(300.0, 300.0, 109.75, 89.75, 160, 120)


def test_binning_divides_each_axis_by_its_own_factor():
    """binning_x 2, binning_y 1 (a 320x480 image) was read as 640x480 and refused as another aspect
    ratio; the factors were taken from the sizes, never from the message."""
    k = [600.0, 0, 320.0, 0, 610.0, 240.0, 0, 0, 1]
    got = intrinsics_from_camera_info(_info(k, binning=(2, 1)))
    assert got == Intrinsics(300.0, 610.0, 159.75, 240.0, 320, 480)
    assert intrinsics_from_camera_info(_info(k, binning=(2, 2))) == Intrinsics(300.0, 305.0, 159.75, 119.75, 320, 240)
    # A region of interest first (full-resolution pixels), then the binning of what it keeps.
    roi = SimpleNamespace(x_offset=100, y_offset=60, width=321, height=240)
    assert intrinsics_from_camera_info(_info(k, roi=roi, binning=(2, 3))) == Intrinsics(300.0, 610.0 / 3, 109.75,
                                                                                       (180 + 0.5) / 3 - 0.5, 160, 80)
    from toist_ros.depth.instances3d import registration_problem

    assert registration_problem((320, 480), (320, 480), (got.width, got.height)) == ""


def test_registration_problem_refuses_another_aspect_ratio_and_accepts_another_resolution():
    from toist_ros.depth.instances3d import registration_problem

    assert registration_problem((640, 480), (320, 240), (1280, 960)) == ""
    assert registration_problem((1280, 720), (427, 240), (1280, 720)) == ""  # binned by 3, rounded
    assert registration_problem((101, 75), (50, 37), (101, 75)) == ""  # halved, rounded down: 0.35 % off
    problem = registration_problem((640, 480), (848, 480), (640, 480))  # the raw depth stream, not the aligned one
    assert "the depth image is 848x480 and the colour image 640x480: another aspect ratio" in problem
    assert "CameraInfo is 1280x720" in registration_problem((640, 480), (640, 480), (1280, 720))
    # RealSense's raw depth beside 16:9 colour: 0.6 % off, within the 1 % that was allowed.
    assert "848x480" in registration_problem((1280, 720), (848, 480), (1280, 720))
    assert "424x240" in registration_problem((640, 360), (424, 240), (640, 360))


def test_frame_problem_names_the_input_in_another_frame():
    from toist_ros.depth.instances3d import frame_problem

    colour = "camera_color_optical_frame"
    assert frame_problem(colour, colour, colour) == ""
    assert frame_problem(colour, "/" + colour, colour) == ""       # a ROS 1 bag's leading slash
    assert frame_problem("", "camera_depth_optical_frame", "x") == ""     # nothing to compare with
    assert frame_problem(colour, "", "") == ""
    problem = frame_problem(colour, "camera_depth_optical_frame", colour)
    assert problem.startswith("the depth image's frame 'camera_depth_optical_frame' is not the colour image's "
                              "'camera_color_optical_frame'") and "aligned_depth_to_color" in problem
    assert frame_problem(colour, colour, "camera_depth_optical_frame").startswith("the CameraInfo's frame")


CAMERA = CameraModel(Intrinsics(615.0, 615.0, 320.0, 240.0, 640, 480), "cam", False)
SECOND = 1_000_000_000


def test_pairs_the_closest_stamp_within_the_tolerance():
    buffer = DepthBuffer()
    buffer.set_camera(CAMERA)
    for i in range(5):
        buffer.put(10 * SECOND + i * 33_000_000, f"depth{i}")
    got = buffer.pair(10 * SECOND + 2 * 33_000_000 + 4_000_000, max_dt_s=0.02)
    assert got.status == PAIRED and got.depth == "depth2" and got.camera is CAMERA
    assert got.offset_s == pytest.approx(-0.004)
    got = buffer.pair(10 * SECOND + 50_000_000, max_dt_s=0.01)   # 17 ms from the nearest
    assert got.status == UNSYNCED and got.depth is None and got.offset_s == pytest.approx(0.016)


class _Waits(threading.Condition):
    """Stands in for a DepthBuffer's condition and clock (``_buffer_waiting_on``): records the
    timeout of every wait, and no wait blocks. A wait runs the next of ``arrivals`` (what another
    thread's ``put`` would bring meanwhile; ``put`` notifies) and reports a notify; with none left
    it moves the clock (``now``, seconds) on by its timeout and reports that it timed out. The lock
    is re-entrant, as the buffer's own is, so ``put`` can run inside the wait."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.timeouts = []
        self.arrivals = []

    def clock(self) -> float:
        return self.now

    def wait(self, timeout=None) -> bool:
        self.timeouts.append(timeout)
        assert len(self.timeouts) < 100, "pair waits on and on"
        if self.arrivals:
            self.arrivals.pop(0)()
            return True
        self.now += timeout
        return False


def _buffer_waiting_on(waits: _Waits) -> DepthBuffer:
    buffer = DepthBuffer(clock=waits.clock)
    buffer._cond = waits  # every wait in pair() goes through it
    return buffer


def test_missing_without_depth_or_without_camera_info():
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    assert buffer.pair(SECOND, 0.02, wait_s=1.0).status == MISSING
    assert waits.timeouts == []  # no depth ever received: frames do not wait for one
    buffer.put(SECOND, "depth")
    assert buffer.pair(SECOND, 0.02).status == MISSING  # no CameraInfo yet
    buffer.set_camera(CAMERA)
    assert buffer.pair(SECOND, 0.02).status == PAIRED


def test_the_camera_info_stamped_closest_to_the_frame_is_used():
    buffer = DepthBuffer()
    small = CameraModel(Intrinsics(300.0, 300.0, 160.0, 120.0, 320, 240), "cam", False)
    buffer.set_camera(CAMERA, 1 * SECOND)
    buffer.set_camera(small, 2 * SECOND)
    buffer.put(1 * SECOND, "depth1")
    buffer.put(2 * SECOND, "depth2")
    assert buffer.pair(1 * SECOND, 0.01).camera is CAMERA   # not simply the latest
    assert buffer.pair(2 * SECOND, 0.01).camera is small


def test_the_ring_forgets_old_depth():
    waits = _Waits()
    buffer = DepthBuffer(horizon_s=0.1, clock=waits.clock)
    buffer.set_camera(CAMERA)
    for i in range(20):
        buffer.put(i * SECOND // 10, i)   # 10 Hz
        waits.now += 0.1
    assert buffer.pair(19 * SECOND // 10, 0.01).depth == 19
    assert len(buffer) == 8               # the newest 8 stay, however old
    assert buffer.pair(2 * SECOND // 10, 0.01).status == UNSYNCED  # pushed out by newer ones


def test_a_slow_model_still_finds_its_depth_image():
    """A frame is paired after waiting for the frame before it and going through the model: up to
    two inference periods after its stamp. The ring of the 8 newest images lost the matching one of
    any model slower than ~0.15 s at 30 Hz (~0.05 s at 90 Hz); it now keeps HORIZON_S of depth."""
    for hz in (30, 90):
        buffer = DepthBuffer()
        buffer.set_camera(CAMERA)
        period = SECOND // hz
        frame = 100 * SECOND
        for i in range(int(0.6 * hz)):   # 0.6 s of depth after the frame: a 0.3 s model, twice
            buffer.put(frame + i * period, np.zeros((4, 4), np.float32))
        got = buffer.pair(frame, max_dt_s=0.005)
        assert got.status == PAIRED and got.offset_s == 0.0, hz


def test_the_ring_is_bounded_in_frames_and_bytes():
    buffer = DepthBuffer()
    for i in range(200):   # unstamped: every stamp 0, the horizon keeps them all
        buffer.put(0, np.zeros((4, 4), np.float32))
    assert len(buffer) == MAX_FRAMES
    small = DepthBuffer(max_bytes=10 * 480 * 640 * 4)
    for i in range(30):
        small.put(SECOND + i, np.zeros((480, 640), np.float32))
    assert len(small) == 10


def test_the_byte_cap_counts_the_depth_images_the_node_buffers():
    """The node buffers DepthImage objects; they had no ``nbytes``, so MAX_BYTES never applied
    (64 ZED 1080p 32FC1 images: 530 MB per camera)."""
    from toist_ros.depth.images import DepthImage

    small = DepthBuffer(max_bytes=10 * 480 * 640 * 4)
    for i in range(30):
        small.put(SECOND + i, DepthImage(np.zeros((480, 640), np.float32), 1.0))
    assert len(small) == 10


def test_a_frame_whose_depth_the_cap_dropped_is_said_to_be_evicted():
    """With the byte cap applied, large depth images span little time: a slow model's frame finds
    its depth gone. That is told apart from depth that never came (UNSYNCED or MISSING alone)."""
    from toist_ros.depth.images import DepthImage

    buffer = DepthBuffer(max_bytes=10 * 480 * 640 * 4)   # 10 VGA 32FC1 images
    buffer.set_camera(CAMERA)
    period = SECOND // 30
    for i in range(30):   # one second at 30 Hz: the first 20 are dropped by the cap
        buffer.put(100 * SECOND + i * period, DepthImage(np.zeros((480, 640), np.float32), 1.0))
    late = buffer.pair(100 * SECOND + 5 * period, max_dt_s=0.005)
    assert late.status == UNSYNCED and late.evicted
    assert buffer.pair(100 * SECOND + 25 * period, max_dt_s=0.005).status == PAIRED
    never = buffer.pair(100 * SECOND + 60 * period, max_dt_s=0.005)   # later than any depth: not dropped
    assert never.status == UNSYNCED and not never.evicted
    roomy = DepthBuffer()
    roomy.set_camera(CAMERA)
    for i in range(30):
        roomy.put(100 * SECOND + i * period, DepthImage(np.zeros((480, 640), np.float32), 1.0))
    assert roomy.pair(100 * SECOND + 5 * period, max_dt_s=0.005).status == PAIRED
    before_any = roomy.pair(99 * SECOND, max_dt_s=0.005)   # older than the stream: nothing was dropped
    assert before_any.status == UNSYNCED and not before_any.evicted


def test_an_unstamped_cameras_depth_is_paired_only_while_it_is_recent():
    """Every stamp 0: stamps cannot tell old depth from new, so after the depth stream stopped the
    last image was paired for ever (depth_offset_ms 0)."""
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    buffer.put(0, "last")
    waits.now = 1.0
    assert buffer.pair(0, 0.02).depth == "last"
    waits.now = 1.0 + HORIZON_S   # the stream stopped HORIZON_S ago
    assert buffer.pair(0, 0.02).status == MISSING
    buffer.put(0, "again")
    assert buffer.pair(0, 0.02).depth == "again"
    # Stamped frames are paired by stamp, however long ago the depth arrived.
    stamped = _buffer_waiting_on(waits)
    stamped.set_camera(CAMERA)
    stamped.put(5 * SECOND, "stamped")
    waits.now += 10.0
    assert stamped.pair(5 * SECOND, 0.02).depth == "stamped"


def test_of_equally_close_depth_images_the_newest_is_paired():
    """A camera that leaves stamps at 0 (docs/ros.md supports it): every depth image is equally
    close; the oldest in the ring (up to a second stale) used to be taken as 'paired'."""
    buffer = DepthBuffer()
    buffer.set_camera(CAMERA)
    for i in range(4):
        buffer.put(0, f"depth{i}")
    assert buffer.pair(0, 0.01).depth == "depth3"


def test_waits_for_a_depth_image_that_can_still_come_and_not_for_one_that_cannot():
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    buffer.put(SECOND, "old")
    waits.arrivals.append(lambda: buffer.put(2 * SECOND, "late"))  # comes while the frame waits
    got = buffer.pair(2 * SECOND, max_dt_s=0.01, wait_s=2.0)
    assert got.status == PAIRED and got.depth == "late"
    assert waits.timeouts == [2.0] and waits.now == 0.0  # one wait of at most wait_s, ended by the arrival
    # Something newer than the frame already arrived: its own depth will not come, no wait.
    buffer.put(7 * SECOND // 2, "newer")   # (no further than the horizon: in line with the stream)
    assert buffer.pair(3 * SECOND, max_dt_s=0.01, wait_s=2.0).status == UNSYNCED
    assert waits.timeouts == [2.0]
    # Nothing comes: gives up when wait_s has passed, not before and not later.
    assert buffer.pair(9 * SECOND, max_dt_s=0.01, wait_s=0.1).status == UNSYNCED
    assert waits.timeouts == [2.0, 0.1] and waits.now == 0.1


class _RecordedWaits(threading.Condition):
    """A real condition that records each wait: (timeout, whether a notify rather than the timeout
    ended it); ``waiting`` is set once a wait has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = []
        self.waiting = threading.Event()

    def wait(self, timeout=None) -> bool:
        self.waiting.set()  # the lock is still held: a put() from another thread comes after the wait began
        woken = super().wait(timeout)
        self.waits.append((timeout, woken))
        return woken


def test_a_depth_image_from_the_depth_callback_wakes_the_waiting_frame():
    """The depth callback's ``put`` (another thread) ends the colour frame's wait at once, not at its deadline."""
    waits = _RecordedWaits()
    buffer = DepthBuffer()
    buffer._cond = waits
    buffer.set_camera(CAMERA)
    buffer.put(SECOND, "old")

    def depth_callback():
        waits.waiting.wait(timeout=30)
        buffer.put(2 * SECOND, "late")

    thread = threading.Thread(target=depth_callback)
    thread.start()
    got = buffer.pair(2 * SECOND, max_dt_s=0.01, wait_s=30.0)
    thread.join()
    assert got.status == PAIRED and got.depth == "late"
    assert len(waits.waits) == 1 and waits.waits[0][1], waits.waits  # woken by the put, not timed out


def test_distortion_is_warned_about_once_per_camera():
    """The warning was once per node: a second camera's distortion went unsaid."""
    from toist_ros.depth.inputs import DepthInputs
    from toist_ros.diagnostics import Counters

    warnings = []
    logger = SimpleNamespace(warning=lambda text, **kwargs: warnings.append(text))
    node = SimpleNamespace(get_logger=lambda: logger)
    settings = {"input.reliability": "auto", "depth.topics": ["front/depth", "rear/depth"],
                "depth.camera_info_topics": ["front/camera_info", "rear/camera_info"], "depth.buffer_mb": 128}
    inputs = DepthInputs(node, settings, Counters(), callback_group=None)
    k = [600.0, 0, 320.0, 0, 600.0, 240.0, 0, 0, 1]
    distorted = _info(k, d=(-0.2, 0.05, 0, 0, 0))
    distorted.header.stamp = SimpleNamespace(sec=1, nanosec=0)
    for index in (0, 0, 1, 1):
        inputs._on_info(distorted, index)
    assert [text.split(" has distortion")[0] for text in warnings] == ["the CameraInfo of camera 0",
                                                                     "the CameraInfo of camera 1"]
    assert all(buffer._cameras for buffer in inputs.buffers)  # used all the same


def test_a_frame_does_not_wait_for_an_unstamped_cameras_stopped_depth():
    """Every stamp 0: the last depth image of a stopped stream is not paired (it arrived too long
    ago), yet its stamp said a newer one could still come, so every frame waited depth.wait_s."""
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    buffer.put(0, "last")
    waits.now = 5.0   # the stream stopped 5 s ago
    assert buffer.pair(0, 0.02, wait_s=0.2).status == MISSING
    assert waits.timeouts == []
    buffer.put(0, "again")   # it sends again: a frame waits for a newer image no more than before
    assert buffer.pair(0, 0.02, wait_s=0.2).depth == "again"


def _stream(buffer, waits, start_ns, count, period_ns, each=None):
    """``count`` depth images ``period_ns`` apart, in stamps and in arrival time alike."""
    for k in range(count):
        buffer.put(start_ns + k * period_ns, np.zeros((4, 4), np.uint16))
        waits.now += period_ns * 1e-9
        if each is not None:
            each(k)


@pytest.mark.parametrize("stray", ["an hour ahead", "stamped 0", "two seconds late"])
def test_a_depth_image_stamped_far_off_costs_nothing_but_its_slot(stray):
    """The ring was trimmed by the newest stamp: one image stamped an hour ahead (a driver glitch)
    made every other image look stale (the ring fell to its 8 newest: a slow model's frames went
    unpaired for over a second), and once the cap dropped it, its future stamp stayed the cap's
    mark: frames older than every kept image were said to be evicted for ever ("raise
    depth.buffer_mb"). Now the ring keeps what arrived in the last HORIZON_S."""
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    period, start = SECOND // 30, 100 * SECOND
    at = {"an hour ahead": start + 3700 * SECOND, "stamped 0": 0, "two seconds late": start + 100 * period - 2 * SECOND}

    def each(k):
        if k == 100:
            buffer.put(at[stray], np.zeros((4, 4), np.uint16))
        if k >= 20:    # a 0.5 s model: the frame stamped 15 images ago is paired now
            assert buffer.pair(start + (k - 15) * period, 0.005).status == PAIRED, k

    _stream(buffer, waits, start, 200, period, each)
    assert len(buffer) in (45, 46)   # HORIZON_S of arrivals at 30 Hz
    old = buffer.pair(start + 199 * period - 2 * SECOND, 0.005)   # older than every image kept
    assert old.status == UNSYNCED and not old.evicted


def test_a_looping_bag_pairs_at_once_when_its_stamps_go_back():
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    period, start = SECOND // 30, 100 * SECOND
    _stream(buffer, waits, start, 60, period)
    _stream(buffer, waits, start, 3, period)   # the bag again from its start
    assert buffer.pair(start + period, 0.005).status == PAIRED
    _stream(buffer, waits, start + 3 * period, 60, period)
    assert len(buffer) in (45, 46)   # the first pass's images aged out


def test_late_images_flushed_after_a_stall_and_a_slow_depth_stream_are_kept():
    """Kept by arrival: a driver that flushes 2 s of queued images at once, and a depth stream
    of one image every 2 s, pair as any other."""
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    period, start = SECOND // 30, 100 * SECOND
    _stream(buffer, waits, start, 30, period)
    waits.now += 2.0   # the stall; then its 60 images at once
    for k in range(30, 90):
        buffer.put(start + k * period, np.zeros((4, 4), np.uint16))
        if k == 31:   # a frame stamped before the stall, still in the model when the flush comes
            assert buffer.pair(start + 25 * period, 0.005).status == PAIRED
    slow = _buffer_waiting_on(waits)
    slow.set_camera(CAMERA)
    _stream(slow, waits, 200 * SECOND, 12, 2 * SECOND)
    assert len(slow) == 8 and slow.pair(200 * SECOND + 22 * SECOND, 0.005).status == PAIRED


def test_evicted_only_when_a_larger_buffer_would_have_kept_the_frames_depth():
    """Said as "raise depth.buffer_mb": true only for an image the cap dropped while its age
    (HORIZON_S since it arrived) would have kept it; not for one that aged out anyway, nor, after
    a bag looped, for a frame whose depth never came although the last pass's image of that stamp
    was capped."""
    from toist_ros.depth.images import DepthImage

    def big():
        return DepthImage(np.zeros((480, 640), np.float32), 1.0)

    waits = _Waits()
    buffer = DepthBuffer(max_bytes=10 * 480 * 640 * 4, clock=waits.clock)   # 10 VGA 32FC1 images
    buffer.set_camera(CAMERA)
    period, start = SECOND // 30, 100 * SECOND
    for k in range(30):
        buffer.put(start + k * period, big())
        waits.now += 1 / 30
    assert buffer.pair(start + 5 * period, 0.005).evicted   # capped at 0.5 s of age: a larger buffer helps
    waits.now += 2.0
    buffer.put(start + 90 * period, big())
    aged = buffer.pair(start + 5 * period, 0.005)           # 3 s later: it would have aged out anyway
    assert aged.status == UNSYNCED and not aged.evicted
    for k in range(30):   # the bag again: stamps repeat; image 12 of this pass never comes
        if k != 12:
            buffer.put(start + k * period, big())
        waits.now += 1 / 30
    waits.now += 2.0
    never = buffer.pair(start + 12 * period, 0.005)
    assert never.status == UNSYNCED and not never.evicted


def test_no_frame_waits_for_a_stamped_camera_whose_depth_stopped():
    """Its last images stay in the ring, stamped before every later frame: each frame waited the
    whole depth.wait_s for an image that could not come."""
    waits = _Waits()
    buffer = _buffer_waiting_on(waits)
    buffer.set_camera(CAMERA)
    _stream(buffer, waits, 100 * SECOND, 30, SECOND // 30)
    waits.now += 9.0   # the depth stream stopped 9 s ago
    assert buffer.pair(109 * SECOND, 0.02, wait_s=0.2).status == UNSYNCED
    assert waits.timeouts == []
