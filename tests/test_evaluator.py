"""The paper's metric: per-task COCOeval (catIds=[1], all images) and its mean; tables, plots, files."""

import contextlib
import copy
import csv
import io
import json
import re

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from toist_core import cli
from toist_core.cli.evaluate import predict_tasks
from toist_core.data.schema import DataError
from toist_core.data.synth import generate
from toist_core.eval.evaluator import (default_backend, evaluate_task, evaluate_tasks, load_ground_truth,
                                       task_files)
from toist_core.eval.plots import plot_pr_curves
from toist_core.eval.predictions import (ImagePredictions, encode_masks, is_prediction_file, load_prediction_file,
                                         load_predictions, save_predictions)
from toist_core.eval.tables import csv_text, markdown_report, write_tables
from toist_core.tasks import COCO_TASKS, TASK_PHRASES

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TASKS = [2, 10, 14]
# The reference's pycocotools and the default (faster-coco-eval when installed).
BACKENDS = sorted({"pycocotools", default_backend()})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=TASKS, splits=("test",), images_per_split=20, seed=21)
    return root


def _perfect(gt: COCO) -> dict:
    preds = {}
    for image_id in gt.getImgIds():
        anns = [a for a in gt.imgToAnns[image_id] if a["category_id"] == 1]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        masks = encode_masks(np.stack([gt.annToMask(a) for a in anns])) if anns else []
        preds[image_id] = ImagePredictions(np.array(boxes).reshape(-1, 4), np.linspace(0.9, 0.5, len(anns)), masks)
    return preds


def _random(gt: COCO, rng: np.random.Generator) -> dict:
    """Noisy copies of all objects (preferred or not) plus random boxes, random scores."""
    preds = {}
    for image_id in gt.getImgIds():
        info = gt.imgs[image_id]
        h, w = info["height"], info["width"]
        boxes = []
        for a in gt.imgToAnns[image_id]:
            x, y, bw, bh = a["bbox"]
            boxes.append([x, y, x + bw, y + bh] + rng.normal(0, 0.12 * max(bw, bh), 4))
        for _ in range(int(rng.integers(0, 6))):
            x0, y0 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            boxes.append([x0, y0, x0 + rng.uniform(5, w - x0), y0 + rng.uniform(5, h - y0)])
        boxes = np.clip(np.array(boxes).reshape(-1, 4), 0, [w, h, w, h])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        masks = np.zeros((len(boxes), h, w), dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
            masks[k, y0:y1, x0:x1] = True
        preds[image_id] = ImagePredictions.from_arrays(boxes, rng.uniform(0, 1, len(boxes)), masks)
    return preds


def test_perfect_predictions_give_ap_one(root):
    files = task_files(root, TASKS)
    predictions = {t: _perfect(load_ground_truth(p)) for t, p in files.items()}
    result = evaluate_tasks(files, predictions)
    assert result.iou_types == ("bbox", "segm")
    for task in result.tasks:
        assert 0 < task.num_images_with_targets < task.num_images == 20
        for iou in ("bbox", "segm"):
            assert task.ap50[iou] == pytest.approx(1.0) and task.ap[iou] == pytest.approx(1.0)
            assert task.ap50_with_targets[iou] == pytest.approx(1.0)
    assert result.mean_ap50("bbox") == pytest.approx(1.0) and result.mean_ap50("segm") == pytest.approx(1.0)


def _hand_file(tmp_path):
    """Image 1: two preferred objects + one other object; image 2: nothing preferred."""
    def ann(id_, image, box, cat):
        x, y, w, h = box
        return {"id": id_, "image_id": image, "bbox": box, "area": float(w * h), "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "COCO_category_id": 62,
                "category_id": cat}
    data = {"info": "hand", "categories": [{"id": 0, "name": "non_preferred"}, {"id": 1, "name": "preferred"}],
            "images": [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 100},
                       {"id": 2, "file_name": "b.jpg", "height": 100, "width": 100}],
            "annotations": [ann(10, 1, [10, 10, 20, 20], 1), ann(11, 1, [60, 60, 30, 30], 1),
                            ann(12, 1, [40, 5, 20, 20], 0), ann(13, 2, [5, 5, 50, 50], 0)]}
    path = tmp_path / "task_3_test.json"
    path.write_text(json.dumps(data))
    return path


