"""`toist convert-coco`: plain COCO files + a task specification -> COCO-Tasks files, and own
class names (``COCO_categories``) in the dataset's captions."""

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from toist_core import cli
from toist_core.data.captions import coco_id2name
from toist_core.data.coco_tasks import CocoTasksDataset, build_dataset
from toist_core.data.config import DataConfig
from toist_core.data.convert_coco import PREFERENCE_CATEGORIES, convert_coco, load_task_spec
from toist_core.data.schema import DataError, load_task_file

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = dict(train_sizes=[64], max_size=100, crop_resize_sizes=[64], crop_min_size=32, crop_max_size=100,
             test_size=64)
# Own classes; ids 1 and 62 are also COCO ids (person, chair): the file's names must win.
CATEGORIES = [{"id": 1, "name": "tape cutter", "supercategory": "tool"}, {"id": 62, "name": "stool"},
              {"id": 90, "name": "mug"}]
H, W = 48, 64

SPEC = """\
name: workshop            # unknown keys are ignored
tasks:
  - id: 1
    phrase: "cut tape with"
    pronoun: "something"
    preferred_categories: ["tape cutter", 62]
  - id: 2
    phrase: "drink coffee from"
    preferred_instances: [12, 99]
"""


def _square(x, y, size):
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def _rle(x, y, size, compressed):
    block = np.zeros((H, W), dtype=np.uint8, order="F")
    block[y:y + size, x:x + size] = 1
    rle = mask_utils.encode(block)
    if compressed:
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = block.flatten(order="F").tolist()  # uncompressed COCO RLE: run lengths, zeros first
    counts = ([0] if flat[0] else []) + [len(list(run)) for _, run in itertools.groupby(flat)]
    return {"size": [H, W], "counts": counts}


def _annotation(ann_id, image_id, category, x, y, size, segmentation=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": [x, y, size, size],
            "segmentation": segmentation if segmentation is not None else _square(x, y, size),
            "area": float(size * size), "iscrowd": 0}


def _write_coco(folder: Path, name: str, first_image: int, annotations: list) -> Path:
    """A COCO file with 3 images (written with cv2) in ``folder/pics``."""
    images = []
    for k in range(3):
        image_id = first_image + k
        file_name = f"pics/img_{image_id}.png"
        (folder / "pics").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / file_name), np.full((H, W, 3), 40 * k, dtype=np.uint8))
        images.append({"id": image_id, "file_name": file_name, "height": H, "width": W, "license": 3})
    path = folder / name
    path.write_text(json.dumps({"info": {"description": "own"}, "images": images, "annotations": annotations,
                                "categories": CATEGORIES}))
    return path


@pytest.fixture
def coco(tmp_path):
    """instances_train.json (images 1-3) and instances_test.json (images 4-6), specification."""
    train = _write_coco(tmp_path, "instances_train.json", 1, [
        _annotation(10, 1, 1, 4, 4, 16),                                            # tape cutter
        _annotation(11, 1, 90, 30, 10, 12, _rle(30, 10, 12, compressed=True)),      # mug, RLE
        _annotation(12, 2, 90, 8, 20, 10, _rle(8, 20, 10, compressed=False)),       # mug, RLE counts list
        _annotation(13, 2, 62, 30, 6, 20),                                          # stool
        # image 3: no object at all
    ])
    test = _write_coco(tmp_path, "instances_test.json", 4, [
        _annotation(20, 4, 90, 10, 10, 14),                                         # mug
        _annotation(21, 5, 1, 20, 20, 12),                                          # tape cutter
    ])
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return tmp_path, train, test, spec


def _flags(path):
    task_file = load_task_file(path)
    return {a.id: a.category_id for anns in task_file.annotations.values() for a in anns}


