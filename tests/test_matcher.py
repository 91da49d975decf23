"""Hungarian matcher: cost formula and optimality against brute force."""

import itertools
import math

import pytest
import torch

from toist_core.losses.matcher import HungarianMatcher, matching_cost
from plain_math import giou_cxcywh


_giou = giou_cxcywh


def _cost(logits, box, target_box, positive):
    """The reference cost of one (query, box) pair, in plain Python."""
    exps = [math.exp(v) for v in logits]
    prob = [e / sum(exps) for e in exps]
    class_term = -sum(p for p, pos in zip(prob, positive) if pos)
    l1 = sum(abs(x - y) for x, y in zip(box, target_box))
    return 5 * l1 + 1 * class_term - 2 * _giou(box, target_box)


def _random_case(generator, num_queries, num_boxes, num_tokens=8):
    logits = torch.randn(num_queries, num_tokens, generator=generator) * 2
    boxes = torch.rand(num_queries, 4, generator=generator) * 0.4 + 0.1
    target_boxes = torch.rand(num_boxes, 4, generator=generator) * 0.4 + 0.1
    positive = (torch.rand(num_boxes, num_tokens, generator=generator) > 0.6).float()
    positive[:, -1] = 0  # never the no-object slot
    return logits, boxes, target_boxes, positive


def test_cost_matrix_equals_hand_formula():
    logits, boxes, target_boxes, positive = _random_case(torch.Generator().manual_seed(1), 4, 3)
    cost = matching_cost(logits, boxes, target_boxes, positive)
    for q in range(4):
        for j in range(3):
            expected = _cost(logits[q].tolist(), boxes[q].tolist(), target_boxes[j].tolist(), positive[j].tolist())
            assert cost[q, j].item() == pytest.approx(expected, abs=1e-5)


def test_identical_box_costs_minus_class_minus_two():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    positive = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # L1 = 0, GIoU = 1, class = -(0.25 + 0.25): 5*0 - 0.5 - 2*1
    assert matching_cost(logits, box, box, positive).item() == pytest.approx(-2.5)


@pytest.mark.parametrize("seed,num_queries,num_boxes", [(0, 4, 2), (1, 5, 3), (2, 5, 5), (3, 6, 1), (4, 3, 3)])
def test_matcher_reaches_brute_force_optimum(seed, num_queries, num_boxes):
    g = torch.Generator().manual_seed(seed)
    logits, boxes, target_boxes, positive = _random_case(g, num_queries, num_boxes)
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
    targets = [{"boxes": target_boxes, "positive_map": positive}]
    (queries, gts), = HungarianMatcher()(outputs, targets)

    pair = [[_cost(logits[q].tolist(), boxes[q].tolist(), target_boxes[j].tolist(), positive[j].tolist())
             for j in range(num_boxes)] for q in range(num_queries)]
    best = min(sum(pair[q][j] for j, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_boxes))
    got = sum(pair[q][j] for q, j in zip(queries.tolist(), gts.tolist()))
    assert got == pytest.approx(best, abs=1e-5)
    assert sorted(gts.tolist()) == list(range(num_boxes))
    assert len(set(queries.tolist())) == num_boxes
    assert queries.dtype == torch.int64 and queries.tolist() == sorted(queries.tolist())


def test_batch_with_empty_image_and_more_boxes_than_queries():
    g = torch.Generator().manual_seed(5)
    logits, boxes, target_boxes, positive = _random_case(g, 2, 3)
    outputs = {"pred_logits": torch.stack([logits, logits]), "pred_boxes": torch.stack([boxes, boxes])}
    targets = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 8)},
               {"boxes": target_boxes, "positive_map": positive}]
    matches = HungarianMatcher()(outputs, targets)
    assert matches[0][0].numel() == 0 and matches[0][1].numel() == 0
    assert len(matches[1][0]) == 2  # min(Q, n)


def test_matcher_errors_name_the_problem():
    logits, boxes, target_boxes, positive = _random_case(torch.Generator().manual_seed(6), 3, 2)
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
    with pytest.raises(KeyError, match="positive_map"):
        HungarianMatcher()(outputs, [{"boxes": target_boxes}])
    with pytest.raises(ValueError, match="positive_map"):
        HungarianMatcher()(outputs, [{"boxes": target_boxes, "positive_map": positive[:, :5]}])
    bad = {"pred_logits": logits[None], "pred_boxes": boxes[None].clone().fill_(float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher()(bad, [{"boxes": target_boxes, "positive_map": positive}])
