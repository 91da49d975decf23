"""toist's model directory: what ``toist export`` and training write, loadable offline::

    <dir>/config.yaml               format, version, model config, pronoun, bank flag, source,
                                    input size, tasks it was trained on and its task vocabulary
    <dir>/model.safetensors         the model's state_dict (toist names) + SHA-256, export id and the
                                    captions it was trained on in its metadata
    <dir>/memory_bank.safetensors   distilled models: feature_bank, cluster_centers, ..., cluster_stale
                                    (+ SHA-256, export id); config.yaml records its k-means settings
    <dir>/tokenizer/                the tokenizer files

A directory is written aside and swapped in whole (:mod:`.atomic_dir`): a reader, or a
process killed mid-export, sees the old directory or the new one. So only a new or empty folder,
or a model directory holding nothing but toist's own files, is ever replaced
(:func:`check_replaceable`): never a folder of other files. Tensors are checked against
their recorded digests when loaded (version 3; older directories carry none), and a load
during which another export replaced the directory reads it again (:func:`load_model_dir`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .. import typed_config
from ..config import InputSize, ModelConfig
from ..listing import listing
from .atomic_dir import mount_point_problem, write_directory
from .errors import CheckpointError, PathLike
from .files import is_run_folder
from .integrity import folder_digest, read_safetensors, read_safetensors_metadata, save_safetensors
from ..tasks import COCO_TASKS, TaskVocabulary
from .loaded import LoadedModel, describe_bank, describe_heads
from .architecture import INFERENCE_NEUTRAL
from .official import SEGM_PREFIX, WRAPPERS
from .strict import (BankSettings, build_for_state, build_memory_bank, load_state_dict_strict, meta_model,
                     refuse_non_finite, tensor_differences)

MODEL_DIR_FORMAT = "toist-model"
# 2: input_size (version 1 loads with the reference size); 3: tasks, tensor digests (required);
# 4: the task vocabulary (older directories: the COCO-Tasks one); 5: the memory bank's k-means
# settings and stale flags (older directories: the reference's settings, every task stale).
MODEL_DIR_VERSION = 5
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
BANK_FILE = "memory_bank.safetensors"
TOKENIZER_DIR = "tokenizer"
# Beside the bank's reference keys in BANK_FILE: which tasks' centres k-means has yet to recompute.
BANK_STALE_KEY = "cluster_stale"
# What else toist writes into a model directory: the ONNX graphs (`toist export --onnx`, staged
# as hidden .tmp files first), TensorRT's engine cache (backend "tensorrt") and the default-model
# recipe's metrics and model card (training/default_model.py).
DETECTOR_FILE = "detector.onnx"
MASK_HEAD_FILE = "mask_head.onnx"
ONNX_DIGESTS_FILE = "onnx_sha256.json"  # each graph's SHA-256 as `toist export --onnx` installed it
TRT_CACHE_DIR = "trt_cache"
RECIPE_FILES = ("metrics.json", "MODEL_CARD.md")
# What every version of config.yaml records; the other fields have defaults for older versions.
REQUIRED_FIELDS = ("format", "version", "model")
OWN_ENTRIES = frozenset((CONFIG_FILE, WEIGHTS_FILE, BANK_FILE, TOKENIZER_DIR, DETECTOR_FILE, MASK_HEAD_FILE,
                         ONNX_DIGESTS_FILE, f".{DETECTOR_FILE}.tmp", f".{MASK_HEAD_FILE}.tmp", TRT_CACHE_DIR)
                        + RECIPE_FILES)
# The folder `toist export --onnx` stages its graphs in (inside the directory: same file system,
# and the parent need not be writable); one an interrupted export left is toist's too.
ONNX_STAGING_PREFIX = ".onnx-staging-"
# The tokenizer files transformers reads, which the export's tokenizer digest covers (a stray
# file a copy adds, .DS_Store or ._*, changes nothing and is not hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")

# Safetensors metadata that ties a directory's files to one export: the same random id in its
# model and bank files (directories written before have none and load as before).
EXPORT_ID_KEY = "toist_export_id"
# Also in the weights' metadata (older toist ignores it; directories without it: "pronoun"): what
# the model was trained to read, "pronoun" or "noun" (a noun teacher: LoadedModel.captions).
CAPTIONS_KEY = "toist_captions"
# Weights metadata: SHA-256 of the tokenizer folder's files as exported (a damaged or edited
# tokenizer.json turns captions into other tokens, silently). Older directories lack it.
TOKENIZER_DIGEST_KEY = "toist_tokenizer_sha256"
CAPTIONS = ("pronoun", "noun")
# And the network's config.yaml ``model`` section as exported (JSON; older directories: none):
# the network is rebuilt from config.yaml, so an edited head count or LayerNorm eps would load
# the same weights into another network, without an error.
MODEL_CONFIG_KEY = "toist_model_config"
# And config.yaml's other fields that change what the model does (JSON; older directories: none):
# a config.yaml cut short by a copy took defaults for what it lost (tasks, pronoun, vocabulary),
# silently.
MANIFEST_KEY = "toist_manifest"
MANIFEST_FIELDS = ("pronoun", "memory_bank", "input_size", "tasks", "vocabulary", "memory_bank_settings")
# A directory replaced while it loads (an export to the same path) is read again from the start,
# this many times in all.
LOAD_ATTEMPTS = 3

logger = logging.getLogger(__name__)


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
    # Task ids it was trained on; empty: not recorded (directories before version 3).
    tasks: list[int] = field(default_factory=list)
    # What its task ids mean: {"name", "tasks": [{"id", "phrase", "pronoun"?}]}; empty: COCO-Tasks.
    vocabulary: dict = field(default_factory=dict)
    # How the memory bank re-runs k-means (the training's distill.* settings); None: no bank, or
    # written before version 5 (the reference's settings).
    memory_bank_settings: Optional[BankSettings] = None


def save_model_dir(model: nn.Module, directory: PathLike, config: ModelConfig,
                   memory_bank: Optional[nn.Module] = None, pronoun: str = "something",
                   source: str = "", input_size: Optional[InputSize] = None,
                   tasks: Optional[Sequence[int]] = None, vocabulary: TaskVocabulary = COCO_TASKS,
                   captions: str = "pronoun", before_install: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``config.yaml``, ``model.safetensors``, the tokenizer and the memory bank, replacing
    ``directory`` as a whole (the old one stays intact until the new one is complete).
    ``before_install(staged)``: called on the complete new directory before it replaces the old
    one (``toist export ... --onnx`` adds and checks its graphs there); if it raises, nothing changes.
    ``directory`` must be new, empty or a toist model directory (:func:`check_replaceable`).

    ``model`` must be what ``config`` builds (:func:`check_model_matches_config`): the directory
    is rebuilt from ``config`` when loaded, so a config of another variant or head count would
    replace a good directory with one that does not load, or loads another network.
    ``captions``: what the model was trained to read (``LoadedModel.captions``). ``~`` is the
    home folder."""
    directory = Path(directory).expanduser()
    if captions not in CAPTIONS:
        raise CheckpointError(f"captions must be one of {CAPTIONS}, got {captions!r}; nothing was written")
    cfg = copy.deepcopy(config)
    cfg.text.tokenizer = TOKENIZER_DIR  # relative to the directory
    cfg.text.weights = None
    cfg.backbone.weights = None
    manifest = ModelDirConfig(model=cfg, pronoun=pronoun, memory_bank=memory_bank is not None, source=source,
                              input_size=input_size or InputSize(), tasks=sorted(set(tasks or ())),
                              vocabulary=vocabulary.to_data(),
                              memory_bank_settings=BankSettings.of_bank(memory_bank) if memory_bank is not None
                              else None)
    if memory_bank is not None and getattr(memory_bank, "num_tasks", vocabulary.num_tasks) != vocabulary.num_tasks:
        raise CheckpointError(f"the memory bank has {memory_bank.num_tasks} task slots but {vocabulary.describe()} "
                              f"has {vocabulary.num_tasks} tasks; nothing was written")
    check_model_matches_config(model, cfg, memory_bank, where=str(directory))
    # Every load refuses non-finite tensors: written, the directory would replace a good one
    # with one that never loads.
    for what, tensors in (("the model", model.state_dict()),
                          ("the memory bank", bank_tensors(memory_bank) if memory_bank is not None else {})):
        try:
            refuse_non_finite(tensors, where=f"{what} to be written to {directory}")
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; nothing was written") from None

    check_replaceable(directory)

    def write(staging: Path) -> None:
        stamp = {"toist": MODEL_DIR_FORMAT, EXPORT_ID_KEY: uuid.uuid4().hex}
        model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        check_tokenizer_copy(model.tokenizer, staging / TOKENIZER_DIR)
        save_safetensors(model.state_dict(), staging / WEIGHTS_FILE,
                         metadata={**stamp, CAPTIONS_KEY: captions, MODEL_CONFIG_KEY: _network_json(cfg),
                                   MANIFEST_KEY: _manifest_json(manifest),
                                   TOKENIZER_DIGEST_KEY: folder_digest(staging / TOKENIZER_DIR, TOKENIZER_FILES)})
        if memory_bank is not None:
            save_safetensors(bank_tensors(memory_bank), staging / BANK_FILE, metadata=stamp)
        typed_config.save_yaml(manifest, staging / CONFIG_FILE)
        if before_install is not None:
            before_install(staging)

    return write_directory(directory, write)