def test_hand_constructed_known_values(tmp_path):
    path = _hand_file(tmp_path)
    # Ranked: FP on the empty image (0.95), TP (0.9), FP on the non-preferred object (0.8).
    # One of two targets found -> recall 0.5 at precision 1/2 -> interpolated precision 0.5 on
    # the 51 recall thresholds 0.00..0.50, 0 beyond: AP = 0.5 * 51 / 101.
    preds = {1: ImagePredictions([[10, 10, 30, 30], [40, 5, 60, 25]], [0.9, 0.8]),
             2: ImagePredictions([[5, 5, 55, 55]], [0.95])}
    result = evaluate_task(path, preds, iou_types=["bbox"])
    assert result.task_id == 3 and result.num_targets == 2 and result.num_images_with_targets == 1
    assert result.ap50["bbox"] == pytest.approx(0.5 * 51 / 101)
    assert result.ap["bbox"] == pytest.approx(0.5 * 51 / 101)
    # Without the empty image's false positive, the TP ranks first: precision 1 up to recall 0.5.
    assert result.ap50_with_targets["bbox"] == pytest.approx(51 / 101)
    # Second target found with a slightly shifted box: IoU = 30*27/(30*30) = 0.9 -> AP@0.5 counts
    # it at rank 3 (precision 2/3 at recall 1).
    preds[1] = ImagePredictions([[10, 10, 30, 30], [40, 5, 60, 25], [60, 63, 90, 90]], [0.9, 0.8, 0.7])
    result = evaluate_task(path, preds, iou_types=["bbox"])
    # Ranks: FP, TP, FP, TP -> precision 0, 1/2, 1/3, 1/2 at recall 0, .5, .5, 1: envelope 1/2 everywhere.
    assert result.ap50["bbox"] == pytest.approx(0.5)
    # An image missing from the predictions counts as an image without detections: ranks TP, FP,
    # TP -> envelope 1 up to recall 0.5, then 2/3.
    result = evaluate_task(path, {1: preds[1]}, iou_types=["bbox"])
    assert result.num_images == 2 and result.ap50["bbox"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def _direct_stats(gt_path, preds, iou_type, image_ids=None):
    """Independent pycocotools run, built the way the reference evaluator builds it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        results = []
        for image_id, p in preds.items():
            for k in range(len(p)):
                rec = {"image_id": image_id, "category_id": 1, "score": float(p.scores[k])}
                if iou_type == "bbox":
                    x0, y0, x1, y1 = p.boxes[k]
                    rec["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                else:
                    rec["segmentation"] = p.masks[k]
                results.append(rec)
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.params.catIds = [1]
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_equals_direct_pycocotools_on_random_predictions(root):
    rng = np.random.default_rng(0)
    for task in TASKS:
        path = root / "annotations" / f"task_{task}_test.json"
        gt = load_ground_truth(path)
        preds = _random(gt, rng)
        result = evaluate_task(path, preds)
        with_targets = sorted({a["image_id"] for a in gt.dataset["annotations"] if a["category_id"] == 1})
        for iou in ("bbox", "segm"):
            direct = _direct_stats(path, copy.deepcopy(preds), iou)
            assert np.allclose(result.stats[iou], direct.stats)
            assert 0.0 < result.ap50[iou] < 1.0 and result.ap50[iou] == direct.stats[1]
            curve = direct.eval["precision"][0, :, 0, 0, 2]
            assert np.allclose(np.nan_to_num(result.curves[iou].precision_all, nan=-1), curve)
            subset = _direct_stats(path, copy.deepcopy(preds), iou, image_ids=with_targets)
            assert np.allclose(np.nan_to_num(result.curves[iou].precision_with_targets, nan=-1),
                               subset.eval["precision"][0, :, 0, 0, 2])
            assert result.ap50_with_targets[iou] == pytest.approx(subset.stats[1])


def _without_targets(gt: COCO) -> list[int]:
    return [i for i in gt.getImgIds() if not gt.getAnnIds(imgIds=[i], catIds=[1])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_means_are_over_the_tasks_with_a_result(root, backend):
    """pycocotools' -1 (a task whose evaluated images hold no target) stays the task's value but
    is no AP: the means leave it out, and a mean over no task is n/a (NaN), not 0 or -1."""
    files = task_files(root, TASKS)
    gts = {t: load_ground_truth(p) for t, p in files.items()}
    preds = {t: _perfect(gt) for t, gt in gts.items()}
    ids = {2: gts[2].getImgIds(), 10: _without_targets(gts[10])[:3], 14: gts[14].getImgIds()}
    for image_id in ids[10]:   # a false positive on each: still no AP without a target
        info = gts[10].imgs[image_id]
        mask = np.zeros((1, info["height"], info["width"]), dtype=bool)
        mask[0, 1:20, 1:20] = True
        preds[10][image_id] = ImagePredictions.from_arrays(np.array([[1.0, 1, 20, 20]]), np.array([0.9]), mask)
    result = evaluate_tasks(gts, preds, ("bbox", "segm"), ids, backend=backend)
    for iou in ("bbox", "segm"):
        direct = _direct_stats(files[10], {i: preds[10][i] for i in ids[10]}, iou, image_ids=ids[10])
        assert result.task(10).stats[iou] == pytest.approx(list(direct.stats)) and direct.stats[1] == -1
        assert result.task(2).ap50[iou] == pytest.approx(1.0) and result.task(14).ap50[iou] == pytest.approx(1.0)
        assert result.mean_ap50(iou) == pytest.approx(1.0)
        assert result.mean_ap(iou) == pytest.approx(1.0)
        assert result.mean_ap50_with_targets(iou) == pytest.approx(1.0)
        assert result.tasks_without_result(iou) == [10]
    report = markdown_report(result)
    assert "| AP@0.5 box (mAP^box) | 100.0 | n/a | 100.0 | 100.0 |" in report
    assert "task(s) 10 have no result" in report
    assert csv_text(result).splitlines()[-1].startswith("mean,,43,")   # 20 + 3 + 20 images
    assert "100.0000" in csv_text(result).splitlines()[-1]

    only_empty = evaluate_tasks({10: gts[10]}, {10: preds[10]}, ("bbox",), {10: ids[10]}, backend=backend)
    assert np.isnan(only_empty.mean_ap50("bbox")) and np.isnan(only_empty.mean_ap("bbox"))
    assert "mAP^box@0.5 = n/a" in markdown_report(only_empty)
    rows = list(csv.DictReader(io.StringIO(csv_text(only_empty))))
    assert [row["task"] for row in rows] == ["10", "mean"]
    numbers = [value for row in rows for key, value in row.items() if key not in ("task", "phrase")]
    assert "nan" not in numbers and [row["AP50_box"] for row in rows] == ["n/a", "n/a"], rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_without_evaluated_images_has_no_result(root, backend, tmp_path):
    """E.g. a training holdout that gives a task no image: n/a for that task, no crash, and
    pycocotools never sees the empty image list (which it reads as "every image")."""
    files = task_files(root, TASKS)
    gts = {t: load_ground_truth(p) for t, p in files.items()}
    preds = {2: _perfect(gts[2]), 10: _perfect(gts[10]), 14: {}}
    ids = {2: gts[2].getImgIds(), 10: gts[10].getImgIds()[:5], 14: []}
    result = evaluate_tasks(gts, preds, ("bbox", "segm"), ids, backend=backend)
    empty = result.task(14)
    assert (empty.num_images, empty.num_images_with_targets, empty.num_targets) == (0, 0, 0)
    for iou in ("bbox", "segm"):
        assert empty.ap50[iou] == empty.ap[iou] == empty.ap50_with_targets[iou] == -1
        assert empty.stats[iou] == [-1.0] * 12 and np.isnan(empty.curves[iou].precision_all).all()
        assert result.tasks_without_result(iou) == [14]
        assert result.mean_ap50(iou) == pytest.approx(1.0)
    md_path, csv_path = write_tables(result, tmp_path)
    assert "| AP@0.5 box (mAP^box) | 100.0 | 100.0 | n/a | 100.0 |" in md_path.read_text()
    assert [png.name for png in plot_pr_curves(result, tmp_path)] == ["pr_task_2.png", "pr_task_10.png",
                                                                     "pr_task_14.png"]


def test_tables_and_plots_are_written(root, tmp_path):
    files = task_files(root, TASKS)
    rng = np.random.default_rng(1)
    result = evaluate_tasks(files, {t: _random(load_ground_truth(p), rng) for t, p in files.items()})
    md_path, csv_path = write_tables(result, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["task"] for r in rows] == [str(t) for t in TASKS] + ["mean"]
    for row, task in zip(rows, result.tasks):
        assert float(row["AP50_box"]) == pytest.approx(100 * task.ap50["bbox"], abs=1e-4)
        assert float(row["AP50_mask"]) == pytest.approx(100 * task.ap50["segm"], abs=1e-4)
    assert float(rows[-1]["AP50_box"]) == pytest.approx(100 * np.mean([t.ap50["bbox"] for t in result.tasks]),
                                                        abs=1e-4)
    text = md_path.read_text()
    assert "| Metric | 2 | 10 | 14 | Mean |" in text
    assert f"{100 * result.mean_ap50('segm'):.1f}" in text
    for png in plot_pr_curves(result, tmp_path):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plots_draw_an_own_phrase_with_dollar_signs_as_written(root, tmp_path):
    """matplotlib reads text between two "$" as a formula: an own vocabulary's phrase such as
    "cut \\ with $x_$" failed the run's plots with its parser's error after the whole evaluation."""
    import dataclasses

    import matplotlib.pyplot as plt

    files = task_files(root, [2])
    result = evaluate_tasks(files, {2: _random(load_ground_truth(files[2]), np.random.default_rng(4))})
    phrased = dataclasses.replace(result, phrases={2: "cut \\ with $x_$ or pay $5 or $10"})
    figures_before = plt.get_fignums()
    (png,) = plot_pr_curves(phrased, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == figures_before  # closed


def test_predictions_roundtrip_and_errors(root, tmp_path):
    gt = load_ground_truth(root / "annotations" / "task_2_test.json")
    preds = {2: _random(gt, np.random.default_rng(2))}
    for name in ("p.json", "p.json.gz"):
        loaded = load_predictions(save_predictions(tmp_path / name, preds))
        assert set(loaded[2]) == set(preds[2])
        for image_id, p in preds[2].items():
            q = loaded[2][image_id]
            # Exact (unrounded): re-scoring the file gives the numbers of the run that wrote it.
            assert np.array_equal(q.boxes, p.boxes) and np.array_equal(q.scores, p.scores)
            assert q.masks == p.masks
    bad = json.loads((tmp_path / "p.json").read_text())
    image_key = next(iter(bad["tasks"]["2"]))
    del bad["tasks"]["2"][image_key]["scores"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=f"bad.json: task 2: image {image_key}: missing field 'scores'"):
        load_predictions(tmp_path / "bad.json")
    with pytest.raises(DataError, match="image ids not in"):
        evaluate_task(root / "annotations" / "task_2_test.json", {123: ImagePredictions([[0, 0, 1, 1]], [1.0])})
    boxes_only = {i: ImagePredictions(p.boxes, p.scores) for i, p in preds[2].items()}
    with pytest.raises(DataError, match="segm evaluation needs masks"):
        evaluate_task(root / "annotations" / "task_2_test.json", boxes_only, iou_types=["segm"])
    assert evaluate_task(root / "annotations" / "task_2_test.json", boxes_only).ap50.keys() == {"bbox"}


def test_evaluation_refuses_non_finite_predictions_and_wrong_mask_sizes(tmp_path):
    # pycocotools would rank a NaN score last and match an inf box to nothing: a normal-looking AP.
    path = _hand_file(tmp_path)
    good = {1: ImagePredictions([[10, 10, 30, 30], [40, 5, 60, 25]], [0.9, 0.8]),
            2: ImagePredictions([[5, 5, 55, 55]], [0.95])}
    nan_score = {**good, 1: ImagePredictions(good[1].boxes, [0.9, np.nan])}
    with pytest.raises(DataError, match=r"^task 3: image 1: scores\[1\] is nan$"):
        evaluate_tasks({3: path}, {3: nan_score})
    inf_box = {**good, 2: ImagePredictions([[5, 5, np.inf, 55]], [0.95])}
    with pytest.raises(DataError, match=r"^task 3: image 2: boxes\[0\] is \[5\.0, 5\.0, inf, 55\.0\]$"):
        evaluate_tasks({3: path}, {3: inf_box})
    wrong_size = {1: ImagePredictions([[10, 10, 30, 30]], [0.9], encode_masks(np.ones((1, 50, 100), bool)))}
    message = r"^task 3: image 1: masks\[0\] has size \[50, 100\], the image is \[100, 100\]"
    with pytest.raises(DataError, match=message):
        evaluate_task(path, wrong_size)
    assert evaluate_task(path, wrong_size, iou_types=["bbox"]).ap50["bbox"] > 0  # masks unused


def test_inverted_boxes_and_partial_masks_are_refused(tmp_path):
    """An inverted box (x1 < x0) falls outside COCOeval's area range: ignored instead of a false
    positive, so AP went up. One image without masks among masked ones dropped the mask AP of
    every task without a word."""
    path = _hand_file(tmp_path)
    good = {1: ImagePredictions([[10, 10, 30, 30], [40, 5, 60, 25]], [0.9, 0.8]),
            2: ImagePredictions([[5, 5, 55, 55]], [0.95])}
    inverted = {**good, 1: ImagePredictions([[10, 10, 30, 30], [60, 5, 40, 25]], [0.9, 0.8])}
    with pytest.raises(DataError, match=r"^task 3: image 1: boxes\[1\] is \[60\.0, 5\.0, 40\.0, 25\.0\]: x1 < x0"):
        evaluate_tasks({3: path}, {3: inverted})
    # So is a box above COCOeval's largest area (1e10 px^2): one such false positive per image
    # raised the AP instead of lowering it.
    huge = {**good, 2: ImagePredictions([[5, 5, 55, 55], [0, 0, 2e5, 1e5]], [0.95, 0.99])}
    with pytest.raises(DataError, match=r"^task 3: image 2: boxes\[1\] is \[0\.0, 0\.0, 200000\.0, 100000\.0\]: "
                                        r"an area of 2e\+10 px\^2, above COCOeval's largest \(1e\+10\)"):
        evaluate_tasks({3: path}, {3: huge})
    # (What an image predicts within it is scored as before.)
    assert evaluate_tasks({3: path}, {3: {**good, 2: ImagePredictions([[0, 0, 1e5, 1e5]], [0.99])}}).tasks
    masked = {image: ImagePredictions(p.boxes, p.scores, encode_masks(np.ones((len(p.boxes), 100, 100), bool)))
              for image, p in good.items()}
    partial = {**masked, 2: good[2]}
    with pytest.raises(DataError, match=r"1 of 2 images have no masks \(task 3 image 2\)"):
        evaluate_tasks({3: path}, {3: partial})
    with pytest.raises(DataError, match=r"1 of 2 images have no masks \(task 3 image 2\)"):
        evaluate_task(path, partial, task_id=3)
    # Boxes asked for alone are scored: the masks are not read (it was the same refusal).
    boxes_only = evaluate_tasks({3: path}, {3: partial}, iou_types=["bbox"]).tasks[0].ap50
    assert boxes_only == evaluate_tasks({3: path}, {3: good}, iou_types=["bbox"]).tasks[0].ap50
    with pytest.raises(DataError, match=r"1 of 2 images have no masks"):
        evaluate_tasks({3: path}, {3: partial}, iou_types=["bbox", "segm"])
    assert set(evaluate_tasks({3: path}, {3: masked}).iou_types) == {"bbox", "segm"}
    assert evaluate_tasks({3: path}, {3: good}).iou_types == ("bbox",)
    assert evaluate_tasks({3: path}, {3: {}}).iou_types == ("bbox",)   # no image: no mask AP of 0 either


def test_an_image_without_detections_may_say_masks_null_in_a_file_with_masks(root, tmp_path):
    """It has nothing to give; it was "1 of N images have no masks" and the file was refused."""
    gt = load_ground_truth(root / "annotations" / "task_2_test.json")
    preds = {2: _random(gt, np.random.default_rng(2))}
    data = json.loads(save_predictions(tmp_path / "p.json", preds).read_text())
    empty = next(iter(data["tasks"]["2"]))
    data["tasks"]["2"][empty] = {"boxes": [], "scores": [], "masks": None}
    (tmp_path / "null.json").write_text(json.dumps(data))
    loaded = load_predictions(tmp_path / "null.json")
    assert loaded[2][int(empty)].masks == []
    assert set(evaluate_task(root / "annotations" / "task_2_test.json", loaded[2]).ap50) == {"bbox", "segm"}
    data["tasks"]["2"][empty] = {"boxes": [[0, 0, 1, 1]], "scores": [0.5], "masks": None}   # a detection: not so
    (tmp_path / "half.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="1 of .* images have no masks"):
        evaluate_task(root / "annotations" / "task_2_test.json", load_predictions(tmp_path / "half.json")[2])


def test_a_predictions_file_holding_an_image_twice_is_refused(tmp_path):
    entry = {"boxes": [[0, 0, 1, 1]], "scores": [0.5]}
    body = json.dumps({"2000000": entry})[:-1] + ', "02000000": {"boxes": [], "scores": []}}'
    (tmp_path / "twice.json").write_text('{"format": "toist-predictions", "version": 1, "tasks": {"1": ' + body + "}}")
    with pytest.raises(DataError, match=r"twice\.json: task 1: image 2000000 appears twice \(key '02000000'\)"):
        load_predictions(tmp_path / "twice.json")
    same_key = json.dumps({"2000000": entry})[:-1] + ', "2000000": {"boxes": [], "scores": []}}'
    (tmp_path / "same.json").write_text('{"format": "toist-predictions", "version": 1, "tasks": {"1": ' + same_key + "}}")
    with pytest.raises(DataError, match=r"same\.json: not a valid predictions JSON file: key '2000000' appears twice"):
        load_predictions(tmp_path / "same.json")
    (tmp_path / "deep.json").write_text('{"format": "toist-predictions", "tasks": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(DataError, match=r"deep\.json: not a valid predictions JSON file: nested too deeply"):
        load_predictions(tmp_path / "deep.json")
    (tmp_path / "long.json").write_text('{"format": "toist-predictions", "version": ' + "1" * 5000 + "}")
    with pytest.raises(DataError, match=r"long\.json: not a valid predictions JSON file: Exceeds the limit"):
        load_predictions(tmp_path / "long.json")


def test_cli_predictions_file_edge_cases(root, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format": "toist-predictions", "version": 1, "tasks": {}}))
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(empty), "--out", str(out)]) == 2
    assert "empty.json: the file holds no task" in capsys.readouterr().err and not out.exists()
    preds = tmp_path / "preds.json"
    save_predictions(preds, {2: _perfect(load_ground_truth(root / "annotations" / "task_2_test.json"))})
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(preds), "--save-predictions",
                     str(tmp_path / "again.json"), "--out", str(out)]) == 2
    assert "--save-predictions: only with --checkpoint" in capsys.readouterr().err
    # Own vocabularies have task ids above 14: --tasks takes them (here: no such task in the file).
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(preds), "--tasks", "20",
                     "--out", str(out)]) == 2
    assert "no predictions for task(s) [20]" in capsys.readouterr().err
    # Predictions of an image the task file does not list: both files are named.
    stray = load_predictions(preds)
    stray[2][999] = ImagePredictions([[0, 0, 1, 1]], [0.5], encode_masks(np.ones((1, 4, 4), bool)))
    save_predictions(tmp_path / "stray.json", stray)
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(tmp_path / "stray.json"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"stray.json: task 2: predictions for image ids not in {root / 'annotations' / 'task_2_test.json'}: [999]" in err


def test_cli_options_that_would_not_act_are_refused_before_anything_runs(root, tmp_path, capsys):
    """Checkpoint-only options with --predictions were ignored (a rerun "with --protocol reference"
    gave the same numbers), --duplicate-iou under --protocol reference too; --save-predictions
    as --out failed after all the inference, or as --out/results.csv was replaced by the table."""
    preds = tmp_path / "preds.json"
    save_predictions(preds, {2: _perfect(load_ground_truth(root / "annotations" / "task_2_test.json"))})
    out = tmp_path / "out"
    base = ["evaluate", "--data", str(root), "--out", str(out)]
    for extra, says in ((["--protocol", "reference"], "--protocol"), (["--batch-size", "4", "--no-ccr"],
                                                                       "--batch-size, --no-ccr"),
                        (["--short-side", "10", "--duplicate-iou", "0.5", "--device", "cpu"],
                         "--short-side, --duplicate-iou, --device"), (["--image-dir", str(tmp_path)], "--image-dir")):
        assert cli.main(base + ["--predictions", str(preds)] + extra) == 2
        assert f"{says}: only with --checkpoint (they say how the model predicts; {preds}'s predictions are " \
               "scored as they are)" in capsys.readouterr().err
    assert cli.main(base + ["--predictions", str(preds), "--captions", "pronoun"]) == 2
    assert "--captions: only with --checkpoint" in capsys.readouterr().err
    assert cli.main(base + ["--checkpoint", "unused", "--protocol", "reference", "--duplicate-iou", "0.3"]) == 2
    assert "--duplicate-iou 0.3: protocol toist only" in capsys.readouterr().err
    for saved, says in ((out, "the --out folder itself"), (tmp_path, f"a folder --out {out} is in"),
                        (out / "results.csv", "a file toist evaluate writes into"),
                        (out / "cocoeval_log.txt", "a file toist evaluate writes into"),
                        (out / "pr_task_2.png", "a file toist evaluate writes into")):
        assert cli.main(base + ["--checkpoint", "unused", "--save-predictions", str(saved)]) == 2
        assert f"--save-predictions {saved}: {says}" in capsys.readouterr().err
    assert not out.exists()
    # A file of another split: refused, and not after a warning per task that its images have no entries.
    stray = {t: {999: ImagePredictions([[0, 0, 1, 1]], [0.5])} for t in (2, 10)}
    save_predictions(tmp_path / "other_split.json", stray)
    assert cli.main(base + ["--predictions", str(tmp_path / "other_split.json")]) == 2
    err = capsys.readouterr().err
    assert "predictions for image ids not in" in err and "warning" not in err
    # Images without entries in a file that is right: warned, and scored.
    partial = {2: dict(list(_perfect(load_ground_truth(root / "annotations" / "task_2_test.json")).items())[:5])}
    save_predictions(tmp_path / "partial.json", partial)
    assert cli.main(base + ["--predictions", str(tmp_path / "partial.json"), "--no-plots"]) == 0
    assert "warning: task 2: 15 of 20 evaluated images have no predictions entry" in capsys.readouterr().err


def test_a_damaged_gzip_predictions_file_is_named_not_a_traceback(root, tmp_path, capsys):
    """A .json.gz cut short (EOFError) or with damaged bytes (zlib.error) ended toist evaluate with
    a traceback (exit 1), as did --save-predictions onto such a file."""
    preds = tmp_path / "preds.json.gz"
    save_predictions(preds, {2: _perfect(load_ground_truth(root / "annotations" / "task_2_test.json"))})
    whole = preds.read_bytes()
    cut, damaged = tmp_path / "cut.json.gz", tmp_path / "damaged.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    damaged.write_bytes(whole[:12] + bytes(b ^ 0x5A for b in whole[12:40]) + whole[40:])
    for path in (cut, damaged):
        with pytest.raises(DataError, match=rf"{path.name}: not a valid predictions file: damaged gzip data"):
            load_predictions(path)
        assert cli.main(["evaluate", "--data", str(root), "--predictions", str(path), "--out",
                         str(tmp_path / "out")]) == 2
        assert f"{path.name}: not a valid predictions file: damaged gzip data" in capsys.readouterr().err
    assert is_prediction_file(damaged) is False   # raised zlib.error (--save-predictions onto it)


def test_tables_and_plots_name_the_models_own_tasks(root, tmp_path, monkeypatch):
    import matplotlib.figure

    gt = load_ground_truth(root / "annotations" / "task_2_test.json")
    result = evaluate_tasks({2: gt}, {2: _perfect(gt)})
    result.phrases = {2: "cut tape with"}
    titles = []
    suptitle = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, text, **kw: titles.append(text) or suptitle(self, text, **kw))
    plot_pr_curves(result, tmp_path)
    assert titles and titles[0].startswith("Task 2: cut tape with (")
    assert "| 2 | cut tape with |" in markdown_report(result)


def test_saving_non_finite_predictions_writes_nothing(tmp_path):
    bad = {3: {1: ImagePredictions([[10, 10, 30, 30]], [0.9]), 2: ImagePredictions([[5, 5, 55, -np.inf]], [0.5])}}
    message = r"^task 3: image 2: boxes\[0\] is \[5\.0, 5\.0, 55\.0, -inf\]$"
    for name in ("new_dir/p.json", "p.json.gz"):
        with pytest.raises(DataError, match=message):
            save_predictions(tmp_path / name, bad)
    assert not (tmp_path / "new_dir").exists() and not (tmp_path / "p.json.gz").exists()
    existing = save_predictions(tmp_path / "p.json", {3: {1: bad[3][1]}})
    before = existing.read_bytes()
    with pytest.raises(DataError, match=message):
        save_predictions(existing, bad)
    assert existing.read_bytes() == before


def _predictions_text(task, image_id, entry) -> str:
    # json.dumps writes NaN / Infinity tokens, as a careless writer would.
    return json.dumps({"format": "toist-predictions", "version": 1, "tasks": {str(task): {str(image_id): entry}}})


def test_loading_non_finite_predictions_names_file_task_image_and_field(tmp_path):
    cases = [("scores", [0.5, float("nan")], r"scores\[1\] is nan"),
             ("boxes", [[0, 0, 1, 1], [0, 0, float("inf"), 1]], r"boxes\[1\] is \[0\.0, 0\.0, inf, 1\.0\]")]
    for field, value, message in cases:
        entry = {"boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [0.5, 0.4], field: value}
        (tmp_path / "bad.json").write_text(_predictions_text(7, 42, entry))
        with pytest.raises(DataError, match=rf"bad\.json: task 7: image 42: {message}$"):
            load_predictions(tmp_path / "bad.json")


@pytest.mark.parametrize("field, value, message", [
    ("scores", [0.5, True], r"field 'scores': expected numbers, got True"),
    ("scores", [0.5, "0.9"], r"field 'scores': expected numbers, got '0\.9'"),
    ("scores", [None, 0.4], r"field 'scores': expected numbers, got None"),
    ("scores", [0.5, 10 ** 400], r"field 'scores': 1000000.* is too large for a number"),
    ("scores", 0.5, r"field 'scores': expected a list of numbers, got 0\.5"),
    ("boxes", [[0, 0, 1, 1], [0, 0, "2", 2]], r"field 'boxes': expected numbers, got '2'"),
    ("boxes", [[0, 0, 1, 1], [0, 0, 2, -10 ** 400]], r"field 'boxes': -1000000.* is too large for a number"),
    ("boxes", [[0, 0, 1, 1], 7], r"field 'boxes': expected a list of \[x1, y1, x2, y2\] lists, got \[\[0, 0, 1, 1\], 7\]"),
    ("boxes", [[0, 0, 1, 1], [0, 0, 2]], r"field 'boxes': expected \[N, 4\]"),
])
def test_predictions_that_are_not_plain_numbers_are_refused_by_field(tmp_path, field, value, message):
    """numpy would read true as 1.0, "0.9" as 0.9 and null as NaN (said as NaN, which the file
    does not hold), and an integer beyond float range crashed with an unnamed OverflowError."""
    entry = {"boxes": [[0, 0, 1, 1], [0, 0, 2, 2]], "scores": [0.5, 0.4], field: value}
    (tmp_path / "bad.json").write_text(_predictions_text(7, 42, entry))
    with pytest.raises(DataError, match=rf"bad\.json: task 7: image 42: {message}"):
        load_predictions(tmp_path / "bad.json")


def test_cli_refuses_non_finite_predictions_and_writes_nothing(root, tmp_path, capsys):
    image_id = load_ground_truth(root / "annotations" / "task_2_test.json").getImgIds()[0]
    bad = tmp_path / "bad.json"
    bad.write_text(_predictions_text(2, image_id, {"boxes": [[1, 1, 5, 5]], "scores": [float("nan")]}))
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(bad), "--out", str(out)]) == 2
    assert f"bad.json: task 2: image {image_id}: scores[0] is nan" in capsys.readouterr().err
    assert not out.exists()


def test_cli_on_predictions_file(root, tmp_path, capsys):
    files = task_files(root, TASKS)
    preds = {t: _perfect(load_ground_truth(p)) for t, p in files.items()}
    save_predictions(tmp_path / "preds.json", preds)
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(tmp_path / "preds.json"),
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP^box@0.5 = 100.0, mAP^mask@0.5 = 100.0" in printed
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.csv", "pr_task_2.png", "cocoeval_log.txt"}
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(tmp_path / "preds.json"),
                          "--tasks", "5", "--out", str(out)]) == 2
    # A later run of fewer tasks into the same folder says which plots are not its own.
    capsys.readouterr()
    assert cli.main(["evaluate", "--data", str(root), "--predictions", str(tmp_path / "preds.json"),
                     "--tasks", str(TASKS[0]), "--out", str(out)]) == 0
    others = ", ".join(f"pr_task_{t}.png" for t in sorted(TASKS[1:]))
    assert f"note: {others} in {out} are from an earlier run, not this one" in capsys.readouterr().err


def test_cli_refuses_output_paths_it_cannot_write_before_anything_runs(root, tmp_path, capsys):
    """--out naming a file, or --save-predictions under one, failed after the whole inference run
    with "[Errno 17] File exists", the predictions lost."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    base = ["evaluate", "--data", str(root), "--checkpoint", str(tmp_path / "never_loaded"), "--no-plots"]
    assert cli.main(base + ["--out", str(notes)]) == 2
    assert f"--out {notes}: exists and is not a folder" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "out"), "--save-predictions", str(notes / "p.json")]) == 2
    assert f"--save-predictions {notes / 'p.json'}: {notes} is a file, not a folder" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(notes / "deeper" / "out")]) == 2
    assert f"--out {notes / 'deeper' / 'out'}: {notes} is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert cli.main(base + ["--out", str(tmp_path / "dangling")]) == 2
    assert f"--out {tmp_path / 'dangling'}: a link to {tmp_path / 'gone'}, which does not exist" in capsys.readouterr().err
    assert notes.read_text() == "mine\n" and not (tmp_path / "out").exists()


