"""Character spans of a caption -> token positions and positive maps.

The model's class head has one logit per token slot (``MAX_TEXT_TOKENS = 256``; the last,
index 255, means "no object"). A target box is tied to the tokens of its character spans
(``tokens_positive``); these helpers map spans to token indices with a fast tokenizer's
offsets, using the same one-to-three character fallbacks the reference uses at span edges
that fall on whitespace.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

MAX_TEXT_TOKENS = 256
NO_OBJECT_INDEX = MAX_TEXT_TOKENS - 1

Span = tuple[int, int]  # [begin, end) character offsets


def _char_to_token(encoding, batch_index: int, char: int) -> Optional[int]:
    if char < 0:
        return None
    try:
        return encoding.char_to_token(batch_index, char)
    except Exception:  # the tokenizer raises for offsets outside the text
        return None


def span_token_range(encoding, batch_index: int, span: Span) -> Optional[tuple[int, int]]:
    """Token index range ``[first, last]`` (inclusive) covered by a character span, or None.

    ``encoding`` is a ``BatchEncoding`` of a fast tokenizer.
    """
    begin, end = span
    first = _char_to_token(encoding, batch_index, begin)
    if first is None:
        first = _char_to_token(encoding, batch_index, begin + 1)
        if first is None:
            first = _char_to_token(encoding, batch_index, begin + 2)
    last = _char_to_token(encoding, batch_index, end - 1)
    if last is None:
        last = _char_to_token(encoding, batch_index, end - 2)
        if last is None:
            last = _char_to_token(encoding, batch_index, end - 3)
    if first is None or last is None or last < first:
        return None
    return first, last


def span_token_indices(encoding, batch_index: int, spans: Sequence[Span]) -> list[int]:
    """Sorted unique token indices covered by any of ``spans`` in caption ``batch_index``."""
    indices: set[int] = set()
    for span in spans:
        found = span_token_range(encoding, batch_index, span)
        if found is not None:
            indices.update(range(found[0], found[1] + 1))
    return sorted(indices)


def positive_map(encoding, batch_index: int, spans_per_box: Sequence[Sequence[Span]],
                 num_tokens: int = MAX_TEXT_TOKENS) -> Tensor:
    """Binary ``[n_boxes, num_tokens]`` map: 1 on the tokens of each box's spans.

    The reference normalises rows and then casts them through ``torch.bool`` in its collate
    function, so the map its matcher and loss see is binary; we build it binary directly.
    """
    result = torch.zeros((len(spans_per_box), num_tokens), dtype=torch.float32)
    for row, spans in enumerate(spans_per_box):
        for idx in span_token_indices(encoding, batch_index, spans):
            if idx < num_tokens:
                result[row, idx] = 1.0
    return result
