"""InferenceConfig.protocol: "reference" reproduces the reference evaluation's pre- and
post-processing exactly; "toist" (the default) keeps toist's float resize, padding to a multiple
of 32 and box clipping.

The expected values are written here from the reference's code as the spec describes it, not
from toist's helpers: the size rule of ``get_size_with_aspect_ratio``, ``T.RandomResize([800],
max_size=1333)`` = torchvision's ``F.resize`` on the PIL image, ``ToTensor``, ``Normalize``,
``NestedTensor`` padding to the batch maximum, ``PostProcess`` (no clipping) and
``PostProcessSegm``.
"""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from toist_core import cli
from toist_core.config import InferenceConfig
from toist_core.inference import TaskSegmenter
from toist_core.tokens import NO_OBJECT_INDEX
from toist_core.typed_config import ConfigError

SMALL = dict(short_side=64, max_size=128)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def smooth_image(height, width, seed=0):
    """Low-frequency content (as a photo): resize methods then differ by little, not by noise."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def reference_size(height, width, size, max_size):
    """``get_size_with_aspect_ratio``: the short side ``size``, lowered to ``round(max_size *
    short / long)`` when the long side would pass ``max_size``; the long side then truncated."""
    short, long = min(height, width), max(height, width)
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def reference_transform(image, size=64, max_size=128):
    """The reference's test transform of one ``H x W x 3`` uint8 image -> ``[3, h, w]``."""
    pil = Image.fromarray(image)
    h, w = reference_size(image.shape[0], image.shape[1], size, max_size)
    pil = TF.resize(pil, [h, w])                       # PIL bilinear on the uint8 image
    return TF.normalize(TF.to_tensor(pil), MEAN, STD)


@pytest.fixture(scope="module")
def model():
    return TaskSegmenter.from_config("tiny_segm", seed=0).model


def segmenter(model, protocol, **kwargs):
    settings = dict(score_threshold=0.0, max_instances=100, **SMALL)
    settings.update(kwargs)
    return TaskSegmenter(model, device="cpu", task=2, inference=InferenceConfig(protocol=protocol, **settings))


def test_size_rule_written_here_truncates_the_long_side():
    # These cases tell truncation from rounding (99.66 -> 99, 127.5 -> 127) and exercise the cap.
    assert reference_size(70, 109, 64, 128) == (64, 99)
    assert reference_size(40, 150, 64, 128) == (34, 127)
    assert reference_size(150, 400, 800, 1333) == (500, 1333)
    assert reference_size(64, 90, 64, 128) == (64, 90)


@pytest.mark.parametrize("height, width", [(70, 109), (40, 150), (131, 57), (64, 90), (30, 30)])
def test_reference_preprocessing_is_the_reference_transform_exactly(model, height, width):
    image = random_image(height, width, seed=height)
    batch, sizes = segmenter(model, "reference").preprocess([image])
    expected = reference_transform(image)
    assert sizes == [tuple(expected.shape[-2:])]
    # One image: no padding at all, and bit for bit the reference's input.
    assert tuple(batch.tensors.shape) == (1,) + tuple(expected.shape)
    assert not batch.mask.any()
    assert torch.equal(batch.tensors[0], expected)


def test_reference_batch_is_padded_to_its_largest_image_only(model):
    images = [random_image(70, 109, seed=1), random_image(131, 57, seed=2)]
    batch, sizes = segmenter(model, "reference").preprocess(images)
    expected = [reference_transform(img) for img in images]
    height = max(e.shape[1] for e in expected)
    width = max(e.shape[2] for e in expected)
    assert tuple(batch.tensors.shape) == (2, 3, height, width) and (height, width) == (128, 99)
    for b, e in enumerate(expected):
        h, w = e.shape[-2:]
        assert sizes[b] == (h, w)
        assert torch.equal(batch.tensors[b, :, :h, :w], e)
        assert (batch.tensors[b, :, h:] == 0).all() and (batch.tensors[b, :, :, w:] == 0).all()
        assert not batch.mask[b, :h, :w].any() and batch.mask[b, h:].all() and batch.mask[b, :, w:].all()