def test_converted_files_pass_the_schema_with_exact_flags(coco):
    folder, train, test, spec = coco
    out = folder / "tasks"
    summary = convert_coco(train, "train", spec, out)
    convert_coco(test, "test", spec, out)

    assert _flags(out / "annotations" / "task_1_train.json") == {10: 1, 11: 0, 12: 0, 13: 1}
    assert _flags(out / "annotations" / "task_2_train.json") == {10: 0, 11: 0, 12: 1, 13: 0}
    assert _flags(out / "annotations" / "task_1_test.json") == {20: 0, 21: 1}
    assert _flags(out / "annotations" / "task_2_test.json") == {20: 0, 21: 0}

    task_file = load_task_file(out / "annotations" / "task_1_train.json", keep_raw=True)
    raw = task_file.raw
    assert [i.id for i in task_file.images] == [1, 2, 3]  # the image without objects stays
    assert raw["images"][0] == {"id": 1, "file_name": "pics/img_1.png", "height": H, "width": W}
    assert raw["categories"] == list(PREFERENCE_CATEGORIES)
    assert raw["COCO_categories"] == [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    source = json.loads(train.read_text())["annotations"]
    for before, after in zip(source, raw["annotations"]):
        assert after["COCO_category_id"] == before["category_id"]
        for key in ("id", "image_id", "bbox", "segmentation", "area", "iscrowd"):
            assert after[key] == before[key]
    assert not list((out / "annotations").glob(".*"))  # no temporary file left behind

    by_task = {t.task_id: t for t in summary.tasks}
    assert (by_task[1].images, by_task[1].annotations, by_task[1].preferred, by_task[1].images_with_preferred) \
        == (3, 4, 2, 2)
    assert (by_task[2].preferred, by_task[2].images_with_preferred) == (1, 1)
    assert by_task[1].path == out / "annotations" / "task_1_train.json"


def test_warnings(coco):
    folder, train, test, spec = coco
    train_warnings = convert_coco(train, "train", spec, folder / "out").warnings
    assert len(train_warnings) == 1 and "preferred_instances 99 are not annotations of" in train_warnings[0]
    test_warnings = convert_coco(test, "test", spec, folder / "out").warnings
    assert any("task 1: preferred category 'stool' (id 62) has no object in" in w for w in test_warnings)
    assert any(w.startswith("task 2: no preferred object in") for w in test_warnings)


def test_dataset_names_own_classes_in_noun_captions(coco):
    folder, train, test, spec = coco
    out = folder / "tasks"
    summary = convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert summary.images_copied == 3 and (out / "images" / "train" / "pics" / "img_1.png").is_file()
    cfg = DataConfig(root=str(out), tasks=[1, 2], image_dirs={"train": "images/train"}, masks=True, **SMALL)
    dataset = build_dataset(cfg, "train", caption_mode="noun")
    assert len(dataset) == 6
    captions = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        task_file, image = dataset.sample_info(index)
        captions[(task_file.task_id, image.id)] = target["caption"]
        assert target["masks"].shape[0] == target["boxes"].shape[0]
    assert captions[(1, 1)] == "step on tape cutter"  # id 1 is "person" in the COCO table
    assert captions[(1, 2)] == "step on stool"        # id 62 is "chair" there
    assert captions[(2, 2)] == "sit comfortably on mug"
    assert captions[(1, 3)] == captions[(2, 1)] == ""  # no preferred object

    # Images not copied: an absolute image folder works as well.
    cfg = DataConfig(root=str(out), tasks=[1], image_dirs={"train": str(folder)}, **SMALL)
    assert len(build_dataset(cfg, "train", caption_mode="grounding")) == 3


def _task_file(folder: Path, name: str, own_categories=None) -> Path:
    """A COCO-Tasks file as the real and synthetic ones (``categories`` = the 0/1 pair): one
    preferred chair (COCO id 62) in a written image."""
    assert cv2.imwrite(str(folder / "img.png"), np.zeros((H, W, 3), dtype=np.uint8))
    data = {"images": [{"id": 1, "file_name": "img.png", "height": H, "width": W}],
            "annotations": [dict(_annotation(1, 1, 0, 4, 4, 16), category_id=1, COCO_category_id=62)],
            "categories": list(PREFERENCE_CATEGORIES)}
    if own_categories is not None:
        data["COCO_categories"] = own_categories
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_files_without_own_categories_use_the_coco_table(tmp_path):
    plain = _task_file(tmp_path, "a/task_2_train.json")
    dataset = CocoTasksDataset(plain, tmp_path, caption_mode="noun")
    assert dataset[0][1]["caption"] == "sit comfortably on chair"
    assert dataset.id2name == coco_id2name()
    assert dataset.files[0].raw is None  # the raw JSON is not kept

    own = _task_file(tmp_path, "b/task_2_train.json", [{"id": 62, "name": "stool"}])
    dataset = CocoTasksDataset([own, plain], tmp_path, caption_mode="noun")
    assert dataset[0][1]["caption"] == dataset[1][1]["caption"] == "sit comfortably on stool"


def test_own_category_name_conflicts_name_both_files(tmp_path):
    first = _task_file(tmp_path, "a/task_2_train.json", [{"id": 62, "name": "stool"}])
    second = _task_file(tmp_path, "b/task_2_train.json", [{"id": 62, "name": "bar stool"}])
    with pytest.raises(DataError, match="category id 62 is named 'bar stool', but .*a/task_2_train.json names "
                                        "it 'stool'") as info:
        CocoTasksDataset([first, second], tmp_path, caption_mode="noun")
    assert str(second) in str(info.value)
    bad = _task_file(tmp_path, "c/task_2_train.json", [{"id": 62}])
    with pytest.raises(DataError, match=r"field 'COCO_categories'\[0\] \(id 62\): field 'name'"):
        CocoTasksDataset(bad, tmp_path)


def _spec(folder: Path, text: str) -> Path:
    path = folder / "bad_spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("tasks:\n  - {id: 1, preferred_categories: [sissors]}\n",
     re.escape("bad_spec.yaml: tasks[0] (id 1): preferred_categories: 'sissors' is not a category of ")
     + ".*instances_train.json; its categories are 'mug', 'stool', 'tape cutter'$"),
    ("tasks:\n  - {id: 1, preferred_categories: [tape cuter]}\n",
     "preferred_categories: 'tape cuter' is not a category of .*instances_train.json; did you mean 'tape cutter'\\?"),
    ("tasks:\n  - {id: 1, preferred_categories: [44]}\n",
     "bad_spec.yaml: tasks\\[0\\] \\(id 1\\): preferred_categories: 44 is not a category id of .*\\(ids: 1, 62, 90\\)"),
    ("tasks:\n  - {id: 1, preferred_categories: [mug]}\n  - {id: 3, phrase: x}\n",
     "bad_spec.yaml: tasks\\[1\\] \\(id 3\\): no preference given"),
    ("tasks:\n  - {id: 1, preferred_categories: [], preferred_instances: []}\n",
     "tasks\\[0\\] \\(id 1\\): no preference given"),
    ("tasks:\n  - {id: 1, preferred_categories: [mug]}\n  - {id: 1, preferred_instances: [3]}\n",
     "bad_spec.yaml: tasks\\[1\\] \\(id 1\\): duplicate task id \\(also tasks\\[0\\]\\)"),
    ("tasks:\n  - {id: 0, preferred_categories: [mug]}\n",
     "bad_spec.yaml: tasks\\[0\\]: field 'id': expected a positive integer, got 0"),
    ("tasks:\n  - {id: 1, preferred_categories: mug}\n",
     "tasks\\[0\\] \\(id 1\\): field 'preferred_categories': expected a list of category names or ids, got 'mug'"),
    ("tasks:\n  - {id: 1, preferred_instances: [12, x]}\n",
     "field 'preferred_instances'\\[1\\]: expected one of annotation ids \\(integers\\), got 'x'"),
    # A misspelt key (the file is also the task vocabulary, which refuses it) left the task without it.
    ("tasks:\n  - {id: 1, preferred_categorie: [mug], preferred_instances: [12]}\n",
     "tasks\\[0\\] \\(id 1\\): unknown key\\(s\\) \\['preferred_categorie'\\]; expected id, phrase, preferred_categories"),
    ("tasks: [\n", "bad_spec.yaml: not valid YAML"),
    ("name: x\n", "bad_spec.yaml: expected a mapping with a non-empty list 'tasks'"),
])
def test_specification_errors(coco, text, message):
    folder, train, _, _ = coco
    with pytest.raises(DataError, match=message):
        convert_coco(train, "train", _spec(folder, text), folder / "out")
    assert not (folder / "out").exists()  # nothing is written for bad input


