"""Build the network described by a :class:`~toist_core.config.ModelConfig`."""

from __future__ import annotations

from typing import Union

from torch import nn

from ..config import ModelConfig
from .backbone import build_backbone
from .detector import TOIST
from .position_encoding import PositionEmbeddingSine
from .segmentation import TOISTSegm
from .text import load_tokenizer
from .transformer import Transformer

Model = Union[TOIST, TOISTSegm]


def build_model(cfg: ModelConfig, tokenizer=None) -> Model:
    """The detector (``cfg.masks`` False) or the segmentation model wrapping it as ``.detr``.

    Weights are random unless ``cfg.text.weights`` / ``cfg.backbone.weights`` name pretrained
    ones. ``tokenizer`` (a fast tokenizer) overrides ``cfg.text.tokenizer``.
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.text.tokenizer)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but text.vocab_size is {cfg.text.vocab_size}")
    # A tokenizer of special tokens only (its vocabulary files were missing) maps every caption to
    # the same ids: every task would give the same output. Fewer tokens than vocab_size are fine
    # (the packaged tiny tokenizer serves the paper-size model in tests).
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        source = getattr(tokenizer, "name_or_path", "") or cfg.text.tokenizer
        raise ValueError(f"tokenizer {source!r} has only its {len(tokenizer)} special tokens "
                         f"({', '.join(tokenizer.all_special_tokens)}), no vocabulary: every caption would "
                         "tokenize alike; give a folder with its vocabulary files (tokenizer.json)")
    if tokenizer.pad_token_id != cfg.text.pad_token_id:
        # Another vocabulary (a BERT WordPiece tokenizer pads with 0): every caption would become
        # other tokens than the encoder learnt, silently.
        source = getattr(tokenizer, "name_or_path", "") or cfg.text.tokenizer
        raise ValueError(f"tokenizer {source!r} pads with token id {tokenizer.pad_token_id}, the text encoder "
                         f"with {cfg.text.pad_token_id} (text.pad_token_id): a tokenizer of another vocabulary; "
                         "give the one the model was trained with (RoBERTa's: roberta-base)")
    position = PositionEmbeddingSine(cfg.transformer.d_model // 2, normalize=True)
    backbone = build_backbone(cfg.backbone, position, return_interm_layers=cfg.masks)
    transformer = Transformer(cfg.transformer, cfg.text, tokenizer)
    detector = TOIST(backbone, transformer, num_queries=cfg.num_queries, aux_loss=cfg.aux_loss,
                     contrastive_align=cfg.contrastive_align, contrastive_dim=cfg.contrastive_dim)
    if not cfg.masks:
        return detector
    layer1, layer2, layer3, _ = cfg.backbone.channels
    return TOISTSegm(detector, fpn_dims=[layer3, layer2, layer1])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["Model", "build_model", "count_parameters"]
