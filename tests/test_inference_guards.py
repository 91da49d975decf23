"""TaskSegmenter's guards: ``max_instances`` 0 on every path and checked per-call limits, NaN /
inf network outputs refused on every backend (``toist predict`` / ``evaluate`` exit 2), a config
assigned at run time applied whole, and images too elongated for the size rule."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from test_reference_protocol import reference_size
from toist_core import cli
from toist_core.checkpoint import save_model_dir
from toist_core.config import InferenceConfig, InputSize, preset
from toist_core.data.transforms import resized_hw
from toist_core.distill.memory_bank import MemoryBank
from toist_core.inference import NonFiniteOutputError, TaskSegmenter
from toist_core.inference.finite import check_outputs
from toist_core.inference.postprocess import drop_duplicates, mask_iou
from toist_core.model import build_model, load_tokenizer

SMALL = dict(short_side=64, max_size=128)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return TaskSegmenter.from_config("tiny_segm", seed=0).model


def segmenter(model, **kwargs):
    settings = dict(score_threshold=0.0, max_instances=100, duplicate_iou=None, **SMALL)
    settings.update(kwargs)
    return TaskSegmenter(model, device="cpu", task=2, inference=InferenceConfig(**settings))


class FakeOnnx:
    """Stands in for an OnnxNetwork: ``Q`` queries, image ``nan_image``'s query 2 NaN."""

    def __init__(self, backend="onnxruntime", queries=7, nan_image=None):
        self.backend, self.queries, self.nan_image = backend, queries, nan_image

    def detect(self, batch, state):
        count = batch.tensors.shape[0]
        logits = torch.zeros(count, self.queries, 256)
        if self.nan_image is not None and self.nan_image < count:
            logits[self.nan_image, 2] = float("nan")
        return logits, torch.full((count, self.queries, 4), 0.25), lambda b, keep: torch.zeros(1, len(keep), 16, 16)


# ------------------------------------------------------------------ max_instances, per-call limits

@pytest.mark.parametrize("duplicate_iou", [None, 0.7])
def test_max_instances_zero_gives_no_instances_on_every_path(model, duplicate_iou):
    image = random_image(50, 70)
    seg = segmenter(model, duplicate_iou=duplicate_iou, max_instances=0)
    for with_masks in (True, False):
        pred = seg.predict(image, with_masks=with_masks)
        assert len(pred) == 0 and pred.boxes.shape == (0, 4)
    keep_all = segmenter(model, duplicate_iou=duplicate_iou)
    assert len(keep_all.predict(image)) > 0
    assert len(keep_all.predict(image, max_instances=0)) == 0
    assert [len(p) for p in keep_all.predict_batch([image, image], max_instances=0)] == [0, 0]


def test_predict_batch_takes_any_sequence_and_names_one_image_given_alone(model):
    """A generator failed with "object of type 'generator' has no len()"; one H x W x 3 image
    with "images[0]: expected shape H x W x 3 (RGB), got (50, 3)" (its first row)."""
    seg = segmenter(model)
    images = [random_image(50, 70, seed=1), random_image(40, 60, seed=2)]
    listed = seg.predict_batch(images)
    generated = seg.predict_batch(image for image in images)
    assert [p.boxes.tolist() for p in generated] == [p.boxes.tolist() for p in listed]
    with pytest.raises(TypeError, match=r"got one array of shape \(50, 70, 3\): use predict\(image\)"):
        seg.predict_batch(images[0])
    stacked = seg.predict_batch(np.stack([images[0], images[0]]))   # [N, H, W, 3] is a batch
    assert [p.boxes.tolist() for p in stacked] == [listed[0].boxes.tolist()] * 2


def test_drop_duplicates_with_limit_zero_describes_nothing():
    described = []

    def regions(queries):
        described.append(queries)
        return torch.ones(len(queries), 4, dtype=torch.bool)

    keep, positions = drop_duplicates(torch.tensor([3, 1, 2]), regions, mask_iou, 0.5, 0)
    assert keep.numel() == 0 and positions == [] and described == []


