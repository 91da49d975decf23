"""What may reach the model (``toist_ros.frame_limits``) and how the node's health follows recent
events (``toist_ros.health``): plain Python, no ROS graph."""

import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from toist_ros.conversions import ImageError
from toist_ros.diagnostics import ERROR, OK, WARN
from toist_ros.frame_limits import MIN_MODEL_SIDE, FrameLimits, compressed_size
from toist_ros.health import ERROR_WINDOW_S, HealthLevel, stuck_after_s

LIMITS = FrameLimits(max_pixels=4096 * 4096, short_side=800, max_side=1333)


def _png_header_only(width, height):
    """A PNG that declares ``width`` x ``height`` and carries almost no data (a decompression bomb's
    header: what the node must refuse before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _header(sec=0, nanosec=0):
    return SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=nanosec), frame_id="cam")


def _compressed(data, fmt="png", header=None):
    return SimpleNamespace(data=data, format=fmt, header=header or _header())


def test_compressed_size_reads_the_header_of_real_images():
    rgb = np.zeros((37, 53, 3), np.uint8)
    for ext in (".png", ".jpg"):
        ok, encoded = cv2.imencode(ext, rgb)
        assert ok and compressed_size(_compressed(encoded.tobytes())) == (53, 37)


def test_a_compressed_bomb_is_refused_from_its_header():
    msg = _compressed(_png_header_only(10000, 10000))
    assert compressed_size(msg) == (10000, 10000)
    with pytest.raises(ImageError) as info:
        LIMITS.compressed_to_rgb(msg)
    assert info.value.reason == "too_large" and "10000x10000" in str(info.value) and "input.max_pixels" in str(info.value)


def test_garbage_is_a_decode_error_and_an_empty_message_is_empty():
    with pytest.raises(ImageError) as info:
        LIMITS.compressed_to_rgb(_compressed(b"\xff\xd8 not a jpeg at all"))
    assert info.value.reason == "decode"
    with pytest.raises(ImageError) as info:
        LIMITS.compressed_to_rgb(_compressed(b""))
    assert info.value.reason == "empty"


@pytest.mark.parametrize("width, height, reason", [
    (640, 480, None), (4096, 4096, None), (4097, 4096, "too_large"),
    (4000, 1, "aspect"), (1, 4000, "aspect"), (1333, 16, None), (1334, 16, "aspect"), (100, 2, None),
])
def test_size_and_aspect_bounds(width, height, reason):
    if reason is None:
        LIMITS.check_size(width, height)
        return
    with pytest.raises(ImageError) as info:
        LIMITS.check_size(width, height)
    assert info.value.reason == reason and f"{width}x{height}" in str(info.value)


def test_the_aspect_bound_follows_the_models_input_size():
    """A 1333 x 16 frame keeps a 16 px short side at the official size; at the embedded default's
    128 / 256 it would be 3 px high."""
    small = FrameLimits(max_pixels=1 << 30, short_side=128, max_side=256)
    with pytest.raises(ImageError):
        small.check_size(1333, 16)
    small.check_size(256, MIN_MODEL_SIDE)


def test_raw_frames_are_checked_before_their_data():
    huge = SimpleNamespace(width=10000, height=10000, step=30000, encoding="rgb8", data=b"", header=_header())
    with pytest.raises(ImageError) as info:
        LIMITS.image_to_rgb(huge)
    assert info.value.reason == "too_large"


def test_a_negative_stamp_is_a_counted_reject_not_an_error_in_the_inference_thread():
    """rclpy's Time refuses negative seconds: such a frame used to pass here and fail in the
    inference thread as an 'internal error'; now it is refused with the other bad images."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    raw = SimpleNamespace(width=64, height=48, step=192, encoding="rgb8", data=pixels.tobytes(),
                          is_bigendian=0, header=_header(sec=-1, nanosec=5))
    ok, png = cv2.imencode(".png", pixels)
    for convert, msg in ((LIMITS.image_to_rgb, raw), (LIMITS.compressed_to_rgb, _compressed(png.tobytes(),
                                                                                            header=_header(sec=-1)))):
        with pytest.raises(ImageError, match="negative seconds") as info:
            convert(msg)
        assert info.value.reason == "stamp"
    raw.header = _header(sec=0)  # unstamped: fine
    assert LIMITS.image_to_rgb(raw).shape == (48, 64, 3)


CAMERA = ["/image"]


