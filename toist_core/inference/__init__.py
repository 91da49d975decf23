"""Task-oriented instance segmentation of single images: :class:`TaskSegmenter`.

    seg = TaskSegmenter.from_pretrained("toist_distilled.pth", device="auto", text_encoder="roberta-base")
    seg.set_task(2)                       # "sit comfortably on something": text encoded once here
    pred = seg.predict(rgb_uint8_image)   # boxes / scores / masks in original-image pixels

Per frame: resize (the model's input size: official .pth short side 800, long side <= 1333) +
ImageNet normalisation -> backbone
-> transformer encoder over the image tokens and the task's cached text tokens -> (distilled
models) the pronoun rows of the decoder's memory replaced by the task's nearest cluster
centre -> decoder -> score = 1 - p(no object) -> threshold / top-k -> mask head for the kept
queries only -> boxes and masks at the original resolution.

What depends only on the task is computed in :meth:`TaskSegmenter.encode_task` (called by
:meth:`~TaskSegmenter.set_task`): the RoBERTa + resizer features of the caption, the pronoun's
token positions and, for distilled models, the k-means centres of the task's memory bank
(the bank is fixed at inference, so warm-started k-means reaches the same centres on every
frame). The result is an immutable :class:`TaskState`; ``set_task`` swaps it in with one
attribute assignment, so a thread calling ``predict`` sees either the old or the new task.

Files: :mod:`.segmenter` (:class:`TaskSegmenter`), :mod:`.results` (:class:`TaskState`,
:class:`Prediction`), :mod:`.images` (frame checks and resize), :mod:`.finite` (NaN / inf
network outputs refused: :class:`NonFiniteOutputError`), :mod:`.postprocess` (boxes and masks in
original pixels), :mod:`.processing` (toist's or the reference's resize, padding and box
clipping: ``InferenceConfig.protocol``), :mod:`.settings` (what an applied config derives, swapped
as one object), :mod:`.device` (device, precision, model preparation).
"""

from .device import SlowPrecisionWarning, resolve_device
from .finite import NonFiniteOutputError
from .images import check_image
from .results import Prediction, TaskState, UntrainedTaskWarning
from .segmenter import DEFAULT_PRONOUN, TaskSegmenter

__all__ = ["DEFAULT_PRONOUN", "NonFiniteOutputError", "Prediction", "SlowPrecisionWarning", "TaskSegmenter",
           "TaskState", "UntrainedTaskWarning", "check_image", "resolve_device"]