def test_unknown_name_suggestion_exact_text(coco):
    folder, train, _, _ = coco
    spec = _spec(folder, "tasks:\n  - {id: 1, preferred_categories: [\"Mug\", \"tape cuter\"]}\n")
    with pytest.raises(DataError) as info:
        convert_coco(train, "train", spec, folder / "out")
    assert str(info.value) == (f"{spec}: tasks[0] (id 1): preferred_categories: 'Mug' is not a category of "
                               f"{train}; did you mean 'mug'?")


def test_an_unknown_name_among_many_categories_lists_some_and_counts_the_rest(coco):
    folder, train, _, _ = coco
    many = _edited(train, lambda data: data["categories"].extend(
        {"id": 100 + k, "name": f"thing, {k}"} for k in range(12)))
    spec = _spec(folder, "tasks:\n  - {id: 1, preferred_categories: [sissors]}\n")
    with pytest.raises(DataError) as info:
        convert_coco(many, "train", spec, folder / "out")
    # Quoted (a name may hold a comma), the package's "and N more" for the 3 not shown.
    assert str(info.value).endswith("its categories are 'mug', 'stool', 'tape cutter', 'thing, 0', 'thing, 1', "
                                    "'thing, 10', 'thing, 11', 'thing, 2', 'thing, 3', 'thing, 4', 'thing, 5', "
                                    "'thing, 6' and 3 more")


def _edited(train: Path, edit) -> Path:
    data = json.loads(train.read_text())
    edit(data)
    path = train.with_name("edited.json")
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].update(image_id=77),
     r"edited.json: annotations\[1\] \(id 11\): field 'image_id': 77 is not the id of an image in this file"),
    (lambda d: d["annotations"][2].update(category_id=5),
     r"edited.json: annotations\[2\] \(id 12\): field 'category_id': 5 is not a category id of .*edited.json "
     r"\(ids: 1, 62, 90\)"),
    (lambda d: d["annotations"][3].update(id=10),
     r"edited.json: annotations\[3\] \(id 10\): duplicate annotation id"),
    (lambda d: d["images"][2].update(id=1), r"edited.json: images: duplicate image id 1"),
    (lambda d: d["categories"].append({"id": 90, "name": "cup"}),
     r"edited.json: categories\[3\] \(id 90\): duplicate category id \(already named 'mug'\)"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
     r"edited.json: annotations\[0\] \(id 10\): field 'bbox': expected \[x, y, w, h\] \(4 numbers\), got \[1, 2, 3\]"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]),
     r"annotations\[0\] \(id 10\): field 'bbox': expected finite numbers"),
    # Polygon coordinates: pycocotools crashes on NaN and rasterises a far-off point at any cost.
    (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(2, float("nan")),
     r"annotations\[0\] \(id 10\): field 'segmentation'\[0\]\[2\]: coordinate nan is not finite or not within "
     r"\[-64, 128\] \(image 64x48"),
    (lambda d: d["annotations"][3]["segmentation"][0].__setitem__(5, 1e8),
     r"annotations\[3\] \(id 13\): field 'segmentation'\[0\]\[5\]: coordinate 100000000.0 is not finite"),
    (lambda d: d["annotations"][0].update(segmentation=[[4, 4, 20, 20]]),
     r"annotations\[0\] \(id 10\): field 'segmentation'\[0\]: a polygon must be .*got 4 values"),
    (lambda d: d["annotations"][0].update(area=float("inf")),
     r"annotations\[0\] \(id 10\): field 'area': expected a finite number, got inf"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[10, 10]),
     r"annotations\[1\] \(id 11\): field 'segmentation': RLE size \[10, 10\] differs from the size \[48, 64\]"),
    (lambda d: d["annotations"][0].pop("area"), r"annotations\[0\] \(id 10\): missing field 'area'"),
    (lambda d: d.pop("categories"), r"edited.json: field 'categories': expected a list, got nothing"),
    # One file under two records: one picture as two samples, each with half its objects labelled.
    (lambda d: d["images"][1].update(file_name="pics/img_1.png"),
     r"edited.json: images\[1\] \(id 2\) and images\[0\] \(id 1\) have the same field 'file_name' "
     r"'pics/img_1.png': one record per image file"),
    (lambda d: d["images"][1].update(file_name="./pics/img_1.png"),   # the same file, named otherwise
     r"edited.json: images\[1\] \(id 2\) and images\[0\] \(id 1\) have the same field 'file_name' "
     r"'./pics/img_1.png': one record per image file"),
    # A format training cannot decode: said now, not when training meets it.
    (lambda d: d["images"][2].update(file_name="pics/img_3.bmp"),
     r"pics/img_3.bmp: training and evaluation decode JPEG, PNG, GIF and WebP only .*\(images\[2\] \(id 3\)"),
    # An export of a split no image was given to: nothing to convert (it converted, 0 images).
    (lambda d: d.update(images=[], annotations=[]), r"edited.json: field 'images' is empty: no image to convert"),
])
def test_source_errors(coco, edit, message):
    folder, train, _, spec = coco
    with pytest.raises(DataError, match=message):
        convert_coco(_edited(train, edit), "train", spec, folder / "out")
    assert not (folder / "out").exists()


