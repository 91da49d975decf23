"""What stops a training run, and what a run refuses, before anything wrong reaches a checkpoint:
non-finite model outputs or gradients, a resume whose optimizer settings the checkpoint would
override, a validation task without images; and the memory bank resuming exactly."""

import json
import math

import pytest
import torch
import yaml

from test_train_run import _config, synth_root  # noqa: F401  (synth_root: the module-scoped fixture)
from toist_core.checkpoint import CheckpointError
from training.checkpointing import load_training_checkpoint
from training.distributed import DistEnv
from training.evaluate import in_holdout
from training.loops import Trainer

HOLDOUT = 0.25


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_gradient_stops_before_the_step_and_keeps_the_last_checkpoint(synth_root, tmp_path):
    """A finite loss with a NaN gradient (an overflow in backward): the run stops in that update,
    before the optimizer step, and checkpoint.pth stays the previous update's."""
    out = tmp_path / "run"
    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, out, "checkpoint.every_steps=1",
                              "schedule.max_steps=4"), DistEnv())
    weight = trainer.model.class_embed.weight
    weight.register_hook(lambda grad: grad * float("nan") if trainer.step == 1 else grad)
    saved = {}
    trainer.on_step = lambda t, step: saved.setdefault(step, {k: v.clone() for k, v in t.model.state_dict().items()})
    with pytest.raises(FloatingPointError, match=r"gradient norm not finite in update 2 \(process 0: \{'model': nan\}"):
        trainer.run()
    assert trainer.step == 1 and _all_finite(trainer.model.state_dict()) and _all_finite(trainer.ema.state_dict())
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 1 and _all_finite(ckpt["model"])
    assert all(torch.equal(ckpt["model"][k], v) for k, v in saved[1].items())


def test_non_finite_outputs_stop_before_the_matcher(synth_root, tmp_path):
    """NaN predictions (an fp16 overflow, a diverged model) end the run with the loop's
    FloatingPointError naming the tensors, not with the matcher's ValueError."""
    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "run", "schedule.max_steps=3"), DistEnv())
    decode = trainer.model.decode

    def poisoned(memory):
        outputs = decode(memory)
        if trainer.step == 1:
            outputs["pred_boxes"] = outputs["pred_boxes"] * float("nan")
        return outputs

    trainer.model.decode = poisoned
    with pytest.raises(FloatingPointError, match=r"model outputs not finite in update 2 \(process 0: NaN/inf in "
                                                 r"pred_boxes\)"):
        trainer.run()


def test_resume_refuses_changed_optimizer_settings_before_writing(synth_root, tmp_path):
    """The checkpoint's optimizer state holds lr / weight decay and would silently win over the
    config, which config.yaml would then misreport: refused, each field with both values."""
    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1"), DistEnv()).run()
    ckpt = out / "checkpoint.pth"
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    changed = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2", "optim.lr=1e-3",
                      "optim.weight_decay=0.05", "optim.clip_max_norm=0.2")
    with pytest.raises(CheckpointError) as info:
        Trainer(changed, DistEnv(), resume=str(ckpt))
    message = str(info.value)
    assert "optim.lr: checkpoint 0.0001, config 0.001" in message
    assert "optim.weight_decay: checkpoint 0.0001, config 0.05" in message
    assert "clip_max_norm" not in message          # read from the config at every update: may change
    assert f"init.load={ckpt}" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 1e-4
    # The same optimizer settings resume (other settings may change).
    same = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2", "optim.clip_max_norm=0.2")
    assert Trainer(same, DistEnv(), resume=str(ckpt)).run().step == 2


def _holdout_root(synth_root, root, task_1_targets: bool):
    """The synthetic set with none of task 2's images in the holdout (and, unless
    ``task_1_targets``, no preferred object in task 1's holdout images)."""
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(synth_root / "images")
    for task in (1, 2):
        data = json.loads((synth_root / "annotations" / f"task_{task}_train.json").read_text())
        if task == 2:
            data["images"] = [im for im in data["images"] if not in_holdout(im["id"], HOLDOUT, 0)]
            kept = {im["id"] for im in data["images"]}
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
        elif not task_1_targets:
            data["annotations"] = [a for a in data["annotations"]
                                   if a["category_id"] != 1 or not in_holdout(a["image_id"], HOLDOUT, 0)]
        (root / "annotations" / f"task_{task}_train.json").write_text(json.dumps(data))
    return root


