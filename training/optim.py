"""AdamW with the reference's parameter groups (``main.py``).

Per model: group ``rest`` (every trainable parameter whose name contains neither ``backbone``
nor ``text_encoder``, lr ``lr``), ``backbone`` (lr ``lr_backbone``) and ``text_encoder`` (lr
``text_encoder_lr``). In a distillation run the teacher's three groups follow the student's
(groups 3-5), with the same rates: the teacher is trained too. Frozen parameters
(``requires_grad=False``) are left out. Groups that end up empty are kept, so the group layout
(and a saved optimizer state) does not depend on which parts a stage freezes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from training.schedule import GROUP_KINDS


def group_kind(name: str) -> str:
    """The group a parameter belongs to, from its qualified name."""
    if "text_encoder" in name:
        return "text_encoder"
    if "backbone" in name:
        return "backbone"
    return "rest"


def param_groups(model: nn.Module, lrs: dict[str, float], prefix: str = "") -> list[dict]:
    """Three groups (``rest``, ``backbone``, ``text_encoder``) of ``model``'s trainable parameters."""
    buckets: dict[str, list[nn.Parameter]] = {kind: [] for kind in GROUP_KINDS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets[group_kind(name)].append(param)
    return [{"params": buckets[kind], "lr": lrs[kind], "base_lr": lrs[kind], "kind": kind,
             "name": f"{prefix}{kind}"} for kind in GROUP_KINDS]


def build_optimizer(model: nn.Module, lr: float, lr_backbone: float, text_encoder_lr: float,
                    weight_decay: float = 1e-4, teacher: Optional[nn.Module] = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the student's (and the teacher's) groups; fails if nothing is trainable."""
    lrs = {"rest": lr, "backbone": lr_backbone, "text_encoder": text_encoder_lr}
    groups = param_groups(model, lrs)
    if teacher is not None:
        groups += param_groups(teacher, lrs, prefix="teacher/")
    if not any(group["params"] for group in groups):
        raise ValueError("no trainable parameter: every parameter of the model has requires_grad=False")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def clip_grad_norm(model: nn.Module, max_norm: float) -> Optional[torch.Tensor]:
    """Clip the gradient norm of ``model`` to ``max_norm`` (0: no clipping; the reference clips
    student and teacher separately). Returns the total norm before clipping (NaN / inf when a
    gradient is), None when no parameter has a gradient."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return None
    if max_norm <= 0:
        # The norm alone (as clip_grad_norm_ computes it), for the finite check; torch.nn.utils'
        # get_total_norm is newer than the torch 2.5 that setup.py allows.
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
