"""Synthetic COCO-Tasks generator: schema, layout, determinism, preference structure, drawn masks."""

import contextlib
import io
import json
import os
import re

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from toist_core import cli
from toist_core.cli.synth import parse_task_list
from toist_core.data.schema import load_task_file
from toist_core.data.synth import SYNTH_CLASSES, TASK_PREFERENCES, generate

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGES = 12


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    summary = generate(root, images_per_split=IMAGES, seed=11, image_format="png")
    return root, summary


def _coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_layout_and_schema(full):
    root, summary = full
    assert len(summary.annotation_files) == 28
    ids = {}
    for split, folder in (("train", "train2014"), ("test", "val2014")):
        for task in range(1, 15):
            path = root / "annotations" / f"task_{task}_{split}.json"
            data = json.loads(path.read_text())
            assert set(data) == {"info", "images", "annotations", "categories"}
            assert data["categories"] == [{"id": 0, "name": "non_preferred"}, {"id": 1, "name": "preferred"}]
            for image in data["images"]:
                assert re.fullmatch(rf"COCO_{folder}_\d{{12}}\.png", image["file_name"])
                assert (root / "images" / folder / image["file_name"]).is_file()
            for ann in data["annotations"]:
                assert set(ann) == {"id", "image_id", "bbox", "segmentation", "area", "iscrowd",
                                    "COCO_category_id", "category_id"}
                assert ann["category_id"] in (0, 1) and ann["iscrowd"] == 0
            load_task_file(path)  # passes the strict schema
        ids[split] = {i["id"] for i in data["images"]}
    assert len(ids["train"]) == len(ids["test"]) == IMAGES and not ids["train"] & ids["test"]
    # An object keeps its annotation id (and geometry) across tasks; only category_id changes.
    a = json.loads((root / "annotations" / "task_1_test.json").read_text())["annotations"]
    b = json.loads((root / "annotations" / "task_9_test.json").read_text())["annotations"]
    assert [x["id"] for x in a] == [x["id"] for x in b]
    assert all(x["bbox"] == y["bbox"] for x, y in zip(a, b))


def test_preference_structure(full):
    root, _ = full
    names = {c.coco_id: c.name for c in SYNTH_CLASSES}
    totals = {"none": 0, "some": 0, "multi_class": 0}
    for task in range(1, 15):
        coco = _coco(root / "annotations" / f"task_{task}_train.json")
        for image_id, anns in ((i, coco.imgToAnns[i]) for i in coco.getImgIds()):
            present = [names[a["COCO_category_id"]] for a in anns]
            best = next((n for n in TASK_PREFERENCES[task] if n in present), None)
            for ann in anns:
                assert ann["category_id"] == int(names[ann["COCO_category_id"]] == best)
            totals["none" if best is None else "some"] += 1
            totals["multi_class"] += len(set(present)) > 1
    assert totals["none"] > 0 and totals["some"] > 0 and totals["multi_class"] > 0


def test_deterministic_and_subset_stable(full, tmp_path):
    root, _ = full
    generate(tmp_path / "again", tasks=[3], splits=("test",), images_per_split=IMAGES, seed=11, image_format="png")
    same = (tmp_path / "again" / "annotations" / "task_3_test.json").read_bytes()
    assert same == (root / "annotations" / "task_3_test.json").read_bytes()
    for path in (root / "images" / "val2014").iterdir():
        assert (tmp_path / "again" / "images" / "val2014" / path.name).read_bytes() == path.read_bytes()
    generate(tmp_path / "other", tasks=[3], splits=("test",), images_per_split=IMAGES, seed=12, image_format="png")
    assert (tmp_path / "other" / "annotations" / "task_3_test.json").read_bytes() != same


def test_images_per_task_subset(tmp_path):
    summary = generate(tmp_path, tasks=[1, 2], splits=("test",), images_per_split=10, images_per_task=4, seed=0)
    one = json.loads((tmp_path / "annotations" / "task_1_test.json").read_text())["images"]
    two = json.loads((tmp_path / "annotations" / "task_2_test.json").read_text())["images"]
    assert len(one) == len(two) == 4 and summary.num_images["test"] == 10
    assert [i["id"] for i in one] != [i["id"] for i in two]
    assert one[0]["file_name"].endswith(".jpg")


