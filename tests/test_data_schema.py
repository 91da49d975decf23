"""Reading COCO-Tasks JSON: valid files parse exactly; every kind of bad input names file, record and field."""

import json
import re
import shutil

import pytest

from toist_core.data.coco_tasks import CocoTasksDataset
from toist_core.data.schema import DataError, load_task_file, parse_task_file_name
from toist_core.data.synth import generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1, 2], splits=("test",), images_per_split=6, seed=3)
    return root


@pytest.fixture()
def task_json(synth_root):
    return json.loads((synth_root / "annotations" / "task_1_test.json").read_text())


def _write(tmp_path, data, name="task_1_test.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_valid_file_matches_json(synth_root, task_json):
    task_file = load_task_file(synth_root / "annotations" / "task_1_test.json")
    assert (task_file.task_id, task_file.split) == (1, "test")
    assert [i.id for i in task_file.images] == [i["id"] for i in task_json["images"]]
    assert task_file.num_annotations == len(task_json["annotations"])
    first = task_json["annotations"][0]
    rec = task_file.image_annotations(first["image_id"])[0]
    assert rec.id == first["id"] and rec.bbox == tuple(float(v) for v in first["bbox"])
    assert rec.coco_category_id == first["COCO_category_id"] and rec.category_id == first["category_id"]
    assert rec.segmentation == first["segmentation"]


def test_file_name_gives_task_and_split(tmp_path):
    assert parse_task_file_name("x/task_14_train.json") == (14, "train")
    with pytest.raises(DataError, match="task_<k>_<split>"):
        parse_task_file_name("tasks_1.json")
    # Any positive id: which ids exist is the task vocabulary's business (DataConfig checks it).
    assert parse_task_file_name("task_15_test.json") == (15, "test")
    with pytest.raises(DataError, match="task id 0 in the file name must be 1 or more"):
        parse_task_file_name("task_0_test.json")


def test_missing_file_and_malformed_json(tmp_path):
    with pytest.raises(DataError, match="task_1_test.json: annotation file not found"):
        load_task_file(tmp_path / "task_1_test.json")
    path = _write(tmp_path, '{"images": [')
    with pytest.raises(DataError, match=r"task_1_test.json: not valid JSON"):
        load_task_file(path)
    path = _write(tmp_path, [1, 2])
    with pytest.raises(DataError, match="top level must be a JSON object"):
        load_task_file(path)
    path = _write(tmp_path, {"images": []})
    with pytest.raises(DataError, match="missing top-level field 'annotations'"):
        load_task_file(path)


@pytest.mark.parametrize("section, field, value, message", [
    ("annotations", "bbox", None, "missing field 'bbox'"),
    ("annotations", "bbox", [1, 2, 3], r"field 'bbox': expected \[x, y, w, h\]"),
    ("annotations", "category_id", 2, "field 'category_id': expected 0 .* or 1"),
    ("annotations", "category_id", "1", "field 'category_id': expected an integer"),
    ("annotations", "COCO_category_id", None, "missing field 'COCO_category_id'"),
    ("annotations", "iscrowd", None, "missing field 'iscrowd'"),
    ("annotations", "area", "big", "field 'area': expected a number"),
    ("annotations", "segmentation", [[1, 2, 3]], r"field 'segmentation'\[0\]: a polygon must be"),
    ("annotations", "segmentation", [[1, 2, 3, 4, 5, "x"]], r"coordinates must be numbers, got 'x'"),
    # 4 values: pycocotools would read the polygon as a box and fail with an unnamed TypeError.
    ("annotations", "segmentation", [[2, 2, 10, 10]],
     r"field 'segmentation'\[0\]: a polygon must be .* \(>= 6: 3 points; the first one of an annotation\) of "
     r"coordinates, got 4 values"),
    ("annotations", "segmentation", [[1, 1, 5, 1, 5, 5], [2, 2]], r"field 'segmentation'\[1\]: a polygon must be"),
    # Non-finite or absurd numbers (pycocotools crashes or exhausts memory; a NaN box was dropped unseen).
    ("annotations", "segmentation", [[1, 1, float("nan"), 1, 5, 5]],
     r"field 'segmentation'\[0\]\[2\]: coordinate nan is not finite or not within \[-\d+, \d+\] \(image \d+x\d+"),
    ("annotations", "segmentation", [[1, 1, 5, 1, 5, float("-inf")]], r"field 'segmentation'\[0\]\[5\]: coordinate -inf"),
    ("annotations", "segmentation", [[1, 1, 5, 1, 5, 5], [1, 1, 1e12, 1, 5, 5]],
     r"field 'segmentation'\[1\]\[2\]: coordinate 1000000000000.0 is not finite or not within"),
    ("annotations", "bbox", [float("nan"), 2, 8, 8], r"field 'bbox': expected finite numbers, got \[nan, 2, 8, 8\]"),
    ("annotations", "bbox", [2, 2, 10 ** 400, 8], r"field 'bbox': expected finite numbers"),
    ("annotations", "area", float("nan"), r"field 'area': expected a finite number, got nan"),
    ("annotations", "area", float("inf"), r"field 'area': expected a finite number, got inf"),
    ("annotations", "segmentation", {"size": [5], "counts": "x"}, "RLE 'size' must be"),
    ("annotations", "image_id", 424242, "field 'image_id': 424242 is not the id of an image"),
    ("images", "height", "512", "field 'height': expected an integer, got '512'"),
    ("images", "file_name", None, "missing field 'file_name'"),
    ("images", "width", 0, "must be positive"),
])
def test_bad_record_names_file_record_and_field(tmp_path, task_json, section, field, value, message):
    index = 2
    record = task_json[section][index]
    if value is None:
        del record[field]
    else:
        record[field] = value
    path = _write(tmp_path, task_json)
    with pytest.raises(DataError) as info:
        load_task_file(path)
    text = str(info.value)
    assert str(path) in text
    assert f"{section}[{index}] (id {record['id']})" in text
    assert re.search(message, text), text


def test_polygon_coordinates_may_lie_one_image_side_outside(tmp_path, task_json):
    """[-side, 2 * side] (side = the longer image side) is accepted, inclusive; a hair beyond is not."""
    image = task_json["images"][0]
    side = max(image["height"], image["width"])
    ann = next(a for a in task_json["annotations"] if a["image_id"] == image["id"])
    ann["segmentation"] = [[-side, 0, 2 * side, 0, 2 * side, 2 * side], [1, 1, 5, 1, 5, 5.5]]
    task_file = load_task_file(_write(tmp_path, task_json))
    assert task_file.image_annotations(image["id"])[0].segmentation == ann["segmentation"]
    ann["segmentation"][0][3] = -side - 0.5
    with pytest.raises(DataError, match=rf"\(id {ann['id']}\): field 'segmentation'\[0\]\[3\]: coordinate {-side - 0.5}"):
        load_task_file(_write(tmp_path, task_json))


def test_a_two_point_polygon_after_the_first_loads_as_the_reference_loads_it(tmp_path, task_json):
    """pycocotools fails only when the FIRST polygon has 4 values; a later one of 2 points is
    rasterised with the rest (real COCO files may hold such parts: they must keep loading)."""
    from pycocotools import mask as mask_utils

    image = task_json["images"][0]
    ann = next(a for a in task_json["annotations"] if a["image_id"] == image["id"])
    ann["segmentation"] = [[1, 1, 9, 1, 9, 9], [2, 2, 6, 2]]
    task_file = load_task_file(_write(tmp_path, task_json))
    polygons = task_file.image_annotations(image["id"])[0].segmentation
    assert polygons == ann["segmentation"]
    assert len(mask_utils.frPyObjects(polygons, image["height"], image["width"])) == 2


def test_duplicate_ids_are_errors(tmp_path, task_json):
    task_json["images"].append(dict(task_json["images"][0]))
    with pytest.raises(DataError, match=f"duplicate image id {task_json['images'][0]['id']}"):
        load_task_file(_write(tmp_path, task_json))
    task_json["images"].pop()
    task_json["annotations"].append(dict(task_json["annotations"][0]))
    with pytest.raises(DataError, match="duplicate annotation id"):
        load_task_file(_write(tmp_path, task_json))


def test_missing_image_is_an_error(synth_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    task_json = json.loads((root / "annotations" / "task_1_test.json").read_text())
    victim = task_json["images"][3]
    (root / "images" / "val2014" / victim["file_name"]).unlink()
    ann = root / "annotations" / "task_1_test.json"
    with pytest.raises(DataError) as info:
        CocoTasksDataset(ann, root / "images" / "val2014")
    text = str(info.value)
    assert victim["file_name"] in text and f"image id {victim['id']}" in text and "task_1_test.json" in text
    # Without the construction-time check the same error comes when the sample is read.
    dataset = CocoTasksDataset(ann, root / "images" / "val2014", check_images=False)
    dataset[0]
    with pytest.raises(DataError, match=f"image file not found \\(image id {victim['id']}"):
        dataset[3]


def test_image_format_torchvision_cannot_decode_is_refused_up_front(synth_root, tmp_path):
    """A BMP (which ``toist predict`` reads through OpenCV) fails when the dataset is built, not
    at the first batch that meets it hours into training."""
    import cv2

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    ann = root / "annotations" / "task_1_test.json"
    task_json = json.loads(ann.read_text())
    victim = task_json["images"][2]
    image_dir = root / "images" / "val2014"
    pixels = cv2.imread(str(image_dir / victim["file_name"]))
    victim["file_name"] = victim["file_name"].rsplit(".", 1)[0] + ".BMP"
    assert cv2.imwrite(str(image_dir / victim["file_name"]), pixels)
    ann.write_text(json.dumps(task_json))
    with pytest.raises(DataError) as info:
        CocoTasksDataset(ann, image_dir)
    text = str(info.value)
    assert victim["file_name"] in text and "'.BMP'" in text and f"image id {victim['id']}" in text
    # The suffix list is right: torchvision really cannot decode the file.
    dataset = CocoTasksDataset(ann, image_dir, check_images=False)
    with pytest.raises(DataError, match="cannot decode image"):
        dataset[2]


def test_image_size_must_match_record(synth_root, tmp_path):
    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    task_json["images"][1]["height"] += 1
    ann = _write(tmp_path, task_json)
    dataset = CocoTasksDataset(ann, synth_root / "images" / "val2014")
    with pytest.raises(DataError, match="fields 'height'/'width'"):
        dataset[1]


def test_unknown_coco_category_fails_for_noun_captions(synth_root, tmp_path):
    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    preferred = next(a for a in task_json["annotations"] if a["category_id"] == 1)
    preferred["COCO_category_id"] = 999
    ann = _write(tmp_path, task_json)
    CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="pronoun")  # names not needed
    with pytest.raises(DataError, match=f"annotation id {preferred['id']}: field 'COCO_category_id': 999"):
        CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="noun")


