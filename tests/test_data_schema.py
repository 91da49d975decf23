"""Reading COCO-Tasks JSON: valid files parse exactly; every kind of bad input names file, record and field."""

import itertools
import json
import re
import shutil

import numpy as np
import pytest

from toist_core.data.coco_tasks import CocoTasksDataset
from toist_core.data.schema import DataError, load_task_file, parse_task_file_name
from toist_core.data.synth import generate

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


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
    # Nested past the parser's recursion, or a number of more digits than Python converts: named,
    # not a bare RecursionError / ValueError.
    path = _write(tmp_path, '{"images": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(DataError, match=r"task_1_test.json: not valid annotation file: nested too deeply to read"):
        load_task_file(path)
    path = _write(tmp_path, '{"images": [{"id": ' + "7" * 5000 + "}]}")
    with pytest.raises(DataError, match=r"task_1_test.json: not valid annotation file: Exceeds the limit"):
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
    # COCOeval ignores such a target, which the table still counted (a miss scored as no miss).
    ("annotations", "area", -1, r"field 'area': -1\.0 is outside \[0, 1e\+10\], the range of areas COCOeval scores"),
    ("annotations", "area", 1e11, r"field 'area': 100000000000\.0 is outside \[0, 1e\+10\]"),
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
    assert victim["file_name"] in text and "this file is BMP although named .BMP" in text
    assert f"image id {victim['id']}" in text
    # The suffix list is right: torchvision really cannot decode the file.
    dataset = CocoTasksDataset(ann, image_dir, check_images=False)
    with pytest.raises(DataError, match="cannot decode image"):
        dataset[2]


def test_image_size_must_match_record(synth_root, tmp_path):
    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    task_json["images"][1]["height"] += 1
    ann = _write(tmp_path, task_json)
    with pytest.raises(DataError, match="fields 'height'/'width'"):   # the header read when it is built
        CocoTasksDataset(ann, synth_root / "images" / "val2014")
    dataset = CocoTasksDataset(ann, synth_root / "images" / "val2014", check_images=False)
    with pytest.raises(DataError, match="fields 'height'/'width'"):   # else when the sample is read
        dataset[1]


def test_a_task_the_vocabulary_lacks_is_refused_by_file_when_the_dataset_is_built(synth_root, tmp_path):
    """task_15_test.json with the 14 COCO-Tasks: it was built, and the first sample read (in a
    loader worker) failed with "unknown task id 15", naming neither the file nor the setting."""
    ann = tmp_path / "task_15_test.json"
    ann.write_text((synth_root / "annotations" / "task_1_test.json").read_text())
    for mode in ("pronoun", "noun", "distill"):
        with pytest.raises(DataError, match=rf"^{ann}: task 15 \(from the file name\) is not in the COCO-Tasks "
                                            r"vocabulary \(ids 1, 2, .*, 14\): name the task vocabulary file"):
            CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode=mode)
    grounding = CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="grounding")
    assert grounding[0][1]["caption"]   # object names: the task is not read


def test_unknown_coco_category_fails_for_noun_captions(synth_root, tmp_path):
    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    preferred = next(a for a in task_json["annotations"] if a["category_id"] == 1)
    preferred["COCO_category_id"] = 999
    ann = _write(tmp_path, task_json)
    CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="pronoun")  # names not needed
    with pytest.raises(DataError, match=f"annotation id {preferred['id']}: field 'COCO_category_id': 999"):
        CocoTasksDataset(ann, synth_root / "images" / "val2014", caption_mode="noun")


def test_toist_evaluate_with_noun_captions_checks_class_names_before_predicting(synth_root, tmp_path):
    """--captions noun read each image's classes as it predicted it: a bare KeyError ("COCO
    category id 999 has no name ...") naming no file, after the images before it."""
    from types import SimpleNamespace

    from toist_core.cli.evaluate import predict_tasks

    task_json = json.loads((synth_root / "annotations" / "task_1_test.json").read_text())
    preferred = next(a for a in task_json["annotations"] if a["category_id"] == 1)
    preferred["COCO_category_id"] = 999
    ann = _write(tmp_path, task_json)
    segmenter = SimpleNamespace()   # nothing is predicted: any use of it would fail
    with pytest.raises(DataError, match=f"{ann}: annotation id {preferred['id']}: field 'COCO_category_id': 999"):
        predict_tasks(segmenter, {1: ann}, synth_root / "images" / "val2014", captions="noun")


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


# ----------------------------------------------------------------------------- RLE segmentations

def _image_rle(image, rows=0, counts=None):
    """A compressed RLE of a block in ``image`` (``rows`` extra rows: a size not the image's)."""
    from pycocotools import mask as mask_utils

    h, w = image["height"] + rows, image["width"]
    block = np.zeros((h, w), dtype=np.uint8, order="F")
    block[2:12, 3:15] = 1
    encoded = mask_utils.encode(block)["counts"].decode()
    return {"size": [h, w], "counts": encoded if counts is None else counts}


def _list_counts(rle):
    from pycocotools import mask as mask_utils

    flat = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).flatten(order="F").tolist()
    runs = [len(list(group)) for _, group in itertools.groupby(flat)]
    return runs if flat[0] == 0 else [0] + runs