def _network_json(cfg: ModelConfig) -> str:
    """``cfg`` as recorded in the weights' metadata: all but the fields that leave inference
    alone (the tokenizer, which ``text_encoder=`` may stand in for, weight sources, dropout,
    freezing, aux losses: :data:`~.architecture.INFERENCE_NEUTRAL`)."""
    flat = typed_config.flatten(typed_config.to_dict(cfg))
    return json.dumps({name: value for name, value in flat.items() if name not in INFERENCE_NEUTRAL}, sort_keys=True)


def _manifest_json(manifest: ModelDirConfig) -> str:
    """``manifest``'s :data:`MANIFEST_FIELDS` as recorded in the weights' metadata."""
    data = typed_config.to_dict(manifest)
    return json.dumps({name: data[name] for name in MANIFEST_FIELDS}, sort_keys=True)


def _check_manifest_unchanged(config_file: Path, manifest: ModelDirConfig, recorded: Optional[str]) -> None:
    """Refuse a config.yaml whose other behaviour fields differ from the export's (``recorded``:
    the weights' :data:`MANIFEST_KEY`; None for directories written before it)."""
    if recorded is None:
        return
    exported = _recorded_json(config_file.parent / WEIGHTS_FILE, MANIFEST_KEY, recorded)
    now = json.loads(_manifest_json(manifest))
    changed = [f"{name} ({_short(exported[name])} when exported, {_short(now[name])} now)"
               for name in MANIFEST_FIELDS if name in exported and exported[name] != now[name]]
    if changed:
        raise CheckpointError(f"{config_file}: {listing(changed, 4)} differ from what was exported with its weights "
                              "(a copy cut short, or an edit): the model would read other tasks or captions. Copy "
                              "the file again, undo the edit, or export the model again (toist export)")


