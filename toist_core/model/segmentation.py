"""Segmentation head: per-query attention maps over the encoder's image tokens, refined into
masks by a small FPN-style convolutional head (DETR's "smallconv", as MDETR/TOIST use it).

:class:`TOISTSegm` wraps the detector as ``.detr`` (so its tensors are prefixed ``detr.``) and
adds ``bbox_attention.*`` and ``mask_head.*``. Masks can be computed for any subset of the
queries (:meth:`TOISTSegm.predict_masks`), e.g. only those an application keeps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..structures import ImageBatch
from .detector import TOIST
from .text import TextFeatures


class MHAttentionMap(nn.Module):
    """Multi-head attention weights only (no values): queries ``[B, n, d]`` against a key map
    ``[B, d, h, w]`` -> ``[B, n, heads, h, w]``, softmax over the ``h * w`` positions of each
    (query, head), padding positions excluded."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        head_dim = self.hidden_dim // self.num_heads
        q = self.q_linear(q)
        # The key projection is the same Linear applied per pixel, as a 1x1 convolution.
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = F.softmax(weights.flatten(3), dim=-1).view_as(weights)
        return self.dropout(weights)


def _expand(tensor: Tensor, length: int) -> Tensor:
    """``[B, ...]`` -> ``[B * length, ...]``, each sample repeated ``length`` times in a row."""
    return tensor.unsqueeze(1).expand(-1, length, *tensor.shape[1:]).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """Conv head upsampling (projected features ++ attention maps) with FPN skips from the
    backbone's stride-16/8/4 levels to stride-4 mask logits.

    ``dim`` = d_model + heads; ``fpn_dims`` = channels of layer3, layer2, layer1;
    ``context_dim`` = d_model. Channels: dim -> d/2 -> d/4 -> d/8 -> d/16 -> 1.
    """

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: Sequence[Tensor]) -> Tensor:
        """``x [B, d, h, w]``, ``bbox_mask [B, n, heads, h, w]``, ``fpns`` = [layer3, layer2, layer1]
        of shape ``[B, C, ., .]`` -> mask logits ``[B * n, 1, H/4, W/4]``."""
        n = bbox_mask.shape[1]
        x = torch.cat([_expand(x, n), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, conv, norm, fpn in ((self.adapter1, self.lay3, self.gn3, fpns[0]),
                                         (self.adapter2, self.lay4, self.gn4, fpns[1]),
                                         (self.adapter3, self.lay5, self.gn5, fpns[2])):
            skip = _expand(adapter(fpn), n)
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


class TOISTSegm(nn.Module):
    """The detector plus mask prediction. ``decode`` adds ``pred_masks [B, Q, H/4, W/4]``."""

    def __init__(self, detr: TOIST, fpn_dims: Sequence[int], freeze_detr: bool = False):
        super().__init__()
        self.detr = detr
        if freeze_detr:
            self.detr.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, fpn_dims, hidden_dim)

    @property
    def tokenizer(self):
        return self.detr.tokenizer

    @property
    def detector(self) -> TOIST:
        return self.detr

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    @property
    def has_masks(self) -> bool:
        return True

    def encode_text(self, captions: Sequence[str]) -> TextFeatures:
        return self.detr.encode_text(captions)

    def encode(self, images: ImageBatch, captions: Optional[Sequence[str]] = None,
               text: Optional[TextFeatures] = None) -> dict:
        """Phase 1 (see :meth:`TOIST.encode`); ``features`` holds all four backbone levels."""
        return self.detr.encode(images, captions, text)

    def predict_masks(self, memory: dict, queries: Tensor) -> Tensor:
        """Mask logits ``[B, n, H/4, W/4]`` for decoder states ``queries [B, n, d]`` (any subset
        of the last decoder layer's queries).

        The attention keys are the image rows of the *unmodified* encoder memory
        (``img_memory``, never ``img_memory_mod``); the conv head reads ``src_proj`` (the
        projected stride-32 features) and the stride-16/8/4 backbone levels.
        """
        src_proj = memory["src_proj"]
        batch, dim, height, width = src_proj.shape
        features = memory["features"]
        if len(features) != 4:
            raise ValueError(f"predict_masks needs the 4 backbone levels in memory['features'], got {len(features)}")
        num_text = memory["text_memory"].shape[0]
        key_map = memory["img_memory"][:-num_text].permute(1, 2, 0).reshape(batch, dim, height, width)
        image_mask = memory["mask"][:, :height * width].reshape(batch, height, width)
        n = queries.shape[1]
        if n == 0:
            return src_proj.new_zeros((batch, 0) + tuple(features[0].shape[-2:]))
        bbox_mask = self.bbox_attention(queries, key_map, mask=image_mask)
        masks = self.mask_head(src_proj, bbox_mask, [features[2], features[1], features[0]])
        return masks.view(batch, n, masks.shape[-2], masks.shape[-1])

    def decode(self, memory: dict, aux: Optional[bool] = None) -> dict:
        hs = self.detr.decoder_states(memory)
        out = self.detr.predict_heads(hs, memory, aux)
        out["pred_masks"] = self.predict_masks(memory, hs[-1])
        return out

    def forward(self, images: ImageBatch, captions: Sequence[str]) -> dict:
        return self.decode(self.encode(images, captions))


__all__ = ["MHAttentionMap", "MaskHeadSmallConv", "TOISTSegm"]
