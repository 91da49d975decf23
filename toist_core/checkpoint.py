"""Checkpoint I/O: the official TOIST / MDETR ``.pth`` files and toist's own model directory.

Official files (``main.py`` of the reference) are pickled dicts::

    {"model", "model_ema", "model_noun", "model_noun_ema", "optimizer", "epoch",
     "args": argparse.Namespace, "cluster_criterion": memory bank state or None}

They are read with ``torch.load(weights_only=True)`` and exactly one extra allowed class,
``argparse.Namespace``; a file holding any other pickled object is refused. The weights
used are ``model_ema`` when present (the reported numbers are the EMA's), else ``model``.
Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
Accepted quirks of the released files: the ``detr.`` prefix of segmentation checkpoints, the
``transformer.text_encoder.embeddings.position_ids`` buffer of transformers < 4.31, the
512-row position table of the "without pretraining" models, and ``cluster_criterion`` (the
memory bank and centres of distilled models).

Model directory (``toist export``; loads without network)::

    <dir>/config.yaml               format, version, model config, pronoun, bank flag, source,
                                    input size it was trained at
    <dir>/model.safetensors         the model's state_dict (toist names)
    <dir>/memory_bank.safetensors   distilled models: feature_bank, cluster_centers, ...
    <dir>/tokenizer/                the tokenizer files
"""

from __future__ import annotations

import argparse
import copy
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import typed_config
from .config import InputSize, ModelConfig, TextEncoderConfig, preset

PathLike = Union[str, Path]

POSITION_IDS_KEY = "transformer.text_encoder.embeddings.position_ids"
SEGM_PREFIX = "detr."
BANK_KEYS = ("feature_bank", "cluster_centers", "update_count", "full_label")
# Non-tensor classes an official checkpoint may contain (its `args`).
SAFE_GLOBALS = [argparse.Namespace]

MODEL_DIR_FORMAT = "toist-model"
MODEL_DIR_VERSION = 2  # 2: input_size (version 1 directories load with the reference size)
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
BANK_FILE = "memory_bank.safetensors"
TOKENIZER_DIR = "tokenizer"

