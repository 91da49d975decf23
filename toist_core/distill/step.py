"""One noun-pronoun distillation forward (reference ``train_one_epoch_distillation``, steps 1-7).

The teacher reads the noun caption, the student the pronoun caption, of the same images::

    memory_noun = teacher.encode(images, noun captions)
    memory_noun = cluster.teacher_step(memory_noun, targets_noun)      # bank update + CCR
    outputs_noun = teacher.decode(memory_noun)
    memory_sth = student.encode(images, pronoun captions)
    memory_sth, cluster_losses = cluster.student_step(memory_sth, targets_sth)  # CCR + CL
    outputs_sth = student.decode(memory_sth)
    losses = criterion(outputs_noun, outputs_sth, targets_noun, targets_sth, cluster_losses)

The caller sums ``losses[k] * weight_dict[k]`` (``toist_core.losses.criterion.weighted_total``),
back-propagates once and steps an optimizer holding both models (the teacher is trained by
its own ``noun_*`` losses; SBTL does not reach it).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..losses.criterion import DistillationCriterion
from .cluster import ClusterModule


def _captions(targets: Sequence[dict], who: str) -> list[str]:
    captions = []
    for b, target in enumerate(targets):
        if "caption" not in target:
            raise KeyError(f"{who} targets[{b}] has no 'caption'")
        captions.append(target["caption"])
    return captions


def distillation_losses(teacher: nn.Module, student: nn.Module, images, targets_noun: Sequence[dict],
                        targets_sth: Sequence[dict], criterion: DistillationCriterion,
                        cluster: Optional[ClusterModule] = None) -> dict[str, Tensor]:
    """The loss dict of one distillation step (no backward, no optimizer).

    ``teacher`` / ``student`` expose ``encode(images, captions) -> memory`` and
    ``decode(memory) -> outputs``; captions are the targets' ``caption`` fields.
    ``cluster=None`` (or a config without CCR and CL) skips the memory bank entirely.
    """
    if len(targets_noun) != len(targets_sth):
        raise ValueError(f"{len(targets_noun)} teacher targets but {len(targets_sth)} student targets")
    use_bank = cluster is not None and cluster.config.uses_bank
    memory_noun = teacher.encode(images, _captions(targets_noun, "teacher"))
    if use_bank:
        memory_noun = cluster.teacher_step(memory_noun, targets_noun)
    outputs_noun = teacher.decode(memory_noun)

    memory_sth = student.encode(images, _captions(targets_sth, "student"))
    cluster_losses: dict[str, Tensor] = {}
    if use_bank:
        memory_sth, cluster_losses = cluster.student_step(memory_sth, targets_sth)
    outputs_sth = student.decode(memory_sth)
    return criterion(outputs_noun, outputs_sth, targets_noun, targets_sth, cluster_losses)