@pytest.mark.parametrize("kwargs", [dict(max_instances=-1), dict(max_instances=2.5), dict(max_instances=True),
                                    dict(score_threshold=-0.1), dict(score_threshold=1.5),
                                    dict(score_threshold=float("nan")), dict(score_threshold="0.3")])
def test_per_call_limits_are_checked(model, kwargs):
    seg = segmenter(model)
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"^{name} must be .* got {re.escape(repr(value))}$"):
        seg.predict(random_image(40, 40), **kwargs)
    with pytest.raises(ValueError, match=name):
        seg.predict_batch([random_image(40, 40)], **kwargs)


def test_per_call_limits_take_numpy_numbers(model):
    seg = segmenter(model)
    pred = seg.predict(random_image(40, 50), max_instances=np.int64(3), score_threshold=np.float32(0.0))
    assert len(pred) == 3


# ------------------------------------------------------------------ NaN / inf network outputs

def test_check_outputs_names_the_image_and_the_queries():
    scores, boxes = torch.rand(3, 5), torch.rand(3, 5, 4)
    check_outputs(scores, boxes, "backend 'torch', precision 'fp32', device cpu")
    scores[1, 2], boxes[1, 3, 0], boxes[2, 0, 1] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(NonFiniteOutputError, match=r"^images\[1\]: the network returned 1 non-finite scores and 1 "
                                                   r"non-finite boxes for its 5 queries \(and 1 more image\(s\) of "
                                                   r"the batch of 3\) \(backend 'torch'.*model's weights or its "
                                                   r"input hold non-finite values"):
        check_outputs(scores, boxes, "backend 'torch', precision 'fp32', device cpu")


@pytest.fixture(scope="module")
def nan_models():
    """tiny_segm with NaN class weights (every score NaN), and with a NaN mask head (masks only)."""
    scores = TaskSegmenter.from_config("tiny_segm", seed=0).model
    masks = TaskSegmenter.from_config("tiny_segm", seed=0).model
    with torch.no_grad():
        scores.detector.class_embed.weight.fill_(float("nan"))
        masks.mask_head.out_lay.bias.fill_(float("nan"))
    return scores, masks


def test_nan_outputs_are_refused_not_dropped(nan_models):
    bad_scores, bad_masks = nan_models
    image = random_image(50, 70)
    for threshold in (0.0, 0.5):   # a NaN score fails every threshold: it used to be "no detection"
        seg = segmenter(bad_scores, score_threshold=threshold, duplicate_iou=0.7)
        with pytest.raises(FloatingPointError, match=r"images\[0\]: the network returned 100 non-finite scores "
                                                     r"for its 100 queries .*backend 'torch', precision 'fp32'"):
            seg.predict(image)
    seg = segmenter(bad_masks)
    with pytest.raises(NonFiniteOutputError, match=r"images\[0\]: the mask head returned non-finite logits"):
        seg.predict(image)
    assert len(seg.predict(image, with_masks=False)) == 100   # boxes and scores are numbers


def test_nan_outputs_of_an_onnx_backend_are_refused(model):
    for backend in ("onnxruntime", "tensorrt"):
        seg = TaskSegmenter(model, device="cpu", task=2, onnx_network=FakeOnnx(backend, nan_image=1),
                            inference=InferenceConfig(backend=backend, score_threshold=0.0, duplicate_iou=None,
                                                      **SMALL))
        images = [random_image(40, 60), random_image(60, 40)]
        with pytest.raises(NonFiniteOutputError, match=rf"^images\[1\]: the network returned 1 non-finite scores "
                                                       rf"for its 7 queries \(backend '{backend}'"):
            seg.predict_batch(images)
        assert len(seg.predict(images[0])) == 7   # image 0 alone is fine


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    cfg = preset("tiny_segm")
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
    with torch.no_grad():
        # Finite weights (NaN ones are refused when the directory is read) whose logits overflow
        # to inf: the scores come out NaN, as from a model that diverged only at run time.
        model.detector.class_embed.weight.uniform_(-1e38, 1e38, generator=torch.Generator().manual_seed(0))
    return save_model_dir(model, tmp_path_factory.mktemp("nan") / "model", cfg, tasks=[2],
                          input_size=InputSize(short_side=64, max_size=128))