def test_missing_image_to_copy_and_bad_split(coco):
    folder, train, _, spec = coco
    (folder / "pics" / "img_2.png").unlink()
    with pytest.raises(DataError, match=r"img_2.png: image file not found \(images\[1\] \(id 2\), field 'file_name'"):
        convert_coco(train, "train", spec, folder / "out", copy_images_from=folder)
    assert not (folder / "out").exists()
    with pytest.raises(DataError, match="split: expected letters and digits only"):
        convert_coco(train, "train_2", spec, folder / "out")


def test_copied_backslash_names_are_written_as_copied(coco):
    """A Windows file_name ``pics\\img_1.png`` is copied to ``pics/img_1.png``; the task file must say
    so, or the dataset cannot find the copy."""
    folder, train, _, spec = coco
    data = json.loads(train.read_text())
    data["images"][0]["file_name"] = "pics\\img_1.png"
    windows = train.with_name("windows.json")
    windows.write_text(json.dumps(data))
    convert_coco(windows, "train", spec, folder / "out", copy_images_from=folder)
    written = json.loads((folder / "out" / "annotations" / "task_1_train.json").read_text())["images"]
    assert [i["file_name"] for i in written] == ["pics/img_1.png", "pics/img_2.png", "pics/img_3.png"]
    assert (folder / "out" / "images" / "train" / "pics" / "img_1.png").is_file()
    dataset = CocoTasksDataset(folder / "out" / "annotations" / "task_1_train.json", folder / "out" / "images" / "train")
    assert dataset.image_path(0) == folder / "out" / "images" / "train" / "pics" / "img_1.png"
    assert tuple(dataset.load_image(0).shape) == (3, H, W)


def test_spec_reader_ignores_other_keys(coco):
    _, _, _, spec = coco
    tasks = load_task_spec(spec)
    assert [(t.task_id, t.categories, t.instances) for t in tasks] == [
        (1, ("tape cutter", 62), frozenset()), (2, (), frozenset({12, 99}))]


def test_cli(coco, capsys):
    folder, train, _, spec = coco
    out = folder / "cli_out"
    code = cli.main(["convert-coco", "--coco", str(train), "--split", "train", "--tasks", str(spec),
                     "--out", str(out), "--copy-images-from", str(folder)])
    captured = capsys.readouterr()
    assert code == 0
    assert "wrote 2 task files of split 'train'" in captured.out
    assert "task   1: 3 images, 4 objects, 2 preferred in 2 images" in captured.out
    assert "set image_dirs: {train: images/train}" in captured.out
    assert "warning: task 2: preferred_instances 99 are not annotations of" in captured.err
    assert (out / "annotations" / "task_2_train.json").is_file()

    bad = _spec(folder, "tasks:\n  - {id: 1, preferred_categories: [sissors]}\n")
    code = cli.main(["convert-coco", "--coco", str(train), "--split", "train", "--tasks", str(bad),
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "toist convert-coco: error: " in captured.err and "'sissors' is not a category" in captured.err
    assert "Traceback" not in captured.err


def test_converted_test_file_is_evaluable(coco):
    """`toist evaluate` reads the written ``categories``: a perfect prediction scores AP 1."""
    from toist_core.data.schema import annotation_rle
    from toist_core.eval.evaluator import evaluate_task
    from toist_core.eval.predictions import ImagePredictions

    folder, _, test, spec = coco
    convert_coco(test, "test", spec, folder / "tasks")
    path = folder / "tasks" / "annotations" / "task_1_test.json"
    ground_truth = load_task_file(path)
    predictions = {}
    for image in ground_truth.images:
        anns = [a for a in ground_truth.image_annotations(image.id) if a.is_preferred]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in anns)]).reshape(-1, 4)
        masks = np.zeros((len(anns), H, W), dtype=bool)
        for k, ann in enumerate(anns):
            masks[k] = mask_utils.decode(annotation_rle(ann, H, W)).astype(bool)
        predictions[image.id] = ImagePredictions.from_arrays(boxes, np.ones(len(anns)), masks)
    result = evaluate_task(path, predictions)
    assert (result.num_images, result.num_targets) == (3, 1)
    assert result.ap50 == {"bbox": 1.0, "segm": 1.0}


def test_task_files_convert_coco_did_not_write_are_refused_unless_overwrite(coco):
    """A conversion into a folder of synthetic (or real COCO-Tasks, or hand-edited) task files
    replaced them without a word; its own files from an earlier run are replaced as before."""
    from toist_core.data.synth import generate

    folder, train, test, spec = coco
    out = folder / "mixed"
    generate(out, tasks=[1], splits=("train",), images_per_split=2, min_size=64, max_size=64, seed=0)
    theirs = out / "annotations" / "task_1_train.json"
    before = theirs.read_bytes()
    with pytest.raises(FileExistsError, match=r"would replace task files toist convert-coco did not write: .*"
                                              r"task_1_train\.json; .*--overwrite"):
        convert_coco(train, "train", spec, out)
    assert theirs.read_bytes() == before and not (out / "annotations" / "task_2_train.json").exists()
    convert_coco(train, "train", spec, out, overwrite=True)
    assert _flags(theirs) == {10: 1, 11: 0, 12: 0, 13: 1}
    convert_coco(train, "train", spec, out)  # its own files: replaced again without --overwrite
    assert _flags(out / "annotations" / "task_2_train.json") == {10: 0, 11: 0, 12: 1, 13: 0}