def test_cli_writes_its_files_as_one_set(root, tmp_path, capsys, monkeypatch):
    """Stopped while its plots were drawn, a run left its new results.md beside the earlier run's
    results.csv, log and plots; repeated IoU types were evaluated and reported twice; a phrase with
    a "|" added a column to the Markdown table."""
    import toist_core.eval.plots as plots

    files = task_files(root, TASKS)
    preds = {t: _perfect(load_ground_truth(p)) for t, p in files.items()}
    save_predictions(tmp_path / "preds.json", preds, phrases={t: f"cut | slice\nwith {t}" for t in TASKS})
    out = tmp_path / "out"
    base = ["evaluate", "--data", str(root), "--predictions", str(tmp_path / "preds.json"), "--out", str(out)]
    assert cli.main(base + ["--iou-types", "bbox", "bbox"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("mAP^box@0.5") == 1 and "mAP^mask" not in printed
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert f"| {TASKS[0]} | cut \\| slice with {TASKS[0]} |" in before["results.md"].decode()

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_task_pr", stopped)
    with pytest.raises(KeyboardInterrupt):
        cli.main(base)   # bbox and segm this time: other tables
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before   # the earlier set, whole


def test_cli_replaces_only_what_an_evaluation_wrote(root, tmp_path, capsys):
    """--save-predictions given the ground-truth file replaced it with predictions, and --out
    replaced a user's own results.md; both are refused before anything runs. A run's own files
    are replaced by the next run (.json and .json.gz)."""
    files = task_files(root, TASKS)
    preds = {t: _perfect(load_ground_truth(p)) for t, p in files.items()}
    save_predictions(tmp_path / "preds.json", preds)
    base = ["evaluate", "--data", str(root), "--predictions", str(tmp_path / "preds.json"), "--no-plots"]
    ground_truth = files[TASKS[0]].read_bytes()
    assert cli.main(base + ["--out", str(tmp_path / "a"), "--save-predictions", str(files[TASKS[0]])]) == 2
    assert "exists and is not a toist predictions file; nothing was replaced" in capsys.readouterr().err
    assert files[TASKS[0]].read_bytes() == ground_truth and not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("# My results\n")
    assert cli.main(base + ["--out", str(mine)]) == 2
    assert f"{mine / 'results.md'} exist and are not what toist evaluate writes" in capsys.readouterr().err
    assert (mine / "results.md").read_text() == "# My results\n"
    # Nor the log or a plot of the same names (they were replaced without a word).
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "cocoeval_log.txt").write_text("my own notes\n")
    plot = notes / f"pr_task_{TASKS[0]}.png"
    plot.write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    plotted = [arg for arg in base if arg != "--no-plots"]
    assert cli.main(plotted + ["--out", str(notes)]) == 2
    assert (f"{notes / 'cocoeval_log.txt'}, {plot} exist and are not what toist evaluate writes"
            in capsys.readouterr().err)
    (notes / "cocoeval_log.txt").unlink()
    assert cli.main(plotted + ["--out", str(notes)]) == 2
    assert f"{plot} exist and are not" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(notes)]) == 0  # --no-plots: the plot is not replaced
    # Nor is it checked by a run of other tasks, which would not replace it.
    other = [str(t) for t in TASKS if t != TASKS[0]]
    assert cli.main(plotted + ["--tasks", *other, "--out", str(notes)]) == 0
    assert cv2.imdecode(np.fromfile(plot, np.uint8), cv2.IMREAD_COLOR).shape == (4, 4, 3)
    reserved = tmp_path / "reserved.json"   # mktemp: a name reserved as an empty file
    reserved.write_bytes(b"")
    from toist_core.cli.evaluate import _refuse_replacing_other_files

    _refuse_replacing_other_files(type("Args", (), {"save_predictions": str(reserved), "out": str(tmp_path / "c"),
                                                    "no_plots": False}))
    for _ in range(2):   # the second run replaces the first's tables
        assert cli.main(base + ["--out", str(tmp_path / "b")]) == 0
    from toist_core.eval.predictions import is_prediction_file

    assert is_prediction_file(save_predictions(tmp_path / "p.json.gz", preds)) and is_prediction_file(tmp_path /
                                                                                                      "preds.json")
    assert not is_prediction_file(files[TASKS[0]]) and not is_prediction_file(tmp_path / "absent.json")
    capsys.readouterr()


