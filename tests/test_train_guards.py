"""What stops a training run, and what a run refuses, before anything wrong reaches a checkpoint:
non-finite model outputs or gradients, a resume whose optimizer settings the checkpoint would
override, a validation task without images; and the memory bank resuming exactly."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_train_run import CONFIGS, FAST, _config, synth_root  # noqa: F401  (synth_root: the module-scoped fixture)
from toist_core.checkpoint import CheckpointError
from training.checkpointing import load_training_checkpoint
from training.config import config_to_dict
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


def test_a_run_stopped_for_nan_ends_in_one_error_line_not_a_traceback(synth_root, tmp_path, monkeypatch, capsys):
    """The trainer's FloatingPointError (and k-means' on a bank holding NaN) went through both
    command lines' error handling (ValueError, OSError, RuntimeError) as a traceback."""
    import training.loops as loops
    from toist_core import cli
    from training.train import main as train_main

    compute = loops.compute_losses

    def poisoned(*args, **kwargs):
        losses = compute(*args, **kwargs)
        losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(loops, "compute_losses", poisoned)
    config = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_pronoun.yaml")
    overrides = [f"data.root={synth_root}", *FAST, "schedule.max_steps=2"]
    assert train_main(["--config", config, f"output_dir={tmp_path / 'a'}"] + overrides) == 2
    assert "train: error: loss not finite in update 1" in capsys.readouterr().err
    assert cli.main(["train", "--config", config, f"output_dir={tmp_path / 'b'}"] + overrides) == 2
    assert "toist train: error: loss not finite in update 1" in capsys.readouterr().err


def test_a_non_finite_loss_term_stops_the_update_naming_the_terms(synth_root, tmp_path, monkeypatch):
    """Finite outputs, a NaN loss term (a log of 0 in a loss): the run stops before backward,
    naming the terms. Without this check fp32 runs stopped later, blaming the gradient; fp16's
    scaler would have skipped the update without a word."""
    import training.loops as loops

    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "run", "schedule.max_steps=3"), DistEnv())
    compute = loops.compute_losses

    def poisoned(*args, **kwargs):
        losses = compute(*args, **kwargs)
        if trainer.step == 1:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(loops, "compute_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss not finite in update 2 \(process 0: terms \{.*'loss_giou': nan"):
        trainer.run()
    assert trainer.step == 1 and _all_finite(trainer.model.state_dict())


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


def test_a_diverged_teacher_stops_the_distillation_update_naming_it(synth_root, tmp_path):
    """NaN noun features of the teacher reach the memory bank inside the forward, before the
    loop looks at the outputs: the run ended with k-means' or scipy's error, without the update
    or a word of what was kept. Now the loop's FloatingPointError, with the update."""
    out = tmp_path / "run"
    trainer = Trainer(_config("tiny_distill.yaml", synth_root, out, "init.load=null", "init.load_noun=null",
                              "distill.bank_size=3", "distill.num_clusters=2", "schedule.max_steps=4",
                              "checkpoint.every_steps=1"), DistEnv())
    encode = trainer.teacher.encode

    def poisoned(images, captions):
        memory = encode(images, captions)
        if trainer.step == 1:
            memory = dict(memory, text_memory=memory["text_memory"] * float("nan"))
        return memory

    trainer.teacher.encode = poisoned
    bank = trainer.cluster.bank
    before = {}
    trainer.on_step = lambda t, step: before.update({k: v.clone() for k, v in bank.state_dict().items()})
    with pytest.raises(FloatingPointError, match=r"^update 2: MemoryBank.update: \d+ of the \d+ noun feature rows "
                                                 r"hold NaN/inf .*the bank is left as it was; stopped before its "
                                                 r"optimizer step and before any checkpoint of it"):
        trainer.run()
    assert trainer.step == 1 and all(torch.equal(before[k], v) for k, v in bank.state_dict().items())
    assert load_training_checkpoint(out / "checkpoint.pth")["step"] == 1


def _poison_moments(optimizer) -> None:
    """NaN in every first moment of the optimizer (a damaged file, a diverged run's state)."""
    for moments in optimizer.state.values():
        moments["exp_avg"].fill_(float("nan"))


def test_weights_made_non_finite_by_the_step_never_replace_the_last_checkpoint(synth_root, tmp_path):
    """Finite gradients, NaN optimizer moments: the step makes the weights NaN; the checkpoint of
    that update is refused and checkpoint.pth stays the previous, good update's."""
    out = tmp_path / "run"
    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, out, "checkpoint.every_steps=1",
                              "schedule.max_steps=4"), DistEnv())
    trainer.on_step = lambda t, step: _poison_moments(t.optimizer) if step == 1 else None
    with pytest.raises(FloatingPointError, match=r"weights not finite after update 2: .*checkpoint.pth is left as it was"):
        trainer.run()
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 1 and _all_finite(ckpt["model"]) and _all_finite(ckpt["model_ema"])


