"""Duplicate removal (``InferenceConfig.duplicate_iou``): one object found twice is published once.

A random tiny model paints nearly the same mask for every query (its mask head has not learned
to read the query), so all its instances are duplicates of one another: the case the removal is for.
"""

import dataclasses

import numpy as np
import pytest
import torch

from toist_core.config import ConfigError, InferenceConfig
from toist_core.inference import TaskSegmenter
from toist_core.inference.postprocess import binary_low_res, drop_duplicates, mask_iou

SMALL = dict(short_side=64, max_size=128)


def image(seed=0, height=60, width=90):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_greedy_walk_keeps_best_of_each_group_and_describes_only_what_it_reaches():
    # Six candidates, best first; 0/1/3 cover one region, 2/5 another, 4 a third.
    regions = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                            [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    candidates = torch.tensor([10, 11, 12, 13, 14, 15])
    described = []

    def describe(queries):
        described.append(queries.tolist())
        return regions[queries - 10]

    keep, positions = drop_duplicates(candidates, describe, mask_iou, 0.5, limit=100)
    assert keep.tolist() == [10, 12, 14] and positions == [0, 2, 4]
    described.clear()
    keep, _ = drop_duplicates(candidates, describe, mask_iou, 0.5, limit=2)
    assert keep.tolist() == [10, 12] and described == [[10, 11]] + [[12, 13]]  # chunks of `limit`, no more
    # Two masks sharing one of three pixels (IoU 1/3): kept apart below that threshold, one above.
    half = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert drop_duplicates(torch.tensor([0, 1]), lambda q: half[q], mask_iou, 0.34, 10)[0].tolist() == [0, 1]
    assert drop_duplicates(torch.tensor([0, 1]), lambda q: half[q], mask_iou, 0.33, 10)[0].tolist() == [0]
    assert drop_duplicates(torch.tensor([], dtype=torch.long), describe, mask_iou, 0.5, 3)[0].numel() == 0
    # "Above" the setting, as documented: an IoU of exactly the setting is kept, so 1.0 drops
    # nothing (not even identical masks: IoU 1.0), as None.
    pair = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)                    # IoU 2/4
    assert drop_duplicates(torch.tensor([0, 1]), lambda q: pair[q], mask_iou, 0.5, 10)[0].tolist() == [0, 1]
    same = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert drop_duplicates(torch.tensor([0, 1]), lambda q: same[q], mask_iou, 1.0, 10)[0].tolist() == [0, 1]
    assert drop_duplicates(torch.tensor([0, 1]), lambda q: same[q], mask_iou, 0.999, 10)[0].tolist() == [0]


def test_setting_is_checked():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="duplicate_iou"):
            InferenceConfig(duplicate_iou=bad)
    assert InferenceConfig().duplicate_iou == 0.7 and InferenceConfig(duplicate_iou=None).duplicate_iou is None


@pytest.fixture(scope="module")
def every_query():
    return TaskSegmenter.from_config("tiny_segm", seed=0, task=2, inference=InferenceConfig(
        score_threshold=0.0, max_instances=100, duplicate_iou=None, **SMALL))


def _low_res_masks(seg, frame, queries):
    """The stride-4 masks the removal compares, for ``queries`` of ``frame``."""
    batch, sizes = seg.preprocess([frame])
    state = seg.task_state
    _, _, mask_logits = seg._detect(batch, state)
    with torch.inference_mode():
        logits = mask_logits(0, torch.as_tensor(queries))[0]
    return binary_low_res(logits, sizes[0], batch.tensors.shape[-2:], seg.inference.mask_threshold)


def test_masks_overlapping_a_better_instance_are_dropped(every_query):
    frame = image(1)
    full = every_query.predict(frame)
    seg = TaskSegmenter(every_query.model, device="cpu", task=2, inference=dataclasses.replace(
        every_query.inference, duplicate_iou=0.5))
    kept = seg.predict(frame)
    assert 1 <= len(kept) < len(full)                                   # the random model's duplicates go
    # What stays is the best-first walk over the full list: each survivor overlaps no better
    # survivor by more than 0.5, each dropped query overlaps a better survivor by more.
    masks = _low_res_masks(every_query, frame, full.queries)
    expected = []
    for i in range(len(full)):
        if all(float(mask_iou(masks[i:i + 1], masks[j:j + 1])) <= 0.5 for j in expected):
            expected.append(i)
    assert kept.queries.tolist() == full.queries[expected].tolist()
    assert np.array_equal(kept.scores, full.scores[expected]) and np.array_equal(kept.boxes, full.boxes[expected])
    assert np.array_equal(kept.masks, full.masks[expected])                # same masks as without removal
    # The instance cap counts survivors: the first two of them, not two of the raw list.
    capped = seg.predict(frame, max_instances=2)
    assert capped.queries.tolist() == kept.queries[:2].tolist()
    # IoU above 1.0 cannot be: 1.0 keeps every query, as None does (the masks of this frame are
    # all alike, so any setting below it keeps fewer).
    at_one = TaskSegmenter(every_query.model, device="cpu", task=2, inference=dataclasses.replace(
        every_query.inference, duplicate_iou=1.0)).predict(frame)
    assert at_one.queries.tolist() == full.queries.tolist() and len(kept) < len(full)


