"""TaskSegmenter: pixel boxes, cached text, masks for kept queries, CCR, CLI predict."""

import dataclasses
import io
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toist_core import cli
from toist_core.config import InferenceConfig
from toist_core.distill.memory_bank import MemoryBank
from toist_core.inference import Prediction, TaskSegmenter, TaskState
from toist_core.structures import ImageBatch
from toist_core.tokens import NO_OBJECT_INDEX

SMALL = dict(short_side=64, max_size=128)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def seg():
    return TaskSegmenter.from_config("tiny_segm", seed=0, task=2,
                                     inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None, max_instances=100, **SMALL))


def test_duplicates_whose_masks_are_empty_are_told_apart_by_their_boxes(seg):
    """A mask threshold above every pixel's probability leaves every mask empty: their IoU was 0,
    so nothing was dropped and one object came back 100 times; with masks off the boxes decide."""
    image = random_image(40, 50, seed=2)
    settings = dataclasses.replace(seg.inference, duplicate_iou=0.7, mask_threshold=0.999999)
    previous, seg.inference = seg.inference, settings
    try:
        with_masks = seg.predict(image)
        boxes_only = seg.predict(image, with_masks=False)
    finally:
        seg.inference = previous
    assert not with_masks.masks.any()
    assert len(boxes_only) < 100 and np.array_equal(with_masks.queries, boxes_only.queries)


def test_a_read_only_frame_is_read_without_a_warning_and_a_task_id_is_no_task_state(seg, recwarn):
    image = random_image(40, 50, seed=2)
    expected = seg.predict(image)
    frozen = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.shape)   # a ROS message's buffer
    assert not frozen.flags.writeable
    got = seg.predict(frozen)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert np.array_equal(got.boxes, expected.boxes) and np.array_equal(got.scores, expected.scores)
    with pytest.raises(TypeError, match=r"task_state must be a TaskState .*got int; for a task id or name use seg.set_task"):
        seg.predict(image, task_state=2)


def reference_outputs(seg, image, caption, memory_hook=None):
    """The naive path: full forward (text encoded, all 100 masks), then the reference's
    post-processing (softmax score, boxes x original size, masks upsampled and thresholded)."""
    batch, sizes = seg.preprocess([image])
    with torch.no_grad():
        memory = seg.model.encode(batch, [caption])
        if memory_hook is not None:
            memory = memory_hook(memory)
        out = seg.model.decode(memory)
    scores = 1 - out["pred_logits"][0].softmax(-1)[:, NO_OBJECT_INDEX]
    height, width = image.shape[:2]
    cx, cy, w, h = out["pred_boxes"][0].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)
    masks = None
    if "pred_masks" in out:
        # The reference's PostProcessSegm: to the padded size, crop the image, to the original size.
        logits = F.interpolate(out["pred_masks"], size=tuple(batch.tensors.shape[-2:]), mode="bilinear",
                               align_corners=False)[..., :sizes[0][0], :sizes[0][1]]
        masks = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
    return scores, boxes, masks


def test_predict_matches_full_forward_and_masks_only_kept(seg):
    image = random_image(70, 110)
    scores, boxes, masks = reference_outputs(seg, image, "sit comfortably on something")
    pred = seg.predict(image, max_instances=7)
    order = scores.argsort(descending=True, stable=True)[:7]
    assert isinstance(pred, Prediction) and len(pred) == 7
    assert pred.queries.tolist() == order.tolist()
    assert np.allclose(pred.scores, scores[order].numpy(), atol=1e-6)
    clipped = boxes[order].clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, 110)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, 70)
    assert np.allclose(pred.boxes, clipped.numpy(), atol=1e-3)
    assert pred.masks.shape == (7, 70, 110) and pred.masks.dtype == bool
    # Masks of the kept queries alone equal those of the full 100-query mask head.
    assert np.array_equal(pred.masks, masks[order].numpy())
    assert 0.0 < pred.masks.mean() < 1.0  # non-trivial masks
    assert pred.caption == "sit comfortably on something" and pred.task_id == 2
    assert pred.image_size == (70, 110)


