"""Held-out synthetic scenes of the demo: same images and preferred boxes as the generated test
split, and the IoU judgement of instances."""

import json

import numpy as np
import pytest

from toist_core.data.synth import generate
from toist_ros.demo_scenes import box_iou, held_out_scenes, right_instances

SETTINGS = {"data_seed": 3, "min_size": 64, "max_size": 96, "min_objects": 2, "max_objects": 4}


def test_scenes_are_the_generated_test_images_with_their_preferred_boxes(tmp_path):
    import cv2

    generate(tmp_path, tasks=[2], splits=("test",), images_per_split=30, seed=SETTINGS["data_seed"],
             min_size=64, max_size=96, min_objects=2, max_objects=4, image_format="png")
    data = json.loads((tmp_path / "annotations" / "task_2_test.json").read_text())
    scenes = held_out_scenes(SETTINGS, task_id=2, count=5)
    assert len(scenes) == 5
    for scene in scenes:
        index = int(scene.name.rsplit("_", 1)[1])
        record = next(i for i in data["images"] if i["id"] % 1_000_000 == index)
        written = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "val2014" / record["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(written, scene.pixels)
        expected = sorted((a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                          for a in data["annotations"] if a["image_id"] == record["id"] and a["category_id"] == 1)
        assert np.allclose(sorted(map(tuple, scene.preferred_boxes)), expected, atol=0.02)
    # Scenes without a preferred object are skipped, so every scene has at least one.
    assert all(len(s.preferred_boxes) for s in scenes)


def test_right_instances_use_iou_half():
    preferred = np.array([[10.0, 10.0, 50.0, 50.0]])
    boxes = np.array([[10.0, 10.0, 50.0, 50.0], [20.0, 10.0, 60.0, 50.0], [30.0, 10.0, 70.0, 50.0], [0, 0, 5, 5]])
    assert box_iou(boxes[1:2], preferred)[0, 0] == pytest.approx(30 * 40 / (50 * 40))
    assert right_instances(boxes, preferred) == [True, True, False, False]
    assert right_instances(boxes, np.zeros((0, 4))) == [False] * 4
    assert right_instances(np.zeros((0, 4)), preferred) == []


def _message(boxes, masks=None, size=(60, 40)):
    """A TaskInstances message of ``boxes`` (scores falling with the order), as the node builds it."""
    from std_msgs.msg import Header

    from toist_ros.instances import rank_instances, task_instances_msg, to_instance_msgs

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.linspace(0.9, 0.6, len(boxes)).astype(np.float32)
    ranked = rank_instances(boxes, scores, masks, size)
    return task_instances_msg(Header(), size, "task", 1, 5.0, to_instance_msgs(ranked))


def test_demo_judgement_counts_each_preferred_object_once():
    """Two instances on one preferred object are one object found, not "2 / 1"."""
    from types import SimpleNamespace

    from toist_ros.demo import _judgement

    scene = SimpleNamespace(preferred_boxes=np.array([[10, 10, 30, 30], [40, 5, 55, 20]], dtype=np.float64))
    verdict = _judgement(scene, _message([[10, 10, 30, 30], [11, 10, 30, 31], [0, 30, 5, 39]]))
    assert verdict == {"top_right": True, "right": 1, "preferred": 2}
    verdict = _judgement(scene, _message([[0, 30, 5, 39], [40, 5, 55, 20], [10, 10, 30, 30]]))
    assert verdict == {"top_right": False, "right": 2, "preferred": 2}
    assert _judgement(scene, _message([])) == {"top_right": False, "right": 0, "preferred": 2}
    nothing_preferred = SimpleNamespace(preferred_boxes=np.zeros((0, 4)))
    assert _judgement(nothing_preferred, _message([[10, 10, 30, 30]])) == {"top_right": False, "right": 0,
                                                                         "preferred": 0}


def test_demo_positions_skip_instances_on_no_object():
    """An instance on the background has no true centroid: it is not paired with object 0."""
    from types import SimpleNamespace

    from toist_ros.demo import _positions

    msg = _message([[10, 10, 30, 30], [45, 25, 58, 38]])
    for inst, centroid in zip(msg.instances, ((0.1, 0.0, 1.0), (0.5, 0.5, 2.5))):
        inst.has_3d = True
        inst.centroid.x, inst.centroid.y, inst.centroid.z = centroid
    scene = SimpleNamespace(boxes=np.array([[10, 10, 30, 30], [0, 0, 5, 5]], dtype=np.float64))
    depth = SimpleNamespace(centroids=np.array([[0.1, 0.0, 1.02], [-0.3, -0.3, 1.3]]))
    rows = _positions(msg, scene, depth)
    assert [(row["rank"], row["object"], row["error_cm"]) for row in rows] == [(0, 0, 2.0)]


def test_demo_overlay_keeps_the_masks_when_one_instance_has_none():
    from toist_ros.demo import _overlay

    size = (300, 200)
    masks = np.zeros((2, 200, 300), bool)
    masks[0, 60:140, 60:140] = True
    # The second instance's mask image is empty (a node that computed no mask for it).
    from sensor_msgs.msg import Image

    boxes = [[50, 50, 150, 150], [160, 20, 200, 60]]
    msg = _message(boxes, masks, size)
    msg.instances[1].mask = Image()
    assert msg.instances[0].mask.width > 0 and msg.instances[1].mask.width == 0
    rgb = np.zeros((200, 300, 3), np.uint8)
    drawn = _overlay(rgb, msg, "", 1)
    without_masks = _overlay(rgb, _message(boxes, None, size), "", 1)
    inside = (slice(90, 110), slice(90, 110))
    assert drawn[inside].sum() > without_masks[inside].sum() == 0  # the first instance's mask is tinted