def test_image_dir_without_copying_is_refused(coco, capsys):
    """--image-dir is where --copy-images-from copies to; alone it did nothing, silently."""
    folder, train, _, spec = coco
    with pytest.raises(ValueError, match=r"image_dir \(--image-dir\) 'pics' is where the images are copied to, so it "
                                         r"needs copy_images_from \(--copy-images-from DIR\)"):
        convert_coco(train, "train", spec, folder / "out", image_dir="pics")
    assert not (folder / "out").exists()
    assert cli.main(["convert-coco", "--coco", str(train), "--split", "train", "--tasks", str(spec),
                     "--out", str(folder / "out"), "--image-dir", "pics"]) == 2
    err = capsys.readouterr().err
    assert "toist convert-coco: error: image_dir (--image-dir) 'pics'" in err and "Traceback" not in err
    assert not (folder / "out").exists()


def test_preferred_objects_training_skips_are_said(coco):
    """CVAT's COCO export marks every mask iscrowd 1, and a box can be empty or outside the image:
    training skips such objects, so a task could train on no target at all, without a word."""
    folder, train, _, spec = coco

    def edit(data):
        data["annotations"][0]["iscrowd"] = 1             # id 10, tape cutter: preferred by task 1
        data["annotations"][3]["bbox"] = [30, 6, 0, 20]    # id 13, stool: preferred by task 1

    warnings = convert_coco(_edited(train, edit), "train", spec, folder / "out").warnings
    crowd = [w for w in warnings if "crowd annotations" in w]
    empty = [w for w in warnings if "empty inside the image" in w]
    assert len(crowd) == 1 and crowd[0].startswith("task 1: 1 preferred object(s)") and "ids 10" in crowd[0]
    assert "set iscrowd to 0" in crowd[0]
    assert len(empty) == 1 and empty[0].startswith("task 1: 1 preferred object(s)") and "ids 13" in empty[0]
    assert not [w for w in convert_coco(train, "train", spec, folder / "again").warnings
                if "crowd" in w or "empty inside" in w]


def test_targets_whose_box_or_mask_misleads_the_evaluation_or_the_mask_head_are_said(coco):
    """A box reaching past the image (training clips it, the evaluation scored the exact visible
    box of the object as missed: AP 0), a box far from its own mask (an exporter writing x0, y0,
    x1, y1), a polygon without area (an empty mask target): converted without a word."""
    folder, train, _, spec = coco

    def edit(data):
        data["annotations"][0]["bbox"] = [-3, 4, 19, 16]                        # id 10: past the image's left
        data["annotations"][3]["bbox"] = [2, 26, 20, 20]                        # id 13: not where its mask is
        data["annotations"][2]["segmentation"] = [[8, 20, 12, 24, 16, 28]]      # id 12: a line, no pixel

    warnings = convert_coco(_edited(train, edit), "train", spec, folder / "out").warnings
    past = [w for w in warnings if "reaching past the image" in w]
    astray = [w for w in warnings if "far from their own mask" in w]
    no_pixel = [w for w in warnings if "a mask that covers no pixel" in w]
    assert len(past) == 1 and past[0].startswith("task 1: 1 preferred object(s)") and "ids 10)" in past[0]
    assert len(astray) == 1 and astray[0].startswith("task 1: 1 preferred object(s)") and "ids 13)" in astray[0]
    assert "[x0, y0, x1, y1]" in astray[0]
    assert len(no_pixel) == 1 and no_pixel[0].startswith("task 2: 1 preferred object(s)") and "ids 12:" in no_pixel[0]
    # Objects no task prefers are no target: not looked at. The fixture's own file: nothing said.
    assert not [w for w in convert_coco(train, "train", spec, folder / "again").warnings
                if "past the image" in w or "far from" in w or "no pixel" in w]

    # Nor for small and thin objects whose box COCO takes from the polygon's outline while the
    # mask is drawn in whole pixels (a box IoU test took them for wrong boxes).
    def small(data):
        data["annotations"][0].update(segmentation=[[4, 10.5, 34, 10.5, 34, 11.5, 4, 11.5]],
                                      bbox=[4, 10.5, 30, 1], area=30.0)           # id 10: a 30 x 1 bar
        data["annotations"][3].update(segmentation=[[30.6, 6.6, 33.4, 6.6, 30.6, 9.4]],
                                      bbox=[30.6, 6.6, 2.8, 2.8], area=3.9)       # id 13: a 2.8 px triangle

    assert not [w for w in convert_coco(_edited(train, small), "train", spec, folder / "small").warnings
                if "past the image" in w or "far from" in w or "no pixel" in w]


def test_a_file_or_folder_in_the_way_is_refused_before_anything_is_written(coco):
    """Task files were written first and the images copied after: a file where the image folder
    goes left task files naming images that were never copied (and a folder where a task file
    goes, the task files before it)."""
    folder, train, _, spec = coco
    out = folder / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "train").write_text("not a folder")
    with pytest.raises(DataError, match=r"images/train: a file is where the copied images' folder goes"):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert not (out / "annotations").exists()
    (out / "images" / "train").unlink()
    (out / "annotations").write_text("not a folder")   # the images were copied, then "File exists"
    with pytest.raises(DataError, match=r"out/annotations: a file is where the task files' folder goes \(--out\)"):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert not (out / "images" / "train").exists()
    (out / "annotations").unlink()
    (out / "annotations" / "task_2_train.json").mkdir(parents=True)
    with pytest.raises(DataError, match=r"task_2_train.json: a folder is where this task file goes"):
        convert_coco(train, "train", spec, out, copy_images_from=folder, overwrite=True)
    assert not (out / "annotations" / "task_1_train.json").exists() and not (out / "images" / "train").exists()



