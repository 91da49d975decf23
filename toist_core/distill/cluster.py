"""The distillation steps between the two forward phases (reference ``ClusterCriterion``).

Training step (``memory = model.encode(...)``, then one of these, then ``model.decode(memory)``):

* ``teacher_step(memory_noun, targets_noun)``: per non-empty image, the noun feature
  ``f = mean over boxes of (mean over the box's noun-span tokens of text_memory)``
  (detached); the features of all processes are all-gathered with their task indices and
  pushed into the bank; then (CCR) every noun-span token row of the decoder's copy of the
  memory is replaced by the centre of the image's task nearest to ``f``.
* ``student_step(memory_sth, targets_sth)``: per image, the pronoun feature ``p`` (mean over
  the pronoun's token rows, *with* gradient), its nearest centre ``c`` of the image's task,
  CCR of the pronoun rows with ``c`` and the cluster loss ``mean_b MSE(p_b, c_b)``.
* ``inference_step(memory, task_ids, pronoun_token_indices)``: CCR of the pronoun rows only.

The memory dict is the model's encode cache: ``text_memory [L, B, D]``, ``img_memory
[S, B, D]``, ``tokenized``. The steps return a shallow copy with ``img_memory_mod`` added
(when CCR is on); the decoder reads it instead of ``img_memory``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import dist
from ..tokens import span_token_indices
from .ccr import replace_token_rows
from .config import DistillConfig
from .memory_bank import MemoryBank


def _require(memory: dict, key: str) -> Tensor:
    if key not in memory:
        raise KeyError(f"memory cache has no {key!r} (keys: {sorted(memory)})")
    return memory[key]


def _task_index(target: dict, b: int, num_tasks: int) -> int:
    if "task_id" not in target:
        raise KeyError(f"targets[{b}] has no 'task_id' (needed to pick the task's memory bank)")
    task_id = int(target["task_id"])
    if not 1 <= task_id <= num_tasks:
        raise ValueError(f"targets[{b}]['task_id'] = {task_id}: expected 1..{num_tasks}")
    return task_id - 1


def mean_token_features(text_memory: Tensor, token_indices: Sequence[Sequence[int]]) -> Tensor:
    """``[B, D]``: mean of ``text_memory [L, B, D]`` over the token rows of each sample
    (zeros for a sample without tokens). Keeps the gradient."""
    rows = []
    for b, indices in enumerate(token_indices):
        if len(indices) == 0:
            rows.append(text_memory.new_zeros(text_memory.shape[-1]))
        else:
            rows.append(text_memory[list(indices), b].mean(0))
    return torch.stack(rows)


def noun_features(memory: dict, targets: Sequence[dict]) -> tuple[Tensor, list[list[int]], Tensor]:
    """Teacher noun features of a batch.

    Returns ``features [B, D]`` (detached; per image the mean over its boxes of the mean of
    ``text_memory`` over each box's ``noun_tokens_positive`` tokens), ``token_indices`` (per
    image, the union of its noun-span tokens) and ``valid [B]`` bool: the image has a box
    whose noun span maps to at least one token (others get a zero feature).
    """
    # In fp32 whatever autocast made of the encoder's output: the bank keeps fp32 features.
    text = _require(memory, "text_memory").detach().float()
    tokenized = _require(memory, "tokenized")
    features = text.new_zeros((text.shape[1], text.shape[2]))
    valid = torch.zeros(text.shape[1], dtype=torch.bool)
    union: list[list[int]] = []
    for b, target in enumerate(targets):
        spans_per_box = target.get("noun_tokens_positive", []) if len(target["boxes"]) > 0 else []
        per_box, tokens = [], set()
        for spans in spans_per_box:
            indices = [t for t in span_token_indices(tokenized, b, spans) if t < text.shape[0]]
            if indices:  # the reference would average zero rows here and get NaN
                per_box.append(text[indices, b].mean(0))
                tokens.update(indices)
        if per_box:
            features[b] = torch.stack(per_box).mean(0)
            valid[b] = True
        union.append(sorted(tokens))
    return features, union, valid


def pronoun_token_indices(tokenized, captions: Sequence[str], pronouns: Union[str, Sequence[str]]) -> list[list[int]]:
    """Token indices of the pronoun in each caption: its last occurrence as a whole word (the
    pronoun ends the caption; a short pronoun such as "it" may also occur inside the verb
    phrase, "sit", or as a word of it). ``pronouns``: one word for every caption, or each
    caption's own (a task vocabulary may give a task its own pronoun)."""
    words = [pronouns] * len(captions) if isinstance(pronouns, str) else list(pronouns)
    if len(words) != len(captions):
        raise ValueError(f"{len(words)} pronouns for {len(captions)} captions")
    result = []
    for b, (caption, pronoun) in enumerate(zip(captions, words)):
        matches = list(re.finditer(rf"(?<!\w){re.escape(pronoun)}(?!\w)", caption)) if pronoun else []
        if not matches:
            raise ValueError(f"caption {b} {caption!r} does not contain the pronoun {pronoun!r}")
        begin = matches[-1].start()
        indices = span_token_indices(tokenized, b, [(begin, begin + len(pronoun))])
        if not indices:
            raise ValueError(f"caption {b} {caption!r}: the pronoun {pronoun!r} maps to no token")
        result.append(indices)
    return result


def target_pronouns(targets: Sequence[dict], default: str) -> list[str]:
    """Each target's pronoun (``"pronoun"``, set by the data set's pronoun captions), else ``default``."""
    return [target.get("pronoun") or default for target in targets]