def test_unknown_coco_category_of_any_named_object_fails_in_grounding_mode(synth_root, tmp_path):
    """Grounding captions name every kept object, so a non-preferred one needs a name too (it used to
    fail later, in a loader worker, with a KeyError naming no file)."""
    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    other = next(a for a in task_json["annotations"] if a["category_id"] == 0)
    other["COCO_category_id"] = 500
    ann = _write(tmp_path, task_json)
    CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="noun")  # not named in noun captions
    with pytest.raises(DataError, match=rf"task_1_test.json: annotation id {other['id']}: field 'COCO_category_id': "
                                        rf"500 has no class name \(needed for grounding captions\)"):
        CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="grounding")
    # An object grounding drops (crowd, or a box that is degenerate in the image) needs no name.
    other["iscrowd"] = 1
    CocoTasksDataset(_write(tmp_path, task_json), synth_root / "images" / "val2014", caption_mode="grounding")
    other["iscrowd"], other["bbox"] = 0, [-50, -50, 10, 10]
    dataset = CocoTasksDataset(_write(tmp_path, task_json), synth_root / "images" / "val2014", caption_mode="grounding")
    image_index = next(i for i in range(len(dataset)) if dataset.sample_info(i)[1].id == other["image_id"])
    kept = [a for a in task_json["annotations"] if a["image_id"] == other["image_id"] and a is not other]
    assert len(dataset[image_index][1]["boxes"]) == len(kept)  # the sample reads, without the unnamed object