def test_messages_for_a_file_without_categories_and_an_absolute_image_name(coco):
    folder, train, _, spec = coco
    empty = _edited(train, lambda d: d.update(categories=[], annotations=[]))
    with pytest.raises(DataError, match=r"'tape cutter' is not a category of .*edited.json; it has no category at all$"):
        convert_coco(empty, "train", spec, folder / "out")
    absolute = _edited(train, lambda d: d["images"][0].update(file_name=str(folder / "pics" / "img_1.png")))
    with pytest.raises(DataError) as info:
        convert_coco(absolute, "train", spec, folder / "out", copy_images_from=folder)
    assert str(info.value) == (f"{str(folder / 'pics' / 'img_1.png')!r} must be a relative path inside the image "
                               f"folder to copy it (images[0] (id 1), field 'file_name' in {absolute})")


def test_an_image_whose_size_is_not_its_records_is_refused_before_anything_is_written(coco):
    """The dataset refuses it when it reads the sample, hours into training; with the images
    at hand (--copy-images-from) the conversion reads their headers. A phone photo whose EXIF
    orientation turns it was annotated turned: the message says so."""
    from PIL import Image

    folder, train, _, spec = coco
    out = folder / "out"
    picture = folder / "pics" / "img_2.png"
    assert cv2.imwrite(str(picture), np.zeros((H + 1, W, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"img_2.png: image is {H + 1}x{W} \(height x width\) but the record says "
                                        rf"{H}x{W} \(fields 'height'/'width' of images\[1\] \(id 2\)"):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert not out.exists()

    turned = folder / "pics" / "img_2.jpg"   # stored W x H, displayed a quarter turned: H x W
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (H, W)).save(turned, exif=exif)
    data = json.loads(train.read_text())
    data["images"][1]["file_name"] = "pics/img_2.jpg"
    phone = train.with_name("phone.json")
    phone.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"EXIF orientation \(6\) turns it a quarter.*exif_transpose"):
        convert_coco(phone, "train", spec, out, copy_images_from=folder)
    assert not out.exists()

    # A BMP named .jpg: the suffix passes, torchvision's decoder does not (refused at the first read).
    Image.new("RGB", (W, H)).save(turned, format="BMP")
    with pytest.raises(DataError, match=r"img_2.jpg: training and evaluation decode JPEG, PNG, GIF and WebP only "
                                        r".*this file is BMP although named .jpg: convert it.*\(images\[1\] \(id 2\)"):
        convert_coco(phone, "train", spec, out, copy_images_from=folder)
    assert not out.exists()

    turned.write_bytes(b"\xff\xd8 cut short")
    with pytest.raises(DataError, match=r"img_2.jpg: cannot read the image \(images\[1\] \(id 2\)"):
        convert_coco(phone, "train", spec, out, copy_images_from=folder)
    assert not out.exists()

    # Cut short after its header (an interrupted copy): the header read passed it, and training
    # failed at its first read.
    whole = folder / "whole.png"
    assert cv2.imwrite(str(whole), np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    picture.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"img_2.png: cannot decode image \(images\[1\] \(id 2\).*cut short"):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert not out.exists()

    # A damaged header PIL reads with a ValueError ("Truncated IHDR chunk"): a bare error naming no file.
    damaged = bytearray(whole.read_bytes())
    damaged[11] = 12   # the IHDR chunk's length
    picture.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"img_2.png: cannot read the image \(images\[1\] \(id 2\).*IHDR"):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    assert not out.exists()


def test_another_picture_at_a_copy_destination_is_refused_unless_overwrite(coco):
    """Train and test exports both with pics/img_1.png copied to one --image-dir: the test
    picture replaced the train one under the train annotations, silently. A re-run over its own
    copies goes on."""
    folder, train, _, spec = coco
    out = folder / "out"
    convert_coco(train, "train", spec, out, copy_images_from=folder, image_dir="images")
    copied = out / "images" / "pics" / "img_1.png"
    ours = copied.read_bytes()
    convert_coco(train, "train", spec, out, copy_images_from=folder, image_dir="images")   # its own copies
    other = folder / "other"
    shutil.copytree(folder / "pics", other / "pics")                  # the same pictures but one
    assert cv2.imwrite(str(other / "pics" / "img_1.png"), np.full((H, W, 3), 200, dtype=np.uint8))
    with pytest.raises(FileExistsError, match=rf"{copied}: 1 image\(s\) where this conversion copies its images hold "
                                              r"other pictures .*nothing was written"):
        convert_coco(train, "test", spec, out, copy_images_from=other, image_dir="images")
    assert copied.read_bytes() == ours and not (out / "annotations" / "task_1_test.json").exists()
    convert_coco(train, "test", spec, out, copy_images_from=other, image_dir="images", overwrite=True)
    assert copied.read_bytes() == (other / "pics" / "img_1.png").read_bytes()


