"""Loading any checkpoint toist knows, and exporting it as a model directory.

``load_pretrained`` takes a model directory, an official TOIST / MDETR ``.pth`` or a toist
training checkpoint; ``export_model_dir`` turns either kind of file into a model directory
(``toist export`` and ``python -m training.export`` are this one function).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from ..config import InputSize, ModelConfig
from ..tasks import COCO_TASKS, TaskVocabulary
from .architecture import config_for_checkpoint, text_config_from_source
from .errors import CheckpointError, PathLike
from .files import refuse_run_folder
from .loaded import LoadedModel, describe_bank, describe_heads
from .model_dir import check_replaceable, is_model_dir, load_model_dir, save_model_dir
from .official import OfficialCheckpoint, evaluated_weights, read_official
from .strict import BankSettings, build_memory_bank, load_official_weights

# The released TOIST models are trained on all 14 COCO-Tasks with the pronoun "something".
OFFICIAL_TASKS = tuple(range(1, 15))
OFFICIAL_PRONOUN = "something"
# The training stages whose models read noun captions (the teacher; grounding pre-training).
NOUN_CAPTION_STAGES = ("noun", "grounding")
# Options of TOIST's main.py that every TOIST run's args hold (argparse writes their defaults);
# MDETR's main.py, which TOIST forked, has none of them.
TOIST_ARGS = ("cluster", "distillation", "verb_noun_input", "without_pretrain")

logger = logging.getLogger(__name__)
_SUMMARY_LOGGER = "toist_core.checkpoint"  # load.py and model_dir.py log one summary line per load


def show_load_summary(stream=None) -> None:
    """Print the INFO line saying what a loaded checkpoint held (``toist predict`` / ``export``).

    Only when the application has not configured logging itself (the root logger has no
    handler): then INFO lines would otherwise be dropped. Calling it again adds nothing.
    """
    target = logging.getLogger(_SUMMARY_LOGGER)
    if logging.getLogger().handlers or any(getattr(h, "_toist_summary", False) for h in target.handlers):
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("toist: %(message)s"))
    handler._toist_summary = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(logging.INFO)


def load_official(path: PathLike, config: Optional[ModelConfig] = None,
                  text_encoder: Optional[str] = None, tokenizer=None, weights: Optional[str] = None) -> LoadedModel:
    """Build the model a ``.pth`` file describes and strictly load its weights (and bank).

    Official files: ``text_encoder`` (hub name or local directory) supplies the tokenizer;
    default ``config.text.tokenizer`` or ``roberta-base``. ``tokenizer`` (an object) overrides
    both. toist training checkpoints bring their own config, pronoun, input size and tasks.
    ``weights``: ``"ema"`` (``model_ema`` when the file has it), ``"model"``, or None: the ones
    the file's run evaluated (``"model"`` after ``eval.use_ema: false``, else ``"ema"``).
    """
    from ..model import build_model
    from ..model.hub import TextEncoderUnavailable
    from ..model.text import fetch_tokenizer

    ckpt = read_official(path, weights=weights)
    cfg = config_for_checkpoint(ckpt, config, text_encoder)
    tokenizer_origin = "a tokenizer object given by the caller"
    if tokenizer is None:
        try:
            fetched = fetch_tokenizer(cfg.text.tokenizer)
        except TextEncoderUnavailable as exc:  # the export recipe should name this very file
            raise exc.for_checkpoint(str(path)) from None
        tokenizer, tokenizer_origin = fetched.value, fetched.origin
        _check_recorded_tokenizer(ckpt, cfg.text.tokenizer, tokenizer)
    # (Its config comes from the file's tensor shapes, or a training checkpoint's stored config
    # checked against them: no file can ask for more network than it holds.)
    model = build_model(cfg, tokenizer=tokenizer)
    load_official_weights(model, ckpt)
    bank = None
    if ckpt.cluster_state is not None:
        where = f"{path} [cluster_criterion]"
        bank = build_memory_bank(ckpt.cluster_state, where=where, d_model=cfg.transformer.d_model,
                                 settings=bank_settings(ckpt), stale=ckpt.cluster_stale)
    pronoun, input_size, tasks, vocabulary = _training_facts(ckpt)
    logger.info("%s", describe_checkpoint(ckpt, cfg, bank, weights, _text_config_origin(ckpt, config, text_encoder),
                                          f"tokenizer {cfg.text.tokenizer!r} from {tokenizer_origin}"))
    if bank is not None and bank.num_tasks != vocabulary.num_tasks:
        raise CheckpointError(f"{path}: its memory bank has {bank.num_tasks} task slots but it was trained with "
                              f"{vocabulary.describe()} ({vocabulary.num_tasks} tasks)")
    if not trained_with_ccr(ckpt):
        # Its bank served the cluster loss only; inference (and an exported directory) must not
        # replace the pronoun's rows the training never replaced.
        bank = None
    return LoadedModel(model.eval(), cfg, bank, pronoun, str(path), input_size, tasks, vocabulary,
                       training_captions(ckpt))


def _check_recorded_tokenizer(ckpt: OfficialCheckpoint, used: str, tokenizer) -> None:
    """A tokenizer other than the one a toist training checkpoint's run recorded
    (``config.model.text.tokenizer``; given as ``text_encoder`` or in ``config``) must split text
    the same way: another vocabulary turned every caption into other token ids, and an export
    carried it on, without a word (a model directory refuses the same). Compared where the
    recorded one is packaged with toist (``builtin:*``); a checkpoint never opens the files it
    names, nor the network, so another recorded name (``roberta-base``, a folder of the training
    machine) is only logged beside the one used."""
    from ..model.text import fetch_tokenizer

    recorded = (((ckpt.train_config or {}).get("model") or {}).get("text") or {}).get("tokenizer")
    if not recorded or str(recorded) == str(used):
        return
    if str(recorded).startswith("builtin:"):
        try:
            own = fetch_tokenizer(str(recorded)).value
        except (OSError, ValueError) as exc:   # a builtin of another toist version: not here to compare
            logger.info("%s was trained with tokenizer %r, which is not packaged here (%s); %r is used", ckpt.path,
                        recorded, exc, str(used))
            return
        if own.get_vocab() != tokenizer.get_vocab():
            raise CheckpointError(f"{ckpt.path}: tokenizer {str(used)!r} is not the one this checkpoint was trained "
                                  f"with ({recorded!r}, whose vocabulary differs): leave text_encoder "
                                  "(--text-encoder) and config's text.tokenizer out")
        return
    logger.info("%s was trained with tokenizer %r; %r is used instead: it must split text the same way (the same "
                "vocabulary), or every caption becomes other token ids", ckpt.path, recorded, str(used))


def is_mdetr_file(ckpt: OfficialCheckpoint) -> bool:
    """An official file whose args hold none of :data:`TOIST_ARGS`: MDETR's (e.g. the
    pre-training file TOIST's training starts from), trained on captions naming objects and on
    no COCO-Tasks task. A bare state_dict (no args) cannot tell: read as TOIST's."""
    args = ckpt.args
    return ckpt.train_config is None and args is not None and not any(hasattr(args, name) for name in TOIST_ARGS)