@pytest.mark.parametrize("damage", ["model", "model_ema", "optimizer"])
def test_resume_refuses_non_finite_weights_or_moments_before_writing(synth_root, tmp_path, damage):
    """A checkpoint holding NaN (weights, EMA copy or optimizer moments) is refused at resume,
    naming the file, the entry and the tensor, and nothing in the run folder is written."""
    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2"), DistEnv()).run()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    if damage == "optimizer":
        for moments in ckpt["optimizer"]["state"].values():
            moments["exp_avg"].fill_(float("nan"))
        tensor = r"state\.0\.exp_avg"
    else:
        ckpt[damage]["class_embed.weight"][0, 0] = float("nan")
        tensor = r"class_embed\.weight \(1 of"
    damaged = tmp_path / "damaged.pth"
    torch.save(ckpt, damaged)
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CheckpointError, match=rf"damaged\.pth \[{damage}\]: .*non-finite.*{tensor}"):
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=4"), DistEnv(),
                resume=str(damaged))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_a_checkpoint_with_fields_of_the_wrong_kind_is_refused_naming_the_field(synth_root, tmp_path):
    """Hand-edited files, or ones of another version: a `config` string, a `best` without its
    step, optimizer groups without `params`, a step of 3.7 or "abc", a damaged random state failed
    half-way through a resume with a bare AttributeError / KeyError / ValueError (a `best` without
    its step after the run had written config.yaml and tb/), or resumed at update 3."""
    import copy

    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2"), DistEnv()).run()
    good = torch.load(out / "checkpoint.pth", weights_only=True)

    def without_params(ckpt):
        del ckpt["optimizer"]["param_groups"][0]["params"]

    def short_rng(ckpt):
        ckpt["rng"][0]["python"][1] = ckpt["rng"][0]["python"][1][:10]

    edits = {
        "config": (lambda c: c.update(config="oops"), r"\[config\]: a str, not a mapping"),
        "best": (lambda c: c.update(best={"metric": "x"}), r"\[best\]: step None, not a whole number"),
        "params": (without_params, r"\[optimizer\]: param_groups is not a list of groups"),
        "step text": (lambda c: c.update(step="abc"), r"\[step\]: 'abc', not a whole number"),
        "step fraction": (lambda c: c.update(step=3.7), r"\[step\]: 3\.7, not a whole number"),
        "rng": (short_rng, r"\[rng\]\[0\]: not a generator state that restores"),
        "eval_pending": (lambda c: c.update(eval_pending="yes"), r"\[eval_pending\]: 'yes', not true / false"),
    }
    for name, (edit, says) in edits.items():
        ckpt = copy.deepcopy(good)
        edit(ckpt)
        path = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=rf"{path.name} {says}.*nothing was loaded"):
            load_training_checkpoint(path)
    state = random.getstate()
    load_training_checkpoint(out / "checkpoint.pth")   # the trial restore puts the generators back
    assert random.getstate() == state
    # Through a resume: refused before anything in the run folder is written.
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CheckpointError, match=r"best\.pth \[best\]"):
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=4"), DistEnv(),
                resume=str(tmp_path / "best.pth"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_a_fresh_start_keeps_a_config_yaml_no_run_wrote(synth_root, tmp_path):
    """A configuration a user keeps in the output folder was replaced by the run's resolved one
    (comments and all gone); a config.yaml a run wrote is replaced as before."""
    from toist_core.typed_config import ConfigError
    from training.start_checks import check_start

    out = tmp_path / "run"
    out.mkdir()
    mine = "# my settings for the pronoun stage\nstage: pronoun\noptim: {lr: 1.0e-4}\n"
    (out / "config.yaml").write_text(mine)
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1", "eval.enabled=false")
    says = rf"output_dir: {out / 'config.yaml'} exists and was not written by toist train"
    with pytest.raises(ConfigError, match=says):
        check_start(cfg)   # toist train --check
    with pytest.raises(ConfigError, match=says):
        Trainer(cfg, DistEnv())
    assert (out / "config.yaml").read_text() == mine and sorted(p.name for p in out.iterdir()) == ["config.yaml"]

    # A run's own config.yaml (a run stopped before its first checkpoint, here: set up only): a new
    # start replaces it.
    other = tmp_path / "other"
    Trainer(_config("tiny_pronoun.yaml", synth_root, other, "schedule.max_steps=1", "eval.enabled=false"), DistEnv())
    Trainer(_config("tiny_pronoun.yaml", synth_root, other, "schedule.max_steps=1", "eval.enabled=false",
                    "optim.weight_decay=0.001"), DistEnv())
    assert yaml.safe_load((other / "config.yaml").read_text())["optim"]["weight_decay"] == 0.001
    # One a run wrote before the header line existed (every section, resolved): replaced too.
    text = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(text.split("\n", 1)[1])
    assert not text.split("\n", 1)[1].startswith("#")
    Trainer(_config("tiny_pronoun.yaml", synth_root, other, "schedule.max_steps=1", "eval.enabled=false"), DistEnv())
    assert (other / "config.yaml").read_text().startswith("# toist train")


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
    # Nor is the EMA switched off (its weights were dropped from every later checkpoint) or on.
    from training.start_checks import check_start

    without_ema = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2", "optim.ema=false")
    for start in (lambda: Trainer(without_ema, DistEnv(), resume=str(ckpt)), lambda: check_start(without_ema, str(ckpt))):
        with pytest.raises(CheckpointError, match=r"optim.ema: checkpoint True, config False: its EMA weights .* "
                                                  r"would be dropped. Resume with optim.ema=true"):
            start()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
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
    # Resumed with the bank switched off: it was dropped without a word (nothing written since).
    before = (out / "checkpoint.pth").read_bytes()
    without = _config("tiny_distill.yaml", synth_root, out, *distill, "distill.ccr=false", "distill.cluster_loss=0")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth holds a memory bank \(its run used distill\.ccr or "
                                              r"distill\.cluster_loss\), this config uses none .* start a new run"):
        Trainer(without, DistEnv(), resume=str(out / "checkpoint.pth"))
    assert (out / "checkpoint.pth").read_bytes() == before


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


@pytest.mark.parametrize("leftover", ["BEST_checkpoint.pth", "checkpoint_epoch0002.pth"])
def test_fresh_start_refuses_another_runs_checkpoints_not_only_checkpoint_pth(synth_root, tmp_path, leftover):
    """A run that evaluated and crashed before its first checkpoint.pth leaves BEST_checkpoint.pth
    alone; a new run there started, and exported that run's best weights as its model."""
    from toist_core.typed_config import ConfigError
    from training.start_checks import check_start

    out = tmp_path / "run"
    out.mkdir()
    (out / leftover).write_bytes(b"an earlier run's checkpoint")
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1")
    for start in (lambda: Trainer(cfg, DistEnv()), lambda: check_start(cfg)):
        with pytest.raises(ConfigError, match=f"output_dir: {out} already holds {leftover}") as info:
            start()
        if leftover == "BEST_checkpoint.pth":   # nothing to resume
            assert "without a checkpoint.pth to resume" in str(info.value)
        else:
            assert f"--resume {out / leftover}" in str(info.value)
    assert [p.name for p in out.iterdir()] == [leftover]


def test_a_resume_into_another_runs_folder_is_refused_and_into_a_new_one_continues(synth_root, tmp_path):
    """A resume pointed at another run's output_dir (a forgotten --output-dir: the config's own
    holds an earlier run) replaced that run's checkpoint.pth, config.yaml and model; --check said OK.
    A finished run resumed into a new folder trained nothing and failed at the export."""
    from toist_core.typed_config import ConfigError
    from training.start_checks import check_start

    first, second, fork = tmp_path / "first", tmp_path / "second", tmp_path / "fork"
    for out in (first, second):
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1", "eval.enabled=false",
                        "checkpoint.export_model_dir=false"), DistEnv()).run()
    kept = (first / "checkpoint.pth").read_bytes()
    ckpt = str(second / "checkpoint.pth")
    cfg = _config("tiny_pronoun.yaml", synth_root, first, "schedule.max_steps=1", "checkpoint.export_model_dir=true")
    for start in (lambda: Trainer(cfg, DistEnv(), resume=ckpt), lambda: check_start(cfg, ckpt)):
        with pytest.raises(ConfigError, match=f"output_dir: {first} already holds checkpoint.pth of another run "
                                              f"than --resume {ckpt}; continue it in its own folder "
                                              f"\\(--output-dir {second}\\)"):
            start()
    assert (first / "checkpoint.pth").read_bytes() == kept and not (first / "model").exists()
    # In its own folder, or a new one: it continues (here it had finished: the new folder gets its
    # checkpoint and model all the same).
    cfg = _config("tiny_pronoun.yaml", synth_root, fork, "schedule.max_steps=1", "checkpoint.export_model_dir=true")
    check_start(cfg, ckpt)
    assert Trainer(cfg, DistEnv(), resume=ckpt).run().step == 1
    assert (fork / "checkpoint.pth").is_file() and (fork / "model" / "model.safetensors").is_file()
    # The fork is a run of its own: neither folder takes the other's checkpoints for its own.
    forked = load_training_checkpoint(fork / "checkpoint.pth")["run_id"]
    assert forked != load_training_checkpoint(ckpt)["run_id"]
    cfg = _config("tiny_pronoun.yaml", synth_root, second, "schedule.max_steps=1")
    with pytest.raises(ConfigError, match=f"output_dir: {second} already holds checkpoint.pth of another run"):
        Trainer(cfg, DistEnv(), resume=str(fork / "checkpoint.pth"))
    # Files without a run_id (written before runs recorded one) prove nothing: refused as well.
    for path in (first / "checkpoint.pth", second / "checkpoint.pth"):
        state = load_training_checkpoint(path)
        state.pop("run_id")
        torch.save(state, path)
    with pytest.raises(ConfigError, match=f"output_dir: {first} already holds checkpoint.pth of another run"):
        check_start(_config("tiny_pronoun.yaml", synth_root, first, "schedule.max_steps=1"), ckpt)