def _recorded_json(weights: Path, key: str, recorded: str) -> dict:
    """The JSON object the weights' metadata ``key`` holds; CheckpointError when it is not one."""
    try:
        value = json.loads(recorded)
        if not isinstance(value, dict):
            raise ValueError(value)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{weights}: metadata {key} is not a JSON object; export the model again "
                              "(toist export)") from None
    return value


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tokenizer_unchanged(folder: Path, recorded: Optional[str]) -> None:
    """Refuse a tokenizer folder whose files differ from the export's (``recorded``: None for
    directories written before the digest)."""
    if recorded is not None and folder_digest(folder, TOKENIZER_FILES) != recorded:
        raise CheckpointError(f"{folder}: its files changed since the export (their SHA-256 is not the one recorded "
                              f"in {WEIGHTS_FILE}): a damaged or edited tokenizer gives the model other tokens; "
                              "restore the folder or export the model again (toist export)")


def _check_network_unchanged(config_file: Path, cfg: ModelConfig, recorded: Optional[str]) -> None:
    """Refuse a config.yaml whose network fields were edited after the export (``recorded``:
    the weights' :data:`MODEL_CONFIG_KEY`; None for directories written before it)."""
    if recorded is None:
        return
    exported = _recorded_json(config_file.parent / WEIGHTS_FILE, MODEL_CONFIG_KEY, recorded)
    exported, now = typed_config.flatten(exported), json.loads(_network_json(cfg))
    changed = [f"model.{name} ({was!r} when exported, {now[name]!r} now)"
               for name, was in sorted(exported.items()) if name in now and now[name] != was]
    if changed:
        raise CheckpointError(f"{config_file}: {listing(changed, 4)} differ from the network its weights were "
                              "exported with; the network is built from config.yaml, so the weights would run in "
                              "another network. Undo the edit, or export the model again")


