"""Convolutional backbone with frozen BatchNorm and its multi-scale padding masks.

Tensor names follow torchvision (``body.conv1.weight``, ``body.layer3.22.bn2.running_var``;
MobileNetV2: ``body.features.7.conv.1.0.weight``); wrapped in :class:`Joiner` they become the
reference's ``backbone.0.body.*``. The classifier is dropped, so the same tensors exist
whether one or four levels are returned.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..config import BackboneConfig
from ..structures import ImageBatch

_STEM = ("conv1", "bn1", "relu", "maxpool")
_LAYERS = ("layer1", "layer2", "layer3", "layer4")
# MobileNetV2 ``features`` blocks ending the stride 4, 8, 16 and 32 stages.
_MOBILENET_LEVELS = (3, 6, 13, 18)


class ResNetBody(nn.Module):
    """conv1 ... layer4 of a torchvision ResNet; returns the outputs of ``return_layers``."""

    def __init__(self, resnet: nn.Module, return_layers: tuple[str, ...]):
        super().__init__()
        for name in _STEM + _LAYERS:
            self.add_module(name, getattr(resnet, name))
        self.return_layers = return_layers

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for name, module in self.named_children():
            x = module(x)
            if name in self.return_layers:
                out.append(x)
        return out


class MobileNetBody(nn.Module):
    """``features`` of a torchvision MobileNetV2; returns the outputs of blocks ``return_blocks``."""

    def __init__(self, mobilenet: nn.Module, return_blocks: tuple[int, ...]):
        super().__init__()
        self.features = mobilenet.features
        self.return_blocks = return_blocks

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.return_blocks:
                out.append(x)
        return out


class Backbone(nn.Module):
    """Backbone body producing ``[(feature [B, C_l, h_l, w_l], mask [B, h_l, w_l])]``, strides
    4..32 (all four levels) or only stride 32."""

    def __init__(self, cfg: BackboneConfig, return_interm_layers: bool):
        super().__init__()
        levels = (0, 1, 2, 3) if return_interm_layers else (3,)
        self.level_channels = [cfg.channels[level] for level in levels]
        self.num_channels = self.level_channels[-1]
        if cfg.name == "mobilenet_v2":
            network = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
            if cfg.dilation:
                _dilate_last_mobilenet_stage(network)
            trains = _mobilenet_trains
        else:
            builder = getattr(torchvision.models, cfg.name)
            network = builder(weights=None, replace_stride_with_dilation=[False, False, cfg.dilation],
                              norm_layer=FrozenBatchNorm2d)
            trains = _resnet_trains
        if cfg.weights:
            path = cfg.weights_path()
            state = _read_torchvision_weights(path)
            network.load_state_dict(_without_classifier(state, network), strict=False)
            _check_loaded(network, state, path)
        if cfg.name == "mobilenet_v2":
            self.body = MobileNetBody(network, tuple(_MOBILENET_LEVELS[level] for level in levels))
        else:
            self.body = ResNetBody(network, tuple(_LAYERS[level] for level in levels))
        for name, param in self.body.named_parameters():
            if not (cfg.train and trains(name)):
                param.requires_grad_(False)

    def forward(self, images: ImageBatch) -> list[tuple[Tensor, Tensor]]:
        features = self.body(images.tensors)
        out = []
        for feature in features:
            mask = F.interpolate(images.mask[None].float(), size=feature.shape[-2:])[0].bool()
            out.append((feature, mask))
        return out


class Joiner(nn.Sequential):
    """``(backbone, position_encoding)``; returns the backbone levels and their position codes."""

    def __init__(self, backbone: Backbone, position_encoding: nn.Module):
        super().__init__(backbone, position_encoding)

    @property
    def num_channels(self) -> int:
        return self[0].num_channels

    @property
    def level_channels(self) -> list[int]:
        return self[0].level_channels

    def forward(self, images: ImageBatch) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Levels ``[(feature, mask)]`` and the position code ``[B, d, h, w]`` of the last one
        (the only level the transformer reads)."""
        levels = self[0](images)
        feature, mask = levels[-1]
        return levels, self[1](mask).to(feature.dtype)


def _dilate_last_mobilenet_stage(network: nn.Module) -> None:
    """features[14]'s stride-2 depthwise conv -> stride 1, the 3x3 convs after it dilated by 2
    (DeepLab's output-stride-16 MobileNetV2); the weights are unchanged."""
    for index in range(_MOBILENET_LEVELS[2] + 1, _MOBILENET_LEVELS[3]):
        for conv in network.features[index].modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                else:
                    conv.dilation, conv.padding = (2, 2), (2, 2)


def _resnet_trains(name: str) -> bool:
    """conv1, bn1 and layer1 never train (the reference); layer2..4 do."""
    return any(layer in name for layer in ("layer2", "layer3", "layer4"))


def _mobilenet_trains(name: str) -> bool:
    """The stem and the stride-4 blocks (features 0..3) never train, as ResNet's conv1 + layer1."""
    return int(name.split(".")[1]) > _MOBILENET_LEVELS[0]


def _read_torchvision_weights(path: Path) -> dict[str, Tensor]:
    # The checkpoints' checked loader: a damaged archive or a pickled module is refused by name
    # (a raw UnpicklingError advised weights_only=False).
    from ..checkpoint.files import safe_torch_load  # the checkpoint package builds models: imported late

    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torchvision state_dict, got {type(state).__name__}")
    return state


def _without_classifier(state: dict[str, Tensor], network: nn.Module) -> dict[str, Tensor]:
    """The file's tensors that the network has (the classifier ``fc.*`` / ``classifier.*`` is not
    part of the backbone)."""
    own = network.state_dict()
    return {k: v for k, v in state.items() if k in own}


def _check_loaded(network: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Every backbone tensor must come from the file (``num_batches_tracked`` aside)."""
    missing = [k for k in network.state_dict() if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith(("fc.", "classifier."))]
    if missing:
        raise ValueError(f"{path}: not a torchvision state_dict of this backbone; missing {len(missing)} "
                         f"tensors, e.g. {missing[:3]}")


def build_backbone(cfg: BackboneConfig, position_encoding: nn.Module,
                   return_interm_layers: bool) -> Joiner:
    return Joiner(Backbone(cfg, return_interm_layers), position_encoding)


__all__ = ["Backbone", "Joiner", "MobileNetBody", "ResNetBody", "build_backbone"]
