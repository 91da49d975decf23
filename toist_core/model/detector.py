"""The TOIST detector (MDETR with TOIST's two-phase forward).

``memory = model.encode(images, captions)`` runs the backbone, the text encoder and the
transformer encoder; ``outputs = model.decode(memory)`` runs the decoder and the heads.
Between the two, the memory can be edited (cluster-centre replacement puts
``img_memory_mod`` into it) and text features can be reused across frames
(``model.encode(images, text=model.encode_text([caption]))``).

Submodules are created in the reference's order so the state_dict lists tensors in the same
order as the official files: transformer, class_embed, bbox_embed, query_embed, input_proj,
backbone, contrastive projections.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..structures import ImageBatch
from ..tokens import MAX_TEXT_TOKENS
from .backbone import Joiner
from .heads import MLP
from .text import TextFeatures
from .transformer import Transformer


class TOIST(nn.Module):
    def __init__(self, backbone: Joiner, transformer: Transformer, num_queries: int,
                 aux_loss: bool = True, contrastive_align: bool = True, contrastive_dim: int = 64):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        # One logit per token slot; index 255 = "no object".
        self.class_embed = nn.Linear(hidden_dim, MAX_TEXT_TOKENS)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.contrastive_align = contrastive_align
        if contrastive_align:
            self.contrastive_align_projection_image = nn.Linear(hidden_dim, contrastive_dim)
            self.contrastive_align_projection_text = nn.Linear(hidden_dim, contrastive_dim)

    # -- convenience -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.transformer.tokenizer

    @property
    def detector(self) -> "TOIST":
        """The detector itself (the segmentation wrapper returns its ``.detr``)."""
        return self

    @property
    def has_masks(self) -> bool:
        return False

    # -- phase 1 -----------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> TextFeatures:
        """RoBERTa + resizer features of ``captions`` (depend on the text only: cache them)."""
        return self.transformer.encode_text(captions, device=self.query_embed.weight.device)

    def encode(self, images: ImageBatch, captions: Optional[Sequence[str]] = None,
               text: Optional[TextFeatures] = None) -> dict:
        """Phase 1: image + text -> memory dict.

        Give either ``captions`` (one per image, or one for all) or pre-computed ``text``.

        Keys: ``img_memory [S, B, d]`` (S = HW + L: image tokens, then text tokens),
        ``text_memory [L, B, d]`` (= the last L rows), ``text_memory_resized [L, B, d]``,
        ``mask [B, S]`` (True = padding), ``text_attention_mask [B, L]``, ``pos_embed [S, B, d]``,
        ``query_embed [Q, B, d]``, ``tokenized``, ``features`` (backbone levels ``[B, C_l, h_l, w_l]``,
        four for the segmentation model, else the last one) and ``src_proj [B, d, h, w]``.
        """
        if (captions is None) == (text is None):
            raise ValueError("TOIST.encode: give exactly one of captions or text")
        if captions is not None and len(captions) not in (1, len(images)):
            raise ValueError(f"TOIST.encode: {len(captions)} captions for {len(images)} images")
        levels, pos = self.backbone(images)
        src, mask = levels[-1]
        src_proj = self.input_proj(src)
        if text is None:
            text = self.encode_text(captions)
        memory = self.transformer.encode(src_proj, mask, pos, self.query_embed.weight, text)
        memory["features"] = [feature for feature, _ in levels]
        memory["src_proj"] = src_proj
        return memory

    # -- phase 2 -----------------------------------------------------------------------------
    def decoder_states(self, memory: dict) -> Tensor:
        """Decoder outputs of every layer ``[num_layers, B, Q, d]`` (uses ``img_memory_mod`` if set)."""
        return self.transformer.decode(memory)

    def predict_heads(self, hs: Tensor, memory: dict, aux: Optional[bool] = None) -> dict:
        """Class / box (and contrastive) heads on decoder states ``hs [num_layers, B, Q, d]``.

        ``aux`` (default: ``self.aux_loss``) adds ``aux_outputs`` for all but the last layer;
        without it the heads run on the last layer only.
        """
        aux = self.aux_loss if aux is None else aux
        if not aux:
            hs = hs[-1:]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        layers = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.contrastive_align:
            proj_queries = F.normalize(self.contrastive_align_projection_image(hs), p=2, dim=-1)
            proj_tokens = F.normalize(
                self.contrastive_align_projection_text(memory["text_memory"]).transpose(0, 1), p=2, dim=-1)
            out.update(proj_queries=proj_queries[-1], proj_tokens=proj_tokens, tokenized=memory["tokenized"])
            for layer, queries in zip(layers, proj_queries[:-1]):
                layer.update(proj_queries=queries, proj_tokens=proj_tokens, tokenized=memory["tokenized"])
        out["aux_outputs"] = layers
        return out

    def decode(self, memory: dict, aux: Optional[bool] = None) -> dict:
        """Phase 2: ``pred_logits [B, Q, 256]``, ``pred_boxes [B, Q, 4]`` (cx, cy, w, h relative
        to the un-padded image), ``aux_outputs`` (empty when aux is off), and
        ``proj_queries [B, Q, c]`` / ``proj_tokens [B, L, c]`` with contrastive align."""
        return self.predict_heads(self.decoder_states(memory), memory, aux)

    def forward(self, images: ImageBatch, captions: Sequence[str]) -> dict:
        return self.decode(self.encode(images, captions))


__all__ = ["TOIST"]