_RESNET_BLOCKS = {  # (blocks per layer, bottleneck) -> torchvision name
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model it is loaded into."""


# ------------------------------------------------------------------------------------------
# Reading files safely
# ------------------------------------------------------------------------------------------
def safe_torch_load(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing only ``argparse.Namespace`` besides
    tensors and plain containers. Any other pickled object makes it refuse the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file contains a pickled object{what} other than tensors and "
            f"argparse.Namespace; only those are loaded (torch.load weights_only=True)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {exc}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


@dataclass
class OfficialCheckpoint:
    """What an official (TOIST / MDETR) file holds, ready for strict loading.

    state_dict:    the chosen weights (``model_ema`` if present, else ``model``), without the
                   ``position_ids`` buffer, names as in the file (``detr.`` kept).
    source_key:    which entry the weights came from (``model_ema``, ``model`` or ``<file>``
                   for a bare state_dict).
    args:          the training ``argparse.Namespace`` (or None).
    cluster_state: ``cluster_criterion`` buffers of a distilled model (or None).
    had_position_ids: the file carried the ``position_ids`` buffer.
    """

    path: str
    state_dict: dict[str, Tensor]
    source_key: str
    args: Optional[argparse.Namespace] = None
    cluster_state: Optional[dict[str, Tensor]] = None
    had_position_ids: bool = False

    @property
    def is_segmentation(self) -> bool:
        return any(k.startswith(SEGM_PREFIX) for k in self.state_dict)

    def detector_state_dict(self) -> dict[str, Tensor]:
        """Weights of the detector alone: ``detr.`` stripped, mask-head tensors dropped (what the
        reference's ``--resume`` does to load a segmentation file into a detector)."""
        if not self.is_segmentation:
            return dict(self.state_dict)
        return {k[len(SEGM_PREFIX):]: v for k, v in self.state_dict.items() if k.startswith(SEGM_PREFIX)}


def read_official(path: PathLike) -> OfficialCheckpoint:
    """Read an official TOIST / MDETR checkpoint (or a bare state_dict file) safely."""
    path = Path(path)
    blob = safe_torch_load(path)
    args = None
    cluster_state = None
    if _is_state_dict(blob):
        state, source = dict(blob), "<file>"
    elif isinstance(blob, Mapping):
        if blob.get("model_ema") is not None:
            state, source = blob["model_ema"], "model_ema"
        elif blob.get("model") is not None:
            state, source = blob["model"], "model"
        else:
            raise CheckpointError(f"{path}: no 'model_ema' or 'model' weights in the checkpoint "
                                  f"(keys: {sorted(map(str, blob))})")
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: '{source}' is not a state_dict of tensors")
        state = dict(state)
        args = blob.get("args")
        if args is not None and not isinstance(args, argparse.Namespace):
            raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected argparse.Namespace")
        cluster_state = blob.get("cluster_criterion")
        if cluster_state is not None:
            if not _is_state_dict(cluster_state):
                raise CheckpointError(f"{path}: 'cluster_criterion' is not a dict of tensors")
            missing = [k for k in BANK_KEYS if k not in cluster_state]
            if missing:
                raise CheckpointError(f"{path}: 'cluster_criterion' lacks {missing} (has {sorted(cluster_state)})")
            cluster_state = dict(cluster_state)
    else:
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(blob).__name__}")
    state, had_position_ids = _drop_position_ids(state, path)
    return OfficialCheckpoint(str(path), state, source, args, cluster_state, had_position_ids)


def _drop_position_ids(state: dict[str, Tensor], where: PathLike) -> tuple[dict[str, Tensor], bool]:
    """Remove the ``position_ids`` buffer (newer transformers do not keep it in the state_dict)
    after checking it is the ``[1, P]`` integer row of the ``P``-row position table."""
    found = False
    for prefix in ("", SEGM_PREFIX):
        key = prefix + POSITION_IDS_KEY
        if key not in state:
            continue
        found = True
        ids = state.pop(key)
        table = state.get(prefix + "transformer.text_encoder.embeddings.position_embeddings.weight")
        rows = table.shape[0] if table is not None else None
        if ids.dtype.is_floating_point or ids.ndim != 2 or ids.shape[0] != 1 or (rows is not None and ids.shape[1] != rows):
            raise CheckpointError(f"{where}: {key} has shape {tuple(ids.shape)} / {ids.dtype}; expected "
                                  f"[1, {rows}] integers (one id per position-table row)")
    return state, found


# ------------------------------------------------------------------------------------------
# Architecture of a state_dict
# ------------------------------------------------------------------------------------------
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
                        cluster_state: Optional[Mapping[str, Tensor]] = None) -> Architecture:
    """Read the network sizes from tensor names and shapes (``detr.`` prefix allowed)."""
    masks = any(k.startswith(SEGM_PREFIX) for k in state_dict)
    prefix = SEGM_PREFIX if masks else ""

    def get(name: str) -> Tensor:
        try:
            return state_dict[prefix + name]
        except KeyError:
            raise CheckpointError(f"not a TOIST/MDETR state_dict: missing {prefix + name}") from None

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


