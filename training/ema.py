"""Exponential moving average of a model's whole state_dict (MDETR ``--ema``, decay 0.9998).

The reference updates every entry of the state_dict, buffers included, after each optimizer
step: ``ema = decay * ema + (1 - decay) * model``. Integer buffers (e.g. RoBERTa's
``position_ids``) are copied instead: blending them in floating point and casting back can
round an index down. The EMA model is what the paper evaluates and what ``model_ema`` holds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of ``model`` whose state tracks the model's with ``decay``."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay: must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._pairs = None  # (ema tensors, model tensors) cached per model object

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = _unwrap(model)
        ema_float, model_float, ema_other, model_other = self._tensors(model)
        if ema_float:
            torch._foreach_mul_(ema_float, self.decay)
            torch._foreach_add_(ema_float, model_float, alpha=1.0 - self.decay)
        for ema_t, model_t in zip(ema_other, model_other):
            ema_t.copy_(model_t)

    def _tensors(self, model: nn.Module):
        # state_dict() rebuilds an OrderedDict each call; the tensors themselves are stable,
        # so pair them once per model object (resume loads in place and keeps them).
        if self._pairs is None or self._pairs[0] is not model:
            ema_state = self.module.state_dict(keep_vars=True)
            model_state = model.state_dict(keep_vars=True)
            if ema_state.keys() != model_state.keys():
                missing = sorted(set(ema_state) ^ set(model_state))[:5]
                raise ValueError(f"EMA and model state_dicts differ (e.g. {missing})")
            ema_float, model_float, ema_other, model_other = [], [], [], []
            for key, ema_t in ema_state.items():
                model_t = model_state[key]
                if ema_t.is_floating_point():
                    ema_float.append(ema_t.data)
                    model_float.append(model_t.data)
                else:
                    ema_other.append(ema_t.data)
                    model_other.append(model_t.data)
            self._pairs = (model, (ema_float, model_float, ema_other, model_other))
        return self._pairs[1]

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