def test_default_protocol_keeps_float_resize_and_padding_to_32(model):
    image = random_image(70, 109, seed=3)
    seg = segmenter(model, "toist")
    assert seg.inference.protocol == "toist" and InferenceConfig().protocol == "toist"
    batch, sizes = seg.preprocess([image])
    # Today's pipeline: antialiased bilinear on the float image, padded to a multiple of 32.
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    x = F.interpolate(x[None], size=(64, 99), mode="bilinear", align_corners=False, antialias=True)[0]
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert sizes == [(64, 99)] and tuple(batch.tensors.shape) == (1, 3, 64, 128)
    assert torch.equal(batch.tensors[0, :, :, :99], x)
    assert (batch.tensors[0, :, :, 99:] == 0).all() and batch.mask[0, :, 99:].all()
    # ... which is not the reference's input (uint8 PIL resize).
    assert not torch.equal(batch.tensors[0, :, :, :99], reference_transform(image))


@pytest.fixture(scope="module")
def leaving():
    """A model whose every query predicts (cx, cy, w, h) = (0.9, 0.1, 0.5, 0.4): a box that leaves
    the image on the right and at the top."""
    seg = TaskSegmenter.from_config("tiny_segm", seed=1)
    box = torch.tensor([0.9, 0.1, 0.5, 0.4])
    detector = seg.model.detector
    with torch.no_grad():
        detector.bbox_embed.layers[-1].weight.zero_()
        detector.bbox_embed.layers[-1].bias.copy_(torch.log(box / (1 - box)))
        detector.class_embed.weight.zero_()
        detector.class_embed.bias.zero_()
        detector.class_embed.bias[NO_OBJECT_INDEX] = -5.0
    return seg.model, box


def test_reference_boxes_are_not_clipped_default_boxes_are(leaving):
    model, (cx, cy, w, h) = leaving
    height, width = 60, 90
    image = random_image(height, width, seed=5)
    unclipped = np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    assert unclipped[1] < 0 and unclipped[2] > width          # the box leaves the image
    reference = segmenter(model, "reference", max_instances=3).predict(image)
    assert np.allclose(reference.boxes, np.tile(unclipped, (3, 1)), atol=1e-3)
    assert (reference.boxes[:, 1] < -5).all() and (reference.boxes[:, 2] > width + 10).all()
    default = segmenter(model, "toist", max_instances=3).predict(image)
    clipped = np.array([unclipped[0], 0.0, width, unclipped[3]])
    assert np.allclose(default.boxes, np.tile(clipped, (3, 1)), atol=1e-3)
    p_no_object = math.exp(-5.0) / (255 + math.exp(-5.0))
    assert np.allclose(reference.scores, 1 - p_no_object, atol=1e-6)


def reference_postprocess(out, orig_sizes, resized_sizes):
    """``PostProcess`` + ``PostProcessSegm`` (threshold 0.5) of a batch: per image, scores
    ``[100]``, boxes ``[100, 4]`` and masks ``[100, H, W]``."""
    scores = 1 - out["pred_logits"].softmax(-1)[..., NO_OBJECT_INDEX]
    cx, cy, w, h = out["pred_boxes"].unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    max_h = max(s[0] for s in resized_sizes)
    max_w = max(s[1] for s in resized_sizes)
    masks = F.interpolate(out["pred_masks"], size=(max_h, max_w), mode="bilinear", align_corners=False)
    results = []
    for b, ((oh, ow), (rh, rw)) in enumerate(zip(orig_sizes, resized_sizes)):
        boxes = xyxy[b] * torch.tensor([ow, oh, ow, oh])
        mask = F.interpolate(masks[b:b + 1, :, :rh, :rw], size=(oh, ow), mode="bilinear", align_corners=False)
        results.append((scores[b], boxes, mask[0].sigmoid() > 0.5))
    return results


