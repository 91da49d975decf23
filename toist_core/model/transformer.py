"""MDETR's transformer as TOIST uses it: post-norm encoder over image + text tokens, and a
decoder whose queries attend to that whole memory (no separate text cross-attention).

Tensor names are the reference's: ``encoder.layers.{i}.{self_attn,linear1,linear2,norm1,norm2}``,
``decoder.layers.{i}.{self_attn,cross_attn_image,linear1,linear2,norm1,norm3,norm4}``,
``decoder.norm``, ``text_encoder.*`` (RoBERTa), ``resizer.*``.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextEncoderConfig, TransformerConfig
from .text import FeatureResizer, TextFeatures, build_text_encoder, tokenize


def _with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


class TransformerEncoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = src + pos) -> add & norm1 -> FFN -> add & norm2."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerDecoderLayer(nn.Module):
    """Post-norm: self-attention -> norm1 -> cross-attention to the encoder memory -> norm3
    -> FFN -> norm4. (The reference removed the text cross-attention, hence no norm2.)"""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn_image = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor],
                pos: Optional[Tensor], query_pos: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attn_image(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos),
                                     value=memory, key_padding_mask=memory_key_padding_mask,
                                     need_weights=False)[0]
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(tgt2))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, no final norm (post-norm)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; returns every layer's output after the shared final norm."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                query_pos: Tensor) -> Tensor:
        """``[Q, B, d]`` zeros + memory ``[S, B, d]`` -> ``[num_layers, Q, B, d]``."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Encoder over ``[image tokens; text tokens]``, decoder over that memory, plus the text
    encoder (RoBERTa) and the resizer that maps its states to ``d_model``."""

    def __init__(self, cfg: TransformerConfig, text_cfg: TextEncoderConfig, tokenizer):
        super().__init__()
        layer_args = (cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        self.encoder = TransformerEncoder(TransformerEncoderLayer(*layer_args), cfg.enc_layers)
        self.decoder = TransformerDecoder(TransformerDecoderLayer(*layer_args), cfg.dec_layers, cfg.d_model)
        # Xavier init of the encoder/decoder only: RoBERTa and the resizer keep their own.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.text_encoder = build_text_encoder(text_cfg)
        if text_cfg.freeze:
            self.text_encoder.requires_grad_(False)
        self.resizer = FeatureResizer(text_cfg.hidden_size, cfg.d_model, text_cfg.resizer_dropout)
        self.tokenizer = tokenizer
        self.text_config = copy.copy(text_cfg)  # its position table bounds the caption length
        self.d_model = cfg.d_model
        self.nhead = cfg.nheads

    def encode_text(self, captions: Sequence[str], device: Optional[torch.device] = None) -> TextFeatures:
        """Tokenize, run RoBERTa and the resizer: ``[L, B, d]`` features and ``[B, L]`` padding."""
        device = device if device is not None else self.resizer.fc.weight.device
        tokenized = tokenize(self.tokenizer, captions, device, self.text_config)
        encoded = self.text_encoder(input_ids=tokenized["input_ids"],
                                    attention_mask=tokenized["attention_mask"])
        text_memory = encoded.last_hidden_state.transpose(0, 1)
        return TextFeatures(tokenized=tokenized, resized=self.resizer(text_memory),
                            padding_mask=tokenized["attention_mask"].ne(1))

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor, query_embed: Tensor,
               text: TextFeatures) -> dict:
        """Phase 1. ``src [B, d, h, w]``, ``mask [B, h, w]``, ``pos [B, d, h, w]``,
        ``query_embed [Q, d]`` -> the memory dict (see :meth:`TOIST.encode`)."""
        batch = src.shape[0]
        text = text.for_batch(batch)
        img_tokens = src.flatten(2).permute(2, 0, 1)
        img_pos = pos.flatten(2).permute(2, 0, 1)
        text_resized = text.resized
        tokens = torch.cat([img_tokens, text_resized.to(img_tokens.dtype)], dim=0)
        padding = torch.cat([mask.flatten(1), text.padding_mask], dim=1)
        # Text tokens get a zero position code.
        pos_embed = torch.cat([img_pos, torch.zeros_like(text_resized, dtype=img_pos.dtype)], dim=0)
        img_memory = self.encoder(tokens, key_padding_mask=padding, pos=pos_embed)
        return {
            "img_memory": img_memory,
            "text_memory": img_memory[-text.num_tokens:],
            "text_memory_resized": text_resized,
            "mask": padding,
            "text_attention_mask": text.padding_mask,
            "pos_embed": pos_embed,
            "query_embed": query_embed.unsqueeze(1).repeat(1, batch, 1),
            "tokenized": text.tokenized,
        }

    def decode(self, memory: dict) -> Tensor:
        """Phase 2: decoder states ``[num_layers, B, Q, d]``. Reads ``img_memory_mod`` (memory with
        cluster-centre replacement) instead of ``img_memory`` when present."""
        img_memory = memory.get("img_memory_mod")
        if img_memory is None:
            img_memory = memory["img_memory"]
        query_embed = memory["query_embed"]
        hs = self.decoder(torch.zeros_like(query_embed), img_memory, memory["mask"],
                          memory["pos_embed"], query_embed)
        return hs.transpose(1, 2)


__all__ = ["Transformer", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerEncoderLayer"]