def training_captions(ckpt: OfficialCheckpoint) -> str:
    """``"noun"`` for a file whose model was trained on captions naming the objects: a toist
    training checkpoint of a stage in :data:`NOUN_CAPTION_STAGES`, an official file trained with
    ``--verb_noun_input`` (the reference's noun teacher; a distillation run's file holds the
    pronoun student) or an MDETR file (:func:`is_mdetr_file`); else ``"pronoun"``."""
    if ckpt.train_config is not None:
        return "noun" if ckpt.train_config.get("stage") in NOUN_CAPTION_STAGES else "pronoun"
    if is_mdetr_file(ckpt):
        return "noun"
    args = ckpt.args
    if getattr(args, "verb_noun_input", False) and not getattr(args, "distillation", False):
        return "noun"
    return "pronoun"


def bank_settings(ckpt: OfficialCheckpoint) -> BankSettings:
    """The k-means settings a file's memory bank was filled with: a toist training checkpoint's
    ``distill`` section (its seed, tolerance, iteration cap, rerun and update rules; the sizes it
    records must be the bank's); official files record none: the reference's (the defaults)."""
    if ckpt.train_config is None or ckpt.cluster_state is None:
        return BankSettings()
    from .. import typed_config
    from ..distill.config import DistillConfig

    where = f"{ckpt.path} [config.distill]"
    try:  # what the run used: a section without some keys ran with DistillConfig's defaults
        distill = typed_config.from_dict(DistillConfig, dict(ckpt.train_config.get("distill") or {}), where)
    except (typed_config.ConfigError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    tasks, size, dim = ckpt.cluster_state["feature_bank"].shape
    found = {"num_tasks": tasks, "bank_size": size, "feature_dim": dim,
             "num_clusters": ckpt.cluster_state["cluster_centers"].shape[1]}
    differ = [f"{name} {getattr(distill, name)}, bank {value}" for name, value in found.items()
              if getattr(distill, name) != value]
    if differ:
        raise CheckpointError(f"{where}: does not describe the file's memory bank ({'; '.join(differ)}); its "
                              "k-means settings cannot be trusted for it")
    return BankSettings.of_distill(distill)


def _text_config_origin(ckpt: OfficialCheckpoint, config: Optional[ModelConfig], text_encoder: Optional[str]) -> str:
    """Where the text encoder's architecture came from (the order of config_for_checkpoint)."""
    if config is not None:
        return "the given model config"
    if ckpt.train_config is not None:
        return "the checkpoint's stored config"
    if text_config_from_source(text_encoder) is not None:
        from ..model.hub import local_path

        return f"{local_path(text_encoder) / 'config.json'}"
    return "the tensor shapes (head count: the paper's)"


def _describe_weights(ckpt: OfficialCheckpoint, requested: Optional[str]) -> str:
    if ckpt.source_key == "model_ema":
        return "EMA weights (model_ema)"
    if ckpt.source_key == "model":
        if requested == "model":
            return "raw weights (model, as asked)"
        if requested is None and evaluated_weights(ckpt.train_config) == "model":
            return "raw weights (model: the ones its run evaluated, eval.use_ema false)"
        return "raw weights (model; the file has no EMA)"
    return "a bare state_dict (EMA or raw: not recorded)"


def describe_checkpoint(ckpt: OfficialCheckpoint, cfg: ModelConfig, bank, requested: Optional[str],
                        text_config_origin: str, tokenizer: str) -> str:
    """The one log line saying what a loaded ``.pth`` turned out to hold."""
    kind = _file_kind(ckpt)
    text = cfg.text
    encoder = (f"text encoder RoBERTa {text.num_layers} layers x {text.hidden_size}, {text.max_position_embeddings} "
               f"positions (weights from the file, architecture from {text_config_origin})")
    distilled = describe_bank(bank)
    if bank is not None and not trained_with_ccr(ckpt):
        distilled += ", trained without cluster-centre replacement (distill.ccr: false): the bank is not used"
    weights = _describe_weights(ckpt, requested)
    if ckpt.stripped_prefix:
        weights += f" (saved from a wrapper: the {ckpt.stripped_prefix!r} prefix of every key removed)"
    return (f"loaded {ckpt.path} ({kind}): {describe_heads(cfg)}; {distilled}; "
            f"{weights}; {encoder}; {tokenizer}")


def _file_kind(ckpt: OfficialCheckpoint) -> str:
    noun = training_captions(ckpt) == "noun"
    if ckpt.train_config is not None:
        stage = ckpt.train_config.get("stage")
        return f"toist training checkpoint, stage {stage}" + (": reads captions naming the objects" if noun else "")
    if is_mdetr_file(ckpt):
        return ("MDETR file, not TOIST: trained on captions naming objects, on no COCO-Tasks task; TOIST's training "
                "starts from it (init.load), its answers to task captions mean nothing")
    if noun:
        return "official TOIST file, noun teacher: reads captions naming the objects, not a task's pronoun caption"
    return "official TOIST file" if ckpt.args is not None else "official file without its args (TOIST or MDETR)"


def trained_with_ccr(ckpt: OfficialCheckpoint) -> bool:
    """False for a toist training checkpoint whose distillation ran with CCR off (its config's
    ``distill.ccr``); official files record no such switch (the reference always replaces)."""
    if ckpt.train_config is None:
        return True
    return bool(ckpt.train_config.get("distill", {}).get("ccr", True))


def training_vocabulary(ckpt: OfficialCheckpoint) -> TaskVocabulary:
    """What the file's task ids meant when it was trained: a toist training checkpoint's recorded
    vocabulary, COCO-Tasks for official files."""
    return _training_facts(ckpt)[3]


def _training_facts(ckpt: OfficialCheckpoint) -> tuple[str, InputSize, tuple[int, ...], TaskVocabulary]:
    """(pronoun, input size, tasks, task vocabulary) the file was trained with."""
    if ckpt.train_config is None:
        return OFFICIAL_PRONOUN, InputSize(), () if is_mdetr_file(ckpt) else OFFICIAL_TASKS, COCO_TASKS
    from .. import typed_config
    from ..data.config import DataConfig

    data = dict(ckpt.train_config.get("data", {}))
    data.pop("eval_split", None)  # recorded by checkpoints written before the unused field was removed
    if data.get("vocabulary") and not data.get("vocabulary_entries"):
        # Training records a vocabulary file's entries; without them the file would be opened by
        # the path the checkpoint names: a downloaded file choosing what is read on this machine.
        raise CheckpointError(f"{ckpt.path}: [config.data] names the vocabulary file {data['vocabulary']!r} but "
                              "records no vocabulary_entries (toist training records them): the file is damaged "
                              "or not from toist's training; a checkpoint never opens the files it names")
    data["vocabulary"] = ""  # the recorded entries are the vocabulary; the file may be elsewhere now
    data = typed_config.from_dict(DataConfig, data, f"{ckpt.path} [config.data]")
    return data.pronoun, data.input_size(), tuple(data.tasks), data.task_vocabulary()


def load_pretrained(path: PathLike, config: Optional[ModelConfig] = None,
                    text_encoder: Optional[str] = None, tokenizer=None) -> LoadedModel:
    """A model directory or a ``.pth`` file (official or toist training), whichever ``path`` is
    (``~`` is the home folder: a ROS parameter gets no shell expansion)."""
    path = Path(path).expanduser()
    if is_model_dir(path):
        if config is not None:
            raise CheckpointError(f"{path}: a model directory carries its own config; do not pass one")
        return load_model_dir(path, tokenizer=text_encoder)
    return load_official(path, config=config, text_encoder=text_encoder, tokenizer=tokenizer)


def export_model_dir(path: PathLike, directory: PathLike, text_encoder: Optional[str] = None,
                     config: Optional[ModelConfig] = None, pronoun: Optional[str] = None,
                     weights: Optional[str] = None,
                     before_install: Optional[Callable[[Path], None]] = None) -> LoadedModel:
    """Convert an official file or a toist training checkpoint into a model directory.

    The file is read, checked and strictly loaded before anything is written; the directory
    is then replaced as a whole. ``directory`` must be new, empty or a toist model directory,
    checked before the file is even read (:func:`~.model_dir.check_replaceable`). Official
    files: ``text_encoder`` supplies the tokenizer copied into the directory (default
    roberta-base); training checkpoints name their own. ``~`` is the home folder in both paths.
    ``before_install``: as :func:`~.model_dir.save_model_dir`'s.
    """
    path, directory = Path(path).expanduser(), Path(directory).expanduser()
    check_replaceable(directory)
    refuse_run_folder(path, purpose="convert")
    if is_model_dir(path):
        raise CheckpointError(f"{path}: a model directory already, not a checkpoint file: nothing to convert (copy "
                              f"the folder to move it; `toist export --onnx {path}` adds its ONNX graphs)")
    loaded = load_official(path, config=config, text_encoder=text_encoder, weights=weights)
    if pronoun:
        loaded.pronoun = pronoun
    save_model_dir(loaded.model, directory, loaded.config, memory_bank=loaded.memory_bank,
                   pronoun=loaded.pronoun, source=Path(path).name, input_size=loaded.input_size,
                   tasks=loaded.tasks, vocabulary=loaded.vocabulary, captions=loaded.captions,
                   before_install=before_install)
    return loaded