def test_masks_can_be_skipped(seg, monkeypatch):
    image = random_image(60, 80, seed=4)
    full = seg.predict(image, max_instances=5)
    calls = []
    monkeypatch.setattr(seg.model, "predict_masks", lambda *args: calls.append(args))
    bare = seg.predict(image, max_instances=5, with_masks=False)
    assert calls == []  # the mask head is not run at all
    assert bare.masks is None and len(bare) == 5
    assert np.array_equal(bare.boxes, full.boxes) and np.array_equal(bare.scores, full.scores)


def test_threshold_and_cap(seg):
    image = random_image(50, 60, seed=1)
    full = seg.predict(image, score_threshold=0.0, max_instances=100)
    assert len(full) == 100 and np.all(np.diff(full.scores) <= 0)
    cut = float(full.scores[10])
    kept = seg.predict(image, score_threshold=cut, max_instances=100)
    assert len(kept) == int((full.scores >= cut).sum()) and kept.scores.min() >= cut
    assert len(seg.predict(image, score_threshold=1.0)) == 0
    empty = seg.predict(image, score_threshold=1.0)
    assert empty.boxes.shape == (0, 4) and empty.masks.shape == (0, 50, 60)


def test_detection_only_model_has_no_masks():
    seg = TaskSegmenter.from_config("tiny", seed=3, task="water plant with",
                                    inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None, max_instances=5, **SMALL))
    pred = seg.predict(random_image(40, 90))
    assert pred.masks is None and pred.boxes.shape == (5, 4) and pred.task_id == 5
    assert np.all((pred.boxes[:, 0::2] >= 0) & (pred.boxes[:, 0::2] <= 90))
    assert np.all(pred.boxes[:, 2] >= pred.boxes[:, 0])


@pytest.fixture(scope="module")
def forced():
    """A model whose every query predicts box (cx, cy, w, h) = (0.4, 0.55, 0.3, 0.5)."""
    seg = TaskSegmenter.from_config("tiny_segm", seed=1, task=5,
                                    inference=InferenceConfig(score_threshold=0.5, max_instances=3, duplicate_iou=None, **SMALL))
    box = torch.tensor([0.4, 0.55, 0.3, 0.5])
    last = seg.model.detector.bbox_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.log(box / (1 - box)))
        seg.model.detector.class_embed.weight.zero_()
        seg.model.detector.class_embed.bias.zero_()
        seg.model.detector.class_embed.bias[NO_OBJECT_INDEX] = -5.0
    return seg, box


@pytest.mark.parametrize("height, width", [(37, 91), (120, 50), (64, 64), (33, 200)])
def test_boxes_are_in_original_pixels(forced, height, width):
    seg, (cx, cy, w, h) = forced
    pred = seg.predict(random_image(height, width, seed=height))
    expected = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    assert len(pred) == 3
    assert np.allclose(pred.boxes, np.array([expected] * 3, dtype=np.float32), atol=1e-3)
    p_no_object = math.exp(-5.0) / (255 + math.exp(-5.0))
    assert np.allclose(pred.scores, 1 - p_no_object, atol=1e-6)
    assert pred.masks.shape == (3, height, width)


def test_boxes_with_reference_resize_rule(forced):
    """Default preprocessing (short side 800, long side <= 1333) on a large non-square image."""
    small, (cx, cy, w, h) = forced
    seg = TaskSegmenter(small.model, device="cpu", task=5, inference=InferenceConfig(max_instances=1))
    image = random_image(150, 400)
    batch, sizes = seg.preprocess([image])
    # Padded (and masked) to multiples of 32; boxes stay relative to the image.
    assert sizes == [(500, 1333)] and tuple(batch.tensors.shape) == (1, 3, 512, 1344)
    assert not batch.mask[0, :500, :1333].any() and batch.mask[0, 500:].all() and batch.mask[0, :, 1333:].all()
    assert (batch.tensors[0, :, 500:] == 0).all() and (batch.tensors[0, :, :, 1333:] == 0).all()
    pred = seg.predict(image)
    assert np.allclose(pred.boxes[0], [(cx - w / 2) * 400, (cy - h / 2) * 150, (cx + w / 2) * 400,
                                       (cy + h / 2) * 150], atol=1e-3)
    assert pred.masks.shape == (1, 150, 400)