def _check_unlisted_bank(directory: Path, weights_metadata: dict) -> None:
    """A bank file beside ``memory_bank: false``: written by this export (the same export id),
    the config was edited and the model would run without its cluster-centre replacement:
    refused; otherwise a file an older export left behind (the first toist versions re-exported
    into a folder without clearing it): ignored, as they loaded it, and said."""
    bank_file = directory / BANK_FILE
    exported = weights_metadata.get(EXPORT_ID_KEY)
    if exported is not None and read_safetensors_metadata(bank_file).get(EXPORT_ID_KEY) == exported:
        raise CheckpointError(f"{directory / CONFIG_FILE}: says memory_bank: false but {bank_file}, written by the same "
                              "export, is there: the model would run without cluster-centre replacement, unlike its "
                              "training. Undo the edit; to leave the bank unused, set the inference option ccr: false "
                              "(toist evaluate --no-ccr)")
    logger.warning("%s: not this model's (config.yaml says memory_bank: false; a file an earlier export left "
                   "behind?): not used; delete it", bank_file)


def _check_tokenizer_override(directory: Path, given: Optional[str], tokenizer, vocab_size: int) -> None:
    """A ``text_encoder`` given for a model directory must split text as the directory's own
    tokenizer does (a ``--text-encoder`` kept from an official file's command line): token ids
    of another vocabulary index other embedding rows, or none (an IndexError mid-forward)."""
    if given is None:
        return
    from ..model.text import fetch_tokenizer

    own = directory / TOKENIZER_DIR
    if own.is_dir() and fetch_tokenizer(str(own)).value.get_vocab() != tokenizer.get_vocab():
        raise CheckpointError(f"{directory}: text_encoder {given!r} is not the tokenizer this model directory was "
                              f"exported with ({own}): leave text_encoder (--text-encoder) out for a model directory")
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"{directory}: text_encoder {given!r} has {len(tokenizer)} tokens, the model's text "
                              f"encoder {vocab_size} (model.text.vocab_size): not this model's tokenizer")


def bank_tensors(memory_bank: nn.Module) -> dict[str, torch.Tensor]:
    """The bank's state (reference keys) and, for a MemoryBank, its stale flags: a bank whose
    centres are current must not re-run k-means on them when loaded (with an iteration cap,
    a warm-started k-means moves them)."""
    tensors = dict(memory_bank.state_dict())
    if hasattr(memory_bank, "stale_flags"):
        tensors[BANK_STALE_KEY] = memory_bank.stale_flags()
    return tensors