def test_masks_match_the_drawn_objects(full):
    """Visible masks of one image do not overlap, and solid objects show their class colour."""
    root, _ = full
    coco = _coco(root / "annotations" / "task_1_test.json")
    colours = {c.coco_id: np.array(c.colour) for c in SYNTH_CLASSES if c.texture == "solid"}
    checked = 0
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        rgb = cv2.cvtColor(cv2.imread(str(root / "images" / "val2014" / info["file_name"])), cv2.COLOR_BGR2RGB)
        masks = [coco.annToMask(a).astype(bool) for a in coco.imgToAnns[image_id]]
        if len(masks) > 1:
            overlap = np.sum(np.stack(masks), axis=0) > 1
            assert overlap.sum() <= 0.02 * sum(m.sum() for m in masks)
        for ann, mask in zip(coco.imgToAnns[image_id], masks):
            x, y, w, h = ann["bbox"]
            assert abs(mask.sum() - ann["area"]) < 1e-6
            ys, xs = np.nonzero(mask)
            assert xs.min() >= np.floor(x) - 1 and xs.max() <= x + w + 1
            if ann["COCO_category_id"] in colours and mask.sum() > 50:
                inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                mean = rgb[inner].mean(axis=0)
                assert np.abs(mean - colours[ann["COCO_category_id"]]).max() < 25
                checked += 1
    assert checked > 0


def test_cli(tmp_path, capsys):
    assert parse_task_list(["1-3", "7,9"]) == [1, 2, 3, 7, 9]
    with pytest.raises(ValueError, match="1..14"):
        parse_task_list(["0-2"])
    # A reversed range was "ids must be 1..14, got none".
    with pytest.raises(ValueError, match=r"^--tasks: '3-1' is an empty range \(did you mean 1-3\?\)$"):
        parse_task_list(["2", "3-1"])
    with pytest.raises(ValueError, match=r"cannot read '1-x'"):
        parse_task_list(["1-x"])
    code = cli.main(["synth", str(tmp_path), "--tasks", "4", "5", "--splits", "test", "--images-per-split", "3",
                       "--seed", "2", "--max-size", "200"])
    assert code == 0
    assert "wrote 2 task files and 3 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["task_4_test.json", "task_5_test.json"]
    assert cli.main(["synth", str(tmp_path / "x"), "--min-size", "8"]) == 2


def test_empty_fraction_keeps_every_image_with_preferred_objects(tmp_path):
    everything = generate(tmp_path / "all", tasks=[1, 3], splits=("train",), images_per_split=60, seed=4)
    chosen = generate(tmp_path / "mostly", tasks=[1, 3], splits=("train",), images_per_split=60, seed=4,
                      empty_fraction=0.1)
    for task in (1, 3):
        full = json.loads((tmp_path / "all" / "annotations" / f"task_{task}_train.json").read_text())
        part = json.loads((tmp_path / "mostly" / "annotations" / f"task_{task}_train.json").read_text())
        with_preferred = {a["image_id"] for a in full["annotations"] if a["category_id"] == 1}
        listed = {i["id"] for i in part["images"]}
        assert with_preferred <= listed and len(full["images"]) == 60
        empty = len(listed - with_preferred)
        assert empty == round(0.1 / 0.9 * len(with_preferred))
        assert chosen.images_with_preferred[(task, "train")] == everything.images_with_preferred[(task, "train")]
    with pytest.raises(ValueError, match="empty_fraction"):
        generate(tmp_path / "bad", tasks=[1], splits=("train",), images_per_split=4, empty_fraction=1.0)
    # A task none of whose images shows a preferred object: its file lists no image (no sample to
    # train or score), which was written without a word.
    with pytest.warns(UserWarning, match=r"task_\d+_train.json: lists no image: none of the 2 images of the train "
                                         r"split shows a preferred object of task \d+"):
        few = generate(tmp_path / "few", tasks=list(range(1, 15)), splits=("train",), images_per_split=2, seed=0,
                       empty_fraction=0.5)
    assert 0 in few.images_with_preferred.values()


