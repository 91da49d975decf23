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