class _OracleSegmenter:
    """Stands in for TaskSegmenter: returns the ground truth of the image it is shown."""

    def __init__(self, root):
        self.root = root

    def set_task(self, task_id):
        import cv2
        self.gt = load_ground_truth(self.root / "annotations" / f"task_{task_id}_test.json")
        self.ids = {}
        for info in self.gt.dataset["images"]:
            bgr = cv2.imread(str(self.root / "images" / "val2014" / info["file_name"]))
            self.ids[cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes()] = info["id"]

    def predict(self, rgb, score_threshold=None, max_instances=None):
        assert (score_threshold, max_instances) == (0.0, 100)  # the reference keeps every query
        p = _perfect(self.gt)[self.ids[np.ascontiguousarray(rgb).tobytes()]]
        masks = (np.stack([mask_utils.decode(m) for m in p.masks]).astype(bool) if p.masks
                 else np.zeros((0,) + rgb.shape[:2], bool))
        return type("Prediction", (), {"boxes": p.boxes, "scores": p.scores, "masks": masks})


class _NanSegmenter:
    """A model gone wrong: one detection with a NaN score per image."""

    vocabulary = COCO_TASKS
    trained_tasks = None

    def set_task(self, task_id):
        pass

    def predict(self, rgb, score_threshold=None, max_instances=None):
        return type("Prediction", (), {"boxes": np.array([[1.0, 1.0, 5.0, 5.0]]), "scores": np.array([np.nan]),
                                       "masks": None})


