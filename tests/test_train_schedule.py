"""Learning-rate schedule and parameter groups of the training recipe."""

import pytest
from torch import nn

from training.optim import build_optimizer, group_kind
from training.schedule import LRSchedule


class _Named(nn.Module):
    """Parameters named like the reference model's three groups, plus a frozen one."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.transformer = nn.Module()
        self.transformer.text_encoder = nn.Linear(2, 2)
        self.transformer.decoder = nn.Linear(2, 2)
        self.class_embed = nn.Linear(2, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_group_kind_by_name():
    assert group_kind("backbone.0.body.layer2.0.conv1.weight") == "backbone"
    assert group_kind("detr.backbone.0.body.conv1.weight") == "backbone"
    assert group_kind("transformer.text_encoder.encoder.layer.0.attention.self.query.weight") == "text_encoder"
    assert group_kind("transformer.resizer.fc.weight") == "rest"
    assert group_kind("mask_head.lay1.weight") == "rest"


def test_optimizer_groups_student_and_teacher():
    student, teacher = _Named(), _Named()
    opt = build_optimizer(student, lr=5e-5, lr_backbone=1e-5, text_encoder_lr=2e-5, weight_decay=1e-4,
                          teacher=teacher)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["rest", "backbone", "text_encoder", "teacher/rest", "teacher/backbone", "teacher/text_encoder"]
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-5, 2e-5] * 2
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(student.frozen.weight) not in ids and id(teacher.frozen.weight) not in ids
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in student.backbone.parameters()}
    assert {id(p) for p in opt.param_groups[5]["params"]} == {id(p) for p in teacher.transformer.text_encoder.parameters()}
    # rest = decoder + class head (4 tensors), nothing else.
    assert len(opt.param_groups[0]["params"]) == 4


def test_optimizer_refuses_fully_frozen_model():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(model, 1e-4, 1e-5, 1e-5)


def test_step_drop_and_text_encoder_warmup_decay():
    steps_per_epoch, epochs, lr_drop = 10, 20, 7
    sched = LRSchedule(steps_per_epoch, epochs, lr_drop, warmup_fraction=0.01)
    total = steps_per_epoch * epochs
    assert sched.total_steps == total and sched.warmup_steps == round(0.01 * total) == 2
    # x0.1 every lr_drop epochs, by the epoch of the update.
    assert sched.factor("rest", 0) == 1.0
    assert sched.factor("rest", 7 * steps_per_epoch - 1) == 1.0
    assert sched.factor("backbone", 7 * steps_per_epoch) == pytest.approx(0.1)
    assert sched.factor("rest", 14 * steps_per_epoch) == pytest.approx(0.01)
    # Text encoder: 0, 1/2, then 1 at the end of warm-up, linear to 0 at the end of the run.
    assert sched.factor("text_encoder", 0) == 0.0
    assert sched.factor("text_encoder", 1) == pytest.approx(0.5)
    assert sched.factor("text_encoder", 2) == pytest.approx(1.0)
    mid = (2 + total) // 2
    assert sched.factor("text_encoder", mid) == pytest.approx((total - mid) / (total - 2))
    assert sched.factor("text_encoder", total) == 0.0
    decay = [sched.factor("text_encoder", s) for s in range(2, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_apply_sets_group_rates_and_is_a_function_of_the_step():
    model = _Named()
    opt = build_optimizer(model, lr=1.0, lr_backbone=0.5, text_encoder_lr=2.0)
    sched = LRSchedule(steps_per_epoch=5, epochs=30, lr_drop=7, warmup_fraction=0.1)
    sched.apply(opt, 40)  # epoch 8: one drop; warm-up (15 steps) done
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["rest"] == pytest.approx(0.1)
    assert lrs["backbone"] == pytest.approx(0.05)
    assert lrs["text_encoder"] == pytest.approx(2.0 * (150 - 40) / (150 - 15))
    sched.apply(opt, 3)
    assert opt.param_groups[2]["lr"] == pytest.approx(2.0 * 3 / 15)
    assert opt.param_groups[0]["lr"] == 1.0


def test_schedule_compatibility_check():
    sched = LRSchedule(10, 5, 2)
    sched.check_compatible(sched.state_dict())
    other = LRSchedule(11, 5, 2).state_dict()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sched.check_compatible(other)
    with pytest.raises(ValueError, match="lr_drop"):
        LRSchedule(10, 5, 0)


def test_schedule_mismatch_names_config_fields_and_the_differing_entries():
    """The refusal named `lr_drop` / `epochs`, which are no config keys: `schedule.` is part of the name."""
    from training.schedule import ScheduleMismatch

    sched = LRSchedule(10, 5, 2)
    with pytest.raises(ScheduleMismatch) as info:
        sched.check_compatible(LRSchedule(10, 5, 3).state_dict(), "ckpt.pth")
    assert str(info.value) == ("ckpt.pth: learning-rate schedule differs from the configuration (schedule.lr_drop: "
                               "checkpoint 3 vs config 2); exact resume needs the same schedule")
    assert info.value.keys == ["lr_drop"]
    with pytest.raises(ScheduleMismatch) as info:
        sched.check_compatible(LRSchedule(10, 6, 2).state_dict())
    assert "schedule.epochs: checkpoint 6 vs config 5; total_steps (steps_per_epoch x schedule.epochs)" in str(info.value)
    assert info.value.keys == ["epochs", "total_steps", "warmup_steps"]