def test_an_object_whose_mask_covers_no_pixel_is_no_annotation(tmp_path):
    """In 16 px images a thin knife was written as a preferred target with area 0 and a polygon
    that covers no pixel (convert-coco warns about such a mask in a user's files)."""
    generate(tmp_path, tasks=list(range(1, 15)), splits=("train",), images_per_split=100, seed=0, min_size=16,
             max_size=16)
    areas = [a["area"] for path in (tmp_path / "annotations").glob("*.json")
             for a in json.loads(path.read_text())["annotations"]]
    assert areas and min(areas) > 0
    # The scenes the demo judges against count the same objects as the task files.
    from toist_core.data.synth import scene

    per_image = {i["id"]: 0 for i in json.loads((tmp_path / "annotations" / "task_1_train.json").read_text())["images"]}
    for a in json.loads((tmp_path / "annotations" / "task_1_train.json").read_text())["annotations"]:
        per_image[a["image_id"]] += 1
    assert [len(scene("train", i, 0, 16, 16)[1]) for i in range(100)] == list(per_image.values())


def test_refuses_to_overwrite_files_it_did_not_write(tmp_path, capsys):
    """Task files or a synth.json of someone else stop synth before it writes anything; its own output
    is rewritten (e.g. a second split generated into the same root), and --overwrite forces it."""
    small = dict(tasks=[1], splits=("test",), images_per_split=2, min_size=32, max_size=48)
    own = tmp_path / "annotations" / "task_1_test.json"
    own.parent.mkdir()
    own.write_text('{"info": "my labels", "images": [], "annotations": []}')
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path}: holds files toist synth did not write: {own}; "
                                                        "refusing to overwrite them") + ".*--overwrite"):
        generate(tmp_path, **small)
    assert own.read_text() == '{"info": "my labels", "images": [], "annotations": []}'
    assert not (tmp_path / "images").exists() and not (tmp_path / "synth.json").exists()
    assert cli.main(["synth", str(tmp_path), "--tasks", "1", "--splits", "test", "--images-per-split", "2",
                     "--min-size", "32", "--max-size", "48"]) == 2
    assert "did not write" in capsys.readouterr().err and "my labels" in own.read_text()

    generate(tmp_path, overwrite=True, **small)
    assert json.loads(own.read_text())["info"] == "COCO-Tasks Dataset. (synthetic: toist synth)"
    generate(tmp_path, seed=1, **small)  # synth's own files: rewritten without asking
    generate(tmp_path, **dict(small, splits=("train",)))

    (tmp_path / "synth.json").write_text('{"notes": "mine"}')
    with pytest.raises(FileExistsError, match="synth.json"):
        generate(tmp_path, **small)
    assert cli.main(["synth", str(tmp_path), "--tasks", "1", "--splits", "test", "--images-per-split", "2",
                     "--min-size", "32", "--max-size", "48", "--overwrite"]) == 0
    assert "task_preferences" in json.loads((tmp_path / "synth.json").read_text())
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_redrawing_a_split_refuses_to_leave_other_tasks_files_describing_old_images(tmp_path, capsys):
    """Re-running synth on its own root with another seed (or sizes, object counts) and fewer
    tasks left the other tasks' files of the split labelling images that had been redrawn."""
    small = dict(splits=("test",), images_per_split=3, min_size=48, max_size=64)
    generate(tmp_path, tasks=[1, 2, 3], seed=0, **small)
    annotations = tmp_path / "annotations"
    before = {p.name: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    stale = [annotations / "task_2_test.json", annotations / "task_3_test.json"]
    for other in (dict(seed=1), dict(max_size=80), dict(max_objects=2)):
        with pytest.raises(FileExistsError, match=re.escape(f"{stale[0]}, {stale[1]} were written with other") +
                           ".*--overwrite"):
            generate(tmp_path, tasks=[1], **{**small, **other})
        assert {p.name: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert cli.main(["synth", str(tmp_path), "--tasks", "1", "--splits", "test", "--images-per-split", "3",
                     "--min-size", "48", "--max-size", "64", "--seed", "1"]) == 2
    assert "task_2_test.json" in capsys.readouterr().err

    # Drawn as before: a task is added (or rewritten) without asking; another split is independent.
    generate(tmp_path, tasks=[4], seed=0, **small)
    generate(tmp_path, tasks=[1], seed=5, **dict(small, splits=("train",)))
    assert (annotations / "task_4_test.json").is_file() and (annotations / "task_2_test.json").is_file()
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["splits"]["test"]["seed"] == 0 and meta["splits"]["train"]["seed"] == 5
    # Every task file of the split rewritten: nothing left to describe the old images.
    generate(tmp_path, tasks=[1, 2, 3, 4], seed=2, **small)
    # --overwrite removes synth's own stale files (not others').
    generate(tmp_path, tasks=[1], seed=3, overwrite=True, **small)
    assert sorted(p.name for p in annotations.iterdir()) == ["task_1_test.json", "task_1_train.json"]
    assert json.loads((tmp_path / "synth.json").read_text())["splits"]["test"]["seed"] == 3


def test_a_run_cut_short_leaves_its_split_unrecorded_and_no_cut_off_image(tmp_path, monkeypatch):
    """synth.json was written at the end only: a run stopped while redrawing a split left the
    previous run's record of it, so a later run drawn as that one took the other tasks' old files
    (labelling redrawn images) as current; and an image was written in place, cut off by a kill."""
    import toist_core.data.synth as synth

    small = dict(images_per_split=3, min_size=48, max_size=48)
    generate(tmp_path, tasks=[1, 2], splits=("train", "test"), seed=0, **small)
    renamed = []
    real = os.replace

    def stopped_in_the_test_split(src, dst):   # as the second test image is renamed in
        if str(dst).endswith(".jpg") and "val2014" in str(dst):
            renamed.append(dst)
            if len(renamed) == 2:
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(synth.os, "replace", stopped_in_the_test_split)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, tasks=[1, 2], splits=("train", "test"), seed=1, **small)
    monkeypatch.undo()
    splits = json.loads((tmp_path / "synth.json").read_text())["splits"]
    assert splits["train"]["seed"] == 1 and "test" not in splits   # train redrawn whole; test neither
    assert not [p for p in tmp_path.rglob("*.partial")]   # the image being written: not left half
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'annotations' / 'task_2_test.json'} were "
                                                        "written with other (or unrecorded) drawing settings")):
        generate(tmp_path, tasks=[1], splits=("test",), seed=0, **small)
    # Cut short while drawing a split as it was drawn: its images come out the same, its record
    # stands, and a run of fewer tasks goes on (it was refused, and --overwrite offered).
    generate(tmp_path, tasks=[1, 2], splits=("test",), seed=1, **small)
    renamed.clear()
    monkeypatch.setattr(synth.os, "replace", stopped_in_the_test_split)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, tasks=[1], splits=("test",), seed=1, **small)
    monkeypatch.undo()
    generate(tmp_path, tasks=[1], splits=("test",), seed=1, **small)


