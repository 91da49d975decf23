"""Soft-token classification loss and the cardinality error (MDETR ``loss_labels`` /
``loss_cardinality``).

The class head scores the ``C = 256`` token slots of the caption; slot ``C - 1`` (255) is
"no object". A matched query's target is the binary positive map of its box (1 on every
token of the box's spans, not normalised), an unmatched query's target is one-hot on the
no-object slot, down-weighted by ``eos_coef``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_token_cross_entropy(logits: Tensor, query_index: tuple[Tensor, Tensor], positive_rows: Tensor,
                             num_boxes: float, eos_coef: float = 0.1) -> Tensor:
    """``sum_{b,q} w_{b,q} * (-sum_c log_softmax(logits)_{b,q,c} * target_{b,q,c}) / num_boxes``.

    ``logits [B, Q, C]``; ``query_index = (batch_idx [M], query_idx [M])`` of the matched
    queries; ``positive_rows [M, C]`` the positive maps of their target boxes; ``w = 1`` on
    matched queries and ``eos_coef`` elsewhere.
    """
    log_prob = logits.log_softmax(-1)
    target = torch.zeros_like(log_prob)
    target[..., -1] = 1.0
    target[query_index] = positive_rows.to(target)
    per_query = -(log_prob * target).sum(-1)
    weight = torch.full_like(per_query, eos_coef)
    weight[query_index] = 1.0
    return (per_query * weight).sum() / num_boxes


@torch.no_grad()
def cardinality_error(logits: Tensor, num_targets: Tensor) -> Tensor:
    """Mean over images of ``|#(queries whose argmax is not no-object) - #targets|`` (logging)."""
    predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    return F.l1_loss(predicted.float(), num_targets.to(predicted.device).float())
