"""Batching: pad images into an :class:`ImageBatch` and add each target's positive map.

The positive map of a target is ``[n_boxes, 256]`` binary: 1 on the tokens that the box's
``tokens_positive`` character spans cover in the tokenised caption (the model's tokenizer, so
token positions match the text the model reads). Built here rather than in the dataset
because it depends on the tokenizer.
"""

from __future__ import annotations

from typing import Sequence

from toist_core.structures import ImageBatch
from toist_core.tokens import positive_map


def add_positive_maps(targets: Sequence[dict], tokenizer) -> list[dict]:
    """Copies of ``targets`` with ``positive_map [n, 256]`` added (captions tokenised as one batch)."""
    captions = [t["caption"] for t in targets]
    encoding = tokenizer(captions, padding="longest", return_tensors="pt")
    out = []
    for i, target in enumerate(targets):
        target = dict(target)
        target["positive_map"] = positive_map(encoding, i, target["tokens_positive"])
        out.append(target)
    return out


def collate(batch: Sequence[tuple], tokenizer=None):
    """``[(image, target), ...]`` -> ``(ImageBatch, [target, ...])``;
    ``[(image, noun_target, pronoun_target), ...]`` -> ``(ImageBatch, [noun...], [pronoun...])``.

    With a tokenizer (any Hugging Face fast tokenizer) every target gets its ``positive_map``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = len(batch[0])
    if width not in (2, 3) or any(len(item) != width for item in batch):
        raise ValueError("batch items must all be (image, target) or (image, noun_target, pronoun_target)")
    images = ImageBatch.from_images([item[0] for item in batch])
    groups = [[item[k] for item in batch] for k in range(1, width)]
    if tokenizer is not None:
        groups = [add_positive_maps(group, tokenizer) for group in groups]
    return (images, *groups)


class Collator:
    """Picklable ``collate_fn`` bound to a tokenizer (for DataLoader workers)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, batch: Sequence[tuple]):
        return collate(batch, self.tokenizer)