@pytest.mark.parametrize("tasks, says", [
    ([{"id": 1, "phrase": "cut tape with", "preferred_categories": ["mug"]},
      {"id": 3, "phrase": "drink coffee from", "preferred_categories": ["mug"]}], r"tasks\[1\]: id: expected 2"),
    ([{"id": 1, "phrase": "cut tape with", "preferred_categories": ["mug"]},
      {"id": 2, "preferred_categories": ["mug"]}], "phrase"),
])
def test_a_specification_with_phrases_that_training_would_refuse_is_warned_about(coco, tasks, says):
    """The same file is the converter's specification and training's vocabulary: one that
    training would refuse as a vocabulary was converted without a word. (A specification for
    COCO-Tasks ids with their phrases kept for readability is fine: converted, with the warning.)"""
    import yaml

    folder, train, _, _ = coco
    spec = folder / "own.yaml"
    spec.write_text(yaml.safe_dump({"tasks": tasks}))
    summary = convert_coco(train, "train", spec, folder / "out")
    assert [w for w in summary.warnings if re.search(rf"own.yaml.*{says}.*training would refuse this file", w)]
    plain = folder / "plain.yaml"
    plain.write_text(yaml.safe_dump({"tasks": [{k: v for k, v in t.items() if k != "phrase"} for t in tasks]}))
    assert not [w for w in convert_coco(train, "train", plain, folder / "out2").warnings if "vocabulary" in w]


def test_two_pictures_of_one_size_and_time_are_told_apart_and_a_huge_image_header_is_read(coco):
    """Size and modification time alone took two different pictures for one (the copy skipped,
    even with --overwrite); a 180-megapixel aerial tile stopped the header check with PIL's
    decompression-bomb error, a traceback (the conversion decodes what it copies, with PIL's
    limit lifted as well)."""
    import os
    import struct
    import zlib

    folder, train, _, spec = coco
    out = folder / "out"
    stored = [cv2.IMWRITE_PNG_COMPRESSION, 0]   # uncompressed: the file size depends on the image size only
    assert cv2.imwrite(str(folder / "pics" / "img_1.png"), np.full((H, W, 3), 10, np.uint8), stored)
    convert_coco(train, "train", spec, out, copy_images_from=folder, image_dir="images")
    copied = out / "images" / "pics" / "img_1.png"
    other = folder / "other"
    shutil.copytree(folder / "pics", other / "pics")
    picture = other / "pics" / "img_1.png"
    assert cv2.imwrite(str(picture), np.full((H, W, 3), 250, np.uint8), stored)
    assert picture.stat().st_size == copied.stat().st_size and picture.read_bytes() != copied.read_bytes()
    stamp = copied.stat().st_mtime
    os.utime(picture, (stamp, stamp))
    with pytest.raises(FileExistsError, match="hold other pictures"):
        convert_coco(train, "test", spec, out, copy_images_from=other, image_dir="images")
    convert_coco(train, "test", spec, out, copy_images_from=other, image_dir="images", overwrite=True)
    assert copied.read_bytes() == picture.read_bytes()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    from toist_core.data.schema import check_image_size

    huge = folder / "tile.png"   # a header only: 15000 x 12000 (the header check never decodes it)
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 12000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    check_image_size(huge, 12000, 15000, "the tile")   # the dataset's check_images: no decompression-bomb error
    with pytest.raises(DataError, match=r"tile.png: image is 12000x15000 \(height x width\) but the record says"):
        check_image_size(huge, 15000, 12000, "the tile")
    coco_data = json.loads(train.read_text())
    coco_data["images"][0].update(file_name="tile.png", height=12000, width=15000)
    coco_data["annotations"] = [a for a in coco_data["annotations"] if a["image_id"] != coco_data["images"][0]["id"]]
    tile = folder / "tile.json"
    tile.write_text(json.dumps(coco_data))
    # The conversion decodes what it copies: a header without pixels is a file cut short.
    with pytest.raises(DataError, match=r"tile.png: cannot decode image .*cut short"):
        convert_coco(tile, "train", spec, folder / "out3", copy_images_from=folder)
    assert not (folder / "out3").exists()


def test_preferred_instances_may_be_given_per_split(coco):
    """Annotation ids of a list apply to every split: an export numbering its ids from 1 (CVAT,
    per export) gave another object the same id in the other split, which became preferred too,
    without a word. Per split, each file prefers its own."""
    folder, train, test, _ = coco
    spec = _spec(folder, """\
tasks:
  - id: 2
    phrase: "drink coffee from"
    preferred_instances: {train: [12], test: [21, 77]}
""")
    out = folder / "per_split"
    train_summary = convert_coco(train, "train", spec, out)
    test_summary = convert_coco(test, "test", spec, out)
    assert _flags(out / "annotations" / "task_2_train.json") == {10: 0, 11: 0, 12: 1, 13: 0}
    assert _flags(out / "annotations" / "task_2_test.json") == {20: 0, 21: 1}
    assert not [w for w in train_summary.warnings if "are not annotations" in w]
    assert [w for w in test_summary.warnings if "preferred_instances of this split 77 are not annotations" in w]
    # The list form still applies to every split, and says how to give them per split.
    listed = _spec(folder, "tasks:\n  - id: 2\n    preferred_instances: [12, 21]\n")
    warnings = convert_coco(train, "train", listed, folder / "listed").warnings
    assert _flags(folder / "listed" / "annotations" / "task_2_train.json")[12] == 1
    assert [w for w in warnings if "give them per split, {train: [...], test: [...]}" in w]
    # A split the mapping does not name (misspelt, or another case) is said, not skipped silently;
    # a year as the split name is read as one (YAML reads `2017:` as a number).
    misspelt = _spec(folder, "tasks:\n  - id: 2\n    preferred_instances: {trian: [12], test: [21]}\n")
    warnings = convert_coco(train, "train", misspelt, folder / "misspelt").warnings
    assert [w for w in warnings if "names the splits 'test', 'trian', not 'train': no single object is preferred" in w]
    year = _spec(folder, "tasks:\n  - id: 2\n    preferred_instances: {2017: [12]}\n")
    convert_coco(train, "2017", year, folder / "year")
    assert _flags(folder / "year" / "annotations" / "task_2_2017.json")[12] == 1
    bad = _spec(folder, "tasks:\n  - id: 2\n    preferred_instances: {train/x: [1]}\n")
    with pytest.raises(DataError, match=r"field 'preferred_instances': keys are split names .*'train/x'"):
        convert_coco(train, "train", bad, folder / "bad")
    bad = _spec(folder, "tasks:\n  - id: 2\n    preferred_instances: {train: [one]}\n")
    with pytest.raises(DataError, match=r"field 'preferred_instances': field 'train'\[0\]: expected one of annotation "
                                        r"ids \(integers\), got 'one'"):
        convert_coco(train, "train", bad, folder / "bad")
    assert not (folder / "bad").exists()