def test_text_is_encoded_once_per_task(seg):
    calls = []
    handle = seg.model.detector.transformer.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        seg.set_task(3)
        for seed in range(3):
            seg.predict(random_image(40, 56, seed=seed))
        assert len(calls) == 1
        seg.set_task("open parcel with")
        seg.predict_batch([random_image(40, 56), random_image(48, 40)])
        assert len(calls) == 2
    finally:
        handle.remove()
        seg.set_task(2)


def test_loading_new_weights_reencodes_the_current_task(distilled):
    """The task's text features and centres come from the weights: after a ``load_state_dict`` of
    the model or of the bank, frames are answered as by a segmenter built on the new weights."""
    seg, bank = distilled
    other = TaskSegmenter.from_config("tiny_segm", seed=1, inference=seg.inference)
    own_weights = {k: v.clone() for k, v in seg.model.state_dict().items()}
    own_bank = {k: v.clone() for k, v in bank.state_dict().items()}
    image = random_image(56, 72, seed=5)
    pinned = seg.set_task(4)   # a state kept by the caller (the Threads pattern)
    assert seg.predict(image, task_state=pinned).task_id == 4
    import copy
    import pickle

    for kept in (copy.deepcopy(pinned), pickle.loads(pickle.dumps(pinned))):   # copies are the same state
        assert seg.predict(image, task_state=kept).task_id == 4
    with pytest.raises(ValueError, match=r"task_state: encoded by another TaskSegmenter"):
        seg.predict(image, task_state=other.encode_task(4))   # another model's text features
    try:
        seg.model.load_state_dict(other.model.state_dict())
        fresh = TaskSegmenter(seg.model, device="cpu", memory_bank=bank, inference=seg.inference, task=4)
        assert np.array_equal(seg.predict(image).scores, fresh.predict(image).scores)
        # The kept state holds the old weights' text: refused, not mixed with the new image weights.
        with pytest.raises(ValueError, match=r"task_state: encoded before this segmenter's weights were loaded"):
            seg.predict(image, task_state=pinned)
        with pytest.raises(ValueError, match=r"set_task: encoded before"):
            seg.set_task(pinned)
        before = seg.task_state.centres
        bank.load_state_dict({k: v * 2 if k == "feature_bank" else v for k, v in own_bank.items()})
        assert not torch.allclose(seg.task_state.centres, before)
        assert torch.equal(seg.task_state.centres, seg.encode_task(4).centres)
    finally:
        seg.model.load_state_dict(own_weights)
        bank.load_state_dict(own_bank)
    # The hooks stay out of the way of saving the whole module.
    buffer = io.BytesIO()
    torch.save(seg.model, buffer)
    # Back on its own weights, the task state is what it was before.
    assert torch.equal(seg.task_state.centres, bank.cluster_centers[3])
    assert np.array_equal(seg.predict(image).scores,
                          TaskSegmenter(seg.model, device="cpu", memory_bank=bank, inference=seg.inference,
                                        task=4).predict(image).scores)


def test_task_state_snapshot(seg):
    image = random_image(48, 64, seed=4)
    state_7 = seg.encode_task(7)
    assert isinstance(state_7, TaskState) and state_7.caption == "dig hole with something"
    assert seg.task_state.task_id == 2  # encode_task does not change the current task
    with pytest.raises(AttributeError):
        state_7.caption = "x"
    with_state = seg.predict(image, task_state=state_7)
    seg.set_task(state_7)
    current = seg.predict(image)
    seg.set_task(2)
    assert with_state.task_id == current.task_id == 7
    assert np.array_equal(with_state.boxes, current.boxes)
    free = seg.encode_task("reach the top shelf with")
    assert free.task_id is None and free.centres is None and free.pronoun_tokens == ()
    # Compared and hashed by identity (== compared tensors: "Boolean value of Tensor ... ambiguous").
    again = seg.encode_task(7)
    assert state_7 == state_7 and state_7 != again and state_7 in [again, state_7]
    assert {state_7: 1, again: 2}[again] == 2