class ClusterModule(nn.Module):
    """Memory bank + k-means + CCR + cluster loss. ``self.bank`` holds all the state; save it
    as ``checkpoint["cluster_criterion"] = module.bank.state_dict()`` (reference keys)."""

    def __init__(self, config: Optional[DistillConfig] = None):
        super().__init__()
        self.config = cfg = config or DistillConfig()
        self.bank = MemoryBank(num_tasks=cfg.num_tasks, size=cfg.bank_size, dim=cfg.feature_dim,
                               num_clusters=cfg.num_clusters, update=cfg.update, seed=cfg.seed, tol=cfg.kmeans_tol,
                               max_iter=cfg.kmeans_max_iter, rerun=cfg.kmeans_rerun)

    def _centre(self, task: int, query: Tensor) -> Tensor:
        """k-means of the task (stored), then the centre nearest to ``query [D]``: a copy (a view
        of the stored centres changed under a caller that kept it when a later sample of the same
        task re-ran k-means, ``kmeans_rerun: every_use``)."""
        centres = self.bank.cluster(task)
        return centres[self.bank.nearest_centre_index(task, query.detach())[0]].clone()

    def teacher_step(self, memory: dict, targets: Sequence[dict]) -> dict:
        """Push the batch's noun features (of all processes) into the bank; teacher CCR.

        Not under ``no_grad``: the untouched rows of ``img_memory_mod`` keep their gradient
        to the teacher's encoder (the teacher is trained by its own losses).
        """
        features, token_indices, valid = noun_features(memory, targets)
        tasks = torch.full((len(targets),), -1, dtype=torch.int64)
        for b in valid.nonzero().squeeze(1).tolist():
            tasks[b] = _task_index(targets[b], b, self.config.num_tasks)
        # [f | task] rows of the non-empty images, gathered so that every process applies
        # the same update (the reference gathers fixed-size rows tagged -1 when empty).
        packed = torch.cat([features, tasks.to(features).unsqueeze(1)], dim=1)[valid.to(features.device)]
        gathered = dist.all_gather_variable(packed)
        self.bank.update(gathered[:, :-1], gathered[:, -1].round().long())

        memory = dict(memory)
        if self.config.ccr:
            values = features.clone()
            for b in valid.nonzero().squeeze(1).tolist():
                values[b] = self._centre(int(tasks[b]), features[b]).to(values)
            chosen = [token_indices[b] if valid[b] else [] for b in range(len(targets))]
            img_memory = _require(memory, "img_memory")
            memory["img_memory_mod"] = replace_token_rows(img_memory, memory["text_memory"].shape[0], chosen, values)
        return memory

    def student_step(self, memory: dict, targets: Sequence[dict]) -> tuple[dict, dict[str, Tensor]]:
        """Pronoun CCR and the cluster loss ``{'loss_cluster_feature', 'loss_cluster_choice'}``."""
        if not self.config.uses_bank:
            return memory, {}
        text = _require(memory, "text_memory")
        captions = []
        for b, target in enumerate(targets):
            if "caption" not in target:
                raise KeyError(f"targets[{b}] has no 'caption' (needed to find the pronoun)")
            captions.append(target["caption"])
        token_indices = pronoun_token_indices(_require(memory, "tokenized"), captions,
                                              target_pronouns(targets, self.config.pronoun))
        # [B, D], with gradient; fp32 under autocast too (the loss is weighted 1e4: in bf16 it and
        # its gradient kept ~3 significant digits).
        pronoun = mean_token_features(text.float(), token_indices)
        centres = []
        for b, target in enumerate(targets):
            centres.append(self._centre(_task_index(target, b, self.config.num_tasks), pronoun[b]).to(pronoun))
        centres = torch.stack(centres)  # constants: buffers, no gradient
        # F.mse_loss per image (mean over the D dims), then mean over the batch.
        loss = ((pronoun - centres) ** 2).mean(1).mean()
        memory = dict(memory)
        if self.config.ccr:
            memory["img_memory_mod"] = replace_token_rows(_require(memory, "img_memory"), text.shape[0],
                                                          token_indices, centres)
        return memory, {"loss_cluster_choice": loss.new_zeros(()), "loss_cluster_feature": loss}

    def inference_step(self, memory: dict, task_ids: Sequence[Optional[int]],
                       pronoun_token_indices: Sequence[Sequence[int]]) -> dict:
        """CCR of the pronoun rows with the nearest centre of each image's task.

        ``task_ids``: 1-based COCO-Tasks ids, ``None`` for a caption without a task (left
        untouched, as are images with no pronoun tokens). Uses the stored bank; k-means is
        warm-started from the stored centres when the bank is full.
        """
        if not self.config.ccr:
            return memory
        text = _require(memory, "text_memory")
        if len(task_ids) != text.shape[1] or len(pronoun_token_indices) != text.shape[1]:
            raise ValueError(f"inference_step: {len(task_ids)} task ids and {len(pronoun_token_indices)} index lists "
                             f"for a batch of {text.shape[1]}")
        chosen = [list(ix) if task_id is not None else [] for task_id, ix in zip(task_ids, pronoun_token_indices)]
        pronoun = mean_token_features(text.detach().float(), chosen)   # fp32 under autocast, as the segmenter's CCR
        values = pronoun.clone()
        for b, task_id in enumerate(task_ids):
            if task_id is None or not chosen[b]:
                continue
            if not 1 <= int(task_id) <= self.config.num_tasks:
                raise ValueError(f"inference_step: task id {task_id} of image {b} not in 1..{self.config.num_tasks}")
            values[b] = self._centre(int(task_id) - 1, pronoun[b]).to(values)
        memory = dict(memory)
        memory["img_memory_mod"] = replace_token_rows(_require(memory, "img_memory"), text.shape[0], chosen, values)
        return memory
