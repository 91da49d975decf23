"""Soft binary target loss (SBTL): the student mimics the teacher's object / no-object belief.

Per query, the 256-way softmax ``P`` is reduced to ``b = [sum_{c < 255} P_c, P_255]``
([object, no-object]). Per image, teacher and student queries are paired:

* queries that the ordinary matcher assigned to a ground-truth box ("TP") are paired through
  that box: teacher query of GT ``j`` with student query of GT ``j``;
* the remaining queries ("FP") are paired by a second Hungarian matching, rows = student,
  columns = teacher, cost ``KL(b_T || b_S) + ||box_S - box_T||_1 - GIoU(box_S, box_T)``
  (all weights 1, as the reference ``softkd_matcher``).

``L_img = kl_div(log b_S, b_T, 'batchmean')`` over the ``Q`` pairs (i.e. divided by ``Q``),
and the loss is the mean over images. Teacher probabilities are detached.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from .matcher import Match


def binary_object_probs(logits: Tensor) -> Tensor:
    """``[..., C]`` logits -> ``[..., 2]`` = [sum of token-slot probabilities, no-object probability]."""
    prob = logits.softmax(-1)
    return torch.cat([prob[..., :-1].sum(-1, keepdim=True), prob[..., -1:]], dim=-1)


def _safe_log(prob: Tensor) -> Tensor:
    # A probability that underflowed to 0 would give log 0 = -inf (the reference then yields
    # inf / NaN); clamping at the smallest normal float changes nothing for positive values.
    return prob.clamp_min(torch.finfo(prob.dtype).tiny).log()


@torch.no_grad()
def match_unpaired_queries(bin_teacher: Tensor, bin_student: Tensor, boxes_teacher: Tensor,
                           boxes_student: Tensor) -> tuple[Tensor, Tensor]:
    """Hungarian pairing of student rows with teacher rows (the reference ``softkd_matcher``).

    ``bin_* [n, 2]``, ``boxes_* [n, 4]`` (cx, cy, w, h). Cost ``[n_student, n_teacher]``:
    ``sum_c b_T[t,c] (log b_T[t,c] - log b_S[s,c]) + L1(box_S[s], box_T[t]) - GIoU``.
    Returns ``(student_rows, teacher_cols)`` int64 CPU tensors.
    """
    kl = (bin_teacher[None] * (_safe_log(bin_teacher)[None] - _safe_log(bin_student)[:, None])).sum(-1)
    l1 = torch.cdist(boxes_student, boxes_teacher, p=1)
    giou = generalized_box_iou(box_convert(boxes_student, "cxcywh", "xyxy"),
                               box_convert(boxes_teacher, "cxcywh", "xyxy"))
    cost = (kl + l1 - giou).float().cpu()
    if not torch.isfinite(cost).all():
        raise ValueError("soft binary target matcher: non-finite cost (NaN/inf predicted boxes or logits)")
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _by_target(match: Match, targets: Tensor) -> Tensor:
    """Query indices of a match for the ground-truth indices ``targets`` (sorted), in their order."""
    queries, gts = match
    order = torch.argsort(gts)
    queries, gts = queries[order], gts[order]
    return queries[torch.isin(gts, targets)]


def pair_queries(bin_teacher: Tensor, bin_student: Tensor, boxes_teacher: Tensor, boxes_student: Tensor,
                 match_teacher: Match, match_student: Match) -> tuple[Tensor, Tensor]:
    """Pair the ``Q`` queries of one image: ``(teacher_rows [Q], student_rows [Q])``.

    The first pairs follow the ground-truth index, the rest the Hungarian pairing of the
    unmatched queries. With more ground-truth boxes than queries each model's matcher keeps
    its own subset of them (the reference assumes ``Q >= n_gt``): only the boxes both matched
    pair through their index, the other matched queries join the Hungarian pairing. With
    ``Q >= n_gt`` both match every box and this is the reference's pairing.
    """
    num_queries = bin_teacher.shape[0]
    if bin_student.shape[0] != num_queries:
        raise ValueError(f"soft binary target loss: teacher has {num_queries} queries, student {bin_student.shape[0]}")
    gts_t, gts_s = match_teacher[1].sort().values, match_student[1].sort().values
    if not torch.equal(gts_t, gts_s) and not len(gts_t) == len(gts_s) == num_queries:
        # Both matched fewer boxes than queries, so each matched every box it was given.
        raise ValueError(f"soft binary target loss: teacher and student matched different ground-truth boxes "
                         f"({gts_t.tolist()} vs {gts_s.tolist()}); both must see the same targets")
    common = gts_t[torch.isin(gts_t, gts_s)]
    tp_teacher, tp_student = _by_target(match_teacher, common), _by_target(match_student, common)

    device = bin_teacher.device
    free_teacher = torch.ones(num_queries, dtype=torch.bool)
    free_teacher[tp_teacher] = False
    free_student = torch.ones(num_queries, dtype=torch.bool)
    free_student[tp_student] = False
    fp_teacher = free_teacher.nonzero().squeeze(1)
    fp_student = free_student.nonzero().squeeze(1)
    rows_s, cols_t = match_unpaired_queries(bin_teacher[fp_teacher.to(device)], bin_student[fp_student.to(device)],
                                            boxes_teacher[fp_teacher.to(device)], boxes_student[fp_student.to(device)])
    teacher_rows = torch.cat([tp_teacher, fp_teacher[cols_t]])
    student_rows = torch.cat([tp_student, fp_student[rows_s]])
    return teacher_rows, student_rows


def soft_binary_target_loss(outputs_teacher: dict, outputs_student: dict, matches_teacher: Sequence[Match],
                            matches_student: Sequence[Match]) -> Tensor:
    """SBTL of one decoder layer.

    ``outputs_*``: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``; ``matches_*``: the
    ordinary matcher's ``(query_idx, gt_idx)`` per image for that layer and model.
    """
    bin_teacher = binary_object_probs(outputs_teacher["pred_logits"].detach())
    bin_student = binary_object_probs(outputs_student["pred_logits"])
    boxes_teacher = outputs_teacher["pred_boxes"].detach()
    boxes_student = outputs_student["pred_boxes"].detach()
    num_images = bin_student.shape[0]
    if num_images == 0:
        return outputs_student["pred_logits"].sum() * 0
    total = bin_student.new_zeros(())
    for b in range(num_images):
        rows_t, rows_s = pair_queries(bin_teacher[b], bin_student[b], boxes_teacher[b], boxes_student[b],
                                      matches_teacher[b], matches_student[b])
        target = bin_teacher[b][rows_t.to(bin_teacher.device)]
        log_student = _safe_log(bin_student[b][rows_s.to(bin_student.device)])
        total = total + F.kl_div(log_student, target, reduction="batchmean")
    return total / num_images
