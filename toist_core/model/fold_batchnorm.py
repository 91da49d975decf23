"""Fold frozen BatchNorm layers into the convolutions before them (inference only).

The backbones use :class:`~torchvision.ops.misc.FrozenBatchNorm2d` (fixed statistics), which
after a convolution is a per-channel affine map ``y = x * scale + shift``; with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale`` it can
be merged into the convolution: ``W' = W * scale`` (per output channel) and
``b' = b * scale + shift``. Each convolution then writes its output once instead of the
convolution plus an elementwise pass of the BatchNorm over the whole activation. The outputs
equal the unfolded model's up to fp32 rounding.

The module keeps its ``state_dict`` (same keys, same values): the convolution is replaced by a
:class:`FoldedConv2d` that shares the original ``weight`` / ``bias`` parameters and computes
with folded copies held in non-persistent buffers; the BatchNorm by a :class:`FoldedNorm` that
keeps its tensors but passes its input through. Loading a ``state_dict`` re-folds, into the
model or any submodule of it (the conv and the BatchNorm each carry a load post-hook, which
``load_state_dict`` runs for every module it loads into), so the copies never go stale that
way; a caller that edits the conv or BatchNorm tensors in place must call :func:`refold`. The copies cost the
memory of the folded convolutions' weights once more (ResNet-101: ~170 MB in fp32).

Folding changes the module (its submodules' types and its forward): ``TaskSegmenter`` folds
the models it builds itself (``prepared``), never a module it is given.

Pairs folded: consecutive ``Conv2d`` -> BatchNorm children of an ``nn.Sequential``
(torchvision's ``Conv2dNormActivation``, ResNet's ``downsample``, MobileNetV2's inverted
residual), and children named ``conv<k>`` -> ``bn<k>`` of any other module (ResNet's stem and
blocks, whose ``forward`` applies ``bn<k>`` right after ``conv<k>``). A BatchNorm in training
mode (``nn.BatchNorm2d`` with ``training=True``) is left alone: its output depends on the batch.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

_CONV_NAME = re.compile(r"^conv(\d+)$")


def _is_foldable_norm(module: nn.Module) -> bool:
    if isinstance(module, FoldedNorm):
        return False
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return (type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats
            and module.running_mean is not None)


def _norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of a frozen / eval-mode BatchNorm, in float64."""
    mean = norm.running_mean.double()
    var = norm.running_var.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = weight * (var + norm.eps).rsqrt()
    return scale, bias - mean * scale


@torch.no_grad()
def folded_weights(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of ``conv`` followed by ``norm``, as one convolution (computed in
    float64, returned in the conv weight's dtype and memory format)."""
    channels = norm.running_mean.numel()
    if channels != conv.out_channels:
        raise ValueError(f"BatchNorm over {channels} channels after a conv with {conv.out_channels} outputs")
    scale, shift = _norm_affine(norm)
    weight = conv.weight
    folded = torch.empty_like(weight)  # keeps channels-last weights channels-last
    folded.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
    old_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    return folded, (old_bias * scale + shift).to(weight.dtype)


class FoldedNorm(nn.Module):
    """A BatchNorm whose affine map now lives in the convolution before it: the identity, with
    the BatchNorm's tensors kept (same ``state_dict`` keys and values)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self._parameters = norm._parameters
        self._buffers = norm._buffers
        self._non_persistent_buffers_set = norm._non_persistent_buffers_set
        self.eps = norm.eps
        self.folded_from = type(norm).__name__

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"folded {self.folded_from}"


class FoldedConv2d(nn.Conv2d):
    """``Conv2d`` -> BatchNorm as one convolution. ``weight`` / ``bias`` are the original conv's
    (shared parameters, in the ``state_dict``); the forward uses ``folded_weight`` /
    ``folded_bias`` (non-persistent buffers, recomputed by :meth:`refold`)."""

    @classmethod
    def from_pair(cls, conv: nn.Conv2d, norm: FoldedNorm) -> "FoldedConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.training = conv.training
        # Not submodules of each other (each is registered where it was): plain references, for
        # refold() and for a load into the BatchNorm alone.
        object.__setattr__(new, "_norm", norm)
        object.__setattr__(norm, "_conv", new)
        new.register_buffer("folded_weight", torch.empty(0), persistent=False)
        new.register_buffer("folded_bias", torch.empty(0), persistent=False)
        new.refold()
        new.register_load_state_dict_post_hook(_refold_after_load)
        norm.register_load_state_dict_post_hook(_refold_after_load)
        return new

    def refold(self) -> None:
        self.folded_weight, self.folded_bias = folded_weights(self, self._norm)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.folded_weight, self.folded_bias)


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` children of ``parent`` that can be folded."""
    children = dict(parent.named_children())
    pairs = []
    if isinstance(parent, nn.Sequential):
        names = list(children)
        for first, second in zip(names, names[1:]):
            if type(children[first]) is nn.Conv2d and _is_foldable_norm(children[second]):
                pairs.append((first, second))
        return pairs
    for name, child in children.items():
        match = _CONV_NAME.match(name)
        norm_name = f"bn{match.group(1)}" if match else None
        if (match and type(child) is nn.Conv2d and norm_name in children
                and _is_foldable_norm(children[norm_name])):
            pairs.append((name, norm_name))
    return pairs


def refold(model: nn.Module) -> None:
    """Recompute every folded convolution of ``model`` from its current tensors."""
    for module in model.modules():
        if isinstance(module, FoldedConv2d):
            module.refold()


def _refold_after_load(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook of a :class:`FoldedConv2d` or :class:`FoldedNorm`: its folded copies from
    the tensors just loaded. (A load into a parent folds a pair twice, once per member: the
    second, after both are loaded, is the one that counts.)"""
    (module if isinstance(module, FoldedConv2d) else module._conv).refold()


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every foldable conv -> BatchNorm pair of ``model`` in place; returns how many.

    For inference: the model computes the same function (fp32 rounding aside) with one
    elementwise pass less per pair; its ``state_dict`` is unchanged, and ``load_state_dict``
    (into it or any submodule) re-folds. Its folded BatchNorms no longer train.
    """
    count = 0
    for parent in list(model.modules()):
        for conv_name, norm_name in _pairs(parent):
            norm = FoldedNorm(getattr(parent, norm_name))
            setattr(parent, norm_name, norm)
            setattr(parent, conv_name, FoldedConv2d.from_pair(getattr(parent, conv_name), norm))
            count += 1
    return count


def count_foldable(model: nn.Module) -> int:
    """How many conv -> BatchNorm pairs :func:`fold_batchnorm` would fold (0 once folded)."""
    return sum(len(_pairs(parent)) for parent in model.modules())


def count_folded(model: nn.Module) -> int:
    """How many folded convolutions ``model`` has."""
    return sum(isinstance(module, FoldedConv2d) for module in model.modules())


__all__ = ["FoldedConv2d", "FoldedNorm", "count_foldable", "count_folded", "fold_batchnorm", "folded_weights",
           "refold"]