def test_training_data_without_targets_is_refused_and_a_task_without_them_said(synth_root, tmp_path, capsys):
    """Every object a crowd region (as CVAT may export): the run trained to find nothing, its
    mAP "n/a", without a word about the training data."""
    from toist_core.typed_config import ConfigError

    def crowded(root, tasks):
        (root / "annotations").mkdir(parents=True)
        (root / "images").symlink_to(synth_root / "images")
        for task in (1, 2):
            data = json.loads((synth_root / "annotations" / f"task_{task}_train.json").read_text())
            for ann in data["annotations"]:
                ann["iscrowd"] = int(task in tasks)
            (root / "annotations" / f"task_{task}_train.json").write_text(json.dumps(data))
        return root

    root = crowded(tmp_path / "all", (1, 2))
    with pytest.raises(ConfigError, match=rf"data: the train split of {root} has no object to train on for task\(s\) "
                                          r"\[1, 2\]: no preferred object that is not a crowd region"):
        Trainer(_config("tiny_pronoun.yaml", root, tmp_path / "run"), DistEnv())
    assert not (tmp_path / "run").exists()
    # `toist train --check` said "configuration and paths OK" for it; so it did for a holdout
    # that selects no image of a small dataset (the tiny configs' 0.1 of 2 x 6 images).
    from training.train import main as train_main

    check = ["--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={root}", *FAST,
             f"output_dir={tmp_path / 'run'}", "--check"]
    assert train_main(check) == 2
    assert "has no object to train on for task(s) [1, 2]" in capsys.readouterr().err
    few = ["eval.enabled=true", "eval.split=holdout", "eval.holdout_fraction=0.01"]
    assert train_main(check[:-1] + [f"data.root={synth_root}", *few, "--check"]) == 2
    assert "eval.holdout_fraction: 0.01 of the training images selects none" in capsys.readouterr().err
    assert train_main(check[:-1] + [f"data.root={synth_root}", "--check"]) == 0
    assert "configuration, paths and data OK" in capsys.readouterr().err
    logged = []
    Trainer(_config("tiny_pronoun.yaml", crowded(tmp_path / "one", (2,)), tmp_path / "run"), DistEnv(),
            log=logged.append)
    assert any("task(s) [2] have no object to train on" in line for line in logged), logged
    # Grounding keeps each shared image once, under its first task, and trains on every object:
    # the other tasks counting none there is no problem (the recipe's pretraining said so each run).
    logged.clear()
    Trainer(_config("tiny_grounding.yaml", synth_root, tmp_path / "grounding"), DistEnv(), log=logged.append)
    assert not any("have no object to train on" in line for line in logged), logged