def test_cli_predict_exits_2_naming_the_file_on_nan(nan_model_dir, tmp_path, capsys):
    from toist_core.visualize import save_rgb

    image = tmp_path / "frame.png"
    save_rgb(image, random_image(45, 70))
    code = cli.main(["predict", "--checkpoint", str(nan_model_dir), "--task", "2", str(image), "--out",
                     str(tmp_path / "out"), "--device", "cpu", "--score-threshold", "0"])
    err = capsys.readouterr().err
    assert code == 2 and f"toist predict: error: {image}: images[0]: the network returned" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "frame.json").exists()


def test_cli_evaluate_exits_2_on_nan_predictions(nan_model_dir, tmp_path, capsys):
    from toist_core.data.synth import generate

    root = tmp_path / "synth"
    generate(root, tasks=[2], splits=("test",), images_per_split=2, seed=3, min_size=64, max_size=120)
    code = cli.main(["evaluate", "--data", str(root), "--checkpoint", str(nan_model_dir), "--tasks", "2",
                     "--out", str(tmp_path / "eval"), "--no-plots", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "toist evaluate: error: task 2: image id(s) " in err and "non-finite scores" in err
    assert not (tmp_path / "eval" / "results.md").exists()


# ------------------------------------------------------------------ assigning a config at run time

def test_assigned_config_is_applied_whole(model):
    image = random_image(50, 70)
    seg = segmenter(model)
    before = seg.predict(image)
    changed = dataclasses.replace(seg.inference, mean=(0.9, 0.9, 0.9), std=(0.1, 0.1, 0.1), precision="bf16",
                                  pronoun="thing", short_side=48, protocol="reference")
    seg.inference = changed
    built = TaskSegmenter(model, device="cpu", task=2, inference=changed)   # the same config from the start
    after, want = seg.predict(image), built.predict(image)
    assert not np.array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(after.scores, want.scores)
    np.testing.assert_array_equal(after.boxes, want.boxes)
    np.testing.assert_array_equal(after.masks, want.masks)
    assert seg.task_state.caption == built.task_state.caption == "sit comfortably on thing"
    assert seg.encode_task(3).caption.endswith(" thing")


def test_a_fresh_config_takes_the_model_s_own_size(model):
    seg = TaskSegmenter(model, device="cpu", task=2, input_size=InputSize(short_side=64, max_size=128),
                        inference=InferenceConfig(score_threshold=0.0, duplicate_iou=None))
    before = seg.predict(random_image(50, 70))
    seg.inference = InferenceConfig(score_threshold=0.0, duplicate_iou=None)   # sizes None: the model's own
    assert (seg.inference.short_side, seg.inference.max_size) == (64, 128)
    np.testing.assert_array_equal(seg.predict(random_image(50, 70)).scores, before.scores)


def test_ccr_switch_re_encodes_the_current_task(model):
    bank = MemoryBank(num_tasks=14, size=32, dim=128, num_clusters=3, seed=3)
    bank.full_label.fill_(1)
    seg = TaskSegmenter(model, device="cpu", task=2, memory_bank=bank, inference=InferenceConfig(**SMALL))
    assert seg.task_state.uses_ccr
    seg.inference = dataclasses.replace(seg.inference, ccr=False)
    assert not seg.task_state.uses_ccr
    seg.inference = dataclasses.replace(seg.inference, ccr=True)
    assert seg.task_state.uses_ccr


def test_what_cannot_change_after_construction_is_refused(model):
    seg = segmenter(model)
    config = seg.inference
    with pytest.raises(ValueError, match=r"inference.backend: this segmenter runs 'torch', got 'onnxruntime'"):
        seg.inference = dataclasses.replace(config, backend="onnxruntime")
    assert seg.inference is config
    onnx = TaskSegmenter(model, device="cpu", task=2, onnx_network=FakeOnnx(),
                         inference=InferenceConfig(backend="onnxruntime", **SMALL))
    with pytest.raises(ValueError, match=r"inference.precision: 'bf16' is for the torch backend"):
        onnx.inference = dataclasses.replace(onnx.inference, precision="bf16")
    with pytest.raises(ValueError, match=r"runs 'onnxruntime', got 'tensorrt'"):
        onnx.inference = dataclasses.replace(onnx.inference, backend="tensorrt")
    with pytest.raises(ValueError, match=r"inference.precision: 'bf16'"):
        TaskSegmenter(model, device="cpu", onnx_network=FakeOnnx(),
                      inference=InferenceConfig(backend="onnxruntime", precision="bf16"))
    onnx.inference = dataclasses.replace(onnx.inference, score_threshold=0.9)   # the rest may change
    assert onnx.inference.score_threshold == 0.9
    # A fresh config (backend "torch" by default) is told how to keep the backend.
    with pytest.raises(ValueError, match=r"got 'torch' \(to change other settings keep it: dataclasses.replace"):
        onnx.inference = InferenceConfig(score_threshold=0.3)
    onnx.inference = InferenceConfig(backend="onnxruntime", score_threshold=0.3, **SMALL)
    assert onnx.inference.score_threshold == 0.3


# ------------------------------------------------------------------ very elongated images

def test_very_elongated_images_keep_a_one_pixel_side(model):
    assert resized_hw(1, 2000, 64, 128) == (1, 2000)
    assert resized_hw(2000, 1, 64, 128) == (2000, 1)
    assert resized_hw(3, 5000, 64, 128) == (1, 1666)
    for protocol in ("toist", "reference"):
        seg = segmenter(model, protocol=protocol)
        for shape in ((1, 2000), (2000, 1)):
            pred = seg.predict(random_image(*shape))
            assert len(pred) == 100 and pred.masks.shape == (100,) + shape
            assert np.isfinite(pred.boxes).all()


def test_size_rule_is_the_reference_s_wherever_that_gives_an_image():
    rng = np.random.default_rng(0)
    sizes = [(64, 128), (128, 256), (800, 1333), (480, 1333), (112, 256)]
    checked = 0
    for height, width in rng.integers(1, 3000, size=(3000, 2)):
        for size, max_size in sizes:
            want = reference_size(int(height), int(width), size, max_size)
            if min(want) >= 1:
                assert resized_hw(int(height), int(width), size, max_size) == want
                checked += 1
    assert checked > 10000


def test_inference_config_is_frozen_and_checks_types():
    """A field changed in place was half applied (duplicate_iou, std, precision... ignored; a
    negative max_instances sliced instances off); a float size failed at the first frame in torch."""
    from toist_core.typed_config import ConfigError

    config = InferenceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.duplicate_iou = None
    for field, value in (("short_side", 64.0), ("max_instances", 2.5), ("pad_multiple", 2.5), ("max_size", True),
                         ("score_threshold", "0.5"), ("mask_threshold", None), ("std", (1.0, 1.0)),
                         ("mean", "abc")):
        with pytest.raises(ConfigError, match=rf"inference\.{field} must be"):
            InferenceConfig(**{field: value})
    assert InferenceConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)  # a YAML list is taken, as a tuple
    assert dataclasses.replace(config, max_instances=3).max_instances == 3


def test_a_new_config_does_not_undo_a_task_set_meanwhile(monkeypatch):
    """seg.inference = ... read the task state, then wrote it back: a set_task of another thread
    in between was lost (the segmenter reverted to the older task). A changed pronoun re-encodes
    the current task: a task set while it re-encodes wins."""
    seg = TaskSegmenter.from_config("tiny", seed=0, device="cpu")
    seg.set_task(1)
    meanwhile = seg.encode_task(3)
    seg.inference = dataclasses.replace(seg.inference, score_threshold=0.2)   # no re-encoding
    assert seg.task_state.task_id == 1
    reencode = seg._reencode

    def set_task_meanwhile(state, pronoun, ccr):  # another thread's set_task, inside the setter's window
        seg.set_task(meanwhile)
        return reencode(state, pronoun, ccr)

    monkeypatch.setattr(seg, "_reencode", set_task_meanwhile)
    seg.inference = dataclasses.replace(seg.inference, pronoun="it")
    assert seg.task_state is meanwhile
    monkeypatch.undo()
    seg.inference = dataclasses.replace(seg.inference, pronoun="thing")
    assert seg.task_state.caption.endswith(" thing") and seg.task_state.task_id == 3


def test_a_config_assigned_during_a_call_leaves_that_call_on_the_old_one(monkeypatch):
    """``seg.inference = ...`` from another thread while a frame was between its network pass and
    its masks gave that frame one config's queries and the other's mask threshold (masks all
    empty): a call now reads its settings once."""
    from toist_core.config import InferenceConfig
    from toist_core.inference import TaskSegmenter

    sizes = dict(short_side=64, max_size=128, score_threshold=0.0, duplicate_iou=None)
    loose = InferenceConfig(mask_threshold=0.05, max_instances=20, **sizes)
    strict = InferenceConfig(mask_threshold=0.95, max_instances=2, **sizes)
    seg = TaskSegmenter.from_config("tiny_segm", device="cpu", seed=4, inference=loose, task=2)
    image = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    expected = seg.predict(image)
    detect = seg._detect

    def detect_then_reconfigure(*args, **kwargs):
        out = detect(*args, **kwargs)
        seg.inference = strict   # "another thread", at the worst moment
        return out

    monkeypatch.setattr(seg, "_detect", detect_then_reconfigure)
    during = seg.predict(image)
    assert len(during) == len(expected) == 20
    assert np.array_equal(during.masks, expected.masks) and np.array_equal(during.boxes, expected.boxes)
    monkeypatch.undo()
    after = seg.predict(image)   # the next call: the new config
    assert len(after) == 2 and after.masks.sum() < expected.masks[:2].sum()


@pytest.mark.parametrize("command, option, value, message", [
    ("predict", "--short-side", "20000", "pixels, 1..16384, got 20000"),
    ("predict", "--max-size", "0", "pixels, 1..16384, got 0"),
    ("predict", "--score-threshold", "2", "a score in [0, 1], got 2"),
    ("predict", "--score-threshold", "nan", "a score in [0, 1], got nan"),
    ("predict", "--max-instances", "-1", "a whole number >= 0, got -1"),
    ("evaluate", "--short-side", "20000", "pixels, 1..16384, got 20000"),
    ("evaluate", "--max-size", "x", "expected a whole number of pixels, got 'x'"),
])
def test_predict_and_evaluate_refuse_bad_numbers_in_the_option_s_words(capsys, command, option, value, message):
    """`toist predict --short-side 20000` was refused as "inference.short_side must be 1..16384",
    a field the user never typed."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}: {message}" in err and "inference." not in err, err


def test_a_short_side_above_the_cap_is_refused_naming_both_options(tmp_path, capsys):
    from toist_core.visualize import save_rgb

    image = tmp_path / "frame.png"
    save_rgb(image, random_image(45, 70))
    code = cli.main(["predict", "--preset", "tiny", "--task", "2", str(image), "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--short-side", "500", "--max-size", "400"])
    err = capsys.readouterr().err
    assert code == 2 and "toist predict: error: --short-side 500 is above --max-size 400" in err, err
    assert not (tmp_path / "out").exists()
    code = cli.main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none"), "--out",
                     str(tmp_path / "eval"), "--short-side", "500", "--max-size", "400"])
    err = capsys.readouterr().err
    assert code == 2 and "--short-side 500 is above --max-size 400" in err and "inference:" not in err, err
