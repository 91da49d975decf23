"""What the segmenter returns: the task state it computes once, and the instances of an image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch import Tensor


@dataclass(frozen=True, eq=False)   # compared by identity: its fields are tensors
class TaskState:
    """Everything about the current task that does not depend on the image (immutable).

    caption:        the caption the model reads (e.g. "sit comfortably on something").
    task_id:        COCO-Tasks id 1..14, or None for free text.
    text:           cached text features (:class:`toist_core.model.text.TextFeatures`, batch 1).
    pronoun_tokens: token positions of the pronoun in the caption (CCR rows).
    centres:        ``[K, D]`` k-means centres of the task's memory bank (distilled models,
                    tasks of the vocabulary, ``InferenceConfig.ccr`` on), else None: no
                    cluster-centre replacement.
    warning:        why this task's results are not to be trusted (the model was not trained
                    on it), else None.
    origin:         which segmenter encoded it, with which weights (set by ``encode_task``;
                    a state built by hand has none and is taken as it is).
    """

    caption: str
    task_id: Optional[int]
    text: object
    pronoun_tokens: tuple[int, ...]
    centres: Optional[Tensor] = None
    warning: Optional[str] = None
    origin: Optional[tuple[str, int]] = field(default=None, compare=False, repr=False)

    @property
    def uses_ccr(self) -> bool:
        return self.centres is not None and len(self.pronoun_tokens) > 0


@dataclass
class Prediction:
    """Instances found in one image, sorted by decreasing score.

    boxes:   ``[N, 4]`` float32, (x1, y1, x2, y2) in original-image pixels, clipped to the image
             (protocol ``"toist"``; the ``"reference"`` protocol does not clip, as the reference).
    scores:  ``[N]`` float32, ``1 - p(no object)``.
    masks:   ``[N, H, W]`` bool at the original resolution, or None for detection-only models.
    queries: ``[N]`` int64, the decoder query each instance came from.
    caption / task_id: the task the image was processed for.
    image_size: ``(H, W)`` of the input image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    masks: Optional[np.ndarray]
    queries: np.ndarray
    caption: str
    task_id: Optional[int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class UntrainedTaskWarning(UserWarning):
    """The task set is not one the model was trained on: its instances mean little."""
