"""Image conversions (every supported encoding, every way an image can be broken), mask crops,
box mapping and ranking: the numpy side of the node, checked without DDS."""

import numpy as np
import pytest

pytest.importorskip("sensor_msgs", reason="ROS message packages are installed by `make setup`")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from toist_ros.conversions import (  # noqa: E402
    SUPPORTED_ENCODINGS, ImageError, compressed_from_array, compressed_to_rgb, image_from_array, image_to_rgb,
    mask_from_image, mask_to_image)
from toist_ros.instances import clamp_box, mask_roi, rank_instances  # noqa: E402


def _photo(height=37, width=53, seed=0):
    """Random RGB pixels (odd sizes catch row/column mix-ups)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _raw(pixels, encoding, step_pad=0):
    """An Image written by hand (not by image_from_array), optionally with padded rows."""
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    h, w = pixels.shape[:2]
    rows = np.zeros((h, w * channels + step_pad), dtype=np.uint8)
    rows[:, : w * channels] = pixels.reshape(h, w * channels)
    msg = Image(height=h, width=w, encoding=encoding, step=w * channels + step_pad)
    msg.data = rows.tobytes()
    return msg


@pytest.mark.parametrize("pad", [0, 5])
def test_every_encoding_reads_back_as_rgb(pad):
    rgb = _photo()
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    written = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }
    for encoding, pixels in written.items():
        out = image_to_rgb(_raw(np.ascontiguousarray(pixels), encoding, pad))
        assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(out, rgb, err_msg=encoding)
    gray = rgb[:, :, 1]
    out = image_to_rgb(_raw(gray[:, :, None], "mono8", pad))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_image_from_array_round_trips(encoding):
    rgb = _photo(seed=3)
    msg = image_from_array(rgb, encoding)
    assert msg.encoding == encoding and (msg.height, msg.width) == rgb.shape[:2]
    assert len(msg.data) == msg.step * msg.height
    back = image_to_rgb(msg)
    if encoding == "mono8":
        assert np.all(back[:, :, 0] == back[:, :, 1])
        expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
        assert np.abs(back[:, :, 0].astype(float) - expected).max() <= 1.0
    else:
        np.testing.assert_array_equal(back, rgb)


def test_opencv_type_names_are_read_as_cv_bridge_reads_them():
    """cv_bridge's cv2_to_imgmsg(frame) says "8UC3" (its default "passthrough"): an OpenCV frame,
    BGR. Such cameras were refused ("unsupported encoding '8UC3'")."""
    rgb = _photo(seed=5)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    np.testing.assert_array_equal(image_to_rgb(_raw(bgr, "8UC3", 0)), rgb)
    np.testing.assert_array_equal(image_to_rgb(_raw(np.concatenate([bgr, alpha], axis=2), "8UC4", 2)), rgb)
    gray = np.ascontiguousarray(rgb[:, :, 1:2])
    np.testing.assert_array_equal(image_to_rgb(_raw(gray, "8UC1", 0)), np.repeat(gray, 3, axis=2))
    wide = _raw(bgr, "16UC3", 0)
    with pytest.raises(ImageError, match="16UC3"):   # not 8-bit: still refused
        image_to_rgb(wide)


def test_encoding_names_are_case_insensitive():
    rgb = _photo()
    msg = _raw(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8")
    msg.encoding = "BGR8"
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize("mutate, reason, words", [
    (lambda m: setattr(m, "encoding", "yuv422"), "encoding", ["yuv422", "rgb8"]),
    (lambda m: setattr(m, "encoding", "16UC1"), "encoding", ["16UC1"]),
    (lambda m: setattr(m, "data", bytes(m.data)[:1589]), "truncated", ["1589 bytes", "1590"]),
    (lambda m: setattr(m, "height", 11), "truncated", ["1593 bytes", "1749"]),
    (lambda m: setattr(m, "data", b""), "truncated", ["0 bytes"]),
    (lambda m: setattr(m, "width", 0), "empty", ["zero size"]),
    (lambda m: setattr(m, "height", 0), "empty", ["zero size"]),
    (lambda m: setattr(m, "step", 10), "step", ["step 10", "159"]),
])
def test_broken_images_say_what_is_wrong(mutate, reason, words):
    msg = _raw(_photo(height=10, width=53), "rgb8")
    assert msg.step * msg.height == 1590
    msg.data = bytes(msg.data) + b"\x00\x00\x00"  # 1593 bytes: longer than step x height is accepted
    image_to_rgb(msg)
    mutate(msg)
    with pytest.raises(ImageError) as info:
        image_to_rgb(msg)
    assert info.value.reason == reason
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_compressed_jpeg_and_png():
    rgb = _photo(height=48, width=64, seed=5)
    png = compressed_from_array(rgb, "png")
    np.testing.assert_array_equal(compressed_to_rgb(png), rgb)
    smooth = np.zeros((48, 64, 3), np.uint8)
    smooth[:, :32] = (200, 30, 10)  # red-ish left half: a BGR/RGB swap would show
    smooth[:, 32:] = (10, 40, 220)
    jpeg = compressed_from_array(smooth, "jpeg", quality=95)
    out = compressed_to_rgb(jpeg)
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth.astype(int))[:, 4:28].max() < 12
    assert out[10, 10, 0] > 150 and out[10, 50, 2] > 150


def test_a_compressed_jpeg_is_read_in_its_stored_grid_whatever_its_exif_orientation(tmp_path):
    """As training, `toist predict` and `client segment` read it: OpenCV turned it on the topic."""
    from PIL import Image as PILImage

    from toist_core.visualize import load_rgb

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    picture = PILImage.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6                                   # displayed a quarter turned: 40 x 20
    picture.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    msg = CompressedImage(format="jpeg", data=(tmp_path / "turned.jpg").read_bytes())
    np.testing.assert_array_equal(compressed_to_rgb(msg), load_rgb(tmp_path / "turned.jpg"))


@pytest.mark.parametrize("data, reason", [(b"", "empty"), (b"\xff\xd8\xff\x00garbage" * 20, "decode"),
                                          (bytes(range(256)), "decode")])
def test_garbage_compressed_bytes_are_rejected(data, reason):
    msg = CompressedImage(format="jpeg")
    msg.data = data
    with pytest.raises(ImageError) as info:
        compressed_to_rgb(msg)
    assert info.value.reason == reason and "jpeg" in str(info.value)


def test_mask_image_round_trip_is_mono8_0_255():
    mask = np.random.default_rng(1).random((13, 29)) > 0.5
    msg = mask_to_image(mask)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("mono8", 13, 29, 29)
    assert set(np.unique(np.frombuffer(bytes(msg.data), np.uint8))) <= {0, 255}
    np.testing.assert_array_equal(mask_from_image(msg), mask)
    assert mask_from_image(mask_to_image(np.zeros((0, 0), bool))).shape == (0, 0)


def test_boxes_are_clamped_to_the_image_and_ordered():
    np.testing.assert_allclose(clamp_box(np.array([-5.5, 10.0, 700.0, 90.0]), 640, 480), [0, 10, 640, 90])
    np.testing.assert_allclose(clamp_box(np.array([50.0, 60.0, 20.0, 500.0]), 640, 480), [20, 60, 50, 480])


def test_mask_roi_is_the_box_hull_grown_to_cover_the_mask_within_the_margin():
    box = np.array([10.2, 5.7, 20.1, 9.0])  # hull x 10..21, y 5..9; margins 8 px (floor): window x 2..29, y 0..17
    mask = np.zeros((40, 60), bool)
    assert mask_roi(box, mask, 60, 40) == (10, 5, 11, 4)
    mask[30:33, 50:52] = True  # outside the box and beyond the margin: not published
    assert mask_roi(box, mask, 60, 40) == (10, 5, 11, 4)
    mask[12:14, 25:27] = True  # outside the box, within the margin: the crop grows to take it
    assert mask_roi(box, mask, 60, 40) == (10, 5, 17, 9)
    mask[0, 2] = True  # the window's corner
    assert mask_roi(box, mask, 60, 40) == (2, 0, 25, 14)
    assert mask_roi(np.array([59.5, 39.5, 60.0, 40.0]), None, 60, 40) == (59, 39, 1, 1)


def _window(box, width, height):
    """The documented crop bound, written out independently of toist_ros.instances: the box's pixel
    hull grown by max(8, ceil(0.1 * side)) on each side, clamped to the image. (x0, y0, x1, y1)."""
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    mx, my = max(8, int(np.ceil(0.1 * (x1 - x0)))), max(8, int(np.ceil(0.1 * (y1 - y0))))
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)


def _vga_boxes(n=10, seed=0):
    """[n, 4] float xyxy boxes of 30-300 x 30-220 px, some touching the border, in a 640x480 image."""
    rng = np.random.default_rng(seed)
    w, h = rng.uniform(30, 300, n), rng.uniform(30, 220, n)
    x0, y0 = rng.uniform(-20, 640 - w + 20), rng.uniform(-20, 480 - h + 20)
    return np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.float32)


def test_a_mask_covering_the_whole_image_is_cut_to_the_box_plus_margin():
    from toist_ros.instances import full_mask, to_instance_msgs

    boxes = _vga_boxes(seed=1)
    masks = np.ones((len(boxes), 480, 640), bool)
    ranked = rank_instances(boxes, np.linspace(0.9, 0.5, len(boxes)), masks, (640, 480))
    for r, msg in zip(ranked, to_instance_msgs(ranked)):
        x0, y0, x1, y1 = _window(r.box, 640, 480)
        assert r.roi == (x0, y0, x1 - x0, y1 - y0)  # a full mask fills exactly the window, no more
        assert (msg.mask.width, msg.mask.height) == (x1 - x0, y1 - y0)
        hull_w, hull_h = np.ceil(r.box[2]) - np.floor(r.box[0]), np.ceil(r.box[3]) - np.floor(r.box[1])
        assert msg.mask.width <= hull_w + 2 * max(8, np.ceil(0.1 * hull_w))
        assert msg.mask.height <= hull_h + 2 * max(8, np.ceil(0.1 * hull_h))
        assert msg.mask_area == (x1 - x0) * (y1 - y0)  # published pixels, not the frame's 307200
        assert int(full_mask(msg, 640, 480).sum()) == msg.mask_area


def test_every_mask_pixel_inside_the_box_survives_the_message():
    from rclpy.serialization import deserialize_message, serialize_message

    from toist_ros.instances import full_mask, to_instance_msgs
    from toist_ros.msg import TaskInstances

    rng = np.random.default_rng(5)
    boxes = _vga_boxes(seed=2)
    boxes[0] = [100.5, 50.25, 100.75, 51.0]  # thinner than a pixel
    masks = rng.random((len(boxes), 480, 640)) > 0.5  # noise everywhere: holes inside, spill outside
    scores = np.linspace(0.9, 0.5, len(boxes)).astype(np.float32)
    msg = TaskInstances(image_width=640, image_height=480)
    msg.instances = to_instance_msgs(rank_instances(boxes, scores, masks, (640, 480)))
    back = deserialize_message(serialize_message(msg), TaskInstances)
    assert len(back.instances) == len(boxes)
    for i, inst in enumerate(back.instances):  # scores are distinct and already sorted: rank i is box i
        full = full_mask(inst, 640, 480)
        x0, y0 = max(0, int(np.floor(boxes[i, 0]))), max(0, int(np.floor(boxes[i, 1])))
        x1, y1 = min(640, int(np.ceil(boxes[i, 2]))), min(480, int(np.ceil(boxes[i, 3])))
        assert x1 > x0 and y1 > y0
        np.testing.assert_array_equal(full[y0:y1, x0:x1], masks[i, y0:y1, x0:x1])  # the box: exact
        wx0, wy0, wx1, wy1 = _window(boxes[i], 640, 480)
        np.testing.assert_array_equal(full[wy0:wy1, wx0:wx1], masks[i, wy0:wy1, wx0:wx1])  # the margin too
        assert int(full.sum()) == int(full[wy0:wy1, wx0:wx1].sum()) == inst.mask_area  # nothing beyond it


def test_bytes_per_message_for_ten_whole_frame_masks_at_vga_are_bounded():
    from rclpy.serialization import serialize_message

    from toist_ros.instances import task_instances_msg, to_instance_msgs

    boxes = _vga_boxes(seed=3)
    masks = np.ones((len(boxes), 480, 640), bool)
    header = Image().header
    header.frame_id = "camera_color_optical_frame"
    ranked = rank_instances(boxes, np.linspace(0.9, 0.5, len(boxes)), masks, (640, 480))
    msg = task_instances_msg(header, (640, 480), "sit comfortably on something", 3, 12.5,
                             to_instance_msgs(ranked, header))
    size = len(serialize_message(msg))
    crop_bytes = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (_window(b, 640, 480) for b in boxes))
    # Per instance: score, rank, box, roi, the mask's header (stamp, frame_id) and encoding, and padding
    # (160 bytes), and the 3D fields (has_3d, three 3-vectors of doubles, points, fraction: 81 bytes).
    assert size <= crop_bytes + len(boxes) * (160 + 81) + 200, (size, crop_bytes)
    assert crop_bytes < 0.25 * len(boxes) * 640 * 480  # the old rule sent 10 whole frames (3.07 MB)


def _prediction(seed=0, n=6, height=48, width=64):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-10, width - 5, n)
    y0 = rng.uniform(-10, height - 5, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(3, 40, n), y0 + rng.uniform(3, 30, n)], 1).astype(np.float32)
    scores = rng.permutation(np.linspace(0.05, 0.95, n)).astype(np.float32)
    masks = np.zeros((n, height, width), bool)
    for i, (a, b, c, d) in enumerate(boxes):
        ya, yb = int(max(0, np.ceil(b))), int(min(height, np.floor(d)))
        xa, xb = int(max(0, np.ceil(a))), int(min(width, np.floor(c)))
        masks[i, ya:yb, xa:xb] = rng.random((max(0, yb - ya), max(0, xb - xa))) > 0.3  # holes
    return boxes, scores, masks


def test_ranking_threshold_and_cut():
    boxes, scores, masks = _prediction()
    ranked = rank_instances(boxes, scores, masks, (64, 48), score_threshold=0.3, max_instances=3)
    expected = np.sort(scores[scores >= 0.3])[::-1][:3]
    np.testing.assert_allclose([r.score for r in ranked], expected)
    assert [r.rank for r in ranked] == [0, 1, 2]
    for r in ranked:
        index = int(np.flatnonzero(scores == np.float32(r.score))[0])
        np.testing.assert_allclose(r.box, clamp_box(boxes[index], 64, 48))
    assert rank_instances(boxes, scores, masks, (64, 48), score_threshold=0.99) == []
    # "score_threshold: keep instances scoring at least this": a score equal to it is kept.
    at = float(np.sort(scores)[-2])
    assert [r.score for r in rank_instances(boxes, scores, masks, (64, 48), score_threshold=at)] == \
        [float(v) for v in np.sort(scores)[::-1][:2]]


def test_a_box_with_no_area_in_the_image_is_not_published():
    """A box wholly outside the image (or of zero width) clipped to a line, took a rank and a
    max_instances place, and was published with a 0 x 30 mask."""
    boxes = np.array([[650, 10, 700, 40], [5, 5, 20, 20], [30, 30, 30, 45], [100, 100, 140, 160]], np.float32)
    scores = np.array([0.9, 0.8, 0.85, 0.7], np.float32)
    masks = np.ones((4, 480, 640), bool)
    ranked = rank_instances(boxes, scores, masks, (640, 480), max_instances=2)
    assert [r.score for r in ranked] == [pytest.approx(0.8), pytest.approx(0.7)] and [r.rank for r in ranked] == [0, 1]
    assert all(r.roi[2] > 0 and r.roi[3] > 0 for r in ranked)


def test_ties_keep_model_order():
    boxes = np.tile(np.array([[0, 0, 4, 4]], np.float32), (4, 1))
    boxes[:, 0] = [0, 1, 2, 3]
    scores = np.array([0.5, 0.2, 0.5, 0.7], np.float32)
    ranked = rank_instances(boxes, scores, None, (10, 10), score_threshold=0.3)
    assert [float(r.box[0]) for r in ranked] == [3.0, 0.0, 2.0]


@pytest.mark.parametrize("where", ["score", "box", "inf box"])
def test_a_non_finite_score_or_box_fails_the_frame_instead_of_becoming_a_number(where):
    """A NaN box coordinate used to become 0 (a box stretched to the image edge, published with a
    good score); a NaN score was dropped silently. Either means a broken model: the frame fails
    (the inference thread counts it as an inference error)."""
    boxes = np.array([[10, 20, 100, 80], [5, 5, 9, 9]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    if where == "score":
        scores[1] = np.nan
    else:
        boxes[0, 0] = np.nan if where == "box" else np.inf
    with pytest.raises(ValueError, match="non-finite scores or boxes for 1 of 2 instances"):
        rank_instances(boxes, scores, None, (640, 480))


def test_mask_crops_put_back_give_the_full_masks():
    """Masks that stay inside their boxes come back whole (the margin rule drops nothing)."""
    from toist_ros.instances import full_mask, to_instance_msgs

    boxes, scores, masks = _prediction(seed=4, n=8)
    ranked = rank_instances(boxes, scores, masks, (64, 48), max_instances=100)
    assert len(ranked) == 8
    msgs = to_instance_msgs(ranked)
    for r, msg in zip(ranked, msgs):
        index = int(np.flatnonzero(scores == np.float32(r.score))[0])
        np.testing.assert_array_equal(full_mask(msg, 64, 48), masks[index])
        assert msg.mask_area == int(masks[index].sum()) == int(np.count_nonzero(mask_from_image(msg.mask)))
        assert (msg.mask.width, msg.mask.height) == (msg.mask_roi.width, msg.mask_roi.height)
        assert msg.mask_roi.x_offset <= np.floor(msg.box[0]) and msg.mask_roi.y_offset <= np.floor(msg.box[1])
        assert msg.mask_roi.x_offset + msg.mask_roi.width <= 64
        np.testing.assert_allclose(msg.box, r.box)
        assert msg.rank == r.rank and abs(msg.score - r.score) < 1e-7


def test_masks_off_leaves_an_empty_mask_image():
    from toist_ros.instances import to_instance_msgs

    boxes, scores, _ = _prediction(seed=2)
    msgs = to_instance_msgs(rank_instances(boxes, scores, None, (64, 48)))
    assert msgs and all(len(m.mask.data) == 0 and m.mask.width == 0 and m.mask_area == 0 for m in msgs)
    assert all(m.mask_roi.width > 0 for m in msgs)


def test_masks_computed_for_3d_only_give_the_box_hull_as_mask_roi():
    """output.masks:=false with depth on: masks exist (for 3D) but are not published, and
    mask_roi is the box's pixel hull as docs/ros.md says, not the hull grown to unseen mask pixels."""
    from toist_ros.instances import box_hull, to_instance_msgs

    boxes = np.array([[20.3, 10.2, 30.7, 20.5]], np.float32)
    masks = np.zeros((1, 48, 64), bool)
    masks[0, 8:22, 18:33] = True  # spills past the box, inside its crop window
    ranked = rank_instances(boxes, np.array([0.9], np.float32), masks, (64, 48))
    assert ranked[0].roi != ranked[0].hull  # published with masks: grown to the mask
    [with_masks] = to_instance_msgs(ranked)
    [without] = to_instance_msgs(ranked, with_masks=False)
    roi = lambda m: (m.mask_roi.x_offset, m.mask_roi.y_offset, m.mask_roi.width, m.mask_roi.height)  # noqa: E731
    assert roi(with_masks) == ranked[0].roi
    x0, y0, x1, y1 = box_hull(boxes[0], 64, 48)
    assert roi(without) == (x0, y0, x1 - x0, y1 - y0) == (20, 10, 11, 11) and without.mask.width == 0


def test_inconsistent_predictions_are_refused():
    boxes, scores, masks = _prediction()
    with pytest.raises(ValueError, match="6 boxes but 5 scores"):
        rank_instances(boxes, scores[:5], None, (64, 48))
    with pytest.raises(ValueError, match="original image pixels"):
        rank_instances(boxes, scores, masks[:, :40], (64, 48))


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    boxes, scores, masks = _prediction(seed=7)
    a = rank_instances(boxes, scores, masks, (64, 48))
    b = rank_instances(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(masks), (64, 48))
    assert [(x.score, x.roi, x.mask_area) for x in a] == [(x.score, x.roi, x.mask_area) for x in b]