def test_bad_inputs_are_named(seg):
    with pytest.raises(ValueError, match="uint8"):
        seg.predict(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        seg.predict(np.zeros((10, 10), dtype=np.uint8))
    # The public preprocess step checks them as predict does (uint16 was divided by 255).
    with pytest.raises(ValueError, match=r"images\[1\].*uint8"):
        seg.preprocess([random_image(10, 10), np.zeros((10, 10, 3), dtype=np.uint16)])
    with pytest.raises(ValueError, match=r"images\[0\].*H x W x 3"):
        seg.preprocess([np.zeros((10, 10, 4), dtype=np.uint8)])
    # A generator, spent by those checks, reached the batching empty ("an empty list of images").
    images = [random_image(10, 12), random_image(9, 7)]
    batch, sizes = seg.preprocess(image for image in images)
    assert sizes == seg.preprocess(images)[1] and batch.tensors.shape[0] == 2
    fresh = TaskSegmenter(seg.model, device="cpu")
    with pytest.raises(RuntimeError, match="set_task"):
        fresh.predict(random_image(10, 10))
    with pytest.raises(ValueError, match="fp16"):
        TaskSegmenter(seg.model, device="cpu", inference=InferenceConfig(precision="fp16"))
    with pytest.raises(ValueError, match="cuda:7|CUDA"):
        TaskSegmenter(seg.model, device="cuda:7")


def test_segmenter_leaves_a_given_module_as_it_is(seg):
    """A trainer evaluates the module it trains: wrapping and predicting must not change its
    layout, device, dtype or train/eval flags (its EMA and optimizer hold its tensors)."""
    from toist_core.model import build_model, load_tokenizer

    model = build_model(seg.config, tokenizer=load_tokenizer(seg.config.text.tokenizer))
    model.train()
    model.detector.transformer.text_encoder.eval()   # a frozen part in eval mode stays so
    modes = [m.training for m in model.modules()]
    storage = {n: (p.data_ptr(), p.stride(), p.dtype, p.device) for n, p in model.named_parameters()}
    wrapped = TaskSegmenter(model, device="cpu", task=2, inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None, **SMALL))
    pred = wrapped.predict(random_image(48, 64, seed=1))
    assert len(pred) > 0
    assert [m.training for m in model.modules()] == modes
    assert {n: (p.data_ptr(), p.stride(), p.dtype, p.device) for n, p in model.named_parameters()} == storage
    # Same result as the module in eval mode (dropout off while predicting).
    model.eval()
    again = TaskSegmenter(model, device="cpu", task=2, inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None, **SMALL))
    assert np.array_equal(again.predict(random_image(48, 64, seed=1)).boxes, pred.boxes)


def test_segmenter_refuses_a_module_on_another_device(seg):
    meta = TaskSegmenter.from_config("tiny", device="cpu").model.to("meta")
    with pytest.raises(ValueError, match="never moves a module"):
        TaskSegmenter(meta, device="cpu")


@pytest.mark.parametrize("device", ["cuda:0", torch.device("cuda:0"), "mps", torch.device("meta")])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(device, monkeypatch):
    """A torch.device skipped the checks: cuda:0 on a machine without CUDA loaded the model, then
    failed with torch's "Found no NVIDIA driver"."""
    from toist_core.inference import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device .*(CUDA is not available|expected 'auto', 'cpu')"):
        resolve_device(device)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bf16_on_cpu_runs_close_to_fp32(seg):
    image = random_image(64, 80, seed=9)
    fast = TaskSegmenter(seg.model, device="cpu", task=2,
                         inference=InferenceConfig(precision="bf16", score_threshold=0.0, duplicate_iou=None, **SMALL))
    ref = seg.predict(image)
    low = fast.predict(image)
    assert len(low) == 100 and low.masks.shape == (100, 64, 80)
    by_query = np.argsort(low.queries)
    assert np.abs(low.boxes[by_query] - ref.boxes[np.argsort(ref.queries)]).max() < 0.1 * 80