# ------------------------------------------------------------------------------------------
# Strict loading
# ------------------------------------------------------------------------------------------
def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_problems(module: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences between ``state_dict`` and ``module``'s tensors (empty = loadable)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = []
    for key, want in expected.items():
        have = state_dict.get(key)
        if have is None:
            continue
        if tuple(have.shape) != tuple(want.shape):
            misshaped.append(f"{key} (file {list(have.shape)}, model {list(want.shape)})")
        elif have.dtype.is_floating_point != want.dtype.is_floating_point:
            misshaped.append(f"{key} (file dtype {have.dtype}, model dtype {want.dtype})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_listing(misshaped)}")
    return problems


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Load every tensor or nothing: any missing / unexpected / mis-shaped tensor raises
    :class:`CheckpointError` naming them."""
    problems = state_dict_problems(module, state_dict)
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def load_official_weights(model: nn.Module, checkpoint: Union[PathLike, OfficialCheckpoint],
                          detector_only: bool = False, ignore_prefixes: Sequence[str] = ()) -> OfficialCheckpoint:
    """Strictly load an official file's weights into ``model`` (built with a matching config).

    ``detector_only``: ``model`` is a detector and the file a segmentation checkpoint: load the
    ``detr.`` weights and deliberately skip the mask head (the reference's ``--resume`` rule).
    ``ignore_prefixes``: tensors of the file to leave out on purpose, e.g. heads of an MDETR
    pre-training file that TOIST does not have (``("isfinal_embed.",)``); everything else must
    still match exactly.
    """
    ckpt = checkpoint if isinstance(checkpoint, OfficialCheckpoint) else read_official(checkpoint)
    state = ckpt.detector_state_dict() if detector_only else ckpt.state_dict
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    load_state_dict_strict(model, state, where=f"{ckpt.path} [{ckpt.source_key}]")
    return ckpt


def build_memory_bank(cluster_state: Mapping[str, Tensor], where: str = "cluster_criterion"):
    """A :class:`toist_core.distill.memory_bank.MemoryBank` holding an official bank state."""
    from .distill.memory_bank import MemoryBank

    missing = [k for k in BANK_KEYS if k not in cluster_state]
    if missing:
        raise CheckpointError(f"{where}: memory bank state lacks {missing}")
    num_tasks, size, dim = cluster_state["feature_bank"].shape
    num_clusters = cluster_state["cluster_centers"].shape[1]
    bank = MemoryBank(num_tasks=num_tasks, size=size, dim=dim, num_clusters=num_clusters)
    load_state_dict_strict(bank, {k: v.float() for k, v in cluster_state.items()}, where=where)
    return bank


# ------------------------------------------------------------------------------------------
# Choosing the config of an official file
# ------------------------------------------------------------------------------------------
def text_config_from_source(text_encoder: Optional[str]) -> Optional[TextEncoderConfig]:
    """Architecture of a local RoBERTa directory (``config.json``), read without network; None
    for a hub name (the checkpoint's shapes are used instead)."""
    if text_encoder is None:
        return None
    source = Path(text_encoder)
    if not (source / "config.json").is_file():
        return None
    from transformers import RobertaConfig

    from .model.text import text_config_fields

    fields = text_config_fields(RobertaConfig.from_pretrained(str(source)))
    return TextEncoderConfig(tokenizer=str(text_encoder), **fields)


def config_for_checkpoint(ckpt: OfficialCheckpoint, config: Optional[ModelConfig] = None,
                          text_encoder: Optional[str] = None) -> ModelConfig:
    """The model config to build for ``ckpt``.

    With ``config``: check that every size readable from the file agrees with it (else a
    :class:`CheckpointError` listing the differences). Without: the ``paper`` config with the
    file's variant applied (detection / segmentation, contrastive heads, position-table
    rows, and any other size), taking the text encoder's head count and LayerNorm eps from
    ``text_encoder``'s ``config.json`` when it is a local directory.
    """
    arch = detect_architecture(ckpt.state_dict, ckpt.cluster_state)
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


# ------------------------------------------------------------------------------------------
# Model directory
# ------------------------------------------------------------------------------------------
@dataclass
class ModelDirConfig:
    """``config.yaml`` of a model directory."""

    format: str = MODEL_DIR_FORMAT
    version: int = MODEL_DIR_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    # Caption word whose rows cluster-centre replacement overwrites (distilled models).
    pronoun: str = "something"
    memory_bank: bool = False
    source: str = ""
    # The size it was trained and evaluated at, what inference uses unless told otherwise
    # (directories written before this field: the reference's 800 / 1333).
    input_size: InputSize = field(default_factory=InputSize)


@dataclass
class LoadedModel:
    """A model ready for inference and what came with it."""

    model: nn.Module
    config: ModelConfig
    memory_bank: Optional[nn.Module] = None
    pronoun: str = "something"
    source: str = ""
    input_size: InputSize = field(default_factory=InputSize)


def save_model_dir(model: nn.Module, directory: PathLike, config: ModelConfig,
                   memory_bank: Optional[nn.Module] = None, pronoun: str = "something",
                   source: str = "", input_size: Optional[InputSize] = None) -> Path:
    """Write ``config.yaml``, ``model.safetensors``, the tokenizer and the memory bank."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "toist": MODEL_DIR_FORMAT})
    model.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    if memory_bank is not None:
        bank_state = {k: v.detach().cpu().contiguous() for k, v in memory_bank.state_dict().items()}
        save_file(bank_state, str(directory / BANK_FILE), metadata={"format": "pt"})
    cfg = copy.deepcopy(config)
    cfg.text.tokenizer = TOKENIZER_DIR  # relative to the directory
    cfg.text.weights = None
    cfg.backbone.weights = None
    manifest = ModelDirConfig(model=cfg, pronoun=pronoun, memory_bank=memory_bank is not None, source=source,
                              input_size=input_size or InputSize())
    typed_config.save_yaml(manifest, directory / CONFIG_FILE)
    return directory


def is_model_dir(path: PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_model_dir(directory: PathLike, tokenizer: Optional[str] = None) -> LoadedModel:
    """Build and strictly load a model directory (no network: the tokenizer is inside it)."""
    from safetensors.torch import load_file

    from .model import build_model, load_tokenizer

    directory = Path(directory)
    manifest = typed_config.load_yaml(ModelDirConfig, directory / CONFIG_FILE)
    if manifest.format != MODEL_DIR_FORMAT or manifest.version > MODEL_DIR_VERSION:
        raise CheckpointError(f"{directory / CONFIG_FILE}: format {manifest.format!r} version "
                              f"{manifest.version} is not a {MODEL_DIR_FORMAT!r} directory of version "
                              f"{MODEL_DIR_VERSION} or older")
    cfg = manifest.model
    if tokenizer is not None:
        cfg.text.tokenizer = str(tokenizer)
    elif not Path(cfg.text.tokenizer).is_absolute() and (directory / cfg.text.tokenizer).is_dir():
        cfg.text.tokenizer = str(directory / cfg.text.tokenizer)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} not found")
    model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer))
    load_state_dict_strict(model, load_file(str(weights)), where=str(weights))
    bank = None
    if manifest.memory_bank:
        bank_file = directory / BANK_FILE
        if not bank_file.is_file():
            raise CheckpointError(f"{directory}: config.yaml says memory_bank: true but {BANK_FILE} is missing")
        bank = build_memory_bank(load_file(str(bank_file)), where=str(bank_file))
    return LoadedModel(model.eval(), cfg, bank, manifest.pronoun, str(directory), manifest.input_size)


def load_official(path: PathLike, config: Optional[ModelConfig] = None,
                  text_encoder: Optional[str] = None, tokenizer=None) -> LoadedModel:
    """Build the model an official file describes and strictly load its weights (and bank).

    ``text_encoder`` (hub name or local directory) supplies the tokenizer; default
    ``config.text.tokenizer`` or ``roberta-base``. ``tokenizer`` (an object) overrides both.
    """
    from .model import build_model, load_tokenizer

    ckpt = read_official(path)
    cfg = config_for_checkpoint(ckpt, config, text_encoder)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.text.tokenizer)
    model = build_model(cfg, tokenizer=tokenizer)
    load_official_weights(model, ckpt)
    bank = None
    if ckpt.cluster_state is not None:
        bank = build_memory_bank(ckpt.cluster_state, where=f"{path} [cluster_criterion]")
    return LoadedModel(model.eval(), cfg, bank, "something", str(path))


def load_pretrained(path: PathLike, config: Optional[ModelConfig] = None,
                    text_encoder: Optional[str] = None, tokenizer=None) -> LoadedModel:
    """A model directory or an official ``.pth`` file, whichever ``path`` is."""
    if is_model_dir(path):
        if config is not None:
            raise CheckpointError(f"{path}: a model directory carries its own config; do not pass one")
        return load_model_dir(path, tokenizer=text_encoder)
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: directory without {CONFIG_FILE}; not a toist model directory")
    return load_official(path, config=config, text_encoder=text_encoder, tokenizer=tokenizer)


def export_official(path: PathLike, directory: PathLike, text_encoder: Optional[str] = None,
                    config: Optional[ModelConfig] = None, pronoun: Optional[str] = None) -> LoadedModel:
    """Convert an official file into a model directory (verified by a strict load first).

    ``text_encoder`` supplies the tokenizer copied into the directory (default roberta-base).
    """
    loaded = load_official(path, config=config, text_encoder=text_encoder or (None if config else "roberta-base"))
    if pronoun:
        loaded.pronoun = pronoun
    save_model_dir(loaded.model, directory, loaded.config, memory_bank=loaded.memory_bank,
                   pronoun=loaded.pronoun, source=Path(path).name, input_size=loaded.input_size)
    return loaded


__all__ = [
    "Architecture", "CheckpointError", "LoadedModel", "ModelDirConfig", "OfficialCheckpoint",
    "build_memory_bank", "config_for_checkpoint", "detect_architecture", "export_official",
    "is_model_dir", "load_model_dir", "load_official", "load_official_weights", "load_pretrained",
    "load_state_dict_strict", "read_official", "safe_torch_load", "save_model_dir", "state_dict_problems",
]
