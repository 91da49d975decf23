"""Tokenizer, RoBERTa text encoder and the resizer from its width to the transformer's.

Nothing here reaches a model hub unless the caller names a hub model: random-weight encoders
are built from :class:`~toist_core.config.TextEncoderConfig` alone, and the packaged test
tokenizer is addressed as ``builtin:tiny``.

Hub names are looked up locally first (``hub``: the Hugging Face cache, then the hub only when it
answers within a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import TINY_TOKENIZER, TextEncoderConfig
from ..tokens import MAX_TEXT_TOKENS
from .hub import Fetched, fetch_pretrained, local_path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

def tokenizer_source(name_or_dir: str) -> str:
    """What ``from_pretrained`` should read for a tokenizer setting (resolves ``builtin:tiny``)."""
    return str(TINY_TOKENIZER_DIR) if name_or_dir == TINY_TOKENIZER else str(name_or_dir)


# The files a RoBERTa-style (byte-level BPE) tokenizer folder needs, one set or the other:
# ``save_pretrained`` of a fast tokenizer writes tokenizer.json (the packaged tiny tokenizer and
# exported model directories hold it), a roberta-base download also has vocab.json + merges.txt.
# Without them transformers builds, without a word of warning, a tokenizer of the 5 special
# tokens alone, which turns every caption into [</s>, <unk>].
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_tokenizer_dir(directory: Path) -> None:
    """Refuse a local tokenizer folder that holds none of :data:`TOKENIZER_FILE_SETS`."""
    if any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return
    present = sorted(p.name for p in directory.iterdir())
    wanted = " or ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS)
    raise OSError(f"cannot load the tokenizer from the local directory {directory}: it has no vocabulary "
                  f"({wanted} needed; it holds {', '.join(present) or 'nothing'})")


def fetch_tokenizer(name_or_dir: str) -> Fetched:
    """:func:`load_tokenizer` and where the tokenizer came from."""
    from transformers import AutoTokenizer

    local = local_path(tokenizer_source(name_or_dir))
    if local.is_dir():
        check_tokenizer_dir(local)
    fetched = fetch_pretrained(AutoTokenizer.from_pretrained, tokenizer_source(name_or_dir), "tokenizer")
    if name_or_dir == TINY_TOKENIZER:
        fetched = Fetched(fetched.value, f"packaged tiny tokenizer ({TINY_TOKENIZER_DIR})")
    if not getattr(fetched.value, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_dir!r} is not a fast tokenizer; char_to_token is needed")
    return fetched


def load_tokenizer(name_or_dir: str):
    """A fast RoBERTa-style tokenizer from a hub name, a local directory or ``builtin:tiny``.

    Hub names are read from the local Hugging Face cache first; the hub is asked only when it
    answers quickly (see :func:`fetch_pretrained`). Fast tokenizers are required: token
    positions of character spans (``char_to_token``) pick the logits of a box's words and the
    pronoun rows that distilled models replace.
    """
    return fetch_tokenizer(name_or_dir).value


def roberta_config(cfg: TextEncoderConfig):
    """The ``transformers.RobertaConfig`` of a text-encoder config."""
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def text_config_fields(roberta) -> dict:
    """The architecture fields of a ``RobertaConfig`` as :class:`TextEncoderConfig` keywords."""
    return dict(vocab_size=roberta.vocab_size, hidden_size=roberta.hidden_size,
                num_layers=roberta.num_hidden_layers, num_heads=roberta.num_attention_heads,
                intermediate_size=roberta.intermediate_size,
                max_position_embeddings=roberta.max_position_embeddings,
                type_vocab_size=roberta.type_vocab_size, layer_norm_eps=roberta.layer_norm_eps,
                pad_token_id=roberta.pad_token_id, bos_token_id=roberta.bos_token_id,
                eos_token_id=roberta.eos_token_id)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """``RobertaModel`` with its pooler: random weights, or pretrained ones from ``cfg.weights``."""
    from transformers import RobertaModel

    if cfg.weights is None:
        return RobertaModel(roberta_config(cfg), add_pooling_layer=True)

    def from_pretrained(source: str, **kwargs: Any) -> nn.Module:
        return RobertaModel.from_pretrained(source, add_pooling_layer=True, **kwargs)

    # from_pretrained hands the model back in eval mode: built here it starts in train mode as
    # every module does, or a run training it would do so with its dropout off.
    model = fetch_pretrained(from_pretrained, cfg.weights, "text encoder weights").value.train()
    found = text_config_fields(model.config)
    wanted = text_config_fields(roberta_config(cfg))
    diff = {k: (wanted[k], found[k]) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                               "intermediate_size", "max_position_embeddings")
            if wanted[k] != found[k]}
    if diff:
        raise ValueError(f"text.weights {cfg.weights!r} does not match the text config "
                         f"(field: (config, weights)): {diff}")
    return model


class FeatureResizer(nn.Module):
    """``Linear(in -> out) -> LayerNorm(eps 1e-12) -> Dropout``: text width to d_model."""

    def __init__(self, input_feat_size: int, output_feat_size: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(input_feat_size, output_feat_size, bias=True)
        self.layer_norm = nn.LayerNorm(output_feat_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.layer_norm(self.fc(x)))


@dataclass(frozen=True)
class TextFeatures:
    """Encoded captions, ready to be joined to the image tokens.

    tokenized:    the tokenizer's ``BatchEncoding`` (``input_ids [B, L]``, ``char_to_token``).
    resized:      ``text_memory_resized [L, B, d]`` (RoBERTa last hidden state -> resizer).
    padding_mask: ``[B, L]`` bool, True on padding tokens.

    Depends on the captions and on the text encoder's and resizer's weights (and their train /
    eval mode: dropout), not on the images, so it can be computed once and reused for every frame
    (a batch-1 instance is broadcast to any image batch) until those weights change.
    """

    tokenized: object
    resized: Tensor
    padding_mask: Tensor

    @property
    def num_tokens(self) -> int:
        return self.resized.shape[0]

    def for_batch(self, batch_size: int) -> "TextFeatures":
        """Repeat batch-1 features ``batch_size`` times (no copy when sizes already match)."""
        current = self.resized.shape[1]
        if current == batch_size:
            return self
        if current != 1:
            raise ValueError(f"text features for {current} captions cannot serve {batch_size} images")
        return TextFeatures(self.tokenized, self.resized.expand(-1, batch_size, -1),
                            self.padding_mask.expand(batch_size, -1))


# More characters than any token of a BPE vocabulary covers (GPT-2 / RoBERTa's longest are runs of
# ~64-128 characters): a longer text cannot fit the token limit, and is refused before the
# tokenizer reads it all (a task of 4 million characters kept a robot's node busy for 5 s).
MAX_CHARS_PER_TOKEN = 128


def max_caption_tokens(cfg: TextEncoderConfig) -> int:
    """The most tokens a caption may have: the 256 token slots of the class head, or fewer when
    the RoBERTa position table is shorter (:attr:`TextEncoderConfig.position_slots`)."""
    return min(MAX_TEXT_TOKENS, cfg.position_slots)


def tokenize(tokenizer, captions: Sequence[str], device: torch.device, text_cfg: Optional[TextEncoderConfig] = None):
    """Tokenize with padding to the longest caption; refuse captions longer than the 256 token
    slots, or than ``text_cfg``'s position table allows (:func:`max_caption_tokens`)."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a list of strings")
    limit = MAX_TEXT_TOKENS if text_cfg is None else max_caption_tokens(text_cfg)
    longest = max(captions, key=len, default="")
    if len(longest) > limit * MAX_CHARS_PER_TOKEN:
        raise ValueError(f"caption too long: {len(longest)} characters, more than {limit} tokens can hold (at most "
                         f"{MAX_CHARS_PER_TOKEN} characters each): {longest[:80]!r}...")
    tokenized = tokenizer(list(captions), padding="longest", return_tensors="pt")
    length = tokenized["input_ids"].shape[1]
    if length > limit:
        longest = max(captions, key=len)
        why = ("" if limit == MAX_TEXT_TOKENS else
               f": text.max_position_embeddings {text_cfg.max_position_embeddings} less RoBERTa's "
               f"pad_token_id + 1 = {text_cfg.pad_token_id + 1} offset")
        raise ValueError(f"caption too long: {length} tokens (at most {limit}{why}): {longest[:80]!r}...")
    return tokenized.to(device)


__all__ = ["FeatureResizer", "TextFeatures", "TINY_TOKENIZER_DIR", "build_text_encoder", "check_tokenizer_dir",
           "fetch_tokenizer", "load_tokenizer", "max_caption_tokens", "roberta_config", "text_config_fields",
           "tokenize", "tokenizer_source"]
