"""Cluster-centre replacement (CCR): overwrite token rows of the decoder's memory.

The encoder output ``img_memory [S, B, D]`` holds the ``HW`` image tokens followed by the
``L`` text tokens. CCR writes a cluster centre into the rows of chosen text tokens of a
*copy* of it; only the decoder reads the copy (``memory['img_memory_mod']``), the mask head
and the distillation features keep using the unmodified rows.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor


def replace_token_rows(memory: Tensor, text_len: int, token_indices: Sequence[Sequence[int]],
                       values: Tensor) -> Tensor:
    """A copy of ``memory [S, B, D]`` whose rows ``S - text_len + t`` of sample ``b`` equal
    ``values[b]`` for every ``t`` in ``token_indices[b]``.

    ``values [B, D]`` (rows of samples without indices are ignored). Samples with an empty
    index list are left untouched. Gradients flow to the untouched rows of ``memory`` and,
    if ``values`` requires grad, to ``values``.
    """
    seq_len, batch, dim = memory.shape
    if len(token_indices) != batch:
        raise ValueError(f"replace_token_rows: {len(token_indices)} index lists for a batch of {batch}")
    if not 0 < text_len <= seq_len:
        raise ValueError(f"replace_token_rows: text_len {text_len} not in 1..{seq_len} (memory has {seq_len} rows)")
    if values.shape != (batch, dim):
        raise ValueError(f"replace_token_rows: values must be [{batch}, {dim}], got {tuple(values.shape)}")
    out = memory.clone()
    first_text_row = seq_len - text_len
    for b, indices in enumerate(token_indices):
        if len(indices) == 0:
            continue
        bad = [t for t in indices if not 0 <= t < text_len]
        if bad:
            raise ValueError(f"replace_token_rows: token indices {bad} of sample {b} outside 0..{text_len - 1}")
        rows = [first_text_row + t for t in indices]
        out[rows, b] = values[b].to(out.dtype).expand(len(rows), dim)
    return out