def test_holdout_without_images_for_a_task_is_evaluated_without_it(synth_root, tmp_path):
    """A task none of whose images falls into the holdout: its AP is n/a (-1), mAP is the other
    task's, and evaluation neither crashes nor keeps the update's checkpoint from being written.
    With no validation target at all the mAP is n/a, which never counts as the best."""
    for task_1_targets in (True, False):
        root = _holdout_root(synth_root, tmp_path / f"synth{task_1_targets}", task_1_targets)
        out = tmp_path / f"run{task_1_targets}"
        logged = []
        trainer = Trainer(_config("tiny_pronoun.yaml", root, out, "eval.enabled=true",
                                  f"eval.holdout_fraction={HOLDOUT}", "eval.every_steps=1", "schedule.max_steps=2",
                                  "checkpoint.every_steps=1"), DistEnv(), log=logged.append)
        assert trainer.val.image_ids[1] and trainer.val.image_ids[2] == []
        assert any("no holdout image for task(s) [2]" in line for line in logged)
        result = trainer.run()
        assert result.metrics["AP50/bbox/task_2"] == -1.0
        assert load_training_checkpoint(out / "checkpoint.pth")["step"] == 2
        if task_1_targets:
            assert result.metrics["mAP50/bbox"] == result.metrics["AP50/bbox/task_1"] >= 0
            assert result.best["step"] in (1, 2) and (out / "BEST_checkpoint.pth").exists()
        else:
            assert result.metrics["AP50/bbox/task_1"] == -1.0 and math.isnan(result.metrics["mAP50/bbox"])
            assert result.best is None and not (out / "BEST_checkpoint.pth").exists()
            assert any("mAP50/bbox = n/a" in line for line in logged)


def test_distillation_resume_restores_which_centres_are_current(synth_root, tmp_path):
    """k-means with few iterations moves centres each time it runs again
    (tests/test_memory_bank.py), so the resumed bank must re-cluster exactly the tasks the
    interrupted one would: the checkpoint keeps the bank's stale flags beside its reference keys.
    A checkpoint without them (older files) resumes as before: every task stale."""
    distill = ["init.load=null", "init.load_noun=null", "distill.bank_size=3", "distill.kmeans_max_iter=1",
               "schedule.max_steps=2"]
    out = tmp_path / "run"
    first = Trainer(_config("tiny_distill.yaml", synth_root, out, *distill), DistEnv())
    first.run()
    saved = first.cluster.bank.stale_flags()
    assert not saved.any()   # every update re-clusters every stale task at once ("on_change")
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert torch.equal(ckpt["cluster_stale"], saved)
    cfg = _config("tiny_distill.yaml", synth_root, out, *distill)
    resumed = Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth"))
    assert torch.equal(resumed.cluster.bank.stale_flags(), saved)
    del ckpt["cluster_stale"]
    torch.save(ckpt, tmp_path / "older.pth")
    older = Trainer(cfg, DistEnv(), resume=str(tmp_path / "older.pth"))
    assert older.cluster.bank.stale_flags().all()


def test_clip_grad_norm_reports_the_norm_with_and_without_clipping():
    """The loop's finite check reads the norm also when clipping is off (optim.clip_max_norm 0)."""
    from torch import nn

    from training.optim import clip_grad_norm

    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    expected = 2.0 * math.sqrt(sum(p.numel() for p in model.parameters()))
    assert float(clip_grad_norm(model, 0.0)) == pytest.approx(expected)
    assert all(bool((p.grad == 2.0).all()) for p in model.parameters())  # 0: not clipped
    assert float(clip_grad_norm(model, 1.0)) == pytest.approx(expected)  # the norm before clipping
    model.weight.grad[0, 0] = float("nan")
    assert math.isnan(float(clip_grad_norm(model, 0.0)))
    assert clip_grad_norm(nn.Linear(1, 1), 0.0) is None  # no gradient yet