def test_cli_checkpoint_path_stops_at_non_finite_predictions(root, tmp_path, capsys, monkeypatch):
    import toist_core.cli.evaluate as evaluate_cli

    monkeypatch.setattr(evaluate_cli, "load_segmenter", lambda *args, **kwargs: _NanSegmenter())
    out, saved = tmp_path / "out", tmp_path / "p.json"
    assert cli.main(["evaluate", "--data", str(root), "--checkpoint", "unused", "--tasks", "14",
                     "--max-images", "2", "--out", str(out), "--save-predictions", str(saved)]) == 2
    first = load_ground_truth(root / "annotations" / "task_14_test.json").dataset["images"][0]["id"]
    assert f"task 14: image {first}: scores[0] is nan" in capsys.readouterr().err
    assert not out.exists() and not saved.exists()


def test_predict_tasks_with_a_segmenter(root):
    files = task_files(root, [10])
    first_six = load_ground_truth(files[10]).getImgIds()[:6]
    preds = predict_tasks(_OracleSegmenter(root), files, root / "images" / "val2014",
                          image_ids={10: first_six}, log=io.StringIO())
    assert sorted(preds[10]) == sorted(first_six)
    result = evaluate_tasks(files, preds, image_ids={10: first_six})
    assert result.task(10).num_images == 6 and result.task(10).num_targets > 0
    assert result.task(10).ap50["segm"] == pytest.approx(1.0)


