"""The model config of a checkpoint: sizes read from tensor shapes, or the config it stores."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from torch import Tensor

from .. import typed_config
from ..config import ModelConfig, TextEncoderConfig, preset
from .errors import CheckpointError
from .official import SEGM_PREFIX, OfficialCheckpoint
from .strict import check_bank_shapes

_RESNET_BLOCKS = {  # (blocks per layer, bottleneck) -> torchvision name
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


@dataclass(frozen=True)
class Architecture:
    """The network sizes a state_dict implies (what can be read from tensor shapes)."""

    masks: bool
    contrastive_align: bool
    backbone: Optional[str]
    d_model: int
    num_queries: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    contrastive_dim: Optional[int]
    text_vocab_size: int
    text_hidden_size: int
    text_num_layers: int
    text_intermediate_size: int
    text_max_positions: int
    num_clusters: Optional[int] = None

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """``field: checkpoint X, config Y`` for every size that differs from ``cfg``."""
        pairs = [
            ("masks", self.masks, cfg.masks),
            ("contrastive_align", self.contrastive_align, cfg.contrastive_align),
            ("backbone.name", self.backbone, cfg.backbone.name),
            ("transformer.d_model", self.d_model, cfg.transformer.d_model),
            ("num_queries", self.num_queries, cfg.num_queries),
            ("transformer.enc_layers", self.enc_layers, cfg.transformer.enc_layers),
            ("transformer.dec_layers", self.dec_layers, cfg.transformer.dec_layers),
            ("transformer.dim_feedforward", self.dim_feedforward, cfg.transformer.dim_feedforward),
            ("text.vocab_size", self.text_vocab_size, cfg.text.vocab_size),
            ("text.hidden_size", self.text_hidden_size, cfg.text.hidden_size),
            ("text.num_layers", self.text_num_layers, cfg.text.num_layers),
            ("text.intermediate_size", self.text_intermediate_size, cfg.text.intermediate_size),
            ("text.max_position_embeddings", self.text_max_positions, cfg.text.max_position_embeddings),
        ]
        if self.contrastive_align and cfg.contrastive_align:
            pairs.append(("contrastive_dim", self.contrastive_dim, cfg.contrastive_dim))
        return [f"{name}: checkpoint {found!r}, config {wanted!r}" for name, found, wanted in pairs
                if found is not None and found != wanted]

    def apply_to(self, base: ModelConfig) -> ModelConfig:
        """A copy of ``base`` with every size read from the state_dict.

        Head counts cannot be read from shapes and stay as in ``base``. A 512-row RoBERTa
        position table is the reference's "without pretraining" model, built with
        transformers' defaults (LayerNorm eps 1e-12).
        """
        cfg = copy.deepcopy(base)
        cfg.masks, cfg.contrastive_align = self.masks, self.contrastive_align
        if self.contrastive_dim is not None:
            cfg.contrastive_dim = self.contrastive_dim
        if self.backbone is not None:
            cfg.backbone.name = self.backbone
        cfg.num_queries = self.num_queries
        t = cfg.transformer
        t.d_model, t.enc_layers, t.dec_layers, t.dim_feedforward = (
            self.d_model, self.enc_layers, self.dec_layers, self.dim_feedforward)
        x = cfg.text
        if self.text_max_positions != x.max_position_embeddings:
            x.layer_norm_eps = 1e-12 if self.text_max_positions == 512 else 1e-5
        x.vocab_size, x.hidden_size, x.num_layers = self.text_vocab_size, self.text_hidden_size, self.text_num_layers
        x.intermediate_size, x.max_position_embeddings = self.text_intermediate_size, self.text_max_positions
        if self.masks:
            cfg.aux_loss = False  # the released mask-head stage ran without aux loss
        return typed_config.from_dict(ModelConfig, typed_config.to_dict(cfg), "checkpoint config")


def detect_architecture(state_dict: Mapping[str, Tensor],
                        cluster_state: Optional[Mapping[str, Tensor]] = None, where: str = "") -> Architecture:
    """Read the network sizes from tensor names and shapes (``detr.`` prefix allowed); ``where``
    (the file) prefixes the error when a tensor the sizes are read from is missing."""
    masks = any(k.startswith(SEGM_PREFIX) for k in state_dict)
    prefix = SEGM_PREFIX if masks else ""

    def get(name: str) -> Tensor:
        try:
            return state_dict[prefix + name]
        except KeyError:
            raise CheckpointError(f"{where + ': ' if where else ''}not a TOIST/MDETR state_dict: "
                                  f"missing {prefix + name}") from None

    def count(pattern: str) -> int:
        regex = re.compile(re.escape(prefix) + pattern)
        return len({m.group(1) for k in state_dict if (m := regex.match(k))})

    blocks = tuple(count(rf"backbone\.0\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = prefix + "backbone.0.body.layer1.0.conv3.weight" in state_dict
    contrastive = prefix + "contrastive_align_projection_image.weight" in state_dict
    num_clusters = None
    if cluster_state is not None and "cluster_centers" in cluster_state:
        num_clusters = int(cluster_state["cluster_centers"].shape[1])
    return Architecture(
        masks=masks,
        contrastive_align=contrastive,
        backbone=_RESNET_BLOCKS.get((blocks, bottleneck)),
        d_model=int(get("query_embed.weight").shape[1]),
        num_queries=int(get("query_embed.weight").shape[0]),
        enc_layers=count(r"transformer\.encoder\.layers\.(\d+)\."),
        dec_layers=count(r"transformer\.decoder\.layers\.(\d+)\."),
        dim_feedforward=int(get("transformer.encoder.layers.0.linear1.weight").shape[0])
        if prefix + "transformer.encoder.layers.0.linear1.weight" in state_dict
        else int(get("transformer.decoder.layers.0.linear1.weight").shape[0]),
        contrastive_dim=int(get("contrastive_align_projection_image.weight").shape[0]) if contrastive else None,
        text_vocab_size=int(get("transformer.text_encoder.embeddings.word_embeddings.weight").shape[0]),
        text_hidden_size=int(get("transformer.text_encoder.embeddings.word_embeddings.weight").shape[1]),
        text_num_layers=count(r"transformer\.text_encoder\.encoder\.layer\.(\d+)\."),
        text_intermediate_size=int(
            get("transformer.text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0]),
        text_max_positions=int(get("transformer.text_encoder.embeddings.position_embeddings.weight").shape[0]),
        num_clusters=num_clusters,
    )


def text_config_from_source(text_encoder: Optional[str]) -> Optional[TextEncoderConfig]:
    """Architecture of a local RoBERTa directory (``config.json``), read without network; None
    for a hub name (the checkpoint's shapes are used instead)."""
    if text_encoder is None:
        return None
    from ..model.hub import local_path  # the tokenizer reads the same path: ~ expanded alike

    source = local_path(text_encoder)
    if not (source / "config.json").is_file():
        return None
    from transformers import RobertaConfig

    from ..model.text import text_config_fields

    fields = text_config_fields(RobertaConfig.from_pretrained(str(source)))
    return TextEncoderConfig(tokenizer=str(text_encoder), **fields)


def config_for_checkpoint(ckpt: OfficialCheckpoint, config: Optional[ModelConfig] = None,
                          text_encoder: Optional[str] = None) -> ModelConfig:
    """The model config to build for ``ckpt``.

    With ``config``: check that every size readable from the file agrees with it (else a
    :class:`CheckpointError` listing the differences). Without: the ``paper`` config with the
    file's variant applied (detection / segmentation, contrastive heads, position-table
    rows, and any other size), taking the text encoder's head count and LayerNorm eps from
    ``text_encoder``'s ``config.json`` when it is a local directory. A toist training
    checkpoint stores its model config: that is used (and checked the same way).
    """
    if ckpt.cluster_state is not None:  # before its shapes are read (d_model: checked when the bank is built)
        check_bank_shapes(ckpt.cluster_state, f"{ckpt.path} [cluster_criterion]")
    arch = detect_architecture(ckpt.state_dict, ckpt.cluster_state, where=str(ckpt.path))
    if config is None and ckpt.train_config is not None:
        config = typed_config.from_dict(ModelConfig, ckpt.train_config["model"], f"{ckpt.path} [config.model]")
    if config is not None:
        problems = arch.mismatches(config)
        if problems:
            raise CheckpointError(f"{ckpt.path}: checkpoint and config differ: " + "; ".join(problems))
        cfg = copy.deepcopy(config)
    else:
        base = preset("paper")
        text_cfg = text_config_from_source(text_encoder)
        if text_cfg is not None:
            base.text = text_cfg
        args = ckpt.args
        if args is not None and isinstance(getattr(args, "nheads", None), int):
            base.transformer.nheads = args.nheads
        try:
            cfg = arch.apply_to(base)
        except typed_config.ConfigError as exc:
            raise CheckpointError(
                f"{ckpt.path}: cannot derive a model config from the checkpoint's shapes ({exc}); pass "
                f"the text encoder's directory (with config.json) or a full model config") from None
        if text_cfg is not None and text_cfg.max_position_embeddings == arch.text_max_positions:
            cfg.text.layer_norm_eps = text_cfg.layer_norm_eps
    if text_encoder is not None:
        cfg.text.tokenizer = str(text_encoder)
    cfg.text.weights = None  # the checkpoint provides every weight
    cfg.backbone.weights = None
    return cfg