def check_model_matches_config(model: nn.Module, config: ModelConfig, memory_bank: Optional[nn.Module] = None,
                               where: str = "model directory") -> None:
    """Refuse, before anything is written, a model that ``config`` does not build: other tensor
    names or shapes (a config of another variant, a wrapper's prefixed keys), other attention
    head counts, or another module setting (e.g. a dilated backbone); and a memory bank of
    another width. The comparison model is built on the meta device (no memory, no weights).
    ``where`` (the directory) starts the error."""
    state = model.state_dict()
    for prefix, remedy in WRAPPERS.items():
        if state and all(key.startswith(prefix) for key in state):
            raise CheckpointError(f"{where}: every tensor name of the model starts with {prefix!r}: it is a wrapper, "
                                  f"not the model (a directory of these names would not load); pass {remedy}. "
                                  "Nothing was written")
    reference = _build_reference(config, model, where)
    problems = _variant_difference(state, config) + tensor_differences(state, reference.state_dict(), "model",
                                                                           "config", limit=4)
    if not problems:
        problems = _head_differences(model, reference, config) + _setting_differences(model, reference)
    dim = getattr(memory_bank, "dim", None)
    if dim is not None and dim != config.transformer.d_model:
        problems.append(f"memory bank of {dim}-d features, config transformer.d_model {config.transformer.d_model}")
    if problems:
        raise CheckpointError(f"{where}: the model does not match the config given for the model directory (which "
                              "is what loading it builds): " + "; ".join(problems) + ". Nothing was written: pass "
                              "the config the model was built with")


def _build_reference(config: ModelConfig, model: nn.Module, where: str) -> nn.Module:
    """What loading the directory will build from ``config``, on the meta device (:func:`meta_model`)."""
    try:
        return meta_model(config, getattr(model, "tokenizer", None))
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(f"{where}: the config given for the model directory does not build a model ({exc}); "
                              "nothing was written") from None


def _variant_difference(state: dict, config: ModelConfig) -> list[str]:
    """The usual cause of a wholesale name mismatch, said first: a segmentation model (its
    detector under ``detr.``) with a detection config, or the other way round."""
    segmentation = any(key.startswith(SEGM_PREFIX) for key in state)
    if segmentation == config.masks:
        return []
    return [f"the model is {'a segmentation model (detr.* tensors, mask head)' if segmentation else 'a detector'} "
            f"but the config has masks: {str(config.masks).lower()}"]


def _heads(module: nn.Module) -> Optional[int]:
    """Attention heads of a module: nn.MultiheadAttention / the mask head's MHAttentionMap
    (``num_heads``), RoBERTa's self-attention (``num_attention_heads``); None for others."""
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _head_differences(model: nn.Module, reference: nn.Module, config: ModelConfig) -> list[str]:
    """Head counts cannot be read from tensor shapes: a model of 4 heads loads into 8 and computes
    something else. One line per config field, naming the first module that differs."""
    wanted = {name: _heads(module) for name, module in reference.named_modules()}
    differ: dict[str, str] = {}
    for name, module in model.named_modules():
        heads = _heads(module)
        if heads is None or wanted.get(name) is None or heads == wanted[name]:
            continue
        # RoBERTa lives under transformer.text_encoder; every other attention is the transformer's.
        field, value = (("text.num_heads", config.text.num_heads) if "text_encoder" in name
                        else ("transformer.nheads", config.transformer.nheads))
        differ.setdefault(field, f"{field}: model {heads} ({name}), config {value}")
    return list(differ.values())


def _setting_differences(model: nn.Module, reference: nn.Module) -> list[str]:
    """Module settings that leave the shapes alone (a convolution's dilation, a LayerNorm's eps),
    read from ``extra_repr``; dropout is left out (training only)."""
    wanted = {name: module for name, module in reference.named_modules()}
    differ = []
    for name, module in model.named_modules():
        other = wanted.get(name)
        if other is None or isinstance(module, nn.Dropout) or type(module) is not type(other):
            continue
        if module.extra_repr() != other.extra_repr():
            differ.append(f"{name} (model {module.extra_repr()}, config {other.extra_repr()})")
    return [f"{len(differ)} module(s) set up otherwise: {listing(differ, 3)}"] if differ else []