def test_cli_on_a_tiny_checkpoint(root, tmp_path, capsys):
    """The --checkpoint path end to end with a random-weight tiny segmentation model."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.inference import TaskSegmenter

    segmenter = TaskSegmenter.from_config("tiny_segm", seed=0, device="cpu")
    model_dir = save_model_dir(segmenter.model, tmp_path / "tiny", segmenter.config)
    out = tmp_path / "out"
    code = cli.main(["evaluate", "--data", str(root), "--checkpoint", str(model_dir), "--tasks", "14",
                          "--max-images", "2", "--short-side", "128", "--max-size", "200", "--device", "cpu",
                          "--out", str(out), "--save-predictions", str(tmp_path / "p.json"), "--no-plots"])
    assert code == 0, capsys.readouterr().err
    saved = load_predictions(tmp_path / "p.json")[14]
    gt = load_ground_truth(root / "annotations" / "task_14_test.json")
    assert sorted(saved) == sorted(gt.getImgIds()[:2])
    for image_id, pred in saved.items():
        assert len(pred) == 100 and len(pred.masks) == 100  # every query kept, as the reference
        assert pred.masks[0]["size"] == [gt.imgs[image_id]["height"], gt.imgs[image_id]["width"]]
        assert np.all(np.diff(pred.scores) <= 0)
    assert (out / "results.csv").is_file()


def test_a_split_without_a_default_image_folder_names_the_option(root, tmp_path, capsys):
    """`--split val` said "image_dirs: no image folder configured", a config field this command
    has not: the option to give is --image-dir."""
    import shutil

    from toist_core.checkpoint import save_model_dir
    from toist_core.inference import TaskSegmenter

    data = tmp_path / "data"
    shutil.copytree(root, data)
    shutil.copy(data / "annotations" / "task_14_test.json", data / "annotations" / "task_14_val.json")
    segmenter = TaskSegmenter.from_config("tiny_segm", seed=0, device="cpu")
    model_dir = save_model_dir(segmenter.model, tmp_path / "tiny", segmenter.config)
    common = ["evaluate", "--data", str(data), "--split", "val", "--checkpoint", str(model_dir), "--tasks", "14",
              "--max-images", "1", "--short-side", "64", "--max-size", "96", "--device", "cpu", "--no-plots"]
    assert cli.main(common + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--split val: no default image folder for that split" in err and "give it with --image-dir" in err
    assert not (tmp_path / "out").exists()
    images = data / "images" / "val2014" if (data / "images" / "val2014").is_dir() else next((data / "images").iterdir())
    assert cli.main(common + ["--out", str(tmp_path / "out"), "--image-dir", str(images)]) == 0, capsys.readouterr().err
    # Own data whose images lie elsewhere (images/test): said once, not as each image "not found".
    (data / "images" / "val2014").rename(data / "images" / "test")
    test = [arg if arg != "val" else "test" for arg in common]
    assert cli.main(test + ["--out", str(tmp_path / "out2")]) == 2
    assert (f"--image-dir: not given, and the default image folder of --split test, {data / 'images' / 'val2014'}, "
            "does not exist" in capsys.readouterr().err)


def test_a_rescored_predictions_file_names_the_tasks_as_the_model_did(root, tmp_path, capsys):
    """An own vocabulary's phrases go into --save-predictions' file, and re-scoring it with
    --predictions titles the tables with them, not with COCO-Tasks' phrases of the same ids."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.inference import TaskSegmenter
    from toist_core.tasks import TaskEntry, TaskVocabulary

    vocabulary = TaskVocabulary([TaskEntry(k, f"own task number {k} with") for k in range(1, 15)], name="own")
    segmenter = TaskSegmenter.from_config("tiny_segm", seed=0, device="cpu")
    model_dir = save_model_dir(segmenter.model, tmp_path / "own", segmenter.config, vocabulary=vocabulary)
    saved = tmp_path / "p.json.gz"
    common = ["--data", str(root), "--tasks", "14", "--max-images", "2", "--no-plots"]
    assert cli.main(["evaluate", *common, "--checkpoint", str(model_dir), "--short-side", "96", "--max-size", "160",
                     "--device", "cpu", "--out", str(tmp_path / "run"), "--save-predictions", str(saved)]) == 0
    assert load_prediction_file(saved).phrases == {14: "own task number 14 with"}
    assert cli.main(["evaluate", *common, "--predictions", str(saved), "--out", str(tmp_path / "again")]) == 0
    printed = capsys.readouterr().out
    for out in ("run", "again"):
        report = (tmp_path / out / "results.md").read_text()
        assert "| 14 | own task number 14 with |" in report and TASK_PHRASES[14].strip() not in report, out
    assert (tmp_path / "run" / "results.md").read_text() == (tmp_path / "again" / "results.md").read_text()
    assert printed.count("| 14 | own task number 14 with |") == 2


def test_predictions_file_phrases_are_checked(tmp_path):
    preds = {2: {1: ImagePredictions([[0, 0, 1, 1]], [0.5])}}
    assert load_prediction_file(save_predictions(tmp_path / "none.json", preds)).phrases is None
    written = save_predictions(tmp_path / "p.json", preds, phrases={2: "schneiden mit \u00e4", 5: "unused"})
    assert load_prediction_file(written).phrases == {2: "schneiden mit \u00e4"}  # only tasks with predictions
    content = json.loads(written.read_text())
    for phrases, message in (([], "field 'phrases': expected an object"), ({"x": "a"}, "phrases.x: key must be an "
                             "integer id"), ({"2": 3}, "field 'phrases.2': expected a string, got 3")):
        (tmp_path / "bad.json").write_text(json.dumps({**content, "phrases": phrases}))
        with pytest.raises(DataError, match=re.escape(f"bad.json: {message}")):
            load_prediction_file(tmp_path / "bad.json")


@pytest.mark.parametrize("edit, message", [
    # int() read "2000_000" as image 2000000, and other scripts' digits as ids.
    (lambda tasks: tasks["2"].update({"1_0": tasks["2"].pop("1")}), "task 2: image 1_0: key must be an integer id"),
    (lambda tasks: tasks["2"].update({"\u0661": tasks["2"].pop("1")}), "task 2: image \u0661: key must be an integer id"),
    # A task key 0 or -1 was reported as a missing task_0_test.json.
    (lambda tasks: tasks.update({"0": tasks.pop("2")}), "tasks.0: a task id is a positive integer, got '0'"),
    (lambda tasks: tasks.update({"-1": tasks.pop("2")}), "tasks.-1: a task id is a positive integer"),
    # [[]] was read as "no box" beside its scores, without a word.
    (lambda tasks: tasks["2"]["1"].update(boxes=[[]], scores=[]),
     "task 2: image 1: field 'boxes': expected [N, 4], got shape (1, 0)"),
])
def test_predictions_file_keys_and_empty_box_rows_are_checked(tmp_path, edit, message):
    written = save_predictions(tmp_path / "p.json", {2: {1: ImagePredictions([[0, 0, 1, 1]], [0.5])}})
    content = json.loads(written.read_text())
    edit(content["tasks"])
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=re.escape(f"bad.json: {message}")):
        load_prediction_file(tmp_path / "bad.json")


def test_predictions_file_without_boxes_reads_as_no_detection(tmp_path):
    written = save_predictions(tmp_path / "p.json", {2: {1: ImagePredictions(np.zeros((0, 4)), np.zeros(0))}})
    assert json.loads(written.read_text())["tasks"]["2"]["1"]["boxes"] == []
    loaded = load_prediction_file(written).tasks[2][1]
    assert loaded.boxes.shape == (0, 4) and loaded.scores.shape == (0,)


