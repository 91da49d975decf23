"""Overlays written by `toist predict` and the demo: labels and the caption stay inside the image."""

import cv2
import numpy as np

from toist_core.visualize import _fitted, draw_instances, instance_color


def test_a_score_label_at_the_right_edge_is_drawn_whole():
    """A box at the image's right edge had its score label cut to the 10 pixels left of it."""
    image = np.zeros((60, 200, 3), np.uint8)
    drawn = draw_instances(image, np.array([[190.0, 20.0, 199.0, 50.0]]), np.array([0.87]))
    assert not image.any()   # the caller's image is untouched
    (tw, th), base = cv2.getTextSize("0.87", cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    band = drawn[20 - th - base:20]   # the label's rows, above the box's top
    filled = np.all(band == instance_color(0), axis=2).any(axis=0) | (band.min(axis=2) > 200).any(axis=0)
    assert filled.sum() >= tw and filled[-1]


def test_a_caption_longer_than_the_image_is_fitted():
    caption = "something to sit on (task 1 of the synthetic scenes)"
    text, scale = _fitted(caption, 112)
    width = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
    assert width <= 112 and text.endswith("...") and caption.startswith(text[:-3])
    assert _fitted("sit", 112) == ("sit", 0.6)   # a short one as it was
    room = cv2.getTextSize("something to sit on", cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0]
    shrunk, smaller = _fitted("something to sit on", room)
    assert shrunk == "something to sit on" and 0.4 <= smaller < 0.6   # smaller type before cutting
    drawn = draw_instances(np.full((40, 120, 3), 255, np.uint8), np.zeros((0, 4)), np.zeros(0), title=caption)
    assert (drawn[0, :100] == 0).all()   # the caption's black bar ...
    assert (drawn[0, -1] == 255).all()   # ... ends inside the image: the caption is not cut by its edge


def test_a_score_label_at_the_top_is_not_under_the_caption():
    """The caption's bar, drawn last, covered the score of a box at the top of the image."""
    image = np.full((200, 300, 3), 128, np.uint8)
    box, score = np.array([[10.0, 0.0, 150.0, 120.0]]), np.array([0.93])
    titled = draw_instances(image, box, score, title="sit comfortably on something")
    untitled = draw_instances(image, box, score)
    # The label's fill: the box's colour inside the box, its edges (2 px) left out.
    label_pixels = lambda drawn: int(np.all(drawn[2:100, 13:60] == instance_color(0), axis=2).sum())  # noqa: E731
    assert label_pixels(titled) >= 0.9 * label_pixels(untitled) > 150
    far = draw_instances(image, np.array([[250.0, 0.0, 299.0, 50.0]]), score, title="sit")
    (tw, th), base = cv2.getTextSize("0.93", cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    assert np.all(far[th + base - 2, 250:250 + tw] != 128)   # right of a short bar: at the top, as before


def test_box_lines_lie_on_the_box_own_pixels():
    """Box corners are pixel edges (columns 10 to 19 are 10 .. 20): the right and bottom lines were
    drawn a pixel outside the box, and outside the image (not at all) for a box over the frame.
    The ROS node's debug_image draws its boxes the same way (toist_ros.overlay)."""
    from types import SimpleNamespace

    from toist_ros.overlay import draw_overlay

    image = np.zeros((100, 200, 3), np.uint8)
    whole = draw_instances(image, np.array([[0.0, 0.0, 200.0, 100.0]]), np.array([0.9]), thickness=1)
    lit = np.all(whole == instance_color(0), axis=2)
    assert lit[50:, -1].all() and lit[-1, 100:].all()   # right column, bottom row (below/right of the label)
    small = np.all(draw_instances(image, np.array([[50.0, 20.0, 60.0, 30.0]]), np.array([0.9]), thickness=1)
                   == instance_color(0), axis=2)
    assert small[25, 59] and not small[25, 60] and small[29, 55] and not small[30, 55]
    ranked = [SimpleNamespace(rank=0, score=0.9, box=(0.0, 0.0, 200.0, 100.0), mask_crop=None, roi=(0, 0, 200, 100))]
    debug = np.all(draw_overlay(image, ranked) == instance_color(0)[::-1], axis=2)   # BGR
    assert debug[50:, -1].all() and debug[-1, 100:].all()


def test_masks_decoded_from_rles_paint_the_mask_not_rows_0_and_1():
    """pycocotools' decode gives uint8 0/1 masks: indexed with them, the overlay painted image
    rows 0 and 1 instead of the mask."""
    import pytest
    from pycocotools import mask as mask_utils

    mask = np.zeros((40, 50), bool)
    mask[10:20, 20:40] = True
    decoded = mask_utils.decode(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    assert decoded.dtype == np.uint8
    image = np.zeros((40, 50, 3), np.uint8)
    from_bool = draw_instances(image, np.zeros((0, 4)), np.zeros(0), masks=mask[None])
    from_rle = draw_instances(image, np.zeros((0, 4)), np.zeros(0), masks=decoded[None])
    assert np.array_equal(from_rle, from_bool) and (from_bool.any(axis=2) == mask).all()
    with pytest.raises(ValueError, match=r"masks must be bool or 0/1 integers, got float32"):
        draw_instances(image, np.zeros((0, 4)), np.zeros(0), masks=mask[None].astype(np.float32))
