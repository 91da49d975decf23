"""Each loss term against a value computed by hand (plain Python) on tiny inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from toist_core.distill.config import DistillConfig
from toist_core.losses.config import LossConfig
from toist_core.losses.contrastive import contrastive_align_loss
from toist_core.losses.criterion import DistillationCriterion, SetCriterion, build_weight_dict, weighted_total
from toist_core.losses.mask_losses import mask_dice_loss, mask_focal_loss
from toist_core.losses.matcher import HungarianMatcher


class FixedMatcher(HungarianMatcher):
    """Returns given matches, to test loss terms independently of the matching."""

    def __init__(self, matches):
        super().__init__()
        self.matches = matches

    def forward(self, outputs, targets):
        return [(torch.tensor(q, dtype=torch.int64), torch.tensor(j, dtype=torch.int64)) for q, j in self.matches]


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _outputs(logits, boxes):
    return {"pred_logits": torch.tensor(logits, dtype=torch.float32),
            "pred_boxes": torch.tensor(boxes, dtype=torch.float32)}


def test_soft_token_cross_entropy_and_boxes_by_hand():
    logits = [[[2.0, 1.0, -1.0, 0.5], [0.0, 0.3, 0.2, 1.5], [1.0, -2.0, 0.0, 0.0]]]
    boxes = [[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]]
    targets = [{"boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]]), "positive_map": torch.tensor([[1.0, 1.0, 0.0, 0.0]])}]
    config = LossConfig(contrastive_align=False, aux_loss=False)
    losses = SetCriterion(config, FixedMatcher([([0], [0])]))(_outputs(logits, boxes), targets)

    lp = [_log_softmax(r) for r in logits[0]]
    # matched query 0: -(log p0 + log p1); unmatched queries 1, 2: 0.1 * -log p_noobj; / 1 box
    expected_ce = -(lp[0][0] + lp[0][1]) + 0.1 * (-lp[1][3]) + 0.1 * (-lp[2][3])
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, abs=1e-6)
    # overlap 0.15 x 0.2 = 0.03, union 0.05, IoU 0.6, hull 0.25 x 0.2 = 0.05 -> GIoU 0.6
    assert losses["loss_giou"].item() == pytest.approx(0.4, abs=1e-6)
    # argmax != no-object: queries 0 and 2 (query 1 argmax is slot 3) -> |2 - 1|
    assert losses["cardinality_error"].item() == pytest.approx(1.0)


def test_losses_divide_by_num_boxes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    boxes = torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2
    pm = torch.zeros(3, 6)
    pm[:, :2] = 1
    targets = [{"boxes": torch.rand(2, 4, generator=g) * 0.3 + 0.2, "positive_map": pm[:2]},
               {"boxes": torch.rand(1, 4, generator=g) * 0.3 + 0.2, "positive_map": pm[2:]}]
    config = LossConfig(contrastive_align=False, aux_loss=False)
    matcher = FixedMatcher([([1, 3], [0, 1]), ([2], [0])])
    losses = SetCriterion(config, matcher)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    src = torch.stack([boxes[0, 1], boxes[0, 3], boxes[1, 2]])
    tgt = torch.cat([targets[0]["boxes"], targets[1]["boxes"]])
    assert losses["loss_bbox"].item() == pytest.approx((src - tgt).abs().sum().item() / 3, rel=1e-6)

    # No target at all: the normaliser is clamped at 1, every matched term is 0.
    empty = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 6)}] * 2
    losses = SetCriterion(config)({"pred_logits": logits, "pred_boxes": boxes}, empty)
    lp = logits.log_softmax(-1)
    assert losses["loss_ce"].item() == pytest.approx((0.1 * -lp[..., -1]).sum().item(), rel=1e-6)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


def test_contrastive_align_by_hand():
    q = [[0.6, 0.8], [1.0, 0.0]]
    t = [[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]]
    tau = 0.07
    logit = [[sum(a * b for a, b in zip(qq, tt)) / tau for tt in t] for qq in q]
    lse = lambda xs: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))
    eps = 1e-6
    # query 0 matched to a box whose tokens are {0, 1}
    b2t = -(logit[0][0] + logit[0][1]) / (2 + eps) + lse(logit[0])
    t2b = sum(-logit[0][k] / (1 + eps) + lse([logit[0][k], logit[1][k]]) for k in (0, 1))
    expected = (b2t + t2b) / 2 / 1.0

    positive = torch.zeros(1, 2, 3, dtype=torch.bool)
    positive[0, 0, :2] = True
    got = contrastive_align_loss(torch.tensor([q]), torch.tensor([t]), positive, 1.0, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # Through the criterion: the positive tokens come from the matched box's positive map.
    pm = torch.zeros(1, 8)
    pm[0, :2] = 1
    outputs = {"pred_logits": torch.zeros(1, 2, 8), "pred_boxes": torch.full((1, 2, 4), 0.3),
               "proj_queries": torch.tensor([q]), "proj_tokens": torch.tensor([t])}
    targets = [{"boxes": torch.full((1, 4), 0.3), "positive_map": pm}]
    losses = SetCriterion(LossConfig(aux_loss=False), FixedMatcher([([0], [0])]))(outputs, targets)
    assert losses["loss_contrastive_align"].item() == pytest.approx(expected, rel=1e-5)


def _focal_by_hand(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return alpha_t * ce * (1 - p_t) ** gamma


def test_focal_and_dice_by_hand():
    x = [[2.0, -1.0, 0.5, 0.0], [-3.0, 1.0, 1.0, 2.0]]
    t = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    focal = sum(sum(_focal_by_hand(a, b) for a, b in zip(xr, tr)) / 4 for xr, tr in zip(x, t)) / 2
    assert mask_focal_loss(torch.tensor(x), torch.tensor(t), 2.0).item() == pytest.approx(focal, rel=1e-6)

    dice = 0.0
    for xr, tr in zip(x, t):
        p = [1 / (1 + math.exp(-v)) for v in xr]
        dice += 1 - (2 * sum(a * b for a, b in zip(p, tr)) + 1) / (sum(p) + sum(tr) + 1)
    assert mask_dice_loss(torch.tensor(x), torch.tensor(t), 2.0).item() == pytest.approx(dice / 2, rel=1e-6)


def test_mask_losses_upsample_to_padded_target_size():
    # Constant predictions stay constant when bilinearly upsampled, so the value is known.
    pred_masks = torch.full((2, 3, 2, 2), 0.5)
    pred_masks[1, 2] = -1.0
    gt0 = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt0[0, :2, :2] = True  # 4 of the 16 pixels
    gt1 = torch.ones(1, 2, 3, dtype=torch.bool)  # smaller image: padded with zeros to 4 x 4
    targets = [{"boxes": torch.full((1, 4), 0.3), "positive_map": torch.ones(1, 8), "masks": gt0},
               {"boxes": torch.full((1, 4), 0.3), "positive_map": torch.ones(1, 8), "masks": gt1}]
    outputs = {"pred_logits": torch.zeros(2, 3, 8), "pred_boxes": torch.full((2, 3, 4), 0.3), "pred_masks": pred_masks}
    config = LossConfig(aux_loss=False, contrastive_align=False, masks=True)
    losses = SetCriterion(config, FixedMatcher([([0], [0]), ([2], [0])]))(outputs, targets)

    focal0 = (4 * _focal_by_hand(0.5, 1) + 12 * _focal_by_hand(0.5, 0)) / 16
    focal1 = (6 * _focal_by_hand(-1.0, 1) + 10 * _focal_by_hand(-1.0, 0)) / 16
    assert losses["loss_mask"].item() == pytest.approx((focal0 + focal1) / 2, rel=1e-5)
    p0, p1 = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))
    dice0 = 1 - (2 * 4 * p0 + 1) / (16 * p0 + 4 + 1)
    dice1 = 1 - (2 * 6 * p1 + 1) / (16 * p1 + 6 + 1)
    assert losses["loss_dice"].item() == pytest.approx((dice0 + dice1) / 2, rel=1e-5)


def _random_outputs(g, batch=2, queries=6, tokens=256, text_len=7, layers=6, masks=False, requires_grad=True):
    def layer():
        out = {"pred_logits": torch.randn(batch, queries, tokens, generator=g),
               "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.4 + 0.1,
               "proj_queries": F.normalize(torch.randn(batch, queries, 64, generator=g), dim=-1),
               "proj_tokens": F.normalize(torch.randn(batch, text_len, 64, generator=g), dim=-1)}
        for v in out.values():
            v.requires_grad_(requires_grad)
        return out
    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(layers - 1)]
    if masks:
        outputs["pred_masks"] = torch.randn(batch, queries, 4, 5, generator=g).requires_grad_(requires_grad)
    return outputs


def _targets(g, counts, tokens=256, masks=False):
    out = []
    for n in counts:
        pm = torch.zeros(n, tokens)
        pm[:, 1:4] = 1
        t = {"boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.2, "positive_map": pm,
             "labels": torch.ones(n, dtype=torch.int64)}
        if masks:
            t["masks"] = torch.rand(n, 16, 20, generator=g) > 0.5
        out.append(t)
    return out


def test_aux_keys_and_finite_without_targets():
    g = torch.Generator().manual_seed(3)
    outputs = _random_outputs(g, masks=True)
    criterion = SetCriterion(LossConfig(masks=True))
    for counts in ([0, 0], [2, 0]):
        losses = criterion(outputs, _targets(g, counts, masks=True))
        base = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "loss_contrastive_align"]
        expected = set(base + ["loss_mask", "loss_dice"]) | {f"{k}_{i}" for k in base for i in range(5)}
        assert set(losses) == expected
        for key, value in losses.items():
            assert torch.isfinite(value).all(), key
        total = weighted_total(losses, build_weight_dict(LossConfig(masks=True)))
        total.backward()
        assert torch.isfinite(outputs["pred_logits"].grad).all()
        outputs["pred_logits"].grad = None


def test_aux_layer_uses_its_own_outputs():
    g = torch.Generator().manual_seed(4)
    outputs = _random_outputs(g)
    targets = _targets(g, [2, 1])
    losses = SetCriterion()(outputs, targets)
    aux2 = SetCriterion(LossConfig(aux_loss=False))(outputs["aux_outputs"][2], targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_contrastive_align"):
        assert losses[f"{key}_2"].item() == pytest.approx(aux2[key].item(), rel=1e-6)


def test_weight_dict_plain_and_distillation():
    plain = build_weight_dict(LossConfig())
    assert len(plain) == 4 * 6
    assert plain["loss_bbox"] == 5 and plain["loss_giou_4"] == 2 and plain["loss_contrastive_align_0"] == 1
    assert "cardinality_error" not in plain

    weights = build_weight_dict(LossConfig(), DistillConfig())
    assert len(weights) == 66
    assert weights["noun_loss_bbox"] == 5 and weights["sth_loss_giou_3"] == 2 and weights["noun_loss_ce_0"] == 1
    assert weights["loss_softkd"] == 50 and weights["loss_softkd_4"] == 50
    assert weights["loss_cluster_feature"] == 1e4 and weights["loss_cluster_choice_2"] == 0
    assert "loss_bbox" not in weights and "noun_loss_softkd" not in weights

    no_sbtl = build_weight_dict(LossConfig(), DistillConfig(sbtl=0))
    assert not any("softkd" in k for k in no_sbtl) and len(no_sbtl) == 60
    no_bank = build_weight_dict(LossConfig(), DistillConfig(ccr=False, cluster_loss=0))
    assert not any("cluster" in k for k in no_bank)
    seg = build_weight_dict(LossConfig(masks=True, aux_loss=False, contrastive_align=False))
    assert seg == {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_mask": 1, "loss_dice": 1}


def test_distillation_criterion_prefixes_and_merges():
    g = torch.Generator().manual_seed(5)
    noun, sth = _random_outputs(g), _random_outputs(g)
    targets = _targets(g, [1, 0])
    cluster = {"loss_cluster_feature": torch.tensor(0.5), "loss_cluster_choice": torch.tensor(0.0)}
    losses = DistillationCriterion()(noun, sth, targets, targets, cluster)
    weights = build_weight_dict(LossConfig(), DistillConfig())
    plain = SetCriterion()(sth, targets)
    assert losses["sth_loss_ce_1"].item() == pytest.approx(plain["loss_ce_1"].item())
    assert {"loss_softkd"} | {f"loss_softkd_{i}" for i in range(5)} <= set(losses)
    assert losses["loss_cluster_feature"].item() == 0.5
    # every weighted key is produced except the never-computed aux copies of the cluster losses
    missing = set(weights) - set(losses)
    assert missing == {f"loss_cluster_{k}_{i}" for k in ("feature", "choice") for i in range(5)}
    assert torch.isfinite(weighted_total(losses, weights))