def test_cli_no_ccr_scores_a_distilled_file_as_its_plain_network(root, tmp_path, capsys):
    """--no-ccr (Table 3's CCR-off files): the bank is left unused, the rest is the same run."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.distill.memory_bank import MemoryBank
    from toist_core.inference import TaskSegmenter

    segmenter = TaskSegmenter.from_config("tiny_segm", seed=0, device="cpu")
    bank = MemoryBank(num_tasks=14, size=16, dim=segmenter.config.transformer.d_model, num_clusters=3, seed=1)
    bank.full_label.fill_(1)
    distilled = save_model_dir(segmenter.model, tmp_path / "distilled", segmenter.config, memory_bank=bank)
    plain = save_model_dir(segmenter.model, tmp_path / "plain", segmenter.config)

    def scores(model_dir, *extra):
        saved = tmp_path / f"{model_dir.name}{''.join(extra)}.json"
        code = cli.main(["evaluate", "--data", str(root), "--checkpoint", str(model_dir), "--tasks", "14",
                         "--max-images", "2", "--short-side", "96", "--max-size", "160", "--device", "cpu",
                         "--out", str(tmp_path / "out"), "--save-predictions", str(saved), "--no-plots", *extra])
        assert code == 0, capsys.readouterr().err
        return {i: p.scores for i, p in load_predictions(saved)[14].items()}

    without = scores(distilled, "--no-ccr")
    expected = scores(plain)
    assert sorted(without) == sorted(expected)
    assert all(np.array_equal(without[i], expected[i]) for i in expected)
    replaced = scores(distilled)
    assert not all(np.allclose(replaced[i], expected[i], atol=1e-4) for i in expected)


def test_mask_box_agreement_tells_query_blind_masks_from_instance_masks():
    from toist_core.eval.mask_sanity import mask_box_agreement

    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 20, 10, 30]], dtype=np.float32)
    own = np.zeros((3, 40, 40), dtype=bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        own[k, y0:y1, x0:x1] = True
    own[0, 10:12, 0:10] = True                    # 20 of its 120 pixels spill below its box
    good = mask_box_agreement([_Pred(own, boxes)])
    assert good["pairwise_iou_median"] == 0.0 and good["pairs"] == 3
    assert good["disjoint_iou_median"] == 0.0 and good["disjoint_pairs"] == 3   # the three boxes are apart
    assert good["inside_box_mean"] == pytest.approx((100 / 120 + 1 + 1) / 3)
    blind = np.repeat(np.ones((1, 40, 40), dtype=bool), 3, axis=0)   # every query paints the frame
    bad = mask_box_agreement([_Pred(blind, boxes)])
    assert bad["pairwise_iou_median"] == 1.0 and bad["inside_box_mean"] == pytest.approx(100 / 1600)
    assert bad["disjoint_iou_median"] == 1.0
    # Duplicates (overlapping boxes) share a mask without counting as disjoint pairs.
    twins = mask_box_agreement([_Pred(np.repeat(own[:1], 2, axis=0), boxes[[0, 0]] + [[0, 0, 1, 0], [0, 0, 0, 0]])])
    assert twins["pairwise_iou_median"] == 1.0 and twins["disjoint_pairs"] == 0
    assert np.isnan(mask_box_agreement([])["pairwise_iou_median"])


class _Pred:
    def __init__(self, masks, boxes):
        self.masks, self.boxes = masks, boxes

    def __len__(self):
        return len(self.boxes)


# ------------------------------------------------------------------------------ RLE masks, ground truth

def _square_mask(height=100, width=100, box=(10, 10, 30, 30)) -> dict:
    x0, y0, x1, y1 = box
    mask = np.zeros((1, height, width), bool)
    mask[0, y0:y1, x0:x1] = True
    return encode_masks(mask)[0]


# counts that are not a 100 x 100 mask, and what the error says of them
_BAD_COUNTS = [
    (_square_mask()["counts"][:3], r"RLE 'counts' cover 1010 pixels, not height \* width = 10000"),  # cut short
    ("!!!!", r"RLE 'counts' string holds '!' at position 0; a compressed RLE uses the characters '0' to 'o'"),
    ("0p0", r"RLE 'counts' string holds 'p' at position 1; a compressed RLE uses the characters '0' to 'o'"),
    ("", r"RLE 'counts' cover 0 pixels, not height \* width = 10000"),
    ("Q", r"RLE 'counts' string ends inside a number"),             # 'Q' = 48 + 33: a group that wants more
    ("0@", r"RLE 'counts' string decodes to a negative run \(-16 pixels, run 1\)"),
]


@pytest.mark.parametrize("counts, message", _BAD_COUNTS)
def test_predictions_whose_rle_counts_are_not_a_mask_of_their_size_are_refused(tmp_path, counts, message):
    """A cut-short counts string made pycocotools' mask IoU loop for ever (toist evaluate hung);
    other bad strings changed the mask AP without a word. Loading, saving and evaluating refuse
    them, naming file, task, image and mask."""
    entry = {"boxes": [[10, 10, 30, 30], [0, 0, 5, 5]], "scores": [0.9, 0.8],
             "masks": [_square_mask(), {"size": [100, 100], "counts": counts}]}
    (tmp_path / "bad.json").write_text(_predictions_text(3, 1, entry))
    where = r"task 3: image 1: masks\[1\] \(size \[100, 100\]\): "
    with pytest.raises(DataError, match=rf"bad\.json: {where}{message}"):
        load_predictions(tmp_path / "bad.json")
    pred = ImagePredictions(entry["boxes"], entry["scores"], entry["masks"])
    with pytest.raises(DataError, match=rf"^{where}{message}"):
        save_predictions(tmp_path / "p.json", {3: {1: pred}})
    assert not (tmp_path / "p.json").exists()
    from toist_core.eval.predictions import check_image_predictions
    with pytest.raises(DataError, match=rf"^{where}{message}"):
        check_image_predictions(pred, "task 3: image 1", (100, 100))


@pytest.mark.parametrize("counts, message", [_BAD_COUNTS[1], _BAD_COUNTS[2]])
def test_evaluating_masks_that_are_not_valid_rle_is_refused(tmp_path, counts, message):
    """(Cases whose evaluation ended before the fix: the cut-short one never did.) Boxes alone are
    still scored: a box evaluation does not read the masks."""
    path = _hand_file(tmp_path)
    preds = {1: ImagePredictions([[10, 10, 30, 30]], [0.9], [{"size": [100, 100], "counts": counts}])}
    for backend in BACKENDS:
        with pytest.raises(DataError, match=rf"^task 3: image 1: masks\[0\] \(size \[100, 100\]\): {message}"):
            evaluate_task(path, preds, backend=backend)
    assert evaluate_task(path, preds, iou_types=["bbox"]).ap50["bbox"] > 0


def test_masks_found_valid_are_checked_again_once_changed(tmp_path):
    """An image's masks are decoded once (when read, then evaluated, the same strings are not
    decoded again); a string replaced or a size changed in place is checked anew."""
    from toist_core.eval.predictions import check_image_predictions

    path = _hand_file(tmp_path)
    pred = ImagePredictions([[10, 10, 30, 30]], [0.9], [_square_mask()])
    assert evaluate_task(path, {1: pred}).ap50["segm"] > 0
    check_image_predictions(pred, "again")                                   # remembered: not decoded
    pred.masks[0]["counts"] = "!!!!"
    with pytest.raises(DataError, match=r"^task 3: image 1: masks\[0\] \(size \[100, 100\]\): RLE 'counts' "
                                        r"string holds"):
        evaluate_task(path, {1: pred})
    pred.masks[0] = _square_mask()
    check_image_predictions(pred, "valid again")
    pred.masks[0]["size"][1] = 50                                            # same string, other size
    with pytest.raises(DataError, match=r"^here: masks\[0\] \(size \[100, 50\]\): RLE 'counts' cover 10000 pixels"):
        check_image_predictions(pred, "here")


def test_a_ground_truth_object_scores_again_as_a_fresh_one(root):
    """Training reads the validation ground truth once and evaluates against the same COCO
    objects all run long; pycocotools' COCOeval writes into them (polygons become RLEs, ignore
    flags), so each later evaluation must equal one on a freshly loaded file, with each backend."""
    path = task_files(root, TASKS)[10]
    for backend in BACKENDS:
        kept = load_ground_truth(path)
        for seed in (1, 2, 3):
            preds = _random(load_ground_truth(path), np.random.default_rng(seed))
            again = evaluate_task(kept, preds, task_id=10, backend=backend)
            fresh = evaluate_task(path, preds, backend=backend)
            assert again.ap50 == fresh.ap50 and again.ap == fresh.ap, (backend, seed)
            assert np.isfinite(list(again.ap.values())).all()


def test_masks_encoded_from_arrays_are_not_decoded_to_be_checked(tmp_path, monkeypatch):
    """Training and `toist evaluate` encode ~100 predicted masks an image with pycocotools: valid
    by construction, so evaluating them decodes none for the check (each was decoded once more
    before); masks handed in as RLE dicts still are, and a string changed later is checked anew."""
    import toist_core.eval.predictions as predictions

    path = _hand_file(tmp_path)
    checked = []
    real = predictions.first_bad_counts
    monkeypatch.setattr(predictions, "first_bad_counts", lambda counts, pixels: checked.append(len(counts))
                        or real(counts, pixels))
    square = np.zeros((2, 100, 100), bool)
    square[:, 10:30, 10:30] = True
    pred = ImagePredictions.from_arrays(np.array([[10.0, 10, 30, 30]] * 2), np.array([0.9, 0.8]), square)
    assert evaluate_task(path, {1: pred}).ap50["segm"] > 0
    assert checked == []
    as_dicts = ImagePredictions.from_arrays(pred.boxes, pred.scores, [dict(m) for m in pred.masks])
    assert evaluate_task(path, {1: as_dicts}).ap50["segm"] > 0
    assert checked == [2]
    pred.masks[1]["counts"] = "!!!!"
    with pytest.raises(DataError, match=r"^task 3: image 1: masks\[1\] \(size \[100, 100\]\)"):
        evaluate_task(path, {1: pred})


def test_save_refuses_exactly_what_load_refuses(tmp_path):
    """save_predictions wrote mask entries load_predictions then refused (uncompressed counts, a
    3-number size) or failed with a bare KeyError (no size)."""
    refused = {"uncompressed RLE (list counts)": {"size": [4, 4], "counts": [0, 16]},
               "size of 3 numbers": {"size": [4, 4, 1], "counts": "04"},
               "no size": {"counts": "04"},
               "size not integers": {"size": [4.0, 4], "counts": "04"},
               "size true/false": {"size": [True, 16], "counts": "04"},
               "negative size": {"size": [-4, -4], "counts": "04"},
               "no counts": {"size": [4, 4]},
               "not an object": "04"}
    for label, mask in refused.items():
        pred = ImagePredictions([[0, 0, 2, 2]], [0.5], [mask])
        with pytest.raises(DataError, match=r"^task 1: image 7: field 'masks\[0\]': expected \{'size': \[h, w\], "
                                            r"'counts': str\}"):
            save_predictions(tmp_path / "p.json", {1: {7: pred}})
        assert not (tmp_path / "p.json").exists(), label
        (tmp_path / "hand.json").write_text(_predictions_text(1, 7, {"boxes": [[0, 0, 2, 2]], "scores": [0.5],
                                                                     "masks": [mask]}))
        with pytest.raises(DataError, match=r"hand\.json: task 1: image 7: field 'masks\[0\]': expected"):
            load_predictions(tmp_path / "hand.json")
    # What saving accepts in memory (bytes counts, numpy sizes, a tuple) loads back as written.
    counts = _square_mask(4, 4, (0, 0, 2, 2))["counts"]
    accepted = [{"size": (np.int64(4), np.int64(4)), "counts": counts.encode()}, {"size": [4, 4], "counts": counts}]
    pred = ImagePredictions([[0, 0, 2, 2], [0, 0, 4, 4]], [0.5, 0.4], accepted)
    loaded = load_predictions(save_predictions(tmp_path / "p.json", {1: {7: pred}}))[1][7]
    assert loaded.masks == [{"size": [4, 4], "counts": counts}] * 2


def _edited_task_file(root, tmp_path, edit, name="task_2_test.json"):
    data = json.loads((root / "annotations" / "task_2_test.json").read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _rle_on_the_first_image(data, rows=0, counts=None):
    """The first image's first object becomes an RLE block (``rows`` more rows than the image;
    ``counts`` instead of the block's)."""
    image = data["images"][0]
    h, w = image["height"], image["width"]
    mask = np.zeros((h + rows, w), np.uint8, order="F")
    mask[2:10, 3:12] = 1
    rle = mask_utils.encode(mask)
    ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    ann["segmentation"] = {"size": [h + rows, w], "counts": counts if counts is not None else rle["counts"].decode()}


