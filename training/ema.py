"""Exponential moving average of a model's whole state_dict (MDETR ``--ema``, decay 0.9998).

The reference updates every entry of the state_dict, buffers included, after each optimizer
step: ``ema = decay * ema + (1 - decay) * model``. Integer buffers (e.g. RoBERTa's
``position_ids``) are copied instead: blending them in floating point and casting back can
round an index down. The EMA model is what the paper evaluates and what ``model_ema`` holds.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn


class ModelEMA:
    """A frozen copy of ``model`` whose state tracks the model's with ``decay``.

    Tensors are paired by name and looked up again at every update: a module may give a
    parameter or buffer new storage at any time (``model.to(memory_format=...)``, ``.to(device)``
    assigns ``param.data`` and replaces buffers), and an EMA holding the old tensors would go on
    updating storage nobody uses. Both sides are looked up, the EMA's own module included (it is
    what evaluation runs).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay: must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._slots: Optional[tuple[nn.Module, list[_Slot]]] = None   # per model object

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = _unwrap(model)
        ema_float, model_float, ema_other, model_other = [], [], [], []
        for slot in self._pairs(model):
            ema_t, model_t = slot.lookup()
            if ema_t.is_floating_point():
                ema_float.append(ema_t)
                model_float.append(model_t)
            else:
                ema_other.append(ema_t)
                model_other.append(model_t)
        if ema_float:
            torch._foreach_mul_(ema_float, self.decay)
            torch._foreach_add_(ema_float, model_float, alpha=1.0 - self.decay)
        for ema_t, model_t in zip(ema_other, model_other):
            ema_t.copy_(model_t)

    def _pairs(self, model: nn.Module) -> list["_Slot"]:
        # Which (module, table, name) holds each state_dict entry is fixed; the tensor there is not.
        if self._slots is None or self._slots[0] is not model:
            ema_slots, model_slots = _state_slots(self.module), _state_slots(model)
            if ema_slots.keys() != model_slots.keys():
                differ = sorted(set(ema_slots) ^ set(model_slots))[:5]
                raise ValueError(f"EMA and model state_dicts differ (e.g. {differ})")
            self._slots = (model, [_Slot(*ema_slots[key], *model_slots[key]) for key in model_slots])
        return self._slots[1]

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict(state, strict=strict)


class _Slot(NamedTuple):
    """Where one state entry lives in the EMA module and in the model: ``owner.<table>[name]``."""

    ema_owner: nn.Module
    ema_table: str
    ema_name: str
    model_owner: nn.Module
    model_table: str
    model_name: str

    def lookup(self) -> tuple[Tensor, Tensor]:
        return (getattr(self.ema_owner, self.ema_table)[self.ema_name],
                getattr(self.model_owner, self.model_table)[self.model_name])


def _state_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """``{state_dict key: (owning module, "_parameters" | "_buffers", name)}``, each tensor once
    (a tensor shared by two modules would otherwise be averaged twice per update)."""
    slots, seen = {}, set()
    for prefix, owner in module.named_modules():
        for table in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, table).items():
                if tensor is None or id(tensor) in seen:
                    continue
                if table == "_buffers" and name in owner._non_persistent_buffers_set:
                    continue
                seen.add(id(tensor))
                slots[f"{prefix}.{name}" if prefix else name] = (owner, table, name)
    return slots


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
