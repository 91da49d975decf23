"""Box-token contrastive alignment loss (MDETR ``loss_contrastive_align``).

``logits[b, q, t] = <proj_queries[b, q], proj_tokens[b, t]> / temperature``. For every query
matched to a box, the box->token term is ``-mean_{t positive} logit + logsumexp_t logit``;
for every token positive for some matched query, the token->box term is
``-mean_{q positive} logit + logsumexp_q logit``. The loss is ``(sum b2t + sum t2b) / 2 /
num_boxes``. Positives are the tokens of the matched box's spans (its positive map).
"""

from __future__ import annotations

from torch import Tensor


def contrastive_align_loss(proj_queries: Tensor, proj_tokens: Tensor, positive: Tensor, num_boxes: float,
                           temperature: float = 0.07) -> Tensor:
    """``proj_queries [B, Q, d]``, ``proj_tokens [B, L, d]`` (already L2-normalised),
    ``positive [B, Q, L]`` bool: query ``q`` of image ``b`` is matched to a box containing
    token ``t``."""
    logits = proj_queries @ proj_tokens.transpose(-1, -2) / temperature  # [B, Q, L]
    positive = positive.to(device=logits.device, dtype=bool)
    positive_logits = -logits.masked_fill(~positive, 0)

    # box -> token (reference adds 1e-6 to the positive counts).
    box_has_pos = positive.any(2)
    box_to_token = positive_logits.sum(2) / (positive.sum(2) + 1e-6) + logits.logsumexp(2)
    box_to_token = box_to_token.masked_fill(~box_has_pos, 0).sum()

    # token -> box
    token_has_pos = positive.any(1)
    token_to_box = positive_logits.sum(1) / (positive.sum(1) + 1e-6) + logits.logsumexp(1)
    token_to_box = token_to_box.masked_fill(~token_has_pos, 0).sum()
    return (box_to_token + token_to_box) / 2 / num_boxes