def test_reference_predict_batch_is_the_reference_pipeline(model):
    """Scores, boxes and masks of a 2-image batch against the reference's forward on its own
    input (built here) and its PostProcess / PostProcessSegm."""
    from toist_core.structures import ImageBatch

    images = [smooth_image(70, 109, seed=6), smooth_image(131, 57, seed=7)]
    seg = segmenter(model, "reference")
    preds = seg.predict_batch(images, max_instances=10)
    inputs = [reference_transform(img) for img in images]
    resized = [tuple(x.shape[-2:]) for x in inputs]
    with torch.no_grad():
        out = model.decode(model.encode(ImageBatch.from_images(inputs), [seg.task_state.caption]))
    expected = reference_postprocess(out, [img.shape[:2] for img in images], resized)
    for pred, (scores, boxes, masks) in zip(preds, expected):
        order = scores.argsort(descending=True, stable=True)[:10]
        assert pred.queries.tolist() == order.tolist()
        assert np.allclose(pred.scores, scores[order].numpy(), atol=1e-6)
        assert np.allclose(pred.boxes, boxes[order].numpy(), atol=1e-3)
        assert pred.masks.shape == tuple(masks[order].shape)
        assert np.mean(pred.masks != masks[order].numpy()) < 1e-3   # up to pixels at the 0.5 edge
        assert 0.0 < pred.masks.mean() < 1.0


def test_protocol_changes_outputs_default_is_unchanged(model):
    image = smooth_image(70, 109, seed=8)
    default = TaskSegmenter(model, device="cpu", task=2,
                            inference=InferenceConfig(score_threshold=0.0, **SMALL)).predict(image)
    toist = segmenter(model, "toist").predict(image)
    reference = segmenter(model, "reference").predict(image)
    assert np.array_equal(default.boxes, toist.boxes) and np.array_equal(default.scores, toist.scores)
    assert np.array_equal(default.masks, toist.masks)
    assert not np.allclose(np.sort(reference.scores), np.sort(toist.scores), atol=1e-6)


def test_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match="protocol"):
        InferenceConfig(protocol="paper")


# ------------------------------------------------------------------------------ toist evaluate

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from toist_core.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[14], splits=("test",), images_per_split=4, seed=3, min_size=64, max_size=120)
    # The file lists its images in descending id order: the reference batches in ascending id.
    path = root / "annotations" / "task_14_test.json"
    data = json.loads(path.read_text())
    data["images"] = sorted(data["images"], key=lambda rec: -rec["id"])
    path.write_text(json.dumps(data))
    return root


