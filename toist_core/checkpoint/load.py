"""Loading any checkpoint toist knows, and exporting it as a model directory.

``load_pretrained`` takes a model directory, an official TOIST / MDETR ``.pth`` or a toist
training checkpoint; ``export_model_dir`` turns either kind of file into a model directory
(``toist export`` and ``python -m training.export`` are this one function).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import InputSize, ModelConfig
from .architecture import config_for_checkpoint
from .errors import CheckpointError, PathLike
from .loaded import LoadedModel
from .model_dir import CONFIG_FILE, is_model_dir, load_model_dir, save_model_dir
from .official import OfficialCheckpoint, read_official
from .strict import build_memory_bank, load_official_weights

# The released TOIST models are trained on all 14 COCO-Tasks with the pronoun "something".
OFFICIAL_TASKS = tuple(range(1, 15))
OFFICIAL_PRONOUN = "something"


def load_official(path: PathLike, config: Optional[ModelConfig] = None,
                  text_encoder: Optional[str] = None, tokenizer=None, weights: str = "ema") -> LoadedModel:
    """Build the model a ``.pth`` file describes and strictly load its weights (and bank).

    Official files: ``text_encoder`` (hub name or local directory) supplies the tokenizer;
    default ``config.text.tokenizer`` or ``roberta-base``. ``tokenizer`` (an object) overrides
    both. toist training checkpoints bring their own config, pronoun, input size and tasks.
    ``weights``: ``"ema"`` (``model_ema`` when the file has it) or ``"model"``.
    """
    from ..model import build_model, load_tokenizer

    ckpt = read_official(path, weights=weights)
    cfg = config_for_checkpoint(ckpt, config, text_encoder)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.text.tokenizer)
    model = build_model(cfg, tokenizer=tokenizer)
    load_official_weights(model, ckpt)
    bank = None
    if ckpt.cluster_state is not None:
        bank = build_memory_bank(ckpt.cluster_state, where=f"{path} [cluster_criterion]")
    pronoun, input_size, tasks = _training_facts(ckpt)
    return LoadedModel(model.eval(), cfg, bank, pronoun, str(path), input_size, tasks)


def _training_facts(ckpt: OfficialCheckpoint) -> tuple[str, InputSize, tuple[int, ...]]:
    """(pronoun, input size, tasks) the file was trained with."""
    if ckpt.train_config is None:
        return OFFICIAL_PRONOUN, InputSize(), OFFICIAL_TASKS
    from .. import typed_config
    from ..data.config import DataConfig

    data = typed_config.from_dict(DataConfig, ckpt.train_config.get("data", {}), f"{ckpt.path} [config.data]")
    return data.pronoun, data.input_size(), tuple(data.tasks)


def load_pretrained(path: PathLike, config: Optional[ModelConfig] = None,
                    text_encoder: Optional[str] = None, tokenizer=None) -> LoadedModel:
    """A model directory or a ``.pth`` file (official or toist training), whichever ``path`` is."""
    if is_model_dir(path):
        if config is not None:
            raise CheckpointError(f"{path}: a model directory carries its own config; do not pass one")
        return load_model_dir(path, tokenizer=text_encoder)
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: directory without {CONFIG_FILE}; not a toist model directory")
    return load_official(path, config=config, text_encoder=text_encoder, tokenizer=tokenizer)


def export_model_dir(path: PathLike, directory: PathLike, text_encoder: Optional[str] = None,
                     config: Optional[ModelConfig] = None, pronoun: Optional[str] = None,
                     weights: str = "ema") -> LoadedModel:
    """Convert an official file or a toist training checkpoint into a model directory.

    The file is read, checked and strictly loaded before anything is written; the directory
    is then replaced as a whole. Official files: ``text_encoder`` supplies the tokenizer
    copied into the directory (default roberta-base); training checkpoints name their own.
    """
    loaded = load_official(path, config=config, text_encoder=text_encoder, weights=weights)
    if pronoun:
        loaded.pronoun = pronoun
    save_model_dir(loaded.model, directory, loaded.config, memory_bank=loaded.memory_bank,
                   pronoun=loaded.pronoun, source=Path(path).name, input_size=loaded.input_size,
                   tasks=loaded.tasks)
    return loaded