def check_replaceable(directory: PathLike, remedy: Optional[str] = None) -> None:
    """Refuse to write a model directory over anything but nothing, an empty folder or a toist
    model directory holding only what toist puts in one (:data:`OWN_ENTRIES`): a directory is
    replaced as a whole, so whatever else ``directory`` holds (the checkpoint being exported, a
    run's logs, a user's files) would be deleted. Called before anything is loaded or written.
    ``remedy``: what to do instead, where the caller cannot take another folder (default: give
    one)."""
    directory = Path(directory).expanduser()
    if directory.is_symlink() and not directory.exists():
        raise CheckpointError(f"{directory}: a link to {os.readlink(directory)}, which does not exist; create that "
                              "folder first (the folder a link points to is what gets replaced), or give a new folder")
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a folder; "
                              f"{remedy or 'give a new or empty folder for the model directory'}")
    problem = mount_point_problem(directory, remedy or "")
    if problem:   # (write_directory refuses it too, but only after the checkpoint was read and loaded)
        raise CheckpointError(problem)
    here = Path.cwd().resolve()
    if directory.resolve() in (here, *here.parents):
        # A folder in use as the working directory cannot be swapped out ("." cannot even be renamed).
        raise CheckpointError(f"{directory}: is the current folder ({here}) or holds it; the model directory replaces "
                              f"the folder as a whole: give a new folder, e.g. {directory / 'model'}")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return
    what = _model_dir_format(directory)
    foreign = entries if what != MODEL_DIR_FORMAT else [name for name in entries if name not in OWN_ENTRIES
                                                        and not name.startswith(ONNX_STAGING_PREFIX)]
    if not foreign:
        return
    shown = listing(foreign, 8)
    kind = ("a toist model directory that also holds other files" if what == MODEL_DIR_FORMAT else
            f"not empty and not a toist model directory ({what})")
    remedy = remedy or f"give a new or empty folder (e.g. {directory / 'model'}), or move those entries out first"
    raise CheckpointError(f"{directory}: {kind}; writing the model directory there replaces the folder as a whole "
                          f"and would delete {shown}. Nothing was written: {remedy}")


def _model_dir_format(directory: Path) -> str:
    """``MODEL_DIR_FORMAT`` when ``directory/config.yaml`` says so, else why not (for the error)."""
    import yaml

    from ..yaml_text import parse_yaml

    config = directory / CONFIG_FILE
    if not config.is_file():
        return f"no {CONFIG_FILE}"
    try:
        data = parse_yaml(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"its {CONFIG_FILE} does not read as YAML: {type(exc).__name__}"
    found = data.get("format") if isinstance(data, dict) else None
    return MODEL_DIR_FORMAT if found == MODEL_DIR_FORMAT else f"its {CONFIG_FILE} has format {found!r}"


def check_tokenizer_copy(original, copy_dir: Path) -> None:
    """A robot reads only the copy: it must load from its folder alone (no hub) and split a
    caption into the very tokens the original does; checked before the directory is swapped in."""
    from ..model.text import fetch_tokenizer

    try:
        copy = fetch_tokenizer(str(copy_dir)).value
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the tokenizer files written for the model directory do not load on their own "
                              f"({exc}); nothing was replaced") from exc
    caption = "sit comfortably on something"
    if copy(caption)["input_ids"] != original(caption)["input_ids"]:
        raise CheckpointError(f"the tokenizer files written for the model directory tokenize differently from "
                              f"the loaded {type(original).__name__}; nothing was replaced")