def test_a_caption_longer_than_the_model_reads_stops_the_start_not_its_batch(synth_root, tmp_path):
    """A noun caption naming 40 classes outgrew the 256 token slots: the run died at that image's
    first batch with "caption too long", naming no file."""
    from toist_core.data.schema import DataError

    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(synth_root / "images")
    for task in (1, 2):
        data = json.loads((synth_root / "annotations" / f"task_{task}_train.json").read_text())
        if task == 2:
            image = data["images"][-1]
            data["COCO_categories"] = [{"id": 1000 + k, "name": f"kitchen utensil number {k}"} for k in range(40)]
            data["annotations"] += [{"id": 90000 + k, "image_id": image["id"], "bbox": [2, 2, 10, 10],
                                     "area": 100.0, "iscrowd": 0, "category_id": 1, "COCO_category_id": 1000 + k,
                                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for k in range(40)]
        (root / "annotations" / f"task_{task}_train.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"task_2_train.json: image id {image['id']}: its noun caption is \d+ "
                                        r"tokens, the model reads at most 256"):
        Trainer(_config("tiny_noun.yaml", root, tmp_path / "run"), DistEnv())
    assert not (tmp_path / "run").exists()
    # The same image in the evaluation split: the teacher is scored on its noun caption, and the
    # run stopped at its first evaluation, after the training that led there.
    (root / "annotations" / "task_2_test.json").write_text((root / "annotations" / "task_2_train.json").read_text())
    (root / "annotations" / "task_1_test.json").write_text(
        (synth_root / "annotations" / "task_1_train.json").read_text())
    for task in (1, 2):
        (root / "annotations" / f"task_{task}_train.json").write_text(
            (synth_root / "annotations" / f"task_{task}_train.json").read_text())
    with pytest.raises(DataError, match=rf"task_2_test.json: image id {image['id']}: its noun caption is \d+ "
                                        r"tokens, the model reads at most 256"):
        Trainer(_config("tiny_noun.yaml", root, tmp_path / "run", "eval.enabled=true", "eval.split=test",
                        "data.image_dirs={train: images/train2014, test: images/train2014}"), DistEnv())
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_names_the_field(synth_root, tmp_path):
    from toist_core.typed_config import ConfigError

    cfg = _config("tiny_pronoun.yaml", synth_root, tmp_path / "run", "loader.batch_size=500")
    with pytest.raises(ConfigError, match=r"^loader\.batch_size: batch_size 500 x 1 process\(es\) is larger than "
                                          r"the dataset \(\d+ samples\)"):
        Trainer(cfg, DistEnv())
    assert not (tmp_path / "run").exists()


def test_a_model_folder_of_other_files_is_refused_before_training_not_after(synth_root, tmp_path):
    """<output_dir>/model is replaced whole by the export at the end: a folder of the user's
    files there failed the export after the whole run (exit 2, no model); --check said OK."""
    from toist_core.typed_config import ConfigError
    from training.start_checks import check_start

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1", "checkpoint.export_model_dir=true")
    for start in (lambda: Trainer(cfg, DistEnv()), lambda: check_start(cfg)):
        with pytest.raises(ConfigError, match=rf"output_dir: the run exports its model to {out / 'model'}: not empty "
                                              r"and not a toist model directory .*would delete notes.txt") as info:
            start()
        # Advice a run can take (its export folder is fixed): not "give a new folder, e.g. .../model/model".
        assert "choose another output_dir, or set checkpoint.export_model_dir=false" in str(info.value)
        assert "model/model" not in str(info.value)
    assert sorted(p.name for p in out.rglob("*")) == ["model", "notes.txt"]
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1", "checkpoint.export_model_dir=false")
    check_start(cfg)


def _synth_with_test_split(root):
    from toist_core.data.synth import generate

    generate(root, tasks=[1, 2], splits=("train", "test"), images_per_split=4, min_size=96, max_size=128, seed=3)
    return root


def test_missing_validation_image_is_refused_at_the_start(tmp_path):
    """data.check_images covered the training images only: a missing test image stopped the run at
    the first evaluation, after the training that led there."""
    from toist_core.data.schema import DataError

    root = _synth_with_test_split(tmp_path / "synth")
    task_file = json.loads((root / "annotations" / "task_1_test.json").read_text())
    image = task_file["images"][-1]
    missing = root / "images" / "val2014" / image["file_name"]
    missing.unlink()
    out = tmp_path / "run"
    evaluate_test = ["eval.enabled=true", "eval.split=test", "schedule.max_steps=1"]
    with pytest.raises(DataError) as info:
        Trainer(_config("tiny_pronoun.yaml", root, out, *evaluate_test), DistEnv())
    assert str(info.value).startswith(f"{missing}: validation image file not found (image id {image['id']}, field "
                                      f"'file_name' in {root / 'annotations' / 'task_1_test.json'}; eval.split 'test'")
    assert not out.exists()
    # Only the images evaluation reads are required (eval.max_images keeps the first per task).
    Trainer(_config("tiny_pronoun.yaml", root, out, *evaluate_test, "eval.max_images=1"), DistEnv())
    # A file evaluation could not decode is refused at the start too, as a training image's is.
    from PIL import Image

    first = task_file["images"][0]
    original = root / "images" / "val2014" / first["file_name"]
    with Image.open(original) as picture:
        picture.convert("RGB").save(root / "images" / "val2014" / "first.bmp", format="BMP")
    first["file_name"] = "first.bmp"
    (root / "annotations" / "task_1_test.json").write_text(json.dumps(task_file))
    with pytest.raises(DataError, match=r"first\.bmp: training and evaluation decode JPEG, PNG, GIF and WebP only "
                                        r".*this file is BMP although named \.bmp"):
        Trainer(_config("tiny_pronoun.yaml", root, tmp_path / "bmp", *evaluate_test, "eval.max_images=1"), DistEnv())
    assert not (tmp_path / "bmp").exists()
    # Judged by content, not by name: the JPEG itself named .bmp is read (it was refused by its suffix).
    shutil.copyfile(original, root / "images" / "val2014" / "first.bmp")
    Trainer(_config("tiny_pronoun.yaml", root, tmp_path / "jpeg_named_bmp", *evaluate_test, "eval.max_images=1"),
            DistEnv())


def test_failed_evaluation_keeps_the_update_and_resumes_exactly(synth_root, tmp_path, monkeypatch):
    """An evaluation runs before its update's checkpoint: one that raised lost every update since
    the last checkpoint. Now checkpoint.pth is written first, and a resume from it repeats the
    evaluation and ends as an uninterrupted run does."""
    import training.loops as loops
    from test_train_resume import _assert_same, _comparable

    common = ["eval.enabled=true", "eval.holdout_fraction=0.25", "eval.max_images=2", "eval.every_steps=2",
              "eval.every_epochs=0", "checkpoint.every_steps=0", "checkpoint.per_epoch=false",
              "schedule.max_steps=3", "model.transformer.dropout=0.1"]
    full = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "full", *common), DistEnv())
    full.run()

    evaluate = loops.evaluate
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("validation images unreadable (disk gone)")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loops, "evaluate", failing_once)
    out = tmp_path / "failed"
    logged = []
    with pytest.raises(OSError, match="disk gone"):
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, *common), DistEnv(), log=logged.append).run()
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2 and ckpt["eval_pending"] and ckpt["last_eval_step"] == -1
    assert any(line.startswith("evaluation of update 2 failed (OSError);") for line in logged)

    # A stop signal during the repeated evaluation ends the run there (it trained one more update
    # first); checkpoint.pth then records that evaluation, and the next resume goes on from it.
    class Stop:
        signum = 0

    stop = Stop()

    def stopped_during(*args, **kwargs):
        stop.signum = 2
        return failing_once(*args, **kwargs)

    monkeypatch.setattr(loops, "evaluate", stopped_during)
    torch.manual_seed(12345)   # the resume must restore every random state itself
    logged.clear()
    stopped = Trainer(_config("tiny_pronoun.yaml", synth_root, out, *common), DistEnv(),
                      resume=str(out / "checkpoint.pth"), log=logged.append, stop=stop).run()
    assert any("repeating its evaluation" in line for line in logged)
    assert (stopped.stopped_by, stopped.step) == (2, 2) and len(calls) == 2
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2 and not ckpt["eval_pending"] and ckpt["last_eval_step"] == 2
    monkeypatch.setattr(loops, "evaluate", failing_once)
    torch.manual_seed(54321)
    resumed = Trainer(_config("tiny_pronoun.yaml", synth_root, out, *common), DistEnv(), resume=str(out / "checkpoint.pth"),
                      log=logged.append)
    resumed.run()
    assert len(calls) == 3   # the failed one, update 2 again, update 3 (the last)
    _assert_same(_comparable(full.state()), _comparable(resumed.state()), "resumed after a failed evaluation")
    best = load_training_checkpoint(out / "BEST_checkpoint.pth")
    _assert_same(_comparable(load_training_checkpoint(tmp_path / "full" / "BEST_checkpoint.pth")), _comparable(best),
                 "BEST_checkpoint.pth")


