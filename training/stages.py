"""The paper's training stages: which models are built, how they start, what one step computes.

========================  =========================================================  ==================
stage                     what trains                                                init (reference)
========================  =========================================================  ==================
``grounding``             MDETR-style pre-training: every object, named (not in      ``init.load``
                          the reference; stands in for MDETR weights on new data)
``pronoun``               plain TOIST detector on pronoun captions                   ``init.load`` (MDETR)
``noun``                  teacher detector on noun captions                          ``init.load`` (MDETR)
``distill``               student (pronoun) *and* teacher (noun), bank + CCR, CL,    ``init.load`` (pronoun
                          SBTL (spec 2.2)                                            model), ``init.load_noun``
``mask_head``             mask head on the frozen pronoun detector                   ``init.frozen_weights``
``mask_head_distill``     mask head on the frozen distilled detector, its bank       ``init.frozen_weights``
                          fixed and used for CCR (reference ``--cluster`` only)
========================  =========================================================  ==================

:class:`StepModule` is the one module a training step calls (and DDP wraps), so gradient
synchronisation sees a single forward even though the model runs in two phases with the
distillation work in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from toist_core.checkpoint import (CheckpointError, OfficialCheckpoint, is_model_dir, load_model_dir,
                                   load_state_dict_strict, read_official, refuse_non_finite, state_dict_problems)
from toist_core.checkpoint.load import trained_with_ccr, training_captions, training_vocabulary
from toist_core.distill.cluster import ClusterModule, pronoun_token_indices, target_pronouns
from toist_core.losses.criterion import DistillationCriterion, SetCriterion, build_weight_dict
from toist_core.model import build_model
from toist_core.structures import ImageBatch

from training.config import TrainConfig

_CONTRASTIVE = "contrastive_align_projection_"


@dataclass
class StageModels:
    """The networks of a stage. ``teacher`` only for ``distill``; ``cluster`` when the memory
    bank takes part (``distill`` with CCR or CL, ``mask_head_distill``)."""

    model: nn.Module
    teacher: Optional[nn.Module] = None
    cluster: Optional[ClusterModule] = None
    # (field, path, the run's configuration) of each loaded toist training checkpoint
    trained_by: list[tuple[str, str, dict]] = field(default_factory=list)


# The training stage a loaded toist checkpoint should come from, per (stage, field); a mismatch
# (a swapped student and teacher) trains without error into a model unlike the paper's.
_SOURCE_STAGES = {("distill", "init.load"): ("pronoun", "distill"),
                  ("distill", "init.load_noun"): ("noun", "distill")}   # distill: its teacher is read


def build_stage_models(cfg: TrainConfig, tokenizer, log=print, load_init: bool = True) -> StageModels:
    """Build the stage's networks (random init or pretrained parts) and load ``cfg.init``.

    ``load_init`` False (a resume): the networks only; ``cfg.init``'s files are not read. The
    resume checkpoint restores everything they gave, and a later run of an earlier stage may
    have overwritten or removed them since (the checks on them were made when the run started)."""
    model = build_model(cfg.model, tokenizer=tokenizer)
    trained_by: list[tuple[str, str, dict]] = []
    if load_init and cfg.init.load is not None:
        _note_source(cfg, trained_by, "init.load", cfg.init.load,
                     load_weights(model, cfg.init.load, cfg.init.strict, "init.load", log), log)
    teacher = None
    cluster = None
    if cfg.is_distill:
        teacher = build_model(cfg.model, tokenizer=tokenizer)
        if load_init and cfg.init.load_noun is not None:
            loaded = load_weights(teacher, cfg.init.load_noun, cfg.init.strict, "init.load_noun", log, teacher=True)
            _note_source(cfg, trained_by, "init.load_noun", cfg.init.load_noun, loaded, log)
        if cfg.distill.uses_bank:
            cluster = ClusterModule(cfg.distill)
    if cfg.is_mask_stage:
        detector = _load_frozen_detector(cfg, model, trained_by, log) if load_init else None
        # The reference freezes the whole detector (RoBERTa included); only the heads train.
        model.detr.requires_grad_(False)
        if cfg.stage == "mask_head_distill":
            cluster = ClusterModule(cfg.distill)
            if detector is not None:
                _load_frozen_bank(cfg, cluster, detector)
    return StageModels(model, teacher, cluster, trained_by)


def _note_source(cfg: TrainConfig, trained_by: list, field_name: str, path: str, train_config: Optional[dict],
                 log) -> None:
    """Record a loaded toist training checkpoint's configuration (for the holdout check) and
    warn when it comes from another stage than the field expects."""
    if train_config is None:
        return
    trained_by.append((field_name, str(path), train_config))
    expected = _SOURCE_STAGES.get((cfg.stage, field_name))
    if expected and train_config.get("stage") not in expected:
        log(f"warning: {field_name}: {path} was trained by stage {train_config.get('stage')!r}; stage "
            f"{cfg.stage!r} expects {' or '.join(map(repr, expected))} there (student and teacher swapped?)")


def _load_frozen_detector(cfg: TrainConfig, model: nn.Module, trained_by: list, log) -> OfficialCheckpoint:
    """``init.frozen_weights``' detector into ``model.detr``, after checking that the file suits
    the mask stage (:func:`check_frozen_detector`); the file as read."""
    ckpt = read_frozen_detector(cfg)
    _note_source(cfg, trained_by, "init.frozen_weights", cfg.init.frozen_weights, ckpt.train_config, log)
    check_frozen_detector(cfg, ckpt, log)
    detector_state = ckpt.detector_state_dict()
    if not model.detr.contrastive_align:
        # Trained with contrastive align, used without it (as the reference's mask stage):
        # those projections only serve the training loss.
        detector_state = {k: v for k, v in detector_state.items() if not k.startswith(_CONTRASTIVE)}
    _load_into(model.detr, detector_state, cfg.init.strict,
               f"init.frozen_weights {cfg.init.frozen_weights} [{ckpt.source_key}]", log)
    return ckpt


def read_frozen_detector(cfg: TrainConfig) -> OfficialCheckpoint:
    """The file ``init.frozen_weights`` names, read (mapped); an error names the field."""
    try:
        return read_official(cfg.init.frozen_weights)
    except CheckpointError as exc:
        raise CheckpointError(f"init.frozen_weights: {exc}") from None


def check_frozen_detector(cfg: TrainConfig, ckpt: OfficialCheckpoint, log=None) -> None:
    """CheckpointError unless ``init.frozen_weights`` suits the mask stage: a pronoun detector, a
    distilled one with CCR, its pronoun and a bank of the config's shape for
    ``mask_head_distill``. Needs no model, so ``check_paths`` runs it before the dataset is built
    and for ``toist train --check`` (which said OK for what the start then refused, minutes in).
    ``log``: where warnings go (None: not said)."""
    if training_captions(ckpt) == "noun":  # frozen: it never learns this stage's pronoun captions
        stage = (ckpt.train_config or {}).get("stage")
        raise CheckpointError(f"init.frozen_weights: {cfg.init.frozen_weights} reads captions naming the objects "
                              f"({f'stage {stage!r}' if stage else 'a noun teacher or an MDETR file'}); stage "
                              f"{cfg.stage!r} trains its mask head on pronoun captions over that frozen detector, "
                              "whose boxes would then mean little: give the pronoun detector (stage 'pronoun') or "
                              "the distilled one (stage 'distill')")
    _check_frozen_vocabulary(cfg, ckpt)
    # A toist distillation run records whether it replaced the pronoun (distill.ccr) and
    # which pronoun; official files record neither (the reference always replaces).
    distilled_as = (ckpt.train_config or {}).get("distill") or {}
    detector_ccr = ckpt.cluster_state is not None and trained_with_ccr(ckpt)
    if cfg.stage == "mask_head" and detector_ccr and log is not None:
        log(f"warning: init.frozen_weights: {cfg.init.frozen_weights} is a distilled detector (it has a memory "
            "bank); stage 'mask_head' trains without it, so without cluster-centre replacement: "
            "stage 'mask_head_distill' keeps it")
    if cfg.stage == "mask_head_distill":
        if ckpt.cluster_state is None:
            raise CheckpointError(f"init.frozen_weights: {cfg.init.frozen_weights} has no memory bank "
                                  "('cluster_criterion'); mask_head_distill needs a distilled detector")
        if not detector_ccr:
            raise CheckpointError(f"init.frozen_weights: {cfg.init.frozen_weights} was distilled with distill.ccr "
                                  "false: its decoder never saw cluster centres, and it is evaluated and exported "
                                  "without them; train its mask head with stage 'mask_head' (no CCR)")
        if distilled_as.get("pronoun", cfg.data.pronoun) != cfg.data.pronoun:
            raise CheckpointError(f"init.frozen_weights: {cfg.init.frozen_weights} was distilled with the pronoun "
                                  f"{distilled_as['pronoun']!r}; this stage's captions end with data.pronoun "
                                  f"{cfg.data.pronoun!r}: set data.pronoun and distill.pronoun to "
                                  f"{distilled_as['pronoun']!r}")
        found = tuple(ckpt.cluster_state["feature_bank"].shape) + (ckpt.cluster_state["cluster_centers"].shape[1],)
        wanted = (cfg.distill.num_tasks, cfg.distill.bank_size, cfg.distill.feature_dim, cfg.distill.num_clusters)
        if found != wanted:
            raise CheckpointError(
                f"init.frozen_weights: the bank of {cfg.init.frozen_weights} has (tasks, size, dim, K) = {found}, "
                f"the config (distill.num_tasks, bank_size, feature_dim, num_clusters) = {wanted}")


def _check_frozen_vocabulary(cfg: TrainConfig, ckpt: OfficialCheckpoint) -> None:
    """The frozen detector must have read this run's task captions: with its phrases changed
    (reordered, edited) the mask head trained over captions the detector never learned, and a
    distilled one's bank slot k, task k's pronoun features, served another task; the exported
    model then recorded the new phrases, without a word."""
    trained_on, here = training_vocabulary(ckpt), cfg.data.task_vocabulary()
    if list(trained_on.entries) == list(here.entries):
        return
    before, now = {e.id: e for e in trained_on.entries}, {e.id: e for e in here.entries}
    task = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))

    def said(entry) -> str:
        return "no task" if entry is None else repr(entry.phrase + (f" ({entry.pronoun})" if entry.pronoun else ""))

    raise CheckpointError(f"init.frozen_weights: {cfg.init.frozen_weights} was trained on {trained_on.describe()}, "
                          f"this run's data is {here.describe()}: task {task} is {said(before.get(task))} there, "
                          f"{said(now.get(task))} here; the frozen detector reads only the captions it was trained "
                          "on: train the mask head with its vocabulary (data.vocabulary), or retrain the detector")


def _load_frozen_bank(cfg: TrainConfig, cluster: ClusterModule, ckpt: OfficialCheckpoint) -> None:
    """The distilled detector's memory bank (fixed in ``mask_head_distill``: used for CCR; its
    shape checked by :func:`check_frozen_detector`)."""
    load_state_dict_strict(cluster.bank, {k: v.float() for k, v in ckpt.cluster_state.items()},
                           where=f"init.frozen_weights {cfg.init.frozen_weights} [cluster_criterion]")


def load_weights(model: nn.Module, path: str, strict: bool, field: str, log=print,
                 teacher: bool = False) -> Optional[dict]:
    """``model_ema`` (else ``model``) of an MDETR / TOIST / toist checkpoint, or the weights of a
    toist model directory, into ``model``; ``teacher`` (init.load_noun): a distillation file's
    teacher, ``model_noun_ema`` (else ``model_noun``), where it holds one.

    A segmentation file loads into a detector through its ``detr.`` weights (the reference's
    rule); the position_ids buffer of old files is dropped. A memory bank in the file is not
    loaded: a distillation builds its own, one slot per task of its data's vocabulary, so
    fine-tuning onto other tasks starts their banks empty, as the reference's bank starts.

    Returns the training configuration of a toist training checkpoint (None for other files).
    """
    try:   # a damaged file's error names the file; the config field it came from, too
        if is_model_dir(path):
            loaded = load_model_dir(path)
            ckpt = OfficialCheckpoint(str(path), loaded.model.state_dict(), "model directory")
        else:
            # The teacher of a distillation file (its model_noun) is what init.load_noun means there.
            ckpt = read_official(path, network="teacher" if teacher else "model")
    except CheckpointError as exc:
        raise CheckpointError(f"{field}: {exc}") from None
    is_segm_model = hasattr(model, "detr")
    state = ckpt.state_dict if (is_segm_model or not ckpt.is_segmentation) else ckpt.detector_state_dict()
    if is_segm_model and not ckpt.is_segmentation:
        state = {"detr." + k: v for k, v in state.items()}
    own = model.state_dict()
    projections = [k for k in own if _CONTRASTIVE in k]
    if projections and not any(_CONTRASTIVE in k for k in state):
        # Weights of a model used without contrastive align (a mask stage's model directory, a
        # released segmentation file): those projections only serve a training loss, so they
        # start from this run's initialisation, as the mask stage drops them the other way.
        state = {**state, **{k: own[k] for k in projections}}
        log(f"{field}: {path} has no contrastive-align projections (a model used without them): "
            f"{', '.join(sorted({k.split('.')[-2] for k in projections}))} start from this run's initialisation")
    _load_into(model, state, strict, f"{field} {path} [{ckpt.source_key}]", log)
    return ckpt.train_config


def _load_into(module: nn.Module, state: dict, strict: bool, where: str, log) -> None:
    if strict:
        load_state_dict_strict(module, state, where=where)
        return
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise CheckpointError(f"{where}: no tensor matches the model (wrong file or key prefix?)")
    refuse_non_finite(usable, where)  # lenient about names and shapes, never about values
    for problem in state_dict_problems(module, state):
        log(f"warning: {where}: {problem} (init.strict is false: skipped)")
    module.load_state_dict(usable, strict=False)


class StepModule(nn.Module):
    """One training forward of a stage: images + targets -> model outputs (+ cluster losses).

    Plain / noun / mask stages: ``encode`` -> (``mask_head_distill``: CCR of the pronoun rows
    with the fixed bank) -> ``decode``. Distillation (spec 2.2): teacher encode -> bank update +
    teacher CCR -> teacher decode; student encode -> student CCR + cluster loss -> decode.
    """

    def __init__(self, models: StageModels, stage: str, pronoun: str):
        super().__init__()
        self.model = models.model
        self.teacher = models.teacher
        self.cluster = models.cluster
        self.stage = stage
        self.pronoun = pronoun

    def forward(self, images: ImageBatch, targets: Sequence[dict],
                noun_targets: Optional[Sequence[dict]] = None):
        if self.stage == "distill":
            return self._distill(images, noun_targets, targets)
        captions = [t["caption"] for t in targets]
        memory = self.model.encode(images, captions)
        if self.cluster is not None:  # mask_head_distill: the frozen detector's CCR
            indices = pronoun_token_indices(memory["tokenized"], captions, target_pronouns(targets, self.pronoun))
            memory = self.cluster.inference_step(memory, [int(t["task_id"]) for t in targets], indices)
        return self.model.decode(memory), {}

    def _distill(self, images: ImageBatch, targets_noun: Sequence[dict], targets_sth: Sequence[dict]):
        memory_noun = self.teacher.encode(images, [t["caption"] for t in targets_noun])
        if self.cluster is not None:
            memory_noun = self.cluster.teacher_step(memory_noun, targets_noun)
        outputs_noun = self.teacher.decode(memory_noun)
        memory_sth = self.model.encode(images, [t["caption"] for t in targets_sth])
        cluster_losses: dict[str, Tensor] = {}
        if self.cluster is not None:
            memory_sth, cluster_losses = self.cluster.student_step(memory_sth, targets_sth)
        outputs_sth = self.model.decode(memory_sth)
        return (outputs_noun, outputs_sth), cluster_losses


def build_criterion(cfg: TrainConfig) -> tuple[nn.Module, dict[str, float]]:
    """The stage's criterion and ``weight_dict`` (66 entries for the paper's distillation run)."""
    if cfg.is_distill:
        return DistillationCriterion(cfg.loss, cfg.distill), build_weight_dict(cfg.loss, cfg.distill)
    return SetCriterion(cfg.loss), build_weight_dict(cfg.loss)


def compute_losses(criterion: nn.Module, stage: str, outputs, cluster_losses: dict,
                   targets: Sequence[dict], noun_targets: Optional[Sequence[dict]] = None) -> dict[str, Tensor]:
    if stage == "distill":
        outputs_noun, outputs_sth = outputs
        return criterion(outputs_noun, outputs_sth, noun_targets, targets, cluster_losses)
    losses = criterion(outputs, targets)
    losses.update(cluster_losses)
    return losses


def float_outputs(obj):
    """Model outputs with every floating tensor in float32 (losses run outside autocast)."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: (v if k == "tokenized" else float_outputs(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(float_outputs(v) for v in obj)
    return obj