def test_a_synth_json_without_drawing_settings_counts_as_other_settings(tmp_path):
    """A root written by an older synth records no drawing settings: its other tasks' files of a
    redrawn split cannot be told current, so they are refused too."""
    small = dict(splits=("test",), images_per_split=2, min_size=32, max_size=48)
    generate(tmp_path, tasks=[1, 2], **small)
    meta = json.loads((tmp_path / "synth.json").read_text())
    del meta["splits"]
    (tmp_path / "synth.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="task_2_test.json were written with other \\(or unrecorded\\)"):
        generate(tmp_path, tasks=[1], **small)
    generate(tmp_path, tasks=[1, 2], **small)
    generate(tmp_path, tasks=[1], **small)  # recorded now


@pytest.mark.parametrize("option, value, says", [
    ("--images-per-task", "0", r"images_per_task must be >= 1"),
    ("--images-per-task", "-2", r"images_per_task must be >= 1"),
    ("--seed", "-1", r"seed must be in 0..2\*\*32-1"),
    ("--max-size", "100000", r"need 16 <= min_size <= max_size <= 4096"),
])
def test_out_of_range_options_are_named(tmp_path, capsys, option, value, says):
    """They failed inside numpy (negative dimensions, a seed), ran out of memory with a traceback,
    or wrote task files listing no image."""
    assert cli.main(["synth", str(tmp_path / "out"), "--tasks", "1", "--images-per-split", "2", option, value]) == 2
    assert re.search(says, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_folder_name_that_is_not_utf8(tmp_path):
    """OpenCV's file writer killed the process (segmentation fault) under such a folder; Linux
    allows any bytes in a name."""
    root = tmp_path / os.fsdecode(b"donn\xe9es")  # Latin-1 "données"
    generate(root, tasks=[1], splits=("test",), images_per_split=2, seed=0, image_format="jpg")
    images = sorted((root / "images" / "val2014").iterdir())
    assert len(images) == 2
    for path in images:
        assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3
