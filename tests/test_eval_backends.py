"""The evaluator's two COCOeval backends give the same numbers: faster-coco-eval (the default)
against pycocotools (the reference), to 1e-6 on every task's AP@0.5, AP@[.5:.95], AP@0.5 on
images with targets, the 12-number summary and the precision-recall curves, on a generated
COCO-Tasks set with boxes and masks plus edge cases (an image without any ground truth, crowd
objects given as uncompressed RLE, empty and zero-area predictions, more than 100 detections
on an image, tied scores, an image missing from the predictions, a task without predictions).
"""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from toist_core.data.synth import generate
from toist_core.eval import evaluator
from toist_core.eval.evaluator import evaluate_task, evaluate_tasks, load_ground_truth, task_files
from toist_core.eval.predictions import ImagePredictions

pytest.importorskip("faster_coco_eval")
# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TASKS = [1, 4, 9]
TOL = 1e-6
EMPTY_IMAGE = 990001  # an image with no annotation at all


def _add_edge_cases(path, rng):
    """An image without ground truth, and crowd objects (uncompressed RLE, preferred or not)."""
    data = json.loads(path.read_text())
    data["images"].append({"id": EMPTY_IMAGE, "file_name": "empty.jpg", "height": 480, "width": 640})
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image in data["images"][:6]:
        h, w = image["height"], image["width"]
        mask = np.zeros((h, w), dtype=np.uint8, order="F")
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        mask[y0:y0 + int(rng.integers(20, h // 2)), x0:x0 + int(rng.integers(20, w // 2))] = 1
        rle = mask_utils.encode(mask)
        # Uncompressed RLE, as COCO stores crowd regions.
        counts, value, run = [], 0, 0
        for pixel in mask.flatten(order="F"):
            if pixel == value:
                run += 1
            else:
                counts.append(run)
                value, run = pixel, 1
        counts.append(run)
        x, y, bw, bh = mask_utils.toBbox(rle).tolist()
        data["annotations"].append({"id": next_id, "image_id": image["id"], "bbox": [x, y, bw, bh],
                                    "segmentation": {"size": [h, w], "counts": counts},
                                    "area": float(mask_utils.area(rle)), "iscrowd": 1,
                                    "COCO_category_id": 1, "category_id": int(image["id"] % 2)})
        next_id += 1
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    generate(root, tasks=TASKS, splits=("test",), images_per_split=24, seed=5)
    rng = np.random.default_rng(5)
    out = task_files(root, TASKS)
    for path in out.values():
        _add_edge_cases(path, rng)
    return out


def _predictions(gt, rng, skip=()):
    """Noisy copies of every object, random boxes, an empty mask, a zero-area box, tied scores;
    one image gets 130 detections (maxDets 100 truncation)."""
    preds = {}
    for n, image_id in enumerate(gt.getImgIds()):
        if image_id in skip:
            continue
        info = gt.imgs[image_id]
        h, w = info["height"], info["width"]
        boxes = []
        for a in gt.imgToAnns[image_id]:
            x, y, bw, bh = a["bbox"]
            boxes.append(np.array([x, y, x + bw, y + bh]) + rng.normal(0, 0.1 * max(bw, bh, 1), 4))
        for _ in range(130 if n == 3 else int(rng.integers(0, 8))):
            x0, y0 = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
            boxes.append([x0, y0, x0 + rng.uniform(1, w - x0), y0 + rng.uniform(1, h - y0)])
        boxes = np.clip(np.array(boxes, dtype=np.float64).reshape(-1, 4), 0, [w, h, w, h])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        if len(boxes):
            boxes[-1, 2:] = boxes[-1, :2]  # a zero-area box
        masks = np.zeros((len(boxes), h, w), dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[k, y0:y1, x0:x1] = True
        if len(boxes) > 1:
            masks[0] = False  # an empty mask
        scores = np.round(rng.uniform(0, 1, len(boxes)), 1)  # many ties
        preds[image_id] = ImagePredictions.from_arrays(boxes, scores, masks)
    return preds


def _assert_same(first, second):
    assert first.task_id == second.task_id and first.num_images == second.num_images
    assert first.num_targets == second.num_targets
    assert first.num_images_with_targets == second.num_images_with_targets
    for iou_type in ("bbox", "segm"):
        where = f"task {first.task_id} {iou_type}"
        assert first.ap50[iou_type] == pytest.approx(second.ap50[iou_type], abs=TOL), where
        assert first.ap[iou_type] == pytest.approx(second.ap[iou_type], abs=TOL), where
        assert first.ap50_with_targets[iou_type] == pytest.approx(second.ap50_with_targets[iou_type], abs=TOL), where
        assert len(first.stats[iou_type]) == len(second.stats[iou_type]) == 12, where
        np.testing.assert_allclose(first.stats[iou_type], second.stats[iou_type], rtol=0, atol=TOL, err_msg=where)
        for name in ("recall", "precision_all", "precision_with_targets"):
            np.testing.assert_allclose(getattr(first.curves[iou_type], name), getattr(second.curves[iou_type], name),
                                       rtol=0, atol=TOL, equal_nan=True, err_msg=f"{where} {name}")


def test_default_is_faster_coco_eval_and_pycocotools_selectable():
    assert evaluator.default_backend() == "faster-coco-eval"
    assert evaluator.resolve_backend(None) == "faster-coco-eval"
    assert evaluator.resolve_backend("pycocotools") == "pycocotools"
    with pytest.raises(ValueError, match="unknown evaluation backend"):
        evaluator.resolve_backend("detectron2")


def test_backends_agree_on_generated_tasks(files):
    rng = np.random.default_rng(0)
    gts = {t: load_ground_truth(p) for t, p in files.items()}
    predictions = {}
    for t, gt in gts.items():
        # Task 9: one image left out of the predictions (counts as no detections).
        predictions[t] = _predictions(gt, rng, skip=(gt.getImgIds()[1],) if t == 9 else ())
        assert EMPTY_IMAGE in predictions[t] and len(predictions[t][EMPTY_IMAGE]) > 0
    crowd = [a for gt in gts.values() for a in gt.dataset["annotations"] if a["iscrowd"]]
    assert crowd and any(a["category_id"] == 1 for a in crowd)
    reference = evaluate_tasks(files, predictions, backend="pycocotools")
    fast = evaluate_tasks(files, predictions)  # the default
    assert reference.iou_types == fast.iou_types == ("bbox", "segm")
    for first, second in zip(reference.tasks, fast.tasks):
        _assert_same(first, second)
        # The numbers are not trivial: some found, not everything.
        assert 0 < first.ap50["bbox"] < 0.999 and 0 < first.ap50["segm"] < 0.999
    for iou_type in ("bbox", "segm"):
        assert reference.mean_ap50(iou_type) == pytest.approx(fast.mean_ap50(iou_type), abs=TOL)

    # A selection of images (incl. the empty one), and one shared ground-truth object for both runs.
    gt = gts[4]
    chosen = gt.getImgIds()[::3] + [EMPTY_IMAGE]
    for backend_order in (("pycocotools", "faster-coco-eval"), ("faster-coco-eval", "pycocotools")):
        runs = [evaluate_task(gt, predictions[4], ("bbox", "segm"), image_ids=chosen, task_id=4, backend=b)
                for b in backend_order]
        _assert_same(*runs)


def test_backends_agree_without_predictions(files):
    """A task without any prediction: AP 0 with targets present; and an image set without targets."""
    path = files[1]
    runs = [evaluate_task(path, {}, ("bbox", "segm"), backend=b) for b in ("pycocotools", "faster-coco-eval")]
    _assert_same(*runs)
    assert runs[1].ap50["bbox"] == 0.0 and runs[1].ap50["segm"] == 0.0
    # Only the image without ground truth, with detections: pycocotools reports -1 (no targets).
    gt = load_ground_truth(path)
    preds = {EMPTY_IMAGE: ImagePredictions.from_arrays(np.array([[1.0, 1, 50, 50]]), np.array([0.7]),
                                                       np.ones((1, 480, 640), dtype=bool))}
    runs = [evaluate_task(gt, preds, ("bbox", "segm"), image_ids=[EMPTY_IMAGE], task_id=1, backend=b)
            for b in ("pycocotools", "faster-coco-eval")]
    _assert_same(*runs)
    assert runs[1].ap50["bbox"] == -1.0 and runs[1].num_images_with_targets == 0


def test_image_ids_beyond_exact_doubles_are_scored(files, tmp_path):
    """Own data with nanosecond-timestamp image ids: faster-coco-eval holds ids as doubles, so
    neighbouring ids collided and the default backend failed ("invalid detection dimension")
    where pycocotools scores them; such a file is now scored by pycocotools, the same numbers."""
    data = json.loads(files[4].read_text())
    first = 1_700_000_000_123_456_789
    renamed = {image["id"]: first + k for k, image in enumerate(data["images"])}
    for image in data["images"]:
        image["id"] = renamed[image["id"]]
    for annotation in data["annotations"]:
        annotation["image_id"] = renamed[annotation["image_id"]]
    path = tmp_path / "task_4_test.json"
    path.write_text(json.dumps(data))
    gt = load_ground_truth(path)
    predictions = _predictions(gt, np.random.default_rng(3))
    runs = [evaluate_task(gt, predictions, ("bbox", "segm"), task_id=4, backend=b)
            for b in ("pycocotools", "faster-coco-eval", None)]
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])
    assert 0 < runs[2].ap50["bbox"] < 0.999


def _perfect(gt):
    """Every preferred, non-crowd target found exactly, one detection each."""
    perfect = {}
    for image_id in gt.getImgIds():
        targets = [a for a in gt.imgToAnns[image_id] if a["category_id"] == 1 and not a["iscrowd"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in targets)]).reshape(-1, 4)
        size = (gt.imgs[image_id]["height"], gt.imgs[image_id]["width"])
        masks = np.stack([gt.annToMask(a).astype(bool) for a in targets]) if targets else np.zeros((0, *size), bool)
        perfect[image_id] = ImagePredictions.from_arrays(boxes, np.linspace(0.9, 0.5, len(targets)), masks)
    return perfect


@pytest.mark.parametrize("first_id, every", [(0, False), (-7, False), (-7, True), (2 ** 64 + 3, False)])
def test_targets_of_annotation_ids_cocoeval_cannot_match_by_are_scored_as_found(files, tmp_path, first_id, every):
    """COCOeval marks a detection by the id of the target it matched, 0 meaning none: exporters that
    number annotations from 0 had that target's perfect detection scored as a false positive
    (AP@0.5 0.855 instead of 1.0 on this set), by both backends; faster-coco-eval (the default)
    scored targets of negative ids, or ids past 2**64, as never found (AP 0.0 with every id
    negative). Such ids are numbered 1..N at load; a COCO object built elsewhere is refused."""
    data = json.loads(files[9].read_text())
    preferred = [a for a in data["annotations"] if a["category_id"] == 1 and not a["iscrowd"]]
    for k, annotation in enumerate(preferred if every else preferred[:1]):
        annotation["id"] = first_id - k if first_id <= 0 else first_id + k
    path = tmp_path / "task_9_test.json"
    path.write_text(json.dumps(data))
    gt = load_ground_truth(path)
    perfect = _perfect(gt)
    for backend in ("pycocotools", "faster-coco-eval"):
        result = evaluate_task(gt, perfect, ("bbox", "segm"), task_id=9, backend=backend)
        assert result.ap50["bbox"] == pytest.approx(1.0), backend
        assert result.ap50["segm"] == pytest.approx(1.0), backend

    from pycocotools.coco import COCO

    elsewhere = COCO()
    elsewhere.dataset = data
    elsewhere.createIndex()
    with pytest.raises(evaluator.DataError, match=rf"task 9: .*annotation ids {first_id}.* are not 1\.\.2\*\*53.*"
                                                  "load_ground_truth"):
        evaluate_task(elsewhere, perfect, ("bbox",), task_id=9)


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_the_collector_is_held_off_during_a_task_and_restored(files, monkeypatch, backend):
    """A task's evaluation runs with Python's cyclic collector off (its full passes over a
    COCO-Tasks-sized prediction set cost ~40 % of the evaluation) and gives it back afterwards:
    on after a result and after a refusal, still off for a caller who had turned it off."""
    import gc

    seen = []
    real_run = evaluator._run_cocoeval

    def recording_run(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(evaluator, "_run_cocoeval", recording_run)
    gt = load_ground_truth(files[1])
    predictions = _predictions(gt, np.random.default_rng(3))
    assert gc.isenabled()
    result = evaluate_task(gt, predictions, ("bbox", "segm"), task_id=1, backend=backend)
    assert seen == [False, False] and gc.isenabled()
    assert 0 < result.ap50["segm"] < 1

    bad = dict(predictions)
    image_id = next(iter(bad))
    bad[image_id] = ImagePredictions(bad[image_id].boxes, np.full(len(bad[image_id].scores), np.nan),
                                     bad[image_id].masks)
    with pytest.raises(evaluator.DataError, match="NaN|nan|finite"):
        evaluate_task(gt, bad, ("bbox",), task_id=1, backend=backend)
    assert gc.isenabled(), "a refused task left the collector off"

    gc.disable()
    try:
        evaluate_task(gt, predictions, ("bbox",), task_id=1, backend=backend)
        assert not gc.isenabled(), "a caller's choice to keep the collector off was overridden"
    finally:
        gc.enable()


def test_evaluations_in_threads_keep_their_own_summaries_and_stdout(files, capsys):
    """pycocotools prints its summary; the evaluator captures it by swapping the process-wide
    ``sys.stdout``. Evaluations in four threads interleaved the swaps: logs without their
    summary (5-9 of 20), summaries on the terminal, and once ``sys.stdout`` left a discarded
    buffer, every later print of the process lost."""
    import sys
    import threading

    gt = load_ground_truth(files[1])
    predictions = _predictions(gt, np.random.default_rng(5))
    before = sys.stdout
    results = []

    def evaluate_some():
        for _ in range(4):
            results.append(evaluate_task(gt, predictions, ("bbox",), task_id=1, backend="pycocotools"))

    threads = [threading.Thread(target=evaluate_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.stdout is before
    assert len(results) == 16
    assert all(result.log.count("Average Precision") == 6 for result in results)
    assert "Average Precision" not in capsys.readouterr().out