def _values(errors=0, received=10, processed=None, rejected=0, stale=0, lost=0, busy_s=0.0, stuck_after_s=10.0,
            internal=0, service_timeouts=0):
    """A report of one camera, ``/image``, whose counts are the totals."""
    processed = received if processed is None else processed
    return {"received": received, "rejected": rejected, "lost_in_transport": lost, "inference_errors": errors,
            "cuda_oom": 0, "internal_errors": internal, "service_timeouts": service_timeouts, "processed": processed,
            "skipped_stale": stale, "forward pass running s": f"{busy_s:.1f}", "stuck after s": f"{stuck_after_s:.1f}",
            "/image published": processed, "/image rejected": rejected, "/image skipped stale": stale,
            "/image arrived": received + rejected, "/image lost in transport": lost}


def _camera(name, published=0, rejected=0, stale=0, arrived=0, lost=0):
    """The per-camera keys of a report for camera ``name``."""
    return {f"{name} published": published, f"{name} rejected": rejected, f"{name} skipped stale": stale,
            f"{name} arrived": arrived, f"{name} lost in transport": lost}


def _judge(health, values, last_error="", now=None, cameras=CAMERA):
    return health.judge(values, ready=True, last_error=last_error, receiving=True, cameras=cameras, now=now)


def test_health_warns_while_frames_arrive_but_none_is_published():
    """Every frame rejected (a depth topic remapped to image) or too old (clocks out of sync):
    the node runs, its users get nothing; that is not "running"."""
    health = HealthLevel()
    assert _judge(health, _values()) == (OK, "running")
    level, message = _judge(health, _values(received=10, processed=10, rejected=40))
    assert level == WARN and message.startswith("no result published for /image since the last report: its frames "
                                                "were 40 rejected")
    level, message = _judge(health, _values(received=50, processed=10, rejected=40, stale=40))
    assert level == WARN and "40 older than input.max_age_s" in message and "rejected" not in message
    # Frames published again; a slow model that published none in a window but turned none away.
    assert _judge(health, _values(received=52, processed=11, rejected=40, stale=41)) == (OK, "running")
    assert _judge(health, _values(received=60, processed=11, rejected=40, stale=41)) == (OK, "running")


def test_health_warns_for_one_camera_whose_frames_are_all_turned_away_beside_a_working_one():
    """Judged on the totals, the front camera's results hid the rear camera's: every rear frame
    rejected (a depth topic remapped to its image) left the level OK."""
    cameras = ["/front/image", "/rear/image"]
    health = HealthLevel()

    def report(front_published, rear_rejected, rear_stale=0):
        values = _values(received=front_published, processed=front_published, rejected=rear_rejected,
                         stale=rear_stale)
        values.update({**_camera("/front/image", published=front_published, arrived=front_published),
                       **_camera("/rear/image", rejected=rear_rejected, stale=rear_stale, arrived=rear_rejected)})
        return _judge(health, values, cameras=cameras)

    assert report(10, 0) == (OK, "running")
    level, message = report(20, 12)
    assert level == WARN and message.startswith("no result published for /rear/image since the last report: its "
                                                "frames were 12 rejected")
    assert "/front/image" not in message
    level, message = report(30, 12, rear_stale=5)  # no new rejects; stale ones
    assert level == WARN and "5 older than input.max_age_s" in message and "rejected" not in message
    assert report(40, 12, rear_stale=5) == (OK, "running")  # nothing turned away since the last report


def test_health_counts_a_camera_made_anew_from_zero_not_as_negative_frames():
    """A lifecycle cleanup and configure makes new cameras whose counts start at 0 again: the
    first report after it said "its frames were -40 rejected" (WARN) for a camera doing nothing."""
    health = HealthLevel()
    assert _judge(health, _values(received=10, processed=10)) == (OK, "running")
    assert _judge(health, _values(received=50, processed=10, rejected=40))[0] == WARN
    assert _judge(health, _values(received=0, processed=0, rejected=0)) == (OK, "running")
    depth = {"/image depth paired": 0, "/image depth missing": 9, "/image depth unsynced": 0}
    assert _judge(health, {**_values(), **depth})[0] == WARN
    depth.update({"/image depth missing": 0})
    assert _judge(health, {**_values(), **depth}) == (OK, "running")
    level, message = _judge(health, _values(received=3, processed=0, rejected=3))  # new rejects after it
    assert level == WARN and "its frames were 3 rejected" in message