def test_cli_evaluate_passes_the_protocol(data_root, tmp_path, monkeypatch):
    """A real model directory through ``--checkpoint``: the protocol and the evaluation's
    settings reach the segmenter on top of what the directory records."""
    import toist_core.inference as inference
    from toist_core.checkpoint import save_model_dir

    model_dir = tmp_path / "model"
    random_seg = TaskSegmenter.from_config("tiny_segm", device="cpu", seed=0)
    save_model_dir(random_seg.model, model_dir, random_seg.config)
    built = []
    real_from_pretrained = inference.TaskSegmenter.from_pretrained

    def from_pretrained(*args, **kwargs):  # records what the CLI built, building it for real
        built.append(real_from_pretrained(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(inference.TaskSegmenter, "from_pretrained", staticmethod(from_pretrained))
    for protocol in ("reference", "toist"):
        saved = tmp_path / f"{protocol}.json"
        args = ["evaluate", "--data", str(data_root), "--checkpoint", str(model_dir), "--tasks", "14",
                "--out", str(tmp_path / protocol), "--save-predictions", str(saved), "--no-plots",
                "--short-side", "64", "--max-size", "128", "--device", "cpu", "--batch-size", "2"]
        if protocol == "reference":
            args += ["--protocol", "reference"]
        assert cli.main(args) == 0
        assert built[-1].inference.protocol == protocol
        assert built[-1].inference.score_threshold == 0.0
        assert (built[-1].inference.short_side, built[-1].inference.max_size) == (64, 128)
        for key, value in random_seg.model.state_dict().items():
            assert torch.equal(built[-1].model.state_dict()[key], value), key


class _RecordingSegmenter:
    """Records the batches it is given (by image height, unique per image here)."""

    def __init__(self, protocol):
        self.inference = InferenceConfig(protocol=protocol)
        self.batches = []

    def set_task(self, task_id):
        pass

    def predict_batch(self, images, score_threshold=None, max_instances=None):
        self.batches.append([img.shape[:2] for img in images])
        empty = type("Prediction", (), {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "masks": None})
        return [empty] * len(images)


def test_reference_protocol_batches_in_ascending_image_id(data_root):
    from toist_core.cli.evaluate import predict_tasks
    from toist_core.eval.evaluator import task_files

    files = task_files(data_root, [14])
    records = json.loads(files[14].read_text())["images"]
    by_id = [(rec["height"], rec["width"]) for rec in sorted(records, key=lambda rec: rec["id"])]
    in_file = [(rec["height"], rec["width"]) for rec in records]
    assert by_id != in_file
    for protocol, expected in (("reference", by_id), ("toist", in_file)):
        fake = _RecordingSegmenter(protocol)
        predict_tasks(fake, files, data_root / "images" / "val2014", batch_size=2, log=io.StringIO())
        assert [size for batch in fake.batches for size in batch] == expected
        assert [len(batch) for batch in fake.batches] == [2, 2]


def test_cli_evaluate_forms_the_reference_scripts_batches(data_root, tmp_path, monkeypatch):
    """Under the reference protocol a batch is padded to its largest image, so the batch size
    is part of the protocol: eval_seg.sh's 4 for a segmentation model, eval_dete.sh's 8 for a
    detection one; the default protocol reads one image at a time; --batch-size wins."""
    import toist_core.cli.evaluate as evaluate
    from toist_core.checkpoint import save_model_dir

    used = []
    real_predict_tasks = evaluate.predict_tasks

    def predict_tasks(*args, **kwargs):
        used.append(kwargs["batch_size"])
        return real_predict_tasks(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_tasks", predict_tasks)
    for preset in ("tiny_segm", "tiny"):
        seg = TaskSegmenter.from_config(preset, device="cpu", seed=0)
        save_model_dir(seg.model, tmp_path / preset, seg.config)
    runs = [("tiny_segm", ["--protocol", "reference"], 4), ("tiny", ["--protocol", "reference"], 8),
            ("tiny_segm", [], 1), ("tiny", ["--protocol", "reference", "--batch-size", "3"], 3)]
    for k, (preset, extra, expected) in enumerate(runs):
        assert cli.main(["evaluate", "--data", str(data_root), "--checkpoint", str(tmp_path / preset), "--tasks", "14",
                         "--out", str(tmp_path / f"out{k}"), "--no-plots", "--short-side", "64", "--max-size", "128",
                         "--device", "cpu", *extra]) == 0
        assert used[-1] == expected, (preset, extra)


def test_noun_captions_in_a_batch_are_each_images_own_and_match_one_at_a_time(tmp_path):
    """eval_dete_noun.sh scores the noun teacher in batches of 8, each image with its own noun
    caption (encoded together, padded to the longest); toist read noun captions one image at a
    time only. Images of one size (no padding between them): a batch gives each image what it
    gets alone, to fp32 noise, so the caption padding is masked and each image reads its own."""
    from toist_core.cli.evaluate import predict_tasks
    from toist_core.data.synth import generate

    generate(tmp_path, tasks=[14], splits=("test",), images_per_split=6, seed=5, min_size=80, max_size=80)
    files = {14: tmp_path / "annotations" / "task_14_test.json"}
    images = tmp_path / "images" / "val2014"
    segmenter = TaskSegmenter.from_config("tiny", device="cpu", seed=0,
                                          inference=InferenceConfig(protocol="reference", score_threshold=0.0))
    alone, batched = (predict_tasks(segmenter, files, images, batch_size=size, captions="noun", log=io.StringIO())[14]
                      for size in (1, 3))
    assert sorted(alone) == sorted(batched) and len(alone) == 6
    for image_id, one in alone.items():   # (near-tied scores may swap places: rows matched by value)
        together = batched[image_id]
        np.testing.assert_allclose(np.sort(together.scores), np.sort(one.scores), atol=1e-5, rtol=0)
        rows_one = np.concatenate([np.asarray(one.boxes), np.asarray(one.scores)[:, None]], axis=1)
        rows_together = np.concatenate([np.asarray(together.boxes), np.asarray(together.scores)[:, None]], axis=1)
        nearest = np.abs(rows_together[:, None] - rows_one[None]).max(-1).min(1)
        assert nearest.max() < 1e-4, (image_id, nearest.max())
    from toist_core.data.coco_tasks import CocoTasksDataset
    from toist_core.inference.noun_captions import noun_caption_state

    dataset = CocoTasksDataset(files[14], images, caption_mode="noun")
    captions = noun_caption_state(segmenter.model, dataset, [0, 1, 2], 14).caption.split("\n")
    assert len(set(captions)) == 3   # of different lengths ("... chair", "", "... baseball bat"): padded together


def test_cli_evaluate_scores_a_noun_teacher_in_the_reference_scripts_batches(data_root, tmp_path, monkeypatch):
    """--protocol reference with noun captions: eval_dete_noun.sh's 8 (it was always 1, and
    --batch-size was refused)."""
    import toist_core.cli.evaluate as evaluate
    from toist_core.checkpoint import save_model_dir

    used = []
    real_predict_tasks = evaluate.predict_tasks

    def predict_tasks(*args, **kwargs):
        used.append((kwargs["batch_size"], kwargs["captions"]))
        return real_predict_tasks(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_tasks", predict_tasks)
    seg = TaskSegmenter.from_config("tiny", device="cpu", seed=0)
    save_model_dir(seg.model, tmp_path / "tiny", seg.config)
    for k, extra in enumerate((["--protocol", "reference"], ["--batch-size", "2"])):
        assert cli.main(["evaluate", "--data", str(data_root), "--checkpoint", str(tmp_path / "tiny"), "--tasks", "14",
                         "--out", str(tmp_path / f"out{k}"), "--no-plots", "--short-side", "64", "--max-size", "128",
                         "--device", "cpu", "--captions", "noun", *extra]) == 0
    assert used == [(8, "noun"), (2, "noun")]


def test_reference_resize_works_with_a_pillow_older_than_9_1(monkeypatch):
    """Image.Resampling is Pillow 9.1; Ubuntu 22.04 (Humble) ships 9.0.1, which the robot's venv
    sees: every image of --protocol reference stopped with an AttributeError."""
    from toist_core.inference import images

    class Pillow90:
        """PIL.Image as 9.0 has it: no Resampling (deleting it from Pillow 13 breaks its own resize)."""

        def __getattr__(self, name):
            if name == "Resampling":
                raise AttributeError("module 'PIL.Image' has no attribute 'Resampling'")
            return getattr(Image, name)

    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    expected = images.resize_pil(image, (21, 35))
    monkeypatch.setattr(images, "Image", Pillow90())
    assert torch.equal(images.resize_pil(image, (21, 35)), expected)


def test_a_failing_lazy_import_keeps_its_cause(tmp_path, monkeypatch):
    """`from toist_core import TaskSegmenter` whose import raised an AttributeError (a library too
    old beside ours) said only "cannot import name 'TaskSegmenter'": Python turns an AttributeError
    from a module's __getattr__ into that, the cause lost."""
    import toist_core

    (tmp_path / "toist_broken_probe.py").write_text(
        "raise AttributeError(\"module 'PIL.Image' has no attribute 'Resampling'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(toist_core._LAZY, "BrokenProbe", "toist_broken_probe")
    with pytest.raises(ImportError, match=r"importing toist_broken_probe \(for toist_core.BrokenProbe\) failed: "
                                          r"AttributeError: module 'PIL.Image' has no attribute 'Resampling'"):
        from toist_core import BrokenProbe  # noqa: F401


def test_training_evaluation_takes_the_protocol_from_eval_protocol():
    """docs/training.md said training's evaluation used the reference's post-processing; it used
    toist's, with no way to choose. eval.protocol chooses (default toist, as the node)."""
    from toist_core.inference.processing import REFERENCE, processing_of
    from training.config import load_config
    from training.evaluate import inference_config

    default = inference_config(load_config("training/configs/distill.yaml"))
    assert default.protocol == "toist" and processing_of(default).clip_boxes
    chosen = inference_config(load_config("training/configs/distill.yaml", ["eval.protocol=reference"]))
    assert processing_of(chosen) == REFERENCE and chosen.ccr and chosen.score_threshold == 0.0
    with pytest.raises(ConfigError, match="protocol"):
        load_config("training/configs/distill.yaml", ["eval.protocol=paper"])