@pytest.mark.parametrize("has_bf16", [False, True, None])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(seg, monkeypatch, has_bf16):
    """Emulated bf16 is slower than fp32: said when a segmenter is built or configured for it;
    nothing when the CPU has the instructions or cannot tell (None: no /proc/cpuinfo)."""
    import warnings

    from toist_core.inference import SlowPrecisionWarning
    from toist_core.inference import device

    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: has_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = TaskSegmenter(seg.model, device="cpu", inference=InferenceConfig(precision="bf16", **SMALL))
        fast.inference = dataclasses.replace(fast.inference, precision="fp32")
        fast.inference = dataclasses.replace(fast.inference, precision="bf16")
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    if has_bf16 is False:
        assert len(slow) == 2 and "bf16" in str(slow[0].message) and "fp32" in str(slow[0].message)
    else:
        assert slow == []


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from toist_core.inference.device import cpu_computes_bf16

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        assert cpu_computes_bf16() is None
        return
    assert cpu_computes_bf16() is bool({"avx512_bf16", "amx_bf16"} & set(flags))


@pytest.fixture(scope="module")
def distilled():
    bank = MemoryBank(num_tasks=14, size=32, dim=128, num_clusters=3, seed=3)
    bank.full_label.fill_(1)
    seg = TaskSegmenter.from_config("tiny_segm", seed=2, memory_bank=bank,
                                    inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None, **SMALL))
    return seg, bank


def test_distilled_model_replaces_pronoun_rows_with_task_centre(distilled):
    seg, bank = distilled
    clusters = []
    original = bank.cluster
    bank.cluster = lambda task: clusters.append(task) or original(task)
    try:
        state = seg.set_task(4)
        image = random_image(56, 72, seed=5)
        for _ in range(3):
            pred = seg.predict(image)
    finally:
        del bank.cluster
    assert clusters == [3]  # k-means once per task (task index = id - 1), never per frame
    assert state.uses_ccr and state.centres.shape == (3, 128)
    assert torch.equal(state.centres, bank.cluster_centers[3])
    rows = list(state.pronoun_tokens)

    def ccr(memory):
        text = memory["text_memory"]
        feature = text[rows, 0].mean(0)
        centre = state.centres[((state.centres - feature) ** 2).sum(-1).argmin()]
        modified = memory["img_memory"].clone()
        modified[[memory["img_memory"].shape[0] - text.shape[0] + r for r in rows], 0] = centre
        return {**memory, "img_memory_mod": modified}

    scores, boxes, masks = reference_outputs(seg, image, state.caption, memory_hook=ccr)
    plain_scores, _, _ = reference_outputs(seg, image, state.caption)
    order = scores.argsort(descending=True, stable=True)
    assert pred.queries.tolist() == order.tolist()
    assert np.allclose(pred.scores, scores[order].numpy(), atol=1e-6)
    assert not torch.allclose(scores, plain_scores, atol=1e-4)  # CCR changed the decoder's input
    # The centre nearest to the image's pronoun feature p, wherever it is in the list (the random
    # bank's nearest was its first centre: "always the first" passed the check above).
    features = []
    reference_outputs(seg, image, state.caption,
                      memory_hook=lambda memory: features.append(memory["text_memory"][rows, 0].mean(0)) or memory)
    p = features[0]
    u = torch.ones_like(p) / p.numel() ** 0.5
    near, far = p + 0.01 * u, [-p, p + 50 * u]    # -p: the nearest to anything but p's direction

    def with_centre(centre):
        def hook(memory):
            modified = memory["img_memory"].clone()
            modified[[memory["img_memory"].shape[0] - memory["text_memory"].shape[0] + r for r in rows], 0] = centre
            return {**memory, "img_memory_mod": modified}
        return hook

    expected, _, _ = reference_outputs(seg, image, state.caption, memory_hook=with_centre(near))
    for centres in ([near, *far], [*far, near], [far[0], near, far[1]]):
        got = seg.predict_batch([image], dataclasses.replace(state, centres=torch.stack(centres)))[0]
        assert np.allclose(got.scores, expected[got.queries].numpy(), atol=1e-6)
    # Free text has no bank: no replacement.
    assert seg.encode_task("step on something soft").centres is None


def test_ccr_off_leaves_the_bank_unused(distilled):
    """A model trained with CCR off is scored as trained: the plain decoder, the bank untouched."""
    seg, bank = distilled
    off = TaskSegmenter(seg.model, device="cpu", memory_bank=bank,
                        inference=dataclasses.replace(seg.inference, ccr=False))
    bank_before = {k: v.clone() for k, v in bank.state_dict().items()}
    state = off.set_task(4)
    image = random_image(56, 72, seed=5)
    pred = off.predict(image)
    assert state.centres is None and not state.uses_ccr and state.pronoun_tokens
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in bank_before.items())
    scores, _, _ = reference_outputs(seg, image, state.caption)
    order = scores.argsort(descending=True, stable=True)
    assert pred.queries.tolist() == order.tolist()
    assert np.allclose(pred.scores, scores[order].numpy(), atol=1e-6)
    # The same segmenter with CCR on answers differently (the switch is what changed).
    assert not np.allclose(seg.predict(image, seg.encode_task(4)).scores, pred.scores, atol=1e-4)