def test_best_starts_over_when_a_resume_scores_on_another_split(tmp_path):
    """A resume with another eval.split compared its scores with the checkpoint's best, scored on
    the other split (and with eval.use_ema changed, with the best of the other weights)."""
    root = _synth_with_test_split(tmp_path / "synth")
    for task in (1, 2):   # a "val" split: the same images under another name
        (root / "annotations" / f"task_{task}_val.json").write_text(
            (root / "annotations" / f"task_{task}_test.json").read_text())
    dirs = "data.image_dirs={train: images/train2014, test: images/val2014, val: images/val2014}"
    common = [dirs, "eval.enabled=true", "eval.every_steps=2", "eval.every_epochs=0",
              "checkpoint.every_steps=2"]
    out = tmp_path / "run"
    first = Trainer(_config("tiny_pronoun.yaml", root, out, *common, "eval.split=test", "schedule.max_steps=2"),
                    DistEnv()).run()
    assert first.best["split"] == "test" and first.best["step"] == 2
    logged = []
    resumed = Trainer(_config("tiny_pronoun.yaml", root, out, *common, "eval.split=val", "schedule.max_steps=4"),
                      DistEnv(), resume=str(out / "checkpoint.pth"), log=logged.append).run()
    assert resumed.best["split"] == "val" and resumed.best["step"] == 4
    assert any(line.startswith("update 4: the best so far (mAP50/bbox = ") and "on 'test', protocol 'toist', ema "
               "weights, update 2) was scored otherwise than this run's mAP50/bbox on 'val', protocol 'toist', ema "
               "weights: the best starts over" in line for line in logged), logged
    # Another eval.protocol: its numbers do not compare either (the best was kept).
    logged.clear()
    again = Trainer(_config("tiny_pronoun.yaml", root, out, *common, "eval.split=val", "eval.protocol=reference",
                            "schedule.max_steps=6"), DistEnv(), resume=str(out / "checkpoint.pth"),
                    log=logged.append).run()
    assert again.best["protocol"] == "reference" and again.best["step"] == 6
    assert any("protocol 'toist', ema weights, update 4) was scored otherwise than this run's mAP50/bbox on 'val', "
               "protocol 'reference', ema weights: the best starts over" in line for line in logged), logged
    # The raw weights instead of the EMA's (eval.use_ema=false): another model's scores.
    logged.clear()
    raw = Trainer(_config("tiny_pronoun.yaml", root, out, *common, "eval.split=val", "eval.protocol=reference",
                          "eval.use_ema=false", "schedule.max_steps=8"), DistEnv(),
                  resume=str(out / "checkpoint.pth"), log=logged.append).run()
    assert raw.best["weights"] == "model" and raw.best["step"] == 8
    assert any("protocol 'reference', ema weights, update 6) was scored otherwise than this run's mAP50/bbox on "
               "'val', protocol 'reference', model weights: the best starts over" in line for line in logged), logged
    # Resumed back to the EMA with nothing left to train (no evaluation to start the best over):
    # the export took BEST_checkpoint.pth's EMA weights, which no evaluation had chosen.
    logged.clear()
    Trainer(_config("tiny_pronoun.yaml", root, out, *common, "eval.split=val", "eval.protocol=reference",
                    "schedule.max_steps=8", "checkpoint.export_model_dir=true"), DistEnv(),
            resume=str(out / "checkpoint.pth"), log=logged.append).run()
    assert any("the best (update 8) was chosen on the model weights, this run exports the ema weights "
               "(eval.use_ema): exporting checkpoint.pth" in line for line in logged), logged


