"""The noun teacher's input at evaluation: each image's own noun caption.

The teacher (stage ``noun``) and a grounding run read captions that name the image's objects
("sit comfortably on chair"), not the task's pronoun caption; the reference scores the teacher
so (``--verb_noun_input``, ``eval_dete_noun.sh``). Used by training's evaluation and by
``toist evaluate --captions noun``.
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence, Union

import torch
from torch import nn

from ..data.captions import noun_targets
from ..data.coco_tasks import CocoTasksDataset, noun_caption_classes
from .results import TaskState


def noun_caption_state(model: nn.Module, dataset: CocoTasksDataset, index: Union[int, Sequence[int]],
                       task: int) -> TaskState:
    """The teacher's input for sample ``index``: the noun caption of its preferred objects'
    classes (the empty caption when it has none), as the dataset builds it in "noun" mode;
    no task id, so no cluster-centre replacement.

    ``index`` a sequence: one caption per sample, encoded together as the reference's batches
    are (padded to the longest, the padding masked), for ``predict_batch`` of those samples'
    images in that order; ``caption`` then holds them one per line."""
    indices = [index] if isinstance(index, Integral) else list(index)
    captions = []
    for i in indices:
        task_file, record = dataset.sample_info(i)
        captions.append(noun_targets(task, noun_caption_classes(task_file, record), dataset.id2name,
                                     dataset.vocabulary).caption)
    with torch.inference_mode():
        return TaskState("\n".join(captions), None, model.encode_text(captions), ())


__all__ = ["noun_caption_state"]