def is_model_dir(path: PathLike) -> bool:
    """Whether ``path`` is (meant as) a model directory: a folder with a config.yaml that is not a
    ``toist train`` run folder's (:func:`~.files.is_run_folder`: its config.yaml is the run's
    configuration, beside checkpoints). A model directory whose config.yaml is damaged still counts:
    loading it says what is wrong with that file."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and not is_run_folder(path)


def load_model_dir(directory: PathLike, tokenizer: Optional[str] = None) -> LoadedModel:
    """Build and strictly load a model directory (no network: the tokenizer is inside it).

    Its files are read by path, one after another; an export replacing the directory meanwhile
    would give this load the config of one export and the weights, bank or tokenizer of another.
    A load during which the directory changed (its ``config.yaml`` or its weights' export id,
    :data:`EXPORT_ID_KEY`) starts again, :data:`LOAD_ATTEMPTS` times in all; an error raised
    while it changed is not reported either."""
    directory = Path(directory).expanduser()
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        before = _export_snapshot(directory)
        try:
            loaded = _load_model_dir_once(directory, tokenizer)
        except Exception:
            if attempt == LOAD_ATTEMPTS or _export_snapshot(directory) == before:
                raise
        else:
            if _export_snapshot(directory) == before:
                return loaded
        logger.info("%s was replaced while it loaded (an export to it); reading it again", directory)
    raise CheckpointError(f"{directory}: replaced while it loaded, {LOAD_ATTEMPTS} times in a row (an export writing "
                          "to it again and again?); load it when the export is done")


def _export_snapshot(directory: Path) -> tuple[Optional[str], Optional[str]]:
    """What changes when another export replaces ``directory``: its config.yaml text and its
    weights' export id (None where missing or unreadable)."""
    try:
        config_text = (directory / CONFIG_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        config_text = None
    return config_text, read_safetensors_metadata(directory / WEIGHTS_FILE).get(EXPORT_ID_KEY)


def _load_model_dir_once(directory: Path, tokenizer: Optional[str]) -> LoadedModel:
    from ..model import build_model
    from ..model.hub import TextEncoderUnavailable
    from ..model.text import check_tokenizer_dir, fetch_tokenizer

    config_file = directory / CONFIG_FILE
    data = typed_config.read_yaml(config_file, "model directory config")
    # Defaults stand in for what later versions added, never for these: a config.yaml without
    # ``model`` would otherwise build the paper network, whatever the weights beside it are.
    missing = [name for name in REQUIRED_FIELDS if not isinstance(data, dict) or name not in data]
    if missing:
        raise CheckpointError(f"{config_file}: not a model directory config: "
                              f"{'it is empty' if data is None else 'no ' + ', '.join(missing)} (it must record "
                              f"{', '.join(REQUIRED_FIELDS)}); export the model again (toist export)")
    manifest = typed_config.from_dict(ModelDirConfig, data, str(config_file))
    if manifest.format != MODEL_DIR_FORMAT or manifest.version > MODEL_DIR_VERSION:
        newer = manifest.format == MODEL_DIR_FORMAT  # written by a newer toist (a robot not yet updated)
        raise CheckpointError(f"{config_file}: format {manifest.format!r} version "
                              f"{manifest.version} is not a {MODEL_DIR_FORMAT!r} directory of version "
                              f"{MODEL_DIR_VERSION} or older"
                              + ("; a newer toist wrote it: update toist here, or export the model with this "
                                 "version" if newer else ""))
    if manifest.version < 1:
        raise CheckpointError(f"{config_file}: field 'version': {manifest.version} is not a version (1 to "
                              f"{MODEL_DIR_VERSION})")
    digests = manifest.version >= 3
    cfg = manifest.model
    # The directory's weights provide every weight: starting weights a config.yaml names (a hub
    # name, a file elsewhere) would only be fetched to be overwritten, as for a .pth.
    cfg.text.weights = None
    cfg.backbone.weights = None
    if tokenizer is not None:
        cfg.text.tokenizer = str(tokenizer)
    elif cfg.text.tokenizer != TOKENIZER_DIR:
        # Its own folder is the one checked against the weights (digest, vocabulary); another path
        # or a hub name would give other token ids unchecked, or reach for the network.
        raise CheckpointError(f"{config_file}: field 'model.text.tokenizer' is {cfg.text.tokenizer!r}; a model "
                              f"directory reads its own tokenizer folder ({TOKENIZER_DIR!r}, as toist export writes "
                              f"it): put {TOKENIZER_DIR!r} back, or pass text_encoder=<tokenizer> to use another")
    elif (directory / TOKENIZER_DIR).is_dir():
        cfg.text.tokenizer = str(directory / TOKENIZER_DIR)
    else:  # never mistake the missing folder for a hub name
        raise CheckpointError(f"{directory}: its tokenizer folder {directory / TOKENIZER_DIR} is missing; export "
                              f"the model again (toist export) or pass text_encoder=<tokenizer directory>")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} not found")
    state, weights_metadata = read_safetensors(weights, required_digest=digests)
    _check_network_unchanged(config_file, cfg, weights_metadata.get(MODEL_CONFIG_KEY))
    captions = weights_metadata.get(CAPTIONS_KEY, "pronoun")
    if captions not in CAPTIONS:
        raise CheckpointError(f"{weights}: metadata {CAPTIONS_KEY} is {captions!r}, expected one of {CAPTIONS}; "
                              "export the model again (toist export)")
    bank = None
    if not manifest.memory_bank and (directory / BANK_FILE).is_file():
        _check_unlisted_bank(directory, weights_metadata)
    if manifest.memory_bank:
        bank_file = directory / BANK_FILE
        if not bank_file.is_file():
            raise CheckpointError(f"{directory}: config.yaml says memory_bank: true but {BANK_FILE} is missing")
        bank_state, bank_metadata = read_safetensors(bank_file, required_digest=digests)
        stale = bank_state.pop(BANK_STALE_KEY, None)
        bank = build_memory_bank(bank_state, where=str(bank_file), d_model=cfg.transformer.d_model,
                                 settings=manifest.memory_bank_settings, stale=stale)
    try:
        vocabulary = (TaskVocabulary.from_data(manifest.vocabulary, source=f"{directory / CONFIG_FILE} [vocabulary]")
                      if manifest.vocabulary else COCO_TASKS)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    unknown = [task for task in manifest.tasks if task not in vocabulary]
    if unknown:
        raise CheckpointError(f"{config_file}: field 'tasks': {unknown} are not task ids of {vocabulary.describe()}")
    if bank is not None and bank.num_tasks != vocabulary.num_tasks:
        raise CheckpointError(f"{directory}: its memory bank has {bank.num_tasks} task slots but its vocabulary "
                              f"{vocabulary.num_tasks} tasks")
    # After the checks that say more about one field (a bank beside memory_bank: false, unknown task ids).
    _check_manifest_unchanged(config_file, manifest, weights_metadata.get(MANIFEST_KEY))
    if tokenizer is None:  # a missing vocabulary file is named first; then any change, before parsing
        check_tokenizer_dir(directory / TOKENIZER_DIR)
        _check_tokenizer_unchanged(directory / TOKENIZER_DIR, weights_metadata.get(TOKENIZER_DIGEST_KEY))
    try:
        fetched = fetch_tokenizer(cfg.text.tokenizer)
    except TextEncoderUnavailable as exc:
        if tokenizer is None:
            raise
        # Its remedy (export the model) is done already: the override is what is not needed.
        raise CheckpointError(f"{directory}: text_encoder {str(tokenizer)!r} is not on this machine ({exc.reason}); "
                              f"a model directory reads its own tokenizer folder ({TOKENIZER_DIR!r}): leave "
                              "text_encoder (--text-encoder) out") from None
    _check_tokenizer_override(directory, tokenizer, fetched.value, cfg.text.vocab_size)
    if weights_metadata.get(MODEL_CONFIG_KEY) is None:
        # Nothing recorded beside the weights vouches for config.yaml (a directory written before
        # toist recorded it): its network is checked against the tensors on a skeleton first.
        model = build_for_state(cfg, fetched.value, state, where=str(weights))
    else:   # config.yaml is the network the weights were saved from (_check_network_unchanged)
        model = build_model(cfg, tokenizer=fetched.value)
    load_state_dict_strict(model, state, where=str(weights))
    # After the files' own checks, whose errors say more about a file that cannot fit.
    if bank is not None and bank_metadata.get(EXPORT_ID_KEY) != weights_metadata.get(EXPORT_ID_KEY):
        raise CheckpointError(f"{bank_file}: written by another export than {weights} (export ids "
                              f"{bank_metadata.get(EXPORT_ID_KEY)} and {weights_metadata.get(EXPORT_ID_KEY)}): "
                              "the two files were put together from different exports; export the model again")
    logger.info("loaded model directory %s (version %d, from %s): %s; %s; tokenizer from %s", directory,
                manifest.version, manifest.source or "?", describe_heads(cfg), describe_bank(bank), fetched.origin)
    return LoadedModel(model.eval(), cfg, bank, manifest.pronoun, str(directory), manifest.input_size,
                       tuple(manifest.tasks) or None, vocabulary, captions)