def test_health_recovers_after_an_old_error():
    health = HealthLevel()
    assert _judge(health, _values(), now=0.0) == (OK, "running")
    level, message = _judge(health, _values(errors=1), last_error="RuntimeError: x", now=1.0)
    assert level == WARN and "1 error(s) of the inference thread or its services" in message
    assert "RuntimeError: x" in message
    t = 2.0
    while t < 1.0 + ERROR_WINDOW_S:
        assert _judge(health, _values(errors=1), last_error="RuntimeError: x", now=t)[0] == WARN
        t += 1.0
    assert _judge(health, _values(errors=1), last_error="RuntimeError: x", now=2.0 + ERROR_WINDOW_S) == (OK, "running")
    # A new error brings it back.
    assert _judge(health, _values(errors=2), last_error="RuntimeError: y", now=3.0 + ERROR_WINDOW_S)[0] == WARN


def test_health_reports_a_forward_pass_that_does_not_end():
    """A hung forward pass (a device that never returns): frames kept arriving and were replaced,
    processed stood still, and /diagnostics said OK "running" for ever."""
    health = HealthLevel()
    assert _judge(health, _values(busy_s=9.0, stuck_after_s=10.0)) == (OK, "running")
    level, message = _judge(health, _values(busy_s=11.0, stuck_after_s=10.0))
    assert level == WARN and message.startswith("a forward pass has run for 11 s (stuck after 10 s")
    assert _judge(health, _values(busy_s=130.0, stuck_after_s=10.0))[0] == ERROR
    assert _judge(health, _values(busy_s=0.0, stuck_after_s=10.0)) == (OK, "running")   # it ended
    # The limit follows the model: five times its p95, at least 10 s.
    assert stuck_after_s(1000.0) == 10.0 and stuck_after_s(4000.0) == 20.0
    # Before a frame was timed: five times the warm-up pass; 120 s when there was none either.
    assert stuck_after_s(float("nan"), 3000.0) == 15.0 and stuck_after_s(float("nan"), 50.0) == 10.0
    assert stuck_after_s(float("nan")) == 120.0


def test_health_counts_internal_errors_and_service_timeouts():
    """The inference thread failing outside the model (internal_errors) on every frame, or
    segment_image timing out, left the level OK."""
    for extra in ({"internal": 1}, {"service_timeouts": 1}):
        health = HealthLevel()
        assert _judge(health, _values(), now=0.0) == (OK, "running")
        assert _judge(health, _values(**extra), now=1.0)[0] == WARN
        assert _judge(health, _values(**extra), now=2.0 + ERROR_WINDOW_S) == (OK, "running")


def test_health_warns_for_one_camera_losing_its_images_beside_a_working_one():
    """Judged on the node's totals, a front camera delivering everything hid a rear one losing
    two images of three (the log warned; /diagnostics said "running")."""
    cameras = ["/front/image", "/rear/image"]
    health = HealthLevel()

    def report(front, rear_arrived, rear_lost):
        values = {**_values(received=front + rear_arrived, lost=rear_lost),
                  **_camera("/front/image", published=front, arrived=front),
                  **_camera("/rear/image", published=rear_arrived, arrived=rear_arrived, lost=rear_lost)}
        return _judge(health, values, cameras=cameras)

    assert report(30, 10, 0) == (OK, "running")
    level, message = report(60, 20, 20)
    assert level == WARN and message.startswith("most images on /rear/image never reached the node (20 lost, 10 "
                                                "arrived since the last report)")
    assert report(90, 40, 20) == (OK, "running")
    # A frame decoded late takes its loss back: the count goes down, which is no camera made anew
    # (read as one, the camera's lifetime counts, 26 lost and 7 arrived, were "since the last report").
    health = HealthLevel()
    assert report(30, 4, 26)[0] == WARN
    assert report(60, 6, 27) == (OK, "running")
    assert report(90, 7, 26) == (OK, "running")


def test_health_warns_while_no_frame_gets_depth_and_recovers_when_one_does():
    health = HealthLevel()
    depth = {"/image depth paired": 0, "/image depth missing": 0, "/image depth unsynced": 0}
    assert _judge(health, {**_values(), **depth}) == (OK, "running")
    depth.update({"/image depth missing": 3, "/image depth unsynced": 2})
    level, message = _judge(health, {**_values(), **depth})
    assert level == WARN and "no 3D for /image: no depth paired with the last 5 frame(s) (3 without a depth" in message
    assert "2 with depth stamped more than depth.max_dt_s apart" in message
    depth.update({"/image depth paired": 1, "/image depth unsynced": 3})  # one frame got depth since the last report
    assert _judge(health, {**_values(), **depth}) == (OK, "running")
    # Without depth keys (depth.enabled false) nothing is said about depth.
    assert _judge(health, _values()) == (OK, "running")


