"""Soft binary target loss: binary probabilities, teacher-student pairing, value, gradients."""

import itertools
import math

import pytest
import torch

from toist_core.distill.config import DistillConfig
from toist_core.losses.config import LossConfig
from toist_core.losses.criterion import DistillationCriterion
from toist_core.losses.soft_binary_target import (binary_object_probs, match_unpaired_queries, pair_queries,
                                                  soft_binary_target_loss)
from plain_math import giou_cxcywh


def _match(queries, gts):
    return torch.tensor(queries, dtype=torch.int64), torch.tensor(gts, dtype=torch.int64)


def _binary(row):
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [sum(exps[:-1]) / total, exps[-1] / total]


def test_binary_probabilities_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 3.0]])
    got = binary_object_probs(logits)
    for row, expected in zip(got.tolist(), map(_binary, logits.tolist())):
        assert row == pytest.approx(expected, rel=1e-6)


def test_pairing_on_constructed_case():
    # Teacher matched query 2 to GT 0, student matched query 0 to GT 0. The free queries carry
    # boxes A, B, C (teacher 0, 1, 3) and C, A, B (student 1, 2, 3) with equal probabilities,
    # so the unmatched pairs must be (t0, s2), (t1, s3), (t3, s1).
    a, b, c, x = [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.1, 0.3], [0.5, 0.8, 0.1, 0.1]
    boxes_t = torch.tensor([a, b, x, c])
    boxes_s = torch.tensor([x, c, a, b])
    probs = torch.full((4, 2), 0.5)
    rows_t, rows_s = pair_queries(probs, probs, boxes_t, boxes_s, _match([2], [0]), _match([0], [0]))
    assert (rows_t[0].item(), rows_s[0].item()) == (2, 0)
    assert set(zip(rows_t[1:].tolist(), rows_s[1:].tolist())) == {(0, 2), (1, 3), (3, 1)}


def test_true_positives_are_aligned_by_ground_truth_index():
    boxes = torch.rand(5, 4) * 0.3 + 0.2
    probs = torch.full((5, 2), 0.5)
    rows_t, rows_s = pair_queries(probs, probs, boxes, boxes, _match([1, 3], [1, 0]), _match([0, 2], [0, 1]))
    # GT 0: teacher query 3 <-> student query 0; GT 1: teacher 1 <-> student 2
    assert rows_t[:2].tolist() == [3, 1] and rows_s[:2].tolist() == [0, 2]
    assert sorted(rows_t.tolist()) == list(range(5)) and sorted(rows_s.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="different ground-truth"):
        pair_queries(probs, probs, boxes, boxes, _match([1], [1]), _match([0], [0]))


def test_more_boxes_than_queries_pairs_the_boxes_both_matched():
    """With 5 boxes and 3 queries each matcher keeps its own 3 boxes: the boxes both kept pair
    through their index, the other matched queries are paired like unmatched ones."""
    a, b, c = [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.1, 0.3]
    boxes_t = torch.tensor([a, b, c])
    boxes_s = torch.tensor([c, b, a])
    probs = torch.full((3, 2), 0.5)
    # Teacher: q0 -> GT 4, q1 -> GT 1, q2 -> GT 3. Student: q0 -> GT 2, q1 -> GT 4, q2 -> GT 1.
    rows_t, rows_s = pair_queries(probs, probs, boxes_t, boxes_s, _match([0, 1, 2], [4, 1, 3]),
                                  _match([0, 1, 2], [2, 4, 1]))
    # GT 1: teacher q1 <-> student q2; GT 4: teacher q0 <-> student q1; left: teacher q2 <-> student q0
    # (the same box c, which the Hungarian pairing finds).
    assert rows_t.tolist() == [1, 0, 2] and rows_s.tolist() == [2, 1, 0]
    # Fewer matches than queries means every box was matched: then the sets must agree.
    with pytest.raises(ValueError, match="different ground-truth"):
        pair_queries(probs, probs, boxes_t, boxes_s, _match([0, 1], [4, 1]), _match([0, 1], [2, 4]))


def test_criterion_takes_more_boxes_than_queries():
    torch.manual_seed(0)
    num_queries, num_logits = 3, 256
    positive_map = torch.zeros(5, num_logits)
    positive_map[:, :3] = 1
    targets = [{"boxes": torch.rand(5, 4) * 0.5 + 0.2, "positive_map": positive_map}]
    criterion = DistillationCriterion(LossConfig(contrastive_align=False, aux_loss=False, num_decoder_layers=1))
    for _ in range(10):  # random outputs: the two matchers keep different boxes on most draws
        teacher, student = ({"pred_logits": torch.randn(1, num_queries, num_logits),
                             "pred_boxes": torch.rand(1, num_queries, 4) * 0.5 + 0.1} for _ in range(2))
        losses = criterion(teacher, student, targets, targets)
        assert torch.isfinite(losses["loss_softkd"])


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


