"""The network's outputs must be numbers: a NaN or inf score, box or mask logit is refused here,
right after the network (every backend), so that it never turns into "no detection" (a NaN
score fails every threshold), an empty mask (``sigmoid(NaN) > 0.5`` is False) or a crash far
away ("cannot convert float NaN to integer" when a box is drawn)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

# Per image: (b, kept query indices [n]) -> mask logits [1, n, H/4, W/4].
MaskFn = Callable[[int, Tensor], Tensor]


class NonFiniteOutputError(FloatingPointError, RuntimeError):
    """The network returned NaN / inf for a frame. A ``FloatingPointError``, and a
    ``RuntimeError`` so that callers handling failed inference (the ``toist`` commands: exit
    code 2 with the message) need no extra clause."""


def _cause(where: str, reduced: bool) -> str:
    hint = "; in fp16 / bf16 a large activation can overflow: try fp32" if reduced else ""
    return (f"({where}): the model's weights or its input hold non-finite values (a diverged or damaged "
            f"checkpoint, a NaN written into the weights, a 0 in inference.std){hint}")


def check_outputs(scores: Tensor, boxes: Tensor, where: str, reduced: bool = False) -> None:
    """Refuse non-finite ``scores [B, Q]`` or ``boxes [B, Q, 4]``, naming the first image of the
    batch that has them, how many of its queries, and ``where`` (backend, precision, device);
    ``reduced``: the network ran in fp16 / bf16 (the message suggests fp32)."""
    bad_scores = ~scores.isfinite()                   # [B, Q]
    bad_boxes = ~boxes.isfinite().all(-1)             # [B, Q]
    bad = bad_scores | bad_boxes
    if not bool(bad.any()):
        return
    b = int(bad.any(-1).nonzero()[0, 0])
    parts = [f"{int(n)} non-finite {what}" for n, what in ((bad_scores[b].sum(), "scores"),
                                                            (bad_boxes[b].sum(), "boxes")) if n]
    others = int(bad.any(-1).sum()) - 1
    also = f" (and {others} more image(s) of the batch of {scores.shape[0]})" if others else ""
    raise NonFiniteOutputError(f"images[{b}]: the network returned {' and '.join(parts)} for its "
                               f"{scores.shape[1]} queries{also} {_cause(where, reduced)}")


def checked_masks(mask_logits: MaskFn, where: str, reduced: bool = False) -> MaskFn:
    """``mask_logits`` (``(b, keep [n]) -> [1, n, h, w]``) refusing non-finite logits."""

    def masks(b: int, keep: Tensor) -> Tensor:
        logits = mask_logits(b, keep)
        if not bool(logits.isfinite().all()):
            queries = int((~logits.isfinite()).flatten(2).any(-1).sum())
            raise NonFiniteOutputError(f"images[{b}]: the mask head returned non-finite logits for {queries} of "
                                       f"the {len(keep)} kept queries {_cause(where, reduced)}")
        return logits

    return masks