def test_health_warns_for_one_camera_without_depth_beside_one_with_depth():
    """Judged on the totals, the front camera's paired frames hid a rear camera that never got
    depth (its depth topic not remapped)."""
    cameras = ["/front/image", "/rear/image"]
    health = HealthLevel()
    values = {**_values(), **_camera("/front/image", published=10, arrived=10), **_camera("/rear/image")}

    def report(front_paired, rear_missing):
        depth = {"/front/image depth paired": front_paired, "/front/image depth missing": 0,
                 "/front/image depth unsynced": 0, "/rear/image depth paired": 0,
                 "/rear/image depth missing": rear_missing, "/rear/image depth unsynced": 0}
        return _judge(health, {**values, **depth}, cameras=cameras)

    assert report(0, 0) == (OK, "running")
    level, message = report(5, 4)
    assert level == WARN and message.startswith("no 3D for /rear/image: no depth paired with the last 4 frame(s)")
    assert report(10, 4) == (OK, "running")


def test_no_image_warning_is_decided_per_camera():
    """A camera whose images were rejected has its own warnings; the other camera, which got
    nothing at all, still gets its no-image warning."""
    from toist_ros.camera_input import CameraInputs, ImageError
    from toist_ros.diagnostics import Counters

    warnings = []
    logger = SimpleNamespace(warning=lambda text, **_: warnings.append(text))
    node = SimpleNamespace(get_logger=lambda: logger, get_publishers_info_by_topic=lambda topic: [])
    inputs = CameraInputs(node, {"input.topics": ["front/image", "rear/image"], "input.reliability": "auto",
                                 "input.no_image_warning_s": 5.0}, Counters(), None, LIMITS)
    front, rear = inputs.cameras
    front.subscribed_name, rear.subscribed_name = "/front/image", "/rear/image"
    inputs._reject(front, ImageError("encoding", "16UC1 is a depth encoding"))
    warnings.clear()
    inputs.warn_no_image()
    assert len(warnings) == 1 and warnings[0].startswith("no image on /rear/image after 5 s")


def test_most_frames_lost_gives_one_warning_naming_the_remedies():
    from toist_ros.camera_input import LOSS_WINDOW_S, CameraInputs
    from toist_ros.diagnostics import Counters

    warnings = []
    logger = SimpleNamespace(warning=lambda text, **_: warnings.append(text))
    node = SimpleNamespace(get_logger=lambda: logger)
    inputs = CameraInputs(node, {"input.topics": ["image"], "input.reliability": "auto"}, Counters(), None, LIMITS)
    [camera] = inputs.cameras
    camera.subscribed_name = "/camera/image"
    camera.window, camera.window_start = [3, 41], camera.window_start - LOSS_WINDOW_S
    inputs._check_losses(camera)
    [text] = warnings
    assert "41 lost in transport, 3 arrived" in text and "input.compressed:=true" in text
    assert "FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA" in text and "input.reliability:=reliable" in text
    # Once per LOSS_WARNING_PERIOD_S, and not when most frames arrive.
    camera.window, camera.window_start = [3, 41], camera.window_start - LOSS_WINDOW_S
    inputs._check_losses(camera)
    assert len(warnings) == 1 and camera.window == [0, 0]
    camera.window, camera.window_start, camera.last_loss_warning = [30, 5], camera.window_start - LOSS_WINDOW_S, -1e9
    inputs._check_losses(camera)
    assert len(warnings) == 1


def test_every_counter_docs_ros_md_lists_is_on_diagnostics():
    """dropped_out_of_order and service_timeouts were counted but never reported."""
    import re
    from pathlib import Path

    from toist_ros.diagnostics import Counters, Percentiles
    from toist_ros.health import report_values

    docs = (Path(__file__).resolve().parents[1] / "docs" / "ros.md").read_text()
    section = docs[docs.index("### Diagnostics"):]
    section = section[:section.index("`inference ms p50/p95`")]
    listed = [name for name in re.findall(r"`([a-z_0-9]+)`", section) if "<" not in name]
    task = SimpleNamespace(caption="sit comfortably on something", revision=1)
    model = SimpleNamespace(description="tiny", device="cpu")
    values = report_values(ready=True, task=task, model=model, counters=Counters(), inference_ms=Percentiles(),
                           latency_ms=Percentiles(), cameras=[], dropped=[], out_of_order=[])
    assert {"dropped_out_of_order", "service_timeouts", "no_image_warnings", "debug_errors"} <= set(listed)
    assert [name for name in listed if name not in values] == []