_giou = giou_cxcywh


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unpaired_matching_is_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    n = 5
    bt = binary_object_probs(torch.randn(n, 6, generator=g) * 2)
    bs = binary_object_probs(torch.randn(n, 6, generator=g) * 2)
    boxes_t = torch.rand(n, 4, generator=g) * 0.4 + 0.1
    boxes_s = torch.rand(n, 4, generator=g) * 0.4 + 0.1
    rows, cols = match_unpaired_queries(bt, bs, boxes_t, boxes_s)
    cost = [[_kl(bt[t].tolist(), bs[s].tolist())
             + sum(abs(x - y) for x, y in zip(boxes_s[s].tolist(), boxes_t[t].tolist()))
             - _giou(boxes_s[s].tolist(), boxes_t[t].tolist()) for t in range(n)] for s in range(n)]
    best = min(sum(cost[s][perm[s]] for s in range(n)) for perm in itertools.permutations(range(n)))
    assert sum(cost[s][t] for s, t in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-5)


def test_loss_value_by_hand_and_teacher_gets_no_gradient():
    logits_t = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]],
                             [[0.5, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    logits_s = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, -1.0, 3.0]],
                             [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]], requires_grad=True)
    # Boxes make the free-query pairing unambiguous (identical boxes pair up).
    base = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.7, 0.1, 0.2]])
    boxes_t = torch.stack([base, base])
    boxes_s = torch.stack([base, base[[2, 0, 1]]])  # image 1: student q0 has teacher q2's box, ...
    matches_t = [_match([0], [0]), _match([], [])]
    matches_s = [_match([1], [0]), _match([], [])]
    loss = soft_binary_target_loss({"pred_logits": logits_t, "pred_boxes": boxes_t},
                                   {"pred_logits": logits_s, "pred_boxes": boxes_s}, matches_t, matches_s)

    bt = [[_binary(r) for r in img] for img in logits_t.tolist()]
    bs = [[_binary(r) for r in img] for img in logits_s.tolist()]
    # image 0: TP (t0, s1); free teacher {1, 2}, free student {0, 2}; t2 and s2 share a box,
    # so the pairing is (t2, s2), (t1, s0).
    img0 = (_kl(bt[0][0], bs[0][1]) + _kl(bt[0][2], bs[0][2]) + _kl(bt[0][1], bs[0][0])) / 3
    # image 1: no GT; student q0 at base[2] (teacher 2), q1 at base[0] (teacher 0), q2 at base[1].
    img1 = (_kl(bt[1][2], bs[1][0]) + _kl(bt[1][0], bs[1][1]) + _kl(bt[1][1], bs[1][2])) / 3
    assert loss.item() == pytest.approx((img0 + img1) / 2, rel=1e-5)

    loss.backward()
    assert logits_t.grad is None
    assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0


def _layer(g, batch, queries, tokens=256):
    return {"pred_logits": torch.randn(batch, queries, tokens, generator=g),
            "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.4 + 0.1}


def test_criterion_applies_sbtl_to_every_layer_with_its_own_matching():
    g = torch.Generator().manual_seed(7)
    teacher, student = _layer(g, 2, 5), _layer(g, 2, 5)
    teacher["aux_outputs"] = [_layer(g, 2, 5) for _ in range(5)]
    student["aux_outputs"] = [_layer(g, 2, 5) for _ in range(5)]
    pm = torch.zeros(2, 256)
    pm[:, :3] = 1
    targets = [{"boxes": torch.rand(2, 4, generator=g) * 0.3 + 0.2, "positive_map": pm},
               {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 256)}]
    criterion = DistillationCriterion(LossConfig(contrastive_align=False), DistillConfig())
    losses = criterion(teacher, student, targets, targets)
    matcher = criterion.set_criterion.matcher
    for i in range(5):
        t, s = teacher["aux_outputs"][i], student["aux_outputs"][i]
        expected = soft_binary_target_loss(t, s, matcher(t, targets), matcher(s, targets))
        assert losses[f"loss_softkd_{i}"].item() == pytest.approx(expected.item(), rel=1e-6)
    final_t = {k: v for k, v in teacher.items() if k != "aux_outputs"}
    final_s = {k: v for k, v in student.items() if k != "aux_outputs"}
    expected = soft_binary_target_loss(final_t, final_s, matcher(final_t, targets), matcher(final_s, targets))
    assert losses["loss_softkd"].item() == pytest.approx(expected.item(), rel=1e-6)

    no_sbtl = DistillationCriterion(LossConfig(contrastive_align=False), DistillConfig(sbtl=0))
    off = no_sbtl(teacher, student, targets, targets)
    assert not any("softkd" in k for k in off)