def test_a_copy_cut_short_leaves_no_part_of_the_picture(coco, monkeypatch):
    """shutil.copy2 wrote in place: a copy interrupted half-way left half a picture, which the
    re-run took for another picture ("hold other pictures"), with --overwrite the only way on."""
    import toist_core.data.convert_coco as convert

    folder, train, _, spec = coco
    out = folder / "out"
    real = shutil.copyfileobj

    def cut_short(source, target, length=0):
        target.write(source.read(20))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.shutil, "copyfileobj", cut_short)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(train, "train", spec, out, copy_images_from=folder)
    copied = out / "images" / "train" / "pics"
    assert not copied.exists() or not [p for p in copied.rglob("*") if p.is_file()]   # nor a temporary file
    monkeypatch.setattr(convert.shutil, "copyfileobj", real)
    source = folder / "pics" / "img_1.png"
    source.chmod(0o600)   # an owner-only download: the copy took that mode, unreadable to another user
    try:
        summary = convert_coco(train, "train", spec, out, copy_images_from=folder)
    finally:
        source.chmod(0o644)
    assert summary.images_copied == 3
    assert (copied / "img_1.png").read_bytes() == source.read_bytes()
    assert (copied / "img_1.png").stat().st_mode & 0o044 == 0o044
    assert (copied / "img_1.png").stat().st_mtime_ns == source.stat().st_mtime_ns


def test_category_names_match_whatever_their_unicode_form(coco):
    """A name typed in one Unicode form (NFC "Café") and exported in the other (NFD: "e" and a
    combining accent) looked the same and was refused with "did you mean 'Café'?"."""
    import unicodedata

    folder, train, _, _ = coco
    data = json.loads(train.read_text())
    data["categories"][2]["name"] = unicodedata.normalize("NFD", "Café mug")
    exported = train.with_name("nfd.json")
    exported.write_text(json.dumps(data))
    spec = _spec(folder, 'tasks:\n  - id: 1\n    phrase: "drink from"\n    preferred_categories: ["Café mug"]\n')
    assert unicodedata.normalize("NFC", "Café mug") in spec.read_text()
    convert_coco(exported, "train", spec, folder / "out")
    assert _flags(folder / "out" / "annotations" / "task_1_train.json") == {10: 0, 11: 1, 12: 1, 13: 0}


def test_a_name_holding_a_lone_surrogate_is_refused_or_kept_as_its_bytes(coco):
    """JSON's "\\ud800" escape is no character: such a class name passed every check, the images
    were copied, and writing the task file failed with a bare UnicodeEncodeError; so did a file
    name (or the COCO file's own name) holding a byte that is not UTF-8, as os.fsdecode reads it,
    which names a real file and is kept (written with JSON's escape)."""
    folder, train, _, spec = coco
    data = json.loads(train.read_text())
    data["categories"][0]["name"] = "mug \ud800"
    source = train.with_name("surrogate_name.json")
    source.write_text(json.dumps(data))   # ensure_ascii: the escape, as an exporter may write it
    with pytest.raises(DataError, match=rf"{source}: categories\[0\] \(id \d+\): field 'name': expected a "
                                        r"non-empty string of characters \(no lone surrogate escape\)"):
        convert_coco(source, "train", spec, folder / "out_name", copy_images_from=folder)
    assert not (folder / "out_name").exists()
    data = json.loads(train.read_text())
    data["images"][0]["file_name"] = os.fsdecode(b"caf\xe9.png")
    latin = train.with_name(os.fsdecode(b"instances_\xff.json"))
    latin.write_text(json.dumps(data))
    convert_coco(latin, "train", spec, folder / "out_latin")
    task_file = folder / "out_latin" / "annotations" / "task_1_train.json"
    written = json.loads(task_file.read_text())
    assert written["images"][0]["file_name"] == os.fsdecode(b"caf\xe9.png")
    assert os.fsdecode(b"instances_\xff.json") in written["info"]
    assert load_task_file(task_file).images[0].file_name == os.fsdecode(b"caf\xe9.png")


def test_a_rerun_with_fewer_tasks_says_which_earlier_task_files_are_left(coco):
    """Task 2 taken out of the specification: its task file of the last conversion stayed beside
    the new ones without a word, and a run naming task 2 trained on it."""
    folder, train, test, spec = coco
    out = folder / "fewer"
    convert_coco(train, "train", spec, out)
    convert_coco(test, "test", spec, out)
    one = folder / "one_task.yaml"
    one.write_text(SPEC.split("  - id: 2")[0])
    summary = convert_coco(train, "train", one, out)
    left = out / "annotations" / "task_2_train.json"
    assert [w for w in summary.warnings if w.startswith(f"{left}: written by an earlier conversion for tasks "
                                                        f"{one} no longer has")], summary.warnings
    assert not [w for w in summary.warnings if "task_2_test.json" in w]   # another split: not this run's