def test_without_masks_boxes_decide(every_query):
    from torchvision.ops import box_iou

    frame = image(2)
    full = every_query.predict(frame, with_masks=False)
    seg = TaskSegmenter(every_query.model, device="cpu", task=2, inference=dataclasses.replace(
        every_query.inference, duplicate_iou=0.5))
    kept = seg.predict(frame, with_masks=False)
    assert kept.masks is None and 1 <= len(kept) < len(full)
    overlaps = box_iou(torch.as_tensor(kept.boxes), torch.as_tensor(kept.boxes)).numpy()
    assert np.all(overlaps[np.triu_indices(len(kept), 1)] <= 0.5)
    dropped = sorted(set(full.queries.tolist()) - set(kept.queries.tolist()))
    for query in dropped:
        row = full.boxes[full.queries.tolist().index(query)]
        better = kept.boxes[kept.scores >= full.scores[full.queries.tolist().index(query)]]
        assert box_iou(torch.as_tensor(row[None]), torch.as_tensor(better)).max() > 0.5


def test_reference_protocol_keeps_every_query(every_query):
    frame = image(3)
    seg = TaskSegmenter(every_query.model, device="cpu", task=2, inference=dataclasses.replace(
        every_query.inference, protocol="reference", duplicate_iou=0.5))
    assert seg.processing.duplicate_iou is None and len(seg.predict(frame)) == 100


def test_changing_the_config_at_run_time_takes_effect(every_query):
    frame = image(4)
    seg = TaskSegmenter(every_query.model, device="cpu", task=2, inference=every_query.inference)
    assert len(seg.predict(frame)) == 100
    seg.inference = dataclasses.replace(seg.inference, duplicate_iou=0.5)
    assert len(seg.predict(frame)) < 100


def test_node_parameter_reaches_the_segmenter(every_query):
    """The node's run-time parameter (0 = keep every instance) and its start-up config."""
    from toist_ros.inference_worker import predict
    from toist_ros.model_loader import inference_config
    from toist_ros.params import PARAMETERS
    from toist_ros.tasks import ActiveTask

    specs = {spec.name: spec for spec in PARAMETERS}
    assert specs["duplicate_iou"].default == 0.7
    settings = {"mask_threshold": 0.5, "duplicate_iou": 0.0, "score_threshold": 0.0, "max_instances": 100,
                "output.masks": True, "depth.enabled": False, "input.short_side": 64, "input.max_side": 128,
                "precision": "fp32", "backend": "torch", "ccr": True}
    assert inference_config(settings).duplicate_iou is None
    assert inference_config({**settings, "duplicate_iou": 0.4}).duplicate_iou == 0.4
    seg = TaskSegmenter(every_query.model, device="cpu", task=2, inference=dataclasses.replace(
        every_query.inference, duplicate_iou=0.5))
    task = ActiveTask(request="2", caption=seg.task_state.caption, task_id=2, revision=1, state=seg.task_state)
    assert len(predict(seg, image(5), task, settings)) == 100 and seg.inference.duplicate_iou is None
    assert len(predict(seg, image(5), task, {**settings, "duplicate_iou": 0.5})) < 100


def test_cli_predict_drops_duplicates_by_default(tmp_path, capsys):
    import json

    from toist_core import cli
    from toist_core.visualize import save_rgb

    save_rgb(tmp_path / "scene.png", image(6))
    counts = {}
    for name, extra in (("default", []), ("off", ["--duplicate-iou", "0"])):
        out = tmp_path / name
        assert cli.main(["predict", "--preset", "tiny_segm", "--task", "2", str(tmp_path / "scene.png"),
                         "--out", str(out), "--device", "cpu", "--short-side", "64", "--max-size", "128",
                         "--score-threshold", "0", *extra]) == 0, capsys.readouterr().err
        counts[name] = len(json.loads((out / "scene.json").read_text())["instances"])
    assert 1 <= counts["default"] < counts["off"] == 100


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_bad_duplicate_iou_is_refused_in_the_option_s_words(tmp_path, capsys, command):
    """`--duplicate-iou -1` was refused by the config field, "duplicate_iou must be in (0, 1] or None",
    a value the command line cannot give (its "keep duplicates" is 0)."""
    from toist_core import cli

    for bad in ("-1", "1.5", "nan", "lots"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--duplicate-iou", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--duplicate-iou" in err and "or None" not in err, err
        assert ("must be in (0, 1], or 0 to keep duplicates" in err) or ("expected a number" in err), err