def test_schedule_refusal_names_the_field_and_says_what_follows_from_the_data(synth_root, tmp_path):
    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1"), DistEnv()).run()
    ckpt = str(out / "checkpoint.pth")
    with pytest.raises(CheckpointError) as info:
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.lr_drop=3"), DistEnv(), resume=ckpt)
    assert "(schedule.lr_drop: checkpoint 20 vs config 3)" in str(info.value)
    assert "Updates per epoch" not in str(info.value) and "init.load" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.epochs=31"), DistEnv(), resume=ckpt)
    assert "(schedule.epochs: checkpoint 30 vs config 31; total_steps" in str(info.value)
    assert "Updates per epoch" not in str(info.value)
    with pytest.raises(CheckpointError) as info:
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "loader.batch_size=4"), DistEnv(), resume=ckpt)
    assert "loader.batch_size: checkpoint 2, config 4: it sets the updates per epoch" in str(info.value)
    # `toist train --check` gives the refusals the start gives (it said "configuration and paths OK").
    from training.start_checks import check_start

    for override, says in (("schedule.lr_drop=3", "(schedule.lr_drop: checkpoint 20 vs config 3)"),
                           ("schedule.epochs=31", "(schedule.epochs: checkpoint 30 vs config 31; total_steps"),
                           ("schedule.warmup_fraction=0.2", "warmup_steps (schedule.warmup_fraction x total_steps)"),
                           ("loader.batch_size=4", "loader.batch_size: checkpoint 2, config 4")):
        with pytest.raises(CheckpointError) as info:
            check_start(_config("tiny_pronoun.yaml", synth_root, out, override), ckpt)
        assert says in str(info.value) and "init.load" in str(info.value), override
    check_start(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=5"), ckpt)   # may change


def test_a_resume_with_another_process_count_is_refused_before_writing(synth_root, tmp_path):
    """Updates per epoch (ceil(N / processes) // batch) can come out equal for two process counts;
    the resume was then taken with a warning, halving the images per update (docs: refused)."""
    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1"), DistEnv()).run()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["world_size"], ckpt["rng"] = 2, ckpt["rng"] * 2   # as two processes write it
    two = tmp_path / "two_processes.pth"
    torch.save(ckpt, two)
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CheckpointError) as info:
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2"), DistEnv(), resume=str(two))
    assert "two_processes.pth was written by 2 process(es), this run has 1" in str(info.value)
    assert "torchrun --nproc_per_node 2" in str(info.value) and "init.load=" in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_per_process_centres_are_checked_like_the_bank():
    from training.checkpointing import check_per_rank_centres

    good = torch.zeros(2, 3, 8)
    check_per_rank_centres(None, (2, 3, 8), "old.pth [cluster_centers_per_rank]")  # older files: none
    check_per_rank_centres([good, good.clone()], (2, 3, 8), "run.pth [cluster_centers_per_rank]")
    with pytest.raises(CheckpointError, match=r"run\.pth \[cluster_centers_per_rank\]: process 1's centres are "
                                              r"\(2, 3, 4\), the bank's are \(2, 3, 8\)"):
        check_per_rank_centres([good, torch.zeros(2, 3, 4)], (2, 3, 8), "run.pth [cluster_centers_per_rank]")
    bad = good.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"cluster_centers_per_rank.*non-finite.*process 1"):
        check_per_rank_centres([good, bad], (2, 3, 8), "run.pth [cluster_centers_per_rank]")


def test_a_resume_keeps_the_holdout_it_trained_without(synth_root, tmp_path):
    """A resume with another eval.holdout_seed (or fraction, or from holdout to a named split)
    was taken without a word: images it had validated on trained, images it trained on
    validated, and the best compared scores of different image sets."""
    from training.start_checks import check_start

    out = tmp_path / "run"
    holdout = ["eval.enabled=true", "eval.holdout_fraction=0.25", "eval.every_epochs=0", "schedule.max_steps=1"]
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, *holdout), DistEnv()).run()
    ckpt = str(out / "checkpoint.pth")
    for override, says in (("eval.holdout_seed=58", "eval.holdout_seed: checkpoint 0, config 58"),
                           ("eval.holdout_fraction=0.5", "eval.holdout_fraction: checkpoint 0.25, config 0.5"),
                           ("eval.enabled=false", "eval.split: checkpoint 'holdout' (enabled True), config "
                                                  "'holdout' (enabled False)")):
        for start in (lambda cfg: Trainer(cfg, DistEnv(), resume=ckpt), lambda cfg: check_start(cfg, ckpt)):
            with pytest.raises(CheckpointError) as info:
                start(_config("tiny_pronoun.yaml", synth_root, out, *holdout, override, "schedule.max_steps=2"))
            assert says in str(info.value) and "a resume keeps the checkpoint's" in str(info.value), override
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, *holdout, "schedule.max_steps=2"), DistEnv(),
            resume=ckpt).run()