def test_cli_predict_writes_overlays_and_rle(tmp_path, capsys):
    from pycocotools import mask as mask_utils

    from toist_core.visualize import save_rgb

    image_path = tmp_path / "kitchen.png"
    save_rgb(image_path, random_image(45, 70, seed=8))
    out = tmp_path / "out"
    code = cli.main(["predict", "--preset", "tiny_segm", "--task", "2", str(image_path), "--out", str(out),
                     "--device", "cpu", "--short-side", "64", "--max-size", "128", "--score-threshold", "0",
                     "--max-instances", "4", "--duplicate-iou", "0"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "kitchen.json").read_text())
    assert result["caption"] == "sit comfortably on something" and result["task_id"] == 2
    assert (result["height"], result["width"]) == (45, 70) and len(result["instances"]) == 4
    first = result["instances"][0]
    decoded = mask_utils.decode({"size": first["segmentation"]["size"],
                                 "counts": first["segmentation"]["counts"].encode()})
    assert decoded.shape == (45, 70) and len(first["box"]) == 4
    from toist_core.visualize import load_rgb
    assert load_rgb(out / "kitchen.png").shape == (45, 70, 3)


def test_cli_predict_never_overwrites_an_input(tmp_path, capsys):
    """--out the images' own folder: <stem>.png is the input itself, so another name is taken."""
    from toist_core.visualize import save_rgb

    photos = tmp_path / "photos"
    photos.mkdir()
    save_rgb(photos / "kitchen.png", random_image(45, 70, seed=8))
    save_rgb(photos / "kitchen_2.png", random_image(40, 60, seed=9))   # the next name is an input too
    inputs = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = tmp_path / "photos" / ".." / "photos"                      # the same folder, spelled otherwise
    code = cli.main(["predict", "--preset", "tiny_segm", "--task", "2", str(photos / "kitchen.png"),
                     str(photos / "kitchen_2.png"), "--out", str(out), "--device", "cpu", "--short-side", "64",
                     "--max-size", "128", "--max-instances", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {p.name: p.read_bytes() for p in photos.iterdir() if p.name in inputs} == inputs
    assert sorted(p.name for p in photos.iterdir()) == ["kitchen.png", "kitchen_2.png", "kitchen_2_2.json",
                                                       "kitchen_2_2.png", "kitchen_3.json", "kitchen_3.png"]
    assert json.loads((photos / "kitchen_3.json").read_text())["image"] == str(photos / "kitchen.png")
    assert f"{out / 'kitchen'}.png/.json is an input image or a file toist did not write, not overwritten" \
        in captured.err
    assert f"go to {out / 'kitchen_3'}.png/.json" in captured.err


def test_cli_predict_keeps_other_files_and_the_other_images_results(tmp_path, capsys):
    """--out the images' folder holding another photo <stem>.png that is not an input: it was
    overwritten. An unreadable image stopped the run and lost the next images' results; a path
    that is not a file is said before the model loads. A second run replaces its own results."""
    from toist_core.visualize import save_rgb

    photos = tmp_path / "photos"
    photos.mkdir()
    save_rgb(photos / "desk.png", random_image(40, 60, seed=3))      # another photo, not an input
    (photos / "desk.jpg").write_bytes(cv2.imencode(".jpg", random_image(45, 70, seed=4))[1].tobytes())
    (photos / "broken.jpg").write_bytes((photos / "desk.jpg").read_bytes()[:300])
    save_rgb(photos / "shelf.png", random_image(45, 70, seed=5))
    other = (photos / "desk.png").read_bytes()
    base = ["predict", "--preset", "tiny_segm", "--task", "task_2", "--out", str(photos), "--device", "cpu",
            "--short-side", "64", "--max-size", "128", "--max-instances", "2"]
    args = base + [str(photos / name) for name in ("desk.jpg", "broken.jpg", "shelf.png")]
    for run in range(2):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert (photos / "desk.png").read_bytes() == other
        assert f"skipped: {photos / 'broken.jpg'}: cannot decode image" in err
        assert f"1 of 3 image(s) could not be read and have no results: {photos / 'broken.jpg'}" in err
        assert json.loads((photos / "desk_2.json").read_text())["image"] == str(photos / "desk.jpg")
        assert json.loads((photos / "shelf_2.json").read_text())["task_id"] == 2   # shelf.png is an input
        assert not (photos / "desk_3.json").exists() and not (photos / "broken.json").exists()
    assert cli.main(base + [str(photos / "shelf.png"), str(photos / "nowhere.png"), str(photos)]) == 2
    assert f"not a file: {photos / 'nowhere.png'}, {photos} (image arguments must name files" in \
        capsys.readouterr().err
    # An --out that cannot be a folder is said before the model loads (the checkpoint is never read).
    unloaded = ["predict", "--checkpoint", str(tmp_path / "never_loaded.pth"), "--task", "2", str(photos / "desk.jpg")]
    assert cli.main(unloaded + ["--out", str(photos / "desk.jpg")]) == 2
    assert f"--out {photos / 'desk.jpg'}: exists and is not a folder" in capsys.readouterr().err
    assert cli.main(unloaded + ["--out", str(photos / "shelf.png" / "results")]) == 2
    assert f"--out {photos / 'shelf.png' / 'results'}: {photos / 'shelf.png'} is a file, not a folder" in \
        capsys.readouterr().err


def test_cli_predict_stopped_mid_image_leaves_what_the_next_run_replaces(tmp_path, monkeypatch, capsys):
    """The result is written before the overlay: an overlay left alone would be taken for another
    picture and kept, and the next run's results would go to <stem>_2."""
    import toist_core.visualize as visualize
    from toist_core.visualize import save_rgb

    save_rgb(tmp_path / "kitchen.png", random_image(45, 70, seed=8))
    out = tmp_path / "out"
    args = ["predict", "--preset", "tiny_segm", "--task", "2", str(tmp_path / "kitchen.png"), "--out", str(out),
            "--device", "cpu", "--short-side", "64", "--max-size", "128", "--max-instances", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(visualize, "save_rgb", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
        assert cli.main(args) == 2
    assert sorted(p.name for p in out.iterdir()) == ["kitchen.json"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["kitchen.json", "kitchen.png"]
    capsys.readouterr()


def test_image_batch_rounds_padding_up_and_marks_it():
    images = [torch.ones(3, 40, 70), torch.ones(3, 65, 33)]
    batch = ImageBatch.from_images(images, size_divisibility=32)
    assert tuple(batch.tensors.shape) == (2, 3, 96, 96)
    assert batch.image_sizes == [(40, 70), (65, 33)]
    assert batch.tensors.sum() == 3 * (40 * 70 + 65 * 33)        # zeros in the padding
    assert tuple(ImageBatch.from_images(images).tensors.shape) == (2, 3, 65, 70)   # reference: no rounding
    with pytest.raises(ValueError, match="size_divisibility"):
        ImageBatch.from_images(images, size_divisibility=0)


def test_lone_frame_is_padded_like_a_batch_of_that_size(seg):
    """With ``pad_multiple`` a single frame gives what it gives in a batch padded to the same
    size; without it, the padding changes the result (which is why frames are padded)."""
    frame, partner = random_image(64, 90), random_image(64, 64, seed=1)   # both -> a 64 x 96 canvas
    alone = seg.predict(frame, max_instances=5)
    in_batch = seg.predict_batch([frame, partner], max_instances=5)[0]
    assert np.allclose(alone.boxes, in_batch.boxes, atol=1e-4) and np.allclose(alone.scores, in_batch.scores, atol=1e-6)
    unpadded = TaskSegmenter(seg.model, device="cpu", task=2, inference=InferenceConfig(
        score_threshold=0.0, pad_multiple=1, **SMALL)).predict(frame, max_instances=5)
    assert not np.allclose(alone.scores, unpadded.scores, atol=1e-6)