@pytest.mark.parametrize("edit, message", [
    # The dataset refuses these; the evaluator took them and mis-scored them, or failed with an
    # AssertionError traceback.
    (lambda d: d["annotations"].append(dict(d["annotations"][0])),
     r"annotations\[\d+\] \(id \d+\): duplicate annotation id"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0], id=999999, image_id=1234567)),
     r"\(id 999999\): field 'image_id': 1234567 is not the id of an image in this file"),
    (lambda d: d["annotations"][0].update(category_id=2),
     r"annotations\[0\] \(id \d+\): field 'category_id': expected 0"),
    (lambda d: d["images"].append(dict(d["images"][1], height=d["images"][1]["height"] + 7)),
     r"images: duplicate image id"),
    (lambda d: _rle_on_the_first_image(d, rows=1),
     r"field 'segmentation': RLE size \[\d+, \d+\] differs from the size"),
    (lambda d: _rle_on_the_first_image(d, counts="da19"),
     r"field 'segmentation' \(RLE size \[\d+, \d+\]\): RLE 'counts' cover"),
    (lambda d: d.update(categories={"1": "preferred"}), r"field 'categories': expected a list"),
])
def test_ground_truth_passes_the_dataset_schema(root, tmp_path, edit, message):
    path = _edited_task_file(root, tmp_path, edit)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*{message}"):
        load_ground_truth(path)
    with pytest.raises(DataError, match=message):
        evaluate_task(path, {})


def test_ground_truth_that_is_not_a_json_object_is_refused(tmp_path):
    (tmp_path / "task_2_test.json").write_text("[]")
    with pytest.raises(DataError, match=r"task_2_test\.json: top level must be a JSON object, got list"):
        load_ground_truth(tmp_path / "task_2_test.json")


def test_a_task_file_without_categories_is_evaluated_with_the_coco_tasks_pair(root, tmp_path, capsys):
    """The dataset does not need 'categories'; pycocotools' loadRes did (KeyError)."""
    path = _edited_task_file(root, tmp_path, lambda d: d.pop("categories"))
    gt = load_ground_truth(path)
    assert gt.dataset["categories"] == [{"id": 0, "name": "non_preferred"}, {"id": 1, "name": "preferred"}]
    perfect = _perfect(load_ground_truth(root / "annotations" / "task_2_test.json"))
    for backend in BACKENDS:
        result = evaluate_task(path, perfect, backend=backend)
        assert result.ap50 == {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    data_root = tmp_path / "data"
    (data_root / "annotations").mkdir(parents=True)
    path.rename(data_root / "annotations" / "task_2_test.json")
    save_predictions(tmp_path / "p.json", {2: perfect})
    assert cli.main(["evaluate", "--data", str(data_root), "--predictions", str(tmp_path / "p.json"),
                     "--out", str(tmp_path / "out"), "--no-plots"]) == 0, capsys.readouterr().err


class _DetectorOnly:
    """A detection checkpoint: boxes, no masks; ``has_masks`` as TaskSegmenter says it (or not at all)."""

    vocabulary = COCO_TASKS
    trained_tasks = None

    def __init__(self, has_masks):
        if has_masks is not None:
            self.has_masks = has_masks
        self.calls = 0

    def set_task(self, task_id):
        pass

    def predict(self, rgb, score_threshold=None, max_instances=None):
        self.calls += 1
        return type("Prediction", (), {"boxes": np.array([[1.0, 1.0, 20.0, 20.0]]), "scores": np.array([0.5]),
                                       "masks": None})


@pytest.mark.parametrize("has_masks, predicted", [(False, 0), (None, 1)])
def test_cli_segm_of_a_detection_model_stops_before_writing_predictions(root, tmp_path, capsys, monkeypatch,
                                                                         has_masks, predicted):
    """`--iou-types segm` of a model without a mask head predicted every image, overwrote
    --save-predictions, then exited 2: now refused before predicting (or at the first image when
    the model does not say), and the predictions file is written only after the evaluation."""
    import toist_core.cli.evaluate as evaluate_cli

    model = _DetectorOnly(has_masks)
    monkeypatch.setattr(evaluate_cli, "load_segmenter", lambda *args, **kwargs: model)
    saved, out = tmp_path / "p.json", tmp_path / "out"
    save_predictions(saved, {14: {1: ImagePredictions([[0, 0, 1, 1]], [0.5])}})   # a previous run's
    previous = saved.read_bytes()
    assert cli.main(["evaluate", "--data", str(root), "--checkpoint", "detector", "--tasks", "14", "--iou-types",
                     "segm", "--out", str(out), "--save-predictions", str(saved), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert ("detection model (no mask head)" if has_masks is False else "the model predicted no masks") in err
    assert model.calls == predicted
    assert saved.read_bytes() == previous and not out.exists()
    # Boxes of the same model: evaluated, and only then saved.
    assert cli.main(["evaluate", "--data", str(root), "--checkpoint", "detector", "--tasks", "14", "--iou-types",
                     "bbox", "--max-images", "3", "--out", str(out), "--save-predictions", str(saved),
                     "--no-plots"]) == 0
    assert len(load_predictions(saved)[14]) == 3