def test_a_resume_reads_the_tasks_it_trained_on(synth_root, tmp_path):
    """A resume with another data.tasks of the same length (or the same tasks reordered) was taken
    silently: the weights trained on a mix, the checkpoint recorded one set and the export the other."""
    from training.start_checks import check_start

    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1", "eval.enabled=false"), DistEnv()).run()
    ckpt = str(out / "checkpoint.pth")
    for override, says in (("data.tasks=[2,1]", "data.tasks: checkpoint [1, 2], config [2, 1]"),
                           ("data.pronoun=it", "data.pronoun: checkpoint 'something', config 'it'"),
                           # Another order of every epoch's samples: some fed twice, some never.
                           ("runtime.seed=7", "runtime.seed: checkpoint 42, config 7")):
        for start in (lambda cfg: Trainer(cfg, DistEnv(), resume=ckpt), lambda cfg: check_start(cfg, ckpt)):
            with pytest.raises(CheckpointError) as info:
                start(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2", "eval.enabled=false",
                              override))
            assert says in str(info.value) and "a resume reads the same" in str(info.value), str(info.value)
    # Where the data lies may change.
    moved = tmp_path / "moved"
    shutil.copytree(synth_root, moved)
    assert Trainer(_config("tiny_pronoun.yaml", moved, out, "schedule.max_steps=2", "eval.enabled=false"), DistEnv(),
                   resume=ckpt).run().step == 2


def test_validation_ground_truth_is_read_once_per_run(synth_root, tmp_path, monkeypatch):
    """Every evaluation parsed and schema-checked each task's ground truth file again; a run now
    reads each once and scores its later evaluations against the same objects."""
    import training.evaluate as evaluation

    read = []
    load = evaluation.load_ground_truth
    monkeypatch.setattr(evaluation, "load_ground_truth", lambda path: read.append(path) or load(path))
    logged = []
    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "run", "eval.enabled=true",
                              "eval.holdout_fraction=0.25", "eval.max_images=2", "eval.every_steps=1",
                              "eval.every_epochs=0", "schedule.max_steps=3"), DistEnv(), log=logged.append)
    trainer.run()
    evaluations = [line for line in logged if " mAP50/bbox = " in line]
    assert len(evaluations) == 3, logged
    assert sorted(read) == sorted(trainer.val.ann_files.values())


@pytest.mark.parametrize("config, says, never", [
    ("tiny_pronoun.yaml", "with init.load=old/checkpoint.pth (its weights", None),
    ("tiny_distill.yaml", "init.load=old/checkpoint.pth and init.load_noun=old/checkpoint.pth (its student and its "
                          "teacher", None),
    ("tiny_mask_head_distill.yaml", "from the same init.frozen_weights", "init.load="),
])
def test_a_refused_resume_advises_a_start_the_stage_takes(synth_root, tmp_path, config, says, never):
    """The advice was init.load=<checkpoint> for every stage: a mask-head stage refuses init.load,
    and a distillation started so reads the student as the teacher and loses its bank."""
    from training.start_checks import check_resume_config

    cfg = _config(config, synth_root, tmp_path / "run")
    saved = config_to_dict(cfg)
    saved["optim"]["lr"] = cfg.optim.lr * 2
    with pytest.raises(CheckpointError) as info:
        check_resume_config({"stage": cfg.stage, "config": saved}, cfg, "old/checkpoint.pth")
    assert "Resume with the checkpoint's values. To go on with other settings" in str(info.value)
    assert says in str(info.value) and (never is None or never not in str(info.value)), str(info.value)


def _every_evaluation_improves(monkeypatch) -> None:
    """Training's evaluation replaced by one whose mAP@0.5 rises at every call (0.1, 0.2, ...)."""
    import training.loops as loops

    def improving(model, val, cfg, env, bank=None):
        improving.calls += 1
        return {"mAP50/bbox": 0.1 * improving.calls, "images": 3.0, "seconds": 0.0}

    improving.calls = 0
    monkeypatch.setattr(loops, "evaluate", improving)


