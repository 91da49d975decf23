"""BatchNorm folding (toist_core.model.fold_batchnorm): the same outputs to fp32 rounding, the
same state_dict, and only on models the segmenter builds itself."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import toist_core
from toist_core.config import InferenceConfig, preset
from toist_core.inference import TaskSegmenter
from toist_core.inference.device import prepared
from toist_core.model import build_model, load_tokenizer
from toist_core.model.fold_batchnorm import (FoldedConv2d, count_foldable, count_folded, fold_batchnorm,
                                             folded_weights)
from toist_core.structures import ImageBatch
from toist_core.tokens import NO_OBJECT_INDEX

CAPTION = "sit comfortably on something"
DEFAULT_MODEL = Path(toist_core.__file__).resolve().parent / "assets" / "default_model"


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 1) -> int:
    """Non-trivial frozen statistics (a fresh model's are 1 / 0: folding would be a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                channels = module.weight.numel()
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                count += 1
    return count


def _model(name: str) -> torch.nn.Module:
    cfg = preset(name)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
    assert _randomise_batchnorm(model) > 0
    return model


def _outputs(model: torch.nn.Module, images: ImageBatch) -> dict:
    with torch.inference_mode():
        out = model(images, [CAPTION])
    return {"scores": 1 - out["pred_logits"].softmax(-1)[..., NO_OBJECT_INDEX], "boxes": out["pred_boxes"],
            "masks": out["pred_masks"].sigmoid()}


def _images(channels_last: bool) -> ImageBatch:
    generator = torch.Generator().manual_seed(3)
    tensors = torch.randn(1, 3, 160, 224, generator=generator)
    mask = torch.zeros(1, 160, 224, dtype=torch.bool)
    mask[:, :, 200:] = True  # some padding, as a real batch has
    if channels_last:
        tensors = tensors.contiguous(memory_format=torch.channels_last)
    return ImageBatch(tensors, mask)


@pytest.mark.parametrize("name", ["tiny_segm", "mobile_segm"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_outputs_match(name, channels_last):
    model = _model(name)
    folded = copy.deepcopy(model)
    pairs = count_foldable(folded)
    assert fold_batchnorm(folded) == pairs > 0
    assert count_foldable(folded) == 0 and count_folded(folded) == pairs
    if channels_last:
        model.to(memory_format=torch.channels_last)
        folded.to(memory_format=torch.channels_last)
    images = _images(channels_last)
    want, got = _outputs(model, images), _outputs(folded, images)
    for key in want:
        diff = float((want[key] - got[key]).abs().max())
        assert diff <= 1e-5, f"{name} {key}: max |diff| {diff:.2e}"


def test_state_dict_kept_and_reload_refolds():
    model = _model("tiny_segm")
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    before, after = model.state_dict(), folded.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # New weights loaded into the folded model are folded again.
    other = _model("tiny_segm")
    _randomise_batchnorm(other, seed=5)
    folded.load_state_dict(other.state_dict())
    images = _images(False)
    want, got = _outputs(other, images), _outputs(folded, images)
    assert float((want["scores"] - got["scores"]).abs().max()) <= 1e-5
    assert float((want["masks"] - got["masks"]).abs().max()) <= 1e-5


def test_loading_into_a_submodule_refolds():
    """load_state_dict into the backbone, one conv or one BatchNorm re-folds what it touched
    (each folded conv and norm carries the hook; torch runs it for every module it loads into)."""
    model = _model("tiny_segm")
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    other = _model("tiny_segm")
    _randomise_batchnorm(other, seed=5)
    images = _images(False)
    folded.detector.backbone.load_state_dict(other.detector.backbone.state_dict())
    want, got = _outputs(other, images), _outputs(folded, images)
    assert float((want["scores"] - got["scores"]).abs().max()) <= 1e-5
    assert float((want["masks"] - got["masks"]).abs().max()) <= 1e-5
    # A load into one member of a pair alone: the conv, then its BatchNorm.
    conv_name = next(name for name, module in folded.named_modules() if isinstance(module, FoldedConv2d))
    conv = folded.get_submodule(conv_name)
    with torch.no_grad():
        doubled = {k: v * 2 for k, v in conv.state_dict().items()}
        conv.load_state_dict(doubled)
        assert torch.allclose(conv.folded_weight, folded_weights(conv, conv._norm)[0])
        norm = conv._norm
        shifted = {k: (v + 1 if k == "bias" else v) for k, v in norm.state_dict().items()}
        norm.load_state_dict(shifted)
        assert torch.equal(conv.folded_bias, folded_weights(conv, norm)[1])


def test_given_module_is_not_folded():
    model = _model("mobile_segm")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    segmenter = TaskSegmenter(model, device="cpu", task=2, inference=InferenceConfig(score_threshold=0.0))
    assert segmenter.model is model
    segmenter.predict(np.zeros((60, 80, 3), dtype=np.uint8))
    assert count_folded(model) == 0 and count_foldable(model) > 0
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def test_models_the_segmenter_builds_are_folded():
    segmenter = TaskSegmenter.from_config("tiny_segm", device="cpu", seed=0, task=2)
    assert count_folded(segmenter.model) > 0 and count_foldable(segmenter.model) == 0
    assert any(isinstance(m, FoldedConv2d) for m in segmenter.model.modules())
    # prepare = fold + channels-last: the folded kernels follow the layout.
    model = prepared(_model("tiny_segm"), torch.device("cpu"), InferenceConfig(channels_last=True))
    conv = next(m for m in model.modules() if isinstance(m, FoldedConv2d))
    assert conv.folded_weight.is_contiguous(memory_format=torch.channels_last)


def test_default_model_directory_is_folded_with_its_state_dict():
    from toist_core.checkpoint import load_pretrained

    loaded = load_pretrained(DEFAULT_MODEL)
    segmenter = TaskSegmenter.from_pretrained(DEFAULT_MODEL, device="cpu")
    assert count_folded(segmenter.model) > 0
    want, got = loaded.model.state_dict(), segmenter.model.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
