"""ResNet backbone with frozen BatchNorm and its multi-scale padding masks.

Tensor names follow torchvision (``body.conv1.weight``, ``body.layer3.22.bn2.running_var``);
wrapped in :class:`Joiner` they become the reference's ``backbone.0.body.*``. The classifier
(avgpool, fc) is dropped, so the same tensors exist whether one or four levels are returned.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..config import BackboneConfig
from ..structures import ImageBatch

_STEM = ("conv1", "bn1", "relu", "maxpool")
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


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


class Backbone(nn.Module):
    """ResNet body producing ``[(feature [B, C_l, h_l, w_l], mask [B, h_l, w_l])]``, strides 4..32
    (all four levels) or only stride 32."""

    def __init__(self, cfg: BackboneConfig, return_interm_layers: bool):
        super().__init__()
        builder = getattr(torchvision.models, cfg.name)
        resnet = builder(weights=None, replace_stride_with_dilation=[False, False, cfg.dilation],
                         norm_layer=FrozenBatchNorm2d)
        if cfg.weights:
            resnet.load_state_dict(_read_resnet_weights(cfg.weights))
        layers = _LAYERS if return_interm_layers else _LAYERS[-1:]
        self.body = ResNetBody(resnet, layers)
        channels = cfg.channels
        self.level_channels = [channels[_LAYERS.index(name)] for name in layers]
        self.num_channels = self.level_channels[-1]
        # conv1, bn1 and layer1 never train; layer2..4 train when cfg.train.
        for name, param in self.body.named_parameters():
            if not cfg.train or not any(layer in name for layer in ("layer2", "layer3", "layer4")):
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


def _read_resnet_weights(path: str) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torchvision ResNet state_dict, got {type(state).__name__}")
    return state


def build_backbone(cfg: BackboneConfig, position_encoding: nn.Module,
                   return_interm_layers: bool) -> Joiner:
    return Joiner(Backbone(cfg, return_interm_layers), position_encoding)


__all__ = ["Backbone", "Joiner", "ResNetBody", "build_backbone"]