def test_gaps_in_a_publishers_sequence_are_lost_frames_and_few_publishers_are_remembered():
    """Each publisher's last sequence number was kept for ever: a driver restarted many times (a
    new publisher each time) grew the table without end."""
    from toist_ros.camera_input import PUBLISHERS_KEPT, Camera

    camera = Camera(0, "image")

    def info(publisher, sequence):
        return {"publication_sequence_number": sequence, "publisher_gid": {"data": [publisher] * 16}}

    assert [camera.lost_before(info(1, s)) for s in (1, 2, 5, 6)] == [0, 0, 2, 0]
    for publisher in range(2, PUBLISHERS_KEPT + 40):   # restarts
        camera.lost_before(info(publisher, 1))
    camera.lost_before(info(PUBLISHERS_KEPT + 38, 4))   # a recent one still counts its gaps
    assert len(camera._last_sequence) == PUBLISHERS_KEPT
    assert camera.lost_before(info(PUBLISHERS_KEPT + 38, 10)) == 5
    assert camera.lost_before(info(1, 9)) == 0   # forgotten: its next message starts afresh


def test_a_message_decoded_out_of_order_takes_its_loss_back():
    """Compressed images are decoded on several pool threads: sequence numbers 10, 12, 11 counted
    11 as lost for good."""
    from toist_ros.camera_input import Camera

    camera = Camera(0, "image")

    def info(sequence):
        return {"publication_sequence_number": sequence, "publisher_gid": {"data": [7] * 16}}

    counted = []
    losses = [camera.arrive(info(n), counted.append) for n in (10, 12, 11, 11, 13, 20, 15, 9)]
    assert losses == [0, 1, -1, 0, 0, 6, -1, 0]   # 11 twice, or 9 never counted: no take-back
    assert (camera.arrived, camera.lost) == (8, 5) and sum(counted) == 5   # 14, 16, 17, 18, 19 never came
    # A publisher's 16 most recent numbers can be taken back, not older ones.
    camera = Camera(0, "image")
    assert [camera.arrive(info(n), counted.append) for n in (10, 28, 11, 12, 27)] == [0, 17, 0, -1, -1]


def test_free_memory_is_given_back_after_a_thread_that_allocated_ended():
    """What a thread's malloc arena held stayed with the process after the thread ended (the
    lifecycle node starts one inference thread per activation)."""
    import threading

    from toist_ros.diagnostics import process_memory_mb, return_free_memory

    pinned = []

    def allocate_and_free():
        blocks = [bytes(60000) for _ in range(2000)]   # 120 MB through malloc, not mmap
        pinned.append(bytes(60000))                    # allocated last: the heap cannot shrink by itself
        del blocks

    thread = threading.Thread(target=allocate_and_free)
    thread.start()
    thread.join()
    before = process_memory_mb()
    assert return_free_memory() is True   # glibc (Linux, where the node runs)
    assert process_memory_mb() < before - 8   # ~16 MB of the thread's freed blocks stay without it


def test_a_garbled_avif_is_a_decode_reject_not_an_error_of_the_node():
    """Pillow's AVIF plugin raises RuntimeError on a damaged file ("Missing or empty image item"):
    it reached the node's callback as an internal error, traceback and all."""
    import io
    import random

    from PIL import Image, features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF plugin")
    out = io.BytesIO()
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(out, format="AVIF")
    rng = random.Random(0)
    garbled = None
    for _ in range(2000):   # three bytes changed at random until one is a RuntimeError to Pillow
        data = bytearray(out.getvalue())
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            with Image.open(io.BytesIO(bytes(data))) as image:
                image.size
        except RuntimeError:
            garbled = bytes(data)
            break
        except Exception:   # noqa: BLE001 (other damage: not the case looked for)
            continue
    assert garbled is not None, "no damaged AVIF made Pillow raise RuntimeError"
    with pytest.raises(ImageError) as info:
        LIMITS.compressed_to_rgb(_compressed(garbled, fmt="avif"))
    assert info.value.reason == "decode"


@pytest.mark.parametrize("orientation, refused", [(1, False), (3, True), (6, True)])
def test_a_turned_tiff_on_a_compressed_topic_is_refused_naming_its_tag(orientation, refused):
    """OpenCV's decoder turned it by its tag (a 96x128 picture came out 128x96) although the node
    reads the stored grid, as training and `toist predict` do."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(out, format="TIFF", tiffinfo={274: orientation})
    msg = _compressed(out.getvalue(), fmt="tiff")
    if not refused:
        assert LIMITS.compressed_to_rgb(msg).shape == (96, 128, 3)
        return
    with pytest.raises(ImageError, match=rf"a TIFF whose orientation tag is {orientation}") as info:
        LIMITS.compressed_to_rgb(msg)
    assert info.value.reason == "decode"
