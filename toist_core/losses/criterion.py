"""Set criterion: matching + loss terms for one model, and the teacher/student version.

Loss keys (MDETR/TOIST names): ``loss_ce``, ``loss_bbox``, ``loss_giou``,
``cardinality_error`` (logging only), ``loss_contrastive_align`` (when on), ``loss_mask`` /
``loss_dice`` (segmentation, last layer only); auxiliary decoder layer ``i`` repeats the
non-mask terms with the suffix ``_i`` (its own matching). The distillation criterion prefixes
the teacher's terms with ``noun_`` and the student's with ``sth_`` and adds
``loss_softkd`` (+ ``_i``) and the cluster losses. ``build_weight_dict`` gives the weights.

All terms are divided by the number of target boxes averaged over processes (>= 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import dist
from ..distill.config import DistillConfig
from .box_losses import box_giou_loss, box_l1_loss
from .classification import cardinality_error, soft_token_cross_entropy
from .config import LossConfig
from .contrastive import contrastive_align_loss
from .mask_losses import mask_dice_loss, mask_focal_loss, pad_target_masks, upsample_masks
from .matcher import HungarianMatcher, Match
from .soft_binary_target import soft_binary_target_loss

# Losses of the distillation run that compare teacher and student (no noun_/sth_ prefix).
CROSS_LOSSES = ("loss_softkd", "loss_cluster_choice", "loss_cluster_feature")


def _query_index(matches: Sequence[Match]) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
    queries = torch.cat([q for q, _ in matches])
    return batch, queries


def _require(outputs: dict, key: str, why: str) -> Tensor:
    if key not in outputs:
        raise KeyError(f"model outputs have no {key!r} ({why}); keys: {sorted(outputs)}")
    return outputs[key]


def _layers(outputs: dict) -> list[dict]:
    """Per-layer outputs in decoder order: aux layers 0..n-1, then the final layer."""
    final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    return list(outputs.get("aux_outputs") or []) + [final]


class SetCriterion(nn.Module):
    """Hungarian matching and the detection / segmentation losses of one model."""

    def __init__(self, config: Optional[LossConfig] = None, matcher: Optional[HungarianMatcher] = None):
        super().__init__()
        self.config = config or LossConfig()
        self.matcher = matcher or HungarianMatcher(self.config.set_cost_class, self.config.set_cost_bbox,
                                                   self.config.set_cost_giou)

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        return self.compute(outputs, targets)[0]

    def compute(self, outputs: dict, targets: Sequence[dict]) -> tuple[dict[str, Tensor], list[list[Match]]]:
        """Losses and the matches of every layer (aux 0..n-1, then final).

        ``outputs``: see ``toist_core.model`` (``pred_logits [B,Q,256]``, ``pred_boxes
        [B,Q,4]``, ``aux_outputs``, ``proj_queries [B,Q,64]``/``proj_tokens [B,L,64]``,
        ``pred_masks [B,Q,h,w]``). ``targets[b]``: ``boxes [n,4]``, ``positive_map [n,256]``,
        ``masks [n,H,W]`` for the mask losses.
        """
        logits = outputs["pred_logits"]
        num_boxes = dist.average_num_boxes(sum(len(t["boxes"]) for t in targets), logits.device)
        layers = _layers(outputs)
        if not self.config.aux_loss:
            layers = layers[-1:]
        losses: dict[str, Tensor] = {}
        all_matches = []
        for i, layer in enumerate(layers):
            is_final = i == len(layers) - 1
            matches = self.matcher(layer, targets)
            all_matches.append(matches)
            terms = self.layer_losses(layer, targets, matches, num_boxes, with_masks=is_final and self.config.masks)
            suffix = "" if is_final else f"_{i}"
            losses.update({k + suffix: v for k, v in terms.items()})
        return losses, all_matches

    def layer_losses(self, outputs: dict, targets: Sequence[dict], matches: Sequence[Match], num_boxes: float,
                     with_masks: bool = False) -> dict[str, Tensor]:
        """The loss terms of one decoder layer for given matches."""
        cfg = self.config
        logits = outputs["pred_logits"]
        device = logits.device
        index = _query_index(matches)
        index = (index[0].to(device), index[1].to(device))
        positive_rows = torch.cat([t["positive_map"][j.to(t["positive_map"].device)].to(device)
                                   for t, (_, j) in zip(targets, matches)])
        losses = {"loss_ce": soft_token_cross_entropy(logits, index, positive_rows, num_boxes, cfg.eos_coef)}

        src_boxes = outputs["pred_boxes"][index]
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)].to(src_boxes)
                                  for t, (_, j) in zip(targets, matches)])
        losses["loss_bbox"] = box_l1_loss(src_boxes, target_boxes, num_boxes)
        losses["loss_giou"] = box_giou_loss(src_boxes, target_boxes, num_boxes)

        num_targets = torch.as_tensor([len(t["boxes"]) for t in targets], device=device)
        losses["cardinality_error"] = cardinality_error(logits, num_targets)

        if with_masks:
            losses.update(self._mask_losses(outputs, targets, matches, num_boxes))
        if cfg.contrastive_align:
            losses["loss_contrastive_align"] = self._contrastive_loss(outputs, matches, index, positive_rows, num_boxes)
        return losses

    def _contrastive_loss(self, outputs: dict, matches: Sequence[Match], index: tuple[Tensor, Tensor],
                          positive_rows: Tensor, num_boxes: float) -> Tensor:
        why = "contrastive_align is on in LossConfig"
        proj_queries = _require(outputs, "proj_queries", why)
        proj_tokens = _require(outputs, "proj_tokens", why)
        num_tokens = proj_tokens.shape[1]
        # The box's token positives are its positive-map row (built from tokens_positive with
        # the same char->token fallbacks as the reference's contrastive map), cut to L tokens.
        positive = torch.zeros(proj_queries.shape[:2] + (num_tokens,), dtype=torch.bool, device=proj_queries.device)
        positive[index] = positive_rows[:, :num_tokens] > 0
        return contrastive_align_loss(proj_queries, proj_tokens, positive, num_boxes, self.config.temperature)

    def _mask_losses(self, outputs: dict, targets: Sequence[dict], matches: Sequence[Match],
                     num_boxes: float) -> dict[str, Tensor]:
        pred_masks = _require(outputs, "pred_masks", "masks is on in LossConfig")
        for b, t in enumerate(targets):
            if "masks" not in t:
                raise KeyError(f"targets[{b}] has no 'masks' (needed by the mask losses; keys: {sorted(t)})")
        target_masks = pad_target_masks([t["masks"].to(pred_masks.device) for t in targets])
        device = pred_masks.device
        batch, queries = (i.to(device) for i in _query_index(matches))
        gts = torch.cat([j for _, j in matches]).to(device)
        # Predictions (1/4 resolution) are upsampled to the padded ground-truth size.
        src = upsample_masks(pred_masks[batch, queries], tuple(target_masks.shape[-2:])).flatten(1)
        tgt = target_masks[batch, gts].flatten(1).to(src)
        return {
            "loss_mask": mask_focal_loss(src, tgt, num_boxes, self.config.focal_alpha, self.config.focal_gamma),
            "loss_dice": mask_dice_loss(src, tgt, num_boxes),
        }


class DistillationCriterion(nn.Module):
    """Teacher (noun caption) and student (pronoun caption) losses plus SBTL.

    Produces ``noun_<key>`` and ``sth_<key>`` for every ``SetCriterion`` key, ``loss_softkd``
    and ``loss_softkd_<i>`` (when ``distill.sbtl > 0``; layer ``i`` pairs use the matches of
    that layer), and merges the cluster losses of ``ClusterModule.student_step``.
    """

    def __init__(self, loss_config: Optional[LossConfig] = None, distill_config: Optional[DistillConfig] = None,
                 matcher: Optional[HungarianMatcher] = None):
        super().__init__()
        self.set_criterion = SetCriterion(loss_config, matcher)
        self.distill_config = distill_config or DistillConfig()

    def forward(self, outputs_noun: dict, outputs_sth: dict, targets_noun: Sequence[dict],
                targets_sth: Sequence[dict], cluster_losses: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        noun_losses, noun_matches = self.set_criterion.compute(outputs_noun, targets_noun)
        sth_losses, sth_matches = self.set_criterion.compute(outputs_sth, targets_sth)
        losses = {f"noun_{k}": v for k, v in noun_losses.items()}
        losses.update({f"sth_{k}": v for k, v in sth_losses.items()})
        if self.distill_config.sbtl > 0:
            if len(noun_matches) != len(sth_matches):
                raise ValueError(f"teacher has {len(noun_matches)} decoder layers with outputs, student "
                                 f"{len(sth_matches)}: SBTL pairs them layer by layer")
            noun_layers = _layers(outputs_noun)[-len(noun_matches):]
            sth_layers = _layers(outputs_sth)[-len(sth_matches):]
            for i, (out_n, out_s, m_n, m_s) in enumerate(zip(noun_layers, sth_layers, noun_matches, sth_matches)):
                suffix = "" if i == len(noun_matches) - 1 else f"_{i}"
                losses["loss_softkd" + suffix] = soft_binary_target_loss(out_n, out_s, m_n, m_s)
        if cluster_losses:
            losses.update(cluster_losses)
        return losses


def build_weight_dict(config: Optional[LossConfig] = None, distill: Optional[DistillConfig] = None) -> dict[str, float]:
    """Loss key -> weight, as the reference's ``build`` (``_0.._{n-1}`` for the aux layers).

    With ``distill`` (a distillation run): per-model keys get ``noun_``/``sth_`` prefixes, and
    ``loss_softkd`` (``distill.sbtl``, when > 0) plus ``loss_cluster_choice`` (0) and
    ``loss_cluster_feature`` (``distill.cluster_loss``, when the memory bank is used) are
    added. The reference suffixes every key for the aux layers, also those only computed on
    the last layer; the paper's distillation run has 66 entries.
    """
    cfg = config or LossConfig()
    weights = {"loss_ce": cfg.ce_loss_coef, "loss_bbox": cfg.bbox_loss_coef}
    if cfg.contrastive_align:
        weights["loss_contrastive_align"] = cfg.contrastive_align_loss_coef
    if distill is not None and distill.sbtl > 0:
        weights["loss_softkd"] = distill.sbtl
    if distill is not None and distill.uses_bank:
        weights["loss_cluster_choice"] = 0.0
        weights["loss_cluster_feature"] = distill.cluster_loss
    weights["loss_giou"] = cfg.giou_loss_coef
    if cfg.masks:
        weights["loss_mask"] = cfg.mask_loss_coef
        weights["loss_dice"] = cfg.dice_loss_coef

    if distill is not None:
        prefixed = {}
        for key, value in weights.items():
            if key in CROSS_LOSSES:
                prefixed[key] = value
            else:
                prefixed["noun_" + key] = value
                prefixed["sth_" + key] = value
        weights = prefixed
    aux = {}
    for i in range(cfg.num_aux_layers):
        aux.update({f"{key}_{i}": value for key, value in weights.items()})
    weights.update(aux)
    return weights


def weighted_total(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """``sum_k losses[k] * weight_dict[k]`` over the keys present in both."""
    terms = [losses[k] * weight_dict[k] for k in losses if k in weight_dict]
    if not terms:
        raise ValueError(f"no loss key has a weight: losses {sorted(losses)}, weights {sorted(weight_dict)}")
    return torch.stack([t.reshape(()) for t in terms]).sum()
