"""The model config of a checkpoint: sizes read from tensor shapes, or the config it stores."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, get_args

from torch import Tensor

from .. import typed_config
from ..config import BackboneName, ModelConfig, TextEncoderConfig, preset
from .errors import CheckpointError
from .official import SEGM_PREFIX, OfficialCheckpoint
from .strict import check_bank_shapes

# Options of the reference's ``main.py`` that toist's network does not implement, as
# (args field, the values toist runs, what the other value means). Some leave every tensor
# shape as it is (a strict load would succeed and compute something else); the others would
# fail it with a list of tensors that does not say why.
_UNSUPPORTED_ARGS = (
    ("pass_pos_and_query", (True,), "--no_pass_pos_and_query (decoder queries as input, positions in the first "
                                    "layer only)"),
    ("pre_norm", (False,), "--pre_norm (pre-norm transformer layers)"),
    ("position_embedding", ("sine", "v2"), "a learned position embedding"),
    ("contrastive_loss", (False,), "--contrastive_loss (image-text CLS heads)"),
)
# Fields of a ModelConfig that do not change what a trained network computes at inference
# (training switches, and where starting weights come from); every other field does.
INFERENCE_NEUTRAL = frozenset(("aux_loss", "backbone.train", "backbone.weights", "text.tokenizer", "text.weights",
                                "text.freeze", "text.resizer_dropout", "transformer.dropout"))
# The RoBERTa sizes a local text encoder's config.json must share with the checkpoint before
# its head count (which shapes cannot tell) is believed.
_TEXT_SIZES = (("hidden_size", "text_hidden_size"), ("num_layers", "text_num_layers"),
               ("intermediate_size", "text_intermediate_size"), ("vocab_size", "text_vocab_size"))

_RESNET_BLOCKS = {  # (blocks per layer, bottleneck) -> torchvision name
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_MOBILENET_BLOCKS = {19: "mobilenet_v2"}  # torchvision's ``features.0`` ... ``features.18`` -> name
_BACKBONE_PREFIX = "backbone.0.body."


@dataclass(frozen=True)
class Architecture:
    """The network sizes a state_dict implies (what can be read from tensor shapes), and the
    settings its file records besides (the reference's ``args.nheads`` / ``args.dilation``).

    ``nheads``: from the mask head's input width (segmentation files) or ``args.nheads``;
    ``dilation``: ``args.dilation``; None where the file does not say (``nheads_source`` names
    where it came from, for messages)."""

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
    nheads: Optional[int] = None
    nheads_source: str = ""
    dilation: Optional[bool] = None

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """``field: checkpoint X, config Y`` for every size or recorded setting that differs from ``cfg``."""
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
        problems = [f"{name}: checkpoint {found!r}, config {wanted!r}" for name, found, wanted in pairs
                    if found is not None and found != wanted]
        # Not shapes: a network built with other heads or without dilation loads every tensor
        # and computes something else.
        for name, found, wanted, source in (
                ("transformer.nheads", self.nheads, cfg.transformer.nheads, self.nheads_source),
                ("backbone.dilation", self.dilation, cfg.backbone.dilation, "args.dilation")):
            if found is not None and found != wanted:
                problems.append(f"{name}: checkpoint {found!r} ({source}), config {wanted!r}")
        return problems

    def apply_to(self, base: ModelConfig) -> ModelConfig:
        """A copy of ``base`` with every size read from the state_dict.

        The transformer's head count and the backbone's dilation are the recorded ones where
        the file has them; RoBERTa's head count cannot be read and stays as in ``base``. A 512-row RoBERTa
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
        if self.nheads is not None:
            t.nheads = self.nheads
        if self.dilation is not None:
            cfg.backbone.dilation = self.dilation
        x = cfg.text
        if self.text_max_positions != x.max_position_embeddings:
            x.layer_norm_eps = 1e-12 if self.text_max_positions == 512 else 1e-5
        x.vocab_size, x.hidden_size, x.num_layers = self.text_vocab_size, self.text_hidden_size, self.text_num_layers
        x.intermediate_size, x.max_position_embeddings = self.text_intermediate_size, self.text_max_positions
        if self.masks:
            cfg.aux_loss = False  # the released mask-head stage ran without aux loss
        return typed_config.from_dict(ModelConfig, typed_config.to_dict(cfg), "checkpoint config")


def detect_architecture(state_dict: Mapping[str, Tensor],
                        cluster_state: Optional[Mapping[str, Tensor]] = None, where: str = "",
                        args: Any = None) -> Architecture:
    """Read the network sizes from tensor names and shapes (``detr.`` prefix allowed), and the
    settings the reference's ``args`` record (``nheads``, ``dilation``); ``where`` (the file)
    prefixes the error when a tensor the sizes are read from is missing, or when the backbone is
    none toist builds (refused here, before any model is built: :func:`_backbone_name`)."""
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

    contrastive = prefix + "contrastive_align_projection_image.weight" in state_dict
    num_clusters = None
    if cluster_state is not None and "cluster_centers" in cluster_state:
        num_clusters = int(cluster_state["cluster_centers"].shape[1])
    d_model = int(get("query_embed.weight").shape[1])
    backbone = _backbone_name(state_dict, prefix, count, args, where)
    nheads, nheads_source = _recorded_nheads(state_dict, d_model, args, where)
    return Architecture(
        masks=masks,
        contrastive_align=contrastive,
        backbone=backbone,
        d_model=d_model,
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
        nheads=nheads,
        nheads_source=nheads_source,
        dilation=_arg(args, "dilation", bool, where),
    )


def _backbone_name(state_dict: Mapping[str, Tensor], prefix: str, count, args: Any, where: str) -> str:
    """The torchvision backbone (:data:`~toist_core.config.BackboneName`) whose tensor names and
    block counts ``backbone.0.body.*`` holds: a ResNet by its blocks per layer and block type, a
    MobileNetV2 by its ``features`` blocks. Any other (MDETR's EfficientNet files,
    ``args.backbone`` ``timm_tf_efficientnet_b3_ns``) is refused here, naming what the file
    holds: a paper-size ResNet-101 was built first, and its strict load then listed ~500 missing
    tensors. ``count(pattern)``: the distinct indices a key pattern matches (after ``prefix``)."""
    blocks = tuple(count(rf"backbone\.0\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = prefix + _BACKBONE_PREFIX + "layer1.0.conv3.weight" in state_dict
    name = _RESNET_BLOCKS.get((blocks, bottleneck)) or _MOBILENET_BLOCKS.get(
        count(r"backbone\.0\.body\.features\.(\d+)\."))
    if name is not None:
        return name
    body = [key[len(prefix):] for key in state_dict if key.startswith(prefix + _BACKBONE_PREFIX)]
    if not body:
        held = f"no backbone tensors ({prefix}{_BACKBONE_PREFIX}*)"
    elif any(blocks):
        held = (f"a ResNet of {', '.join(map(str, blocks))} {'bottleneck' if bottleneck else 'basic'} blocks "
                "in layer1..4, which no torchvision ResNet has")
    else:
        held = f"backbone tensors of another network ({', '.join(body[:3])}{', ...' if len(body) > 3 else ''})"
    recorded = getattr(args, "backbone", None) if args is not None else None
    trained = f"trained with args.backbone={recorded!r}; " if recorded is not None else ""
    raise CheckpointError(f"{where + ': ' if where else ''}{trained}its state_dict holds {held}: toist builds only "
                          f"the torchvision backbones {', '.join(get_args(BackboneName))}, so these weights cannot "
                          "be loaded")


def _arg(args: Any, name: str, kind: type, where: str) -> Any:
    """``args.<name>`` when the file records it (None when not), refused when it is not a ``kind``."""
    value = getattr(args, name, None) if args is not None else None
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where + ': ' if where else ''}args.{name} is {value!r}, expected "
                              f"{'an integer' if kind is int else 'true or false'}")
    return value


def _recorded_nheads(state_dict: Mapping[str, Tensor], d_model: int, args: Any,
                     where: str) -> tuple[Optional[int], str]:
    """(transformer head count, where it was read): a segmentation model's mask head takes
    ``d_model + nheads`` channels (the attention maps are stacked onto the features), so its
    shape tells; else ``args.nheads``; (None, "") when neither says. Both, disagreeing: refused."""
    from_args = _arg(args, "nheads", int, where)
    lay1 = state_dict.get("mask_head.lay1.weight")
    if lay1 is None or lay1.ndim != 4:
        return from_args, "args.nheads" if from_args is not None else ""
    from_shape = int(lay1.shape[1]) - d_model
    if from_args is not None and from_args != from_shape:
        raise CheckpointError(f"{where + ': ' if where else ''}args.nheads is {from_args} but mask_head.lay1.weight "
                              f"{list(lay1.shape)} was built for {from_shape} heads (d_model {d_model} + nheads "
                              "channels): the file is inconsistent")
    return from_shape, "mask_head.lay1.weight"


def refuse_unsupported_args(args: Any, where: str) -> None:
    """:class:`CheckpointError` for a file trained with a reference option toist does not run
    (:data:`_UNSUPPORTED_ARGS`): its weights would load into a network computing something else."""
    if args is None:
        return
    for name, supported, meaning in _UNSUPPORTED_ARGS:
        value = getattr(args, name, None)
        if value is not None and value not in supported:
            raise CheckpointError(f"{where}: trained with args.{name}={value!r}, i.e. {meaning}; toist's network "
                                  f"runs only {name}={supported[0]!r} (the reference's default), so these "
                                  "weights cannot be used")


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

    With ``config``: check that every size readable from the file, every setting its ``args``
    record (``nheads``, ``dilation``) and, for a toist training checkpoint, every field of its
    stored model config that changes what the network computes agree with it (else a
    :class:`CheckpointError` listing the differences). Without: the ``paper`` config with the
    file's variant applied (detection / segmentation, contrastive heads, position-table
    rows, any other size, and the recorded head count and dilation), taking the text
    encoder's head count and LayerNorm eps from ``text_encoder``'s ``config.json`` when it is
    a local directory describing the checkpoint's RoBERTa. A toist training checkpoint stores
    its model config: that is used (and checked the same way).
    """
    where = str(ckpt.path)
    refuse_unsupported_args(ckpt.args, where)
    if ckpt.cluster_state is not None:  # before its shapes are read (d_model: checked when the bank is built)
        check_bank_shapes(ckpt.cluster_state, f"{ckpt.path} [cluster_criterion]")
    arch = detect_architecture(ckpt.state_dict, ckpt.cluster_state, where=where, args=ckpt.args)
    recorded = None
    if ckpt.train_config is not None:
        recorded = typed_config.from_dict(ModelConfig, ckpt.train_config["model"], f"{ckpt.path} [config.model]")
    if config is not None:
        problems = arch.mismatches(config)
        if recorded is not None:
            problems += recorded_mismatches(recorded, config, already=problems)
        if problems:
            raise CheckpointError(f"{ckpt.path}: checkpoint and config differ: " + "; ".join(problems))
        cfg = copy.deepcopy(config)
    elif recorded is not None:
        problems = arch.mismatches(recorded)
        if problems:
            raise CheckpointError(f"{ckpt.path}: checkpoint and its stored config.model differ: " + "; ".join(problems))
        cfg = recorded
    else:
        cfg = _config_from_shapes(ckpt, arch, text_encoder)
    if text_encoder is not None:
        cfg.text.tokenizer = str(text_encoder)
    cfg.text.weights = None  # the checkpoint provides every weight
    cfg.backbone.weights = None
    return cfg


def recorded_mismatches(recorded: ModelConfig, config: ModelConfig, already: Sequence[str] = ()) -> list[str]:
    """``field: checkpoint X (its stored config.model), config Y`` for every field of a training
    checkpoint's model config that changes what the network computes (not :data:`INFERENCE_NEUTRAL`)
    and differs from ``config``; fields ``already`` reported are left out."""
    named = {problem.split(":", 1)[0] for problem in already}
    found = typed_config.flatten(typed_config.to_dict(recorded))
    wanted = typed_config.flatten(typed_config.to_dict(config))
    return [f"{name}: checkpoint {found[name]!r} (its stored config.model), config {wanted.get(name)!r}"
            for name in found
            if name not in INFERENCE_NEUTRAL and name not in named and found[name] != wanted.get(name)]


def _config_from_shapes(ckpt: OfficialCheckpoint, arch: Architecture, text_encoder: Optional[str]) -> ModelConfig:
    """The ``paper`` config adapted to an official file (no config given, none stored)."""
    base = preset("paper")
    text_cfg = text_config_from_source(text_encoder)
    if text_cfg is not None:
        _check_text_encoder_folder(ckpt, arch, text_cfg, text_encoder)
        base.text = text_cfg
    try:
        cfg = arch.apply_to(base)
    except typed_config.ConfigError as exc:
        raise CheckpointError(
            f"{ckpt.path}: cannot derive a model config from the checkpoint's shapes ({exc}); pass "
            f"the text encoder's directory (with config.json) or a full model config") from None
    if text_cfg is not None and text_cfg.max_position_embeddings == arch.text_max_positions:
        cfg.text.layer_norm_eps = text_cfg.layer_norm_eps
    return cfg


def _check_text_encoder_folder(ckpt: OfficialCheckpoint, arch: Architecture, text_cfg: TextEncoderConfig,
                               text_encoder: Optional[str]) -> None:
    """A local text encoder's head count is used only if its config.json describes the
    checkpoint's RoBERTa: a folder of another one (a wrong download) would give a head count
    that divides the width and loads every tensor, and computes something else."""
    differ = [f"{field}: checkpoint {getattr(arch, mine)}, config.json {getattr(text_cfg, field)}"
              for field, mine in _TEXT_SIZES if getattr(arch, mine) != getattr(text_cfg, field)]
    if differ:
        from ..model.hub import local_path

        raise CheckpointError(f"{ckpt.path}: the text encoder folder {local_path(text_encoder)} describes another "
                              f"RoBERTa than the checkpoint's ({'; '.join(differ)}) in its config.json, so its "
                              "head count cannot be taken for the checkpoint's; give the folder of the RoBERTa it "
                              "was trained with, or a full model config")