def test_rle_segmentations_must_be_masks_of_their_image(tmp_path, task_json):
    """pycocotools decodes an RLE as it is: counts not adding up to height * width gave masks read
    from uninitialised memory (different at every read), and a size not the image's mis-scored
    the evaluation. Valid compressed and uncompressed RLEs load as before."""
    image = task_json["images"][0]
    index, ann = next((i, a) for i, a in enumerate(task_json["annotations"]) if a["image_id"] == image["id"])
    h, w = image["height"], image["width"]
    good = _image_rle(image)
    for segmentation in (good, dict(good, counts=_list_counts(good))):
        ann["segmentation"] = segmentation
        loaded = load_task_file(_write(tmp_path, task_json)).image_annotations(image["id"])[0]
        assert loaded.segmentation == segmentation
    cases = [
        (_image_rle(image, rows=1), rf"RLE size \[{h + 1}, {w}\] differs from the size \[{h}, {w}\] of its image"),
        # cut short after the first run ("P" and above: a character that wants more)
        (dict(good, counts=good["counts"][:next(i for i, c in enumerate(good["counts"]) if c < "P") + 1]),
         rf"RLE 'counts' cover {2 + 3 * h} pixels, not height \* width = {h * w}"),
        (dict(good, counts=[3, 7]), rf"RLE 'counts' cover 10 pixels, not height \* width = {h * w}"),
        (dict(good, counts=[h * w, True]), r"RLE 'counts' list must hold non-negative integers, got True"),
        (dict(good, counts=[h * w + 1, -1]), r"RLE 'counts' list must hold non-negative integers, got -1"),
        (dict(good, counts="!!!!"), r"RLE 'counts' string holds '!' at position 0"),
        (dict(good, counts=good["counts"] + "Q"), r"RLE 'counts' string ends inside a number"),
        (dict(good, counts=""), rf"RLE 'counts' cover 0 pixels"),
    ]
    for segmentation, message in cases:
        ann["segmentation"] = segmentation
        path = _write(tmp_path, task_json)
        with pytest.raises(DataError) as info:
            load_task_file(path)
        text = str(info.value)
        assert text.startswith(f"{path}: annotations[{index}] (id {ann['id']}): field 'segmentation'"), text
        assert re.search(message, text), text


def test_a_present_categories_field_must_be_a_list_of_records_with_ids(tmp_path, task_json):
    """The dataset does not read 'categories' (a file may lack it), but pycocotools indexes it by id."""
    del task_json["categories"]
    load_task_file(_write(tmp_path, task_json))
    for value, message in [({"0": "x"}, r"field 'categories': expected a list"),
                           ([{"name": "preferred"}], r"categories\[0\]: missing field 'id'"),
                           ([{"id": 1}, {"id": 1}], r"categories\[1\] \(id 1\): duplicate category id 1"),
                           (["preferred"], r"categories\[0\]: expected an object")]:
        task_json["categories"] = value
        with pytest.raises(DataError, match=message):
            load_task_file(_write(tmp_path, task_json))


def _reference_runs(counts: str) -> list[int]:
    """pycocotools' rleFrString in plain Python, exact integers (the test's own, slow one)."""
    runs, p = [], 0
    while p < len(counts):
        value, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            value |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                value |= -1 << (5 * k)
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def test_rle_counts_check_agrees_with_pycocotools_decoding():
    """Random masks (pycocotools' encodings: all valid), and random strings of valid characters
    judged against a plain decoding, checked many to a batch as the evaluation checks an image."""
    from pycocotools import mask as mask_utils

    from toist_core.data.rle import counts_problem, first_bad_counts

    rng = np.random.default_rng(0)
    counts, pixels = [], []
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = (rng.random((h, w)) < rng.choice([0.0, 0.05, 0.5, 1.0])).astype(np.uint8)
        counts.append(mask_utils.encode(np.asfortranarray(mask))["counts"].decode())
        pixels.append(h * w)
    assert first_bad_counts(counts, pixels) is None
    assert first_bad_counts([c.encode() for c in counts], pixels) is None  # bytes, as pycocotools returns them
    big = np.zeros((1200, 1500), np.uint8, order="F")
    big[100:1100, 1:1499] = 1                                               # runs of 5-character numbers
    assert counts_problem(mask_utils.encode(big)["counts"], 1200, 1500) is None

    checked = 0
    for _ in range(400):
        text = "".join(chr(48 + int(g)) for g in rng.integers(0, 64, int(rng.integers(1, 12))))
        text = text[:-1] + chr(48 + (ord(text[-1]) - 48) % 32)            # ends a number
        if any(len(n) > 6 for n in re.findall(r"[P-o]*[0-O]", text)):
            continue
        runs = _reference_runs(text)
        total = sum(runs)
        valid = min(runs) >= 0 and total > 0
        problem = counts_problem(text, 1, max(total, 1))
        assert (problem is None) == valid, (text, runs, problem)
        # Valid strings among valid ones: the batch names the right one.
        batch = counts[:5] + [text] + counts[5:9]
        found = first_bad_counts(batch, pixels[:5] + [max(total, 1)] + pixels[5:9])
        assert (found is None) if valid else (found[0] == 5), (text, found)
        if valid:
            assert int(mask_utils.area({"size": [1, total], "counts": text.encode()})) == sum(runs[1::2])
        checked += 1
    assert checked > 300
    # Empty inputs, a string holding a non-ASCII letter, a number longer than pycocotools reads.
    assert first_bad_counts([], []) is None
    assert counts_problem("", 0, 5) is None
    assert "holds 'é' at position 1" in counts_problem("0é", 2, 2)
    assert "number of 7 characters at position 0" in counts_problem("oooooo0", 2, 2)