def test_a_run_killed_between_its_checkpoint_and_its_best_writes_the_best_when_resumed(synth_root, tmp_path,
                                                                                      monkeypatch):
    """checkpoint.pth of an improving update is written before BEST_checkpoint.pth: a run killed
    between the two resumed with BEST holding an older update, which `make default-model`'s next
    stage (and an export) took as the best. The resumed run writes the best's own weights again."""
    _every_evaluation_improves(monkeypatch)
    out = tmp_path / "run"
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=3", "eval.enabled=true",
                  "eval.holdout_fraction=0.3", "eval.every_steps=1", "checkpoint.every_steps=1",
                  "checkpoint.export_model_dir=false")
    save = Trainer._save

    def killed_before_the_last_best(self, name):
        if name == "BEST_checkpoint.pth" and self.step == 3:
            raise SystemExit("killed")
        save(self, name)

    monkeypatch.setattr(Trainer, "_save", killed_before_the_last_best)
    with pytest.raises(SystemExit):
        Trainer(cfg, DistEnv()).run()
    monkeypatch.setattr(Trainer, "_save", save)
    last = load_training_checkpoint(out / "checkpoint.pth")
    assert last["step"] == 3 and last["best"]["step"] == 3
    assert load_training_checkpoint(out / "BEST_checkpoint.pth")["step"] == 2   # the older best

    logs = []
    result = Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth"), log=logs.append).run()
    assert result.best["step"] == 3
    best = load_training_checkpoint(out / "BEST_checkpoint.pth")
    assert best["step"] == 3 and best["best"] == last["best"]
    assert all(torch.equal(best["model_ema"][k], last["model_ema"][k]) for k in last["model_ema"])
    assert any("BEST_checkpoint.pth holds the older update 2: written from it" in line for line in logs)

    # Resumed from an older update than the file holds (a rerun from checkpoint_epochNNNN.pth, or
    # here the update-2 checkpoint): the later best is kept, not replaced by an older update.
    earlier = tmp_path / "update2.pth"
    cfg_again = _config("tiny_pronoun.yaml", synth_root, tmp_path / "again", "schedule.max_steps=2",
                        "eval.enabled=true", "eval.holdout_fraction=0.3", "eval.every_steps=1",
                        "checkpoint.every_steps=1", "checkpoint.export_model_dir=false")
    Trainer(cfg_again, DistEnv()).run()
    # The same updates as this run's first two (deterministic): its update-2 checkpoint, once it
    # names this run (a checkpoint of another run is refused there: it would overwrite this one).
    update2 = load_training_checkpoint(tmp_path / "again" / "checkpoint.pth")
    torch.save(dict(update2, run_id=last["run_id"]), earlier)
    assert load_training_checkpoint(earlier)["best"]["step"] == 2
    logs.clear()
    Trainer(cfg, DistEnv(), resume=str(earlier), log=logs.append)._write_interrupted_best()
    kept = load_training_checkpoint(out / "BEST_checkpoint.pth")
    assert kept["step"] == 3 and any("later than update 2 this run resumed from: left as it is" in line
                                     for line in logs)

    # Killed before the first BEST was ever written: no BEST at all, written from the resume too.
    (out / "BEST_checkpoint.pth").unlink()
    logs.clear()
    Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth"), log=logs.append)._write_interrupted_best()
    assert load_training_checkpoint(out / "BEST_checkpoint.pth")["step"] == 3
    assert any("BEST_checkpoint.pth is missing: written from it" in line for line in logs)
    # A BEST of the same update number from another run (another record): replaced as well.
    other = load_training_checkpoint(out / "BEST_checkpoint.pth")
    other["best"] = dict(other["best"], value=-1.0)
    torch.save(other, out / "BEST_checkpoint.pth")
    logs.clear()
    Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth"), log=logs.append)._write_interrupted_best()
    assert load_training_checkpoint(out / "BEST_checkpoint.pth")["best"] == last["best"]
    assert any("BEST_checkpoint.pth holds another run's update 3: written from it" in line for line in logs)


def test_a_damaged_best_checkpoint_is_named_when_a_resume_reads_it(synth_root, tmp_path):
    """The run's BEST_checkpoint.pth was read with a bare torch.load: a truncated file gave
    torch's zip error naming no file, one holding a list an AttributeError."""
    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1"), DistEnv()).run()
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2")
    best = out / "BEST_checkpoint.pth"
    data = (out / "checkpoint.pth").read_bytes()
    best.write_bytes(data[: len(data) // 2])
    trainer = Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth"))
    with pytest.raises(CheckpointError, match=r"BEST_checkpoint\.pth: damaged checkpoint archive"):
        trainer._best_file_record()
    torch.save([1, 2], best)
    with pytest.raises(CheckpointError, match=r"BEST_checkpoint\.pth: expected a dict checkpoint, got list; move it "
                                              r"away and this run writes its best again"):
        trainer._best_file_record()


def test_an_improving_update_writes_its_checkpoint_with_its_best_whatever_the_cadence(synth_root, tmp_path,
                                                                                   monkeypatch):
    """Evaluating more often than checkpoint.pth is written (eval.every_steps, per-epoch
    checkpoints off) wrote BEST_checkpoint.pth alone: a run killed then left a BEST without the
    checkpoint.pth to resume, and starting again there was refused (an earlier run's leftover)."""
    _every_evaluation_improves(monkeypatch)
    out = tmp_path / "run"
    cfg = _config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=3", "eval.enabled=true",
                  "eval.holdout_fraction=0.3", "eval.every_steps=1", "checkpoint.every_steps=0",
                  "checkpoint.per_epoch=false", "checkpoint.export_model_dir=false")
    save = Trainer._save

    def killed_after_the_first_best(self, name):
        save(self, name)
        if name == "BEST_checkpoint.pth":
            raise SystemExit("killed")

    monkeypatch.setattr(Trainer, "_save", killed_after_the_first_best)
    with pytest.raises(SystemExit):
        Trainer(cfg, DistEnv()).run()
    monkeypatch.setattr(Trainer, "_save", save)
    last = load_training_checkpoint(out / "checkpoint.pth")
    assert last["step"] == 1 == load_training_checkpoint(out / "BEST_checkpoint.pth")["step"]
    result = Trainer(cfg, DistEnv(), resume=str(out / "checkpoint.pth")).run()
    assert result.step == 3 and result.best["step"] == 3


def test_a_resume_refused_by_its_checkpoint_leaves_other_writes_alone(synth_root, tmp_path):
    """The clean-up of cut-short checkpoint writes ran before the checkpoint's own checks (NaN
    weights, another process count): a refused resume deleted a temporary file that a run still
    going in that folder was writing."""
    from training.checkpointing import atomic_save

    out = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=1"), DistEnv()).run()
    state = load_training_checkpoint(out / "checkpoint.pth")
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    atomic_save(state, out / "checkpoint.pth")
    inflight = out / ".checkpoint.pth.abc123.tmp"
    inflight.write_bytes(b"being written")
    with pytest.raises(CheckpointError, match="non-finite"):
        Trainer(_config("tiny_pronoun.yaml", synth_root, out, "schedule.max_steps=2"), DistEnv(),
                resume=str(out / "checkpoint.pth"))
    assert inflight.read_bytes() == b"being written"
