"""Short CPU runs of the training loop on synthetic COCO-Tasks (tiny model, a few updates)."""

import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from toist_core.checkpoint import read_official
from toist_core.data.synth import generate
from toist_core.inference import TaskSegmenter
from training.checkpointing import load_training_checkpoint
from training.config import load_config
from training.distributed import DistEnv
from training.loops import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"

# Small and fast: 96-128 px images, two tasks, batch 2, no evaluation unless asked.
FAST = [
    "data.tasks=[1,2]", "data.train_sizes=[96,112]", "data.max_size=128", "data.crop_resize_sizes=[96]",
    "data.crop_min_size=64", "data.crop_max_size=112", "data.test_size=96",
    "loader.batch_size=2", "loader.num_workers=0", "runtime.progress=false", "runtime.tensorboard=false",
    "runtime.threads=2", "checkpoint.export_model_dir=false", "eval.enabled=false",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1, 2], splits=("train",), images_per_split=8, min_size=96, max_size=128, seed=3)
    return root


def _config(name, root, out, *extra):
    return load_config(CONFIGS / name, [f"data.root={root}", f"output_dir={out}", *FAST, *extra])


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_short_run_decreases_the_loss(synth_root, tmp_path):
    cfg = _config("tiny_pronoun.yaml", synth_root, tmp_path / "run", "schedule.max_steps=12",
                  "optim.lr=2e-4", "runtime.log_every=4", "runtime.tensorboard=true")
    trainer = Trainer(cfg, DistEnv())
    before = _params(trainer.model)
    result = trainer.run()
    losses = result.loss_history
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"loss did not drop: {losses}"
    # Frozen parts stay put, trained parts move (the stem and layer1 are frozen, as the reference).
    after = trainer.model.state_dict()
    assert torch.equal(after["backbone.0.body.conv1.weight"], before["backbone.0.body.conv1.weight"])
    assert not torch.equal(after["class_embed.weight"], before["class_embed.weight"])
    assert not torch.equal(after["backbone.0.body.layer4.0.conv1.weight"],
                           before["backbone.0.body.layer4.0.conv1.weight"])
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert {"total", "loss_ce", "loss_bbox_0"} <= set(result.last_losses)
    # The final checkpoint has the official layout and loads in TaskSegmenter (EMA weights).
    ckpt = load_training_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert ckpt["step"] == 12 and ckpt["model_noun"] is None and ckpt["cluster_criterion"] is None
    assert read_official(tmp_path / "run" / "checkpoint.pth").source_key == "model_ema"
    segmenter = TaskSegmenter.from_pretrained(tmp_path / "run" / "checkpoint.pth", device="cpu",
                                              config=cfg.model, task=1)
    for key, value in segmenter.model.state_dict().items():
        assert torch.equal(value, ckpt["model_ema"][key]), key


def test_killed_run_resumes_bit_identical(synth_root, tmp_path):
    # One task: 8 images, batch 2 -> 4 updates per epoch. Checkpoint at update 3, killed during
    # update 4, resumed mid-epoch; 6 updates cross the epoch boundary after the resume.
    common = ["data.tasks=[1]", "schedule.max_steps=6", "checkpoint.every_steps=3", "checkpoint.per_epoch=false",
              "model.transformer.dropout=0.1"]
    full = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "full", *common), DistEnv())
    full.run()

    class Killed(Exception):
        pass

    def kill_after_checkpoint(trainer, step):
        if step == 4:  # the checkpoint of update 3 is on disk, update 4 is lost
            raise Killed

    with pytest.raises(Killed):
        Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "killed", *common), DistEnv(),
                on_step=kill_after_checkpoint).run()
    ckpt = tmp_path / "killed" / "checkpoint.pth"
    assert load_training_checkpoint(ckpt)["step"] == 3
    # Scramble the global random state: the resume must restore it.
    torch.manual_seed(12345)
    resumed = Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "killed", *common), DistEnv(),
                      resume=str(ckpt))
    assert resumed.step == 3
    result = resumed.run()
    assert result.step == 6
    for name, a, b in (("model", full.model, resumed.model), ("model_ema", full.ema.module, resumed.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs after resume"
    opt_a, opt_b = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for idx, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_b["state"][idx]["exp_avg_sq"])
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]


def test_resume_refuses_mismatched_checkpoint_before_writing(synth_root, tmp_path):
    cfg = _config("tiny_pronoun.yaml", synth_root, tmp_path / "a", "schedule.max_steps=1")
    Trainer(cfg, DistEnv()).run()
    ckpt = tmp_path / "a" / "checkpoint.pth"
    other = _config("tiny_pronoun.yaml", synth_root, tmp_path / "b", "model.num_queries=50")
    with pytest.raises(ValueError, match="num_queries"):
        Trainer(other, DistEnv(), resume=str(ckpt))
    assert not (tmp_path / "b").exists()
    noun = _config("tiny_noun.yaml", synth_root, tmp_path / "c")
    with pytest.raises(ValueError, match="stage 'pronoun'"):
        Trainer(noun, DistEnv(), resume=str(ckpt))
    # Starting a fresh run over an existing one is refused too, before anything in the folder
    # changes: its config.yaml still describes its checkpoint, and a write still in progress
    # there (another run's temporary file) is left alone.
    inflight = tmp_path / "a" / ".checkpoint.pth.abc123.tmp"
    inflight.write_bytes(b"being written")
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    other_settings = _config("tiny_pronoun.yaml", synth_root, tmp_path / "a", "schedule.max_steps=2", "optim.lr=1e-3",
                             "runtime.tensorboard=true")
    with pytest.raises(ValueError, match="already holds checkpoint.pth"):
        Trainer(other_settings, DistEnv())
    assert {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before


def test_distillation_updates_and_saves_the_bank(synth_root, tmp_path):
    cfg = _config("tiny_distill.yaml", synth_root, tmp_path / "dis", "schedule.max_steps=3",
                  "distill.bank_size=8", "init.load=null", "init.load_noun=null", "eval.enabled=true", "eval.holdout_fraction=0.25",
                  "eval.max_images=2", "checkpoint.export_model_dir=true")
    trainer = Trainer(cfg, DistEnv())
    bank_before = {k: v.clone() for k, v in trainer.cluster.bank.state_dict().items()}
    teacher_before = _params(trainer.teacher)
    result = trainer.run()
    bank = trainer.cluster.bank.state_dict()
    assert bank["update_count"].sum() > 0
    assert not torch.equal(bank["feature_bank"], bank_before["feature_bank"])
    # The teacher is trained too (its own noun losses), as the reference.
    assert not torch.equal(trainer.teacher.state_dict()["class_embed.weight"], teacher_before["class_embed.weight"])
    assert {"sth_loss_ce", "noun_loss_ce", "loss_softkd", "loss_cluster_feature"} <= set(result.last_losses)
    ckpt = load_training_checkpoint(tmp_path / "dis" / "checkpoint.pth")
    for key, value in bank.items():
        assert torch.equal(ckpt["cluster_criterion"][key], value)
    assert ckpt["model_noun"] is not None and ckpt["model_noun_ema"] is not None
    assert ckpt["best"]["split"] == "holdout" and (tmp_path / "dis" / "BEST_checkpoint.pth").exists()
    # The exported model directory carries the bank and loads as a distilled TaskSegmenter.
    segmenter = TaskSegmenter.from_pretrained(tmp_path / "dis" / "model", device="cpu", task=2)
    assert segmenter.is_distilled
    # ... and the size it was trained at (data.test_size 96, long side capped at data.max_size 128).
    assert (segmenter.inference.short_side, segmenter.inference.max_size) == (96, 128)
    assert torch.equal(segmenter.memory_bank.feature_bank, bank["feature_bank"])
    # A new distillation from this checkpoint (what a refused resume advises): init.load reads its
    # student, init.load_noun its teacher (model_noun_ema; the student was read as the teacher).
    logged = []
    again = Trainer(_config("tiny_distill.yaml", synth_root, tmp_path / "again", "schedule.max_steps=1",
                            f"init.load={tmp_path / 'dis' / 'checkpoint.pth'}",
                            f"init.load_noun={tmp_path / 'dis' / 'checkpoint.pth'}"), DistEnv(), log=logged.append)
    assert all(torch.equal(v, ckpt["model_noun_ema"][k]) for k, v in again.teacher.state_dict().items())
    assert all(torch.equal(v, ckpt["model_ema"][k]) for k, v in again.model.state_dict().items())
    assert not any("swapped" in line for line in logged), logged


def test_pretrained_text_encoder_trains_with_dropout_through_evaluations(synth_root, tmp_path):
    """A text encoder from model.text.weights (from_pretrained hands it back in eval mode) trained
    with its dropout off, student and teacher, while the reference's model.train() each epoch
    turns it on; evaluations in between must not leave anything in eval mode either."""
    from transformers import RobertaModel

    from toist_core.model.text import roberta_config

    encoder_dir = tmp_path / "roberta"
    base = _config("tiny_distill.yaml", synth_root, tmp_path / "unused")
    RobertaModel(roberta_config(base.model.text), add_pooling_layer=True).save_pretrained(str(encoder_dir))
    cfg = _config("tiny_distill.yaml", synth_root, tmp_path / "dis", "schedule.max_steps=2", "distill.bank_size=8",
                  "init.load=null", "init.load_noun=null", f"model.text.weights={encoder_dir}",
                  "eval.enabled=true", "eval.every_steps=1", "eval.holdout_fraction=0.25", "eval.max_images=1")
    trainer = Trainer(cfg, DistEnv())
    # Built in train mode (from_pretrained's eval mode undone) ...
    assert all(m.training for m in trainer.model.transformer.text_encoder.modules())
    trainer.step_module.eval()   # ... and trained in it whatever mode a caller left (the loop's train())
    in_eval_mode = []

    def forward_modes(module, args):
        in_eval_mode.append(sorted(name for name, m in trainer.step_module.named_modules() if not m.training))

    trainer.step_module.register_forward_pre_hook(forward_modes)
    trainer.run()
    assert len(in_eval_mode) == 2 and in_eval_mode == [[]] * 2, in_eval_mode[0][:5]   # the 2nd after an evaluation
    assert trainer.model.transformer.text_encoder.config.hidden_dropout_prob > 0   # dropout there to switch on


def test_distillation_with_ccr_off_is_scored_and_exported_without_it(synth_root, tmp_path, monkeypatch, caplog):
    """Table 3's CCR-off rows: the bank still serves the cluster loss, but neither the run's
    evaluation nor a model loaded from it may replace the pronoun's rows."""
    states = []
    encode_task = TaskSegmenter.encode_task

    def spy(self, task):
        states.append(encode_task(self, task))
        return states[-1]

    monkeypatch.setattr(TaskSegmenter, "encode_task", spy)
    cfg = _config("tiny_distill.yaml", synth_root, tmp_path / "dis", "schedule.max_steps=2", "distill.ccr=false",
                  "distill.bank_size=8", "init.load=null", "init.load_noun=null", "eval.enabled=true",
                  "eval.holdout_fraction=0.25", "eval.max_images=2", "checkpoint.export_model_dir=true")
    trainer = Trainer(cfg, DistEnv())
    result = trainer.run()
    assert "loss_cluster_feature" in result.last_losses and trainer.cluster.bank.update_count.sum() > 0
    assert states and all(state.pronoun_tokens and state.centres is None for state in states)
    checkpoint = tmp_path / "dis" / "checkpoint.pth"
    assert load_training_checkpoint(checkpoint)["cluster_criterion"] is not None
    for source in (checkpoint, tmp_path / "dis" / "model"):
        with caplog.at_level(logging.INFO, logger="toist_core"):
            segmenter = TaskSegmenter.from_pretrained(source, device="cpu")
        assert not segmenter.is_distilled, source
        assert segmenter.encode_task(2).centres is None
    assert "trained without cluster-centre replacement (distill.ccr: false): the bank is not used" in caplog.text
    assert not (tmp_path / "dis" / "model" / "memory_bank.safetensors").exists()


def test_mask_head_stage_trains_only_the_head_on_the_frozen_detector(synth_root, tmp_path):
    detector = _config("tiny_pronoun.yaml", synth_root, tmp_path / "det", "schedule.max_steps=1")
    Trainer(detector, DistEnv()).run()
    frozen = load_training_checkpoint(tmp_path / "det" / "checkpoint.pth")["model_ema"]
    cfg = _config("tiny_mask_head.yaml", synth_root, tmp_path / "mask", "schedule.max_steps=2",
                  f"init.frozen_weights={tmp_path / 'det' / 'checkpoint.pth'}")
    trainer = Trainer(cfg, DistEnv())
    head_before = trainer.model.mask_head.lay1.weight.detach().clone()
    assert {g["name"]: len(g["params"]) for g in trainer.optimizer.param_groups}["backbone"] == 0
    result = trainer.run()
    state = trainer.model.state_dict()
    # The detector (EMA weights of the detection run, contrastive heads dropped) stays frozen.
    for key, value in frozen.items():
        if not key.startswith("contrastive_align_projection_"):
            assert torch.equal(state["detr." + key], value), key
    assert not torch.equal(state["mask_head.lay1.weight"], head_before)
    assert {"loss_mask", "loss_dice"} <= set(result.last_losses)


def record_noun_captions(monkeypatch, module) -> list:
    """The captions ``module``'s ``noun_caption_state`` builds from now on, in order."""
    seen = []
    original = module.noun_caption_state

    def spy(model, dataset, index, task):
        state = original(model, dataset, index, task)
        seen.append(state.caption)
        return state

    monkeypatch.setattr(module, "noun_caption_state", spy)
    return seen


def test_noun_teacher_is_evaluated_on_noun_captions(synth_root, tmp_path, monkeypatch):
    import training.evaluate as evaluation

    seen = record_noun_captions(monkeypatch, evaluation)
    cfg = _config("tiny_noun.yaml", synth_root, tmp_path / "noun", "schedule.max_steps=1", "eval.enabled=true",
                  "eval.holdout_fraction=0.3", "eval.max_images=3")
    result = Trainer(cfg, DistEnv()).run()
    assert seen and "something" not in " ".join(seen)
    assert any(caption.startswith(("step on ", "sit comfortably on ")) for caption in seen)
    assert "mAP50/bbox" in result.metrics


def test_toist_evaluate_with_noun_captions_predicts_what_training_scored(tmp_path):
    """A noun teacher is trained and scored on each image's noun caption; `toist evaluate` read
    the pronoun caption only, so its number for the teacher was not the one training chose its
    best on. --captions noun predicts exactly what training's evaluation predicts."""
    from test_train_guards import _synth_with_test_split
    from toist_core.cli import main as toist
    from toist_core.cli.evaluate import load_segmenter, predict_tasks
    from toist_core.eval.evaluator import task_files
    from training.evaluate import build_validation_set, predict as training_predictions

    root = _synth_with_test_split(tmp_path / "synth")
    out = tmp_path / "noun"
    cfg = _config("tiny_noun.yaml", root, out, "data.image_dirs={train: images/train2014, test: images/val2014}",
                  "eval.enabled=true", "eval.split=test", "eval.max_images=3", "schedule.max_steps=2",
                  "data.tasks=[1,2]")
    Trainer(cfg, DistEnv()).run()
    segmenter = load_segmenter(str(out / "BEST_checkpoint.pth"), "cpu", None, None, None)
    val = build_validation_set(cfg)
    trained = training_predictions(segmenter.model, val, cfg, DistEnv())
    files = task_files(root, [1, 2], "test")
    by_captions = {captions: predict_tasks(segmenter, files, root / "images" / "val2014", val.image_ids,
                                           captions=captions, log=io.StringIO()) for captions in ("noun", "pronoun")}
    differs = 0
    for task, images in trained.items():
        assert sorted(images) == sorted(by_captions["noun"][task]) and images
        for image_id, expected in images.items():
            got, pronoun = by_captions["noun"][task][image_id], by_captions["pronoun"][task][image_id]
            assert np.allclose(got.boxes, expected.boxes, atol=1e-4) and np.allclose(got.scores, expected.scores,
                                                                                     atol=1e-6)
            differs += not np.allclose(pronoun.scores, expected.scores, atol=1e-6)
    assert differs > 0   # what the command predicted before: another input

    # Without --captions: the checkpoint says it is a noun teacher (stage noun), and is read so.
    from toist_core.eval.predictions import load_prediction_file

    assert segmenter.captions == "noun"
    saved = tmp_path / "auto.json"
    from toist_core.inference import UntrainedTaskWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert toist(["evaluate", "--checkpoint", str(out / "BEST_checkpoint.pth"), "--data", str(root), "--tasks",
                      "1", "2", "--max-images", "3", "--device", "cpu", "--save-predictions", str(saved),
                      "--no-plots", "--out", str(tmp_path / "auto")]) == 0
    # Read with its noun captions, the teacher is never given a pronoun caption to warn about.
    assert not [w for w in caught if issubclass(w.category, UntrainedTaskWarning)]
    auto = load_prediction_file(saved).tasks
    for task, images in trained.items():
        for image_id, expected in images.items():
            assert np.allclose(auto[task][image_id].scores, expected.scores, atol=1e-6)
    # (A predictions file holds what was predicted: what the model read is not for it to say.)
    assert toist(["evaluate", "--predictions", str(saved), "--data", str(root), "--captions", "noun",
                  "--out", str(tmp_path / "e2")]) == 2

    # Exported, the teacher says so still: its directory's evaluation reads the same captions.
    teacher_dir = tmp_path / "teacher_dir"
    assert toist(["export", str(out / "BEST_checkpoint.pth"), str(teacher_dir)]) == 0
    assert load_segmenter(str(teacher_dir), "cpu", None, None, None).captions == "noun"
    saved_dir = tmp_path / "auto_dir.json"
    assert toist(["evaluate", "--checkpoint", str(teacher_dir), "--data", str(root), "--tasks", "1", "2",
                  "--max-images", "3", "--device", "cpu", "--save-predictions", str(saved_dir), "--no-plots",
                  "--out", str(tmp_path / "auto_dir")]) == 0
    from_dir = load_prediction_file(saved_dir).tasks
    for task, images in trained.items():
        for image_id, expected in images.items():
            assert np.allclose(from_dir[task][image_id].scores, expected.scores, atol=1e-6)


def test_which_captions_a_checkpoint_was_trained_on():
    """`toist evaluate --captions auto` reads noun captions for a noun teacher: a toist training
    checkpoint of stage noun or grounding, or an official file trained with --verb_noun_input;
    the pronoun otherwise (a distillation file's network is its pronoun student)."""
    from argparse import Namespace
    from types import SimpleNamespace

    from toist_core.checkpoint.load import training_captions

    def official(**args):
        return SimpleNamespace(train_config=None, args=Namespace(**args))

    assert training_captions(official(verb_noun_input=True, distillation=False)) == "noun"
    assert training_captions(official(verb_noun_input=True, distillation=True)) == "pronoun"
    assert training_captions(official(verb_noun_input=False)) == "pronoun"
    assert training_captions(SimpleNamespace(train_config=None, args=None)) == "pronoun"  # a bare state_dict
    for stage, expected in (("noun", "noun"), ("grounding", "noun"), ("pronoun", "pronoun"), ("distill", "pronoun"),
                            ("mask_head", "pronoun")):
        assert training_captions(SimpleNamespace(train_config={"stage": stage}, args=None)) == expected


def test_holdout_images_a_loaded_checkpoint_trained_on_are_reported(synth_root, tmp_path):
    """A stage validating on a holdout the stage before it trained on reports optimistic numbers:
    the run says so, naming the checkpoint and how many of its holdout images were seen."""
    import json

    from training.evaluate import in_holdout

    def warnings_of(*extra, config="tiny_pronoun.yaml"):
        logs = []
        Trainer(_config(config, synth_root, tmp_path / f"next{len(extra)}", "eval.enabled=true",
                        "eval.holdout_fraction=0.5", *extra), DistEnv(), log=logs.append)
        return [line for line in logs if "holdout images" in line]

    ids = [image["id"] for image in json.loads((synth_root / "annotations" / "task_1_train.json").read_text())["images"]]
    ids += [image["id"] for image in json.loads((synth_root / "annotations" / "task_2_train.json").read_text())["images"]]
    holdout = {i for i in set(ids) if in_holdout(i, 0.5, 0)}
    assert holdout and len(holdout) < len(set(ids))

    # Trained on every image (evaluation off): every holdout image was seen.
    everything = tmp_path / "all" / "checkpoint.pth"
    Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "all", "schedule.max_steps=1"), DistEnv()).run()
    [warning] = warnings_of(f"init.load={everything}")
    assert f"init.load: {everything} was trained on {len(holdout)} of this run's {len(holdout)} holdout" in warning

    # Trained with the same holdout carved out: nothing seen, nothing said.
    carved = tmp_path / "carved" / "checkpoint.pth"
    Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "carved", "schedule.max_steps=1", "eval.enabled=true",
                    "eval.holdout_fraction=0.5", "eval.max_images=1"), DistEnv()).run()
    assert warnings_of(f"init.load={carved}") == []
    # Another seed draws another holdout: the images outside the first one were trained on.
    other = {i for i in set(ids) if in_holdout(i, 0.5, 1)}
    seen = len({i for i in other if i not in holdout})
    assert seen, "seeds 0 and 1 draw the same holdout: pick another seed"
    [warning] = warnings_of(f"init.load={carved}", "eval.holdout_seed=1")
    assert f"was trained on {seen} of this run's {len(other)} holdout images" in warning
    # The frozen detector of a mask stage is checked the same way.
    [warning] = warnings_of(f"init.frozen_weights={everything}", config="tiny_mask_head.yaml")
    assert f"init.frozen_weights: {everything} was trained on {len(holdout)}" in warning


def test_stage_inputs_from_the_wrong_stage_are_reported(synth_root, tmp_path):
    """Student and teacher swapped in a distillation, or a distilled detector under the plain mask
    stage (its bank unused), train without error into a model unlike the paper's: the run says so."""
    for stage in ("noun", "pronoun"):
        Trainer(_config(f"tiny_{stage}.yaml", synth_root, tmp_path / stage, "schedule.max_steps=1"), DistEnv()).run()
    noun, pronoun = tmp_path / "noun" / "checkpoint.pth", tmp_path / "pronoun" / "checkpoint.pth"

    def warnings_of(config, *extra):
        logs = []
        Trainer(_config(config, synth_root, tmp_path / f"next_{len(logs)}", "distill.bank_size=8", *extra),
                DistEnv(), log=logs.append)
        return [line for line in logs if line.startswith("warning")]

    swapped = warnings_of("tiny_distill.yaml", f"init.load={noun}", f"init.load_noun={pronoun}")
    assert any(f"init.load: {noun} was trained by stage 'noun'; stage 'distill' expects 'pronoun' or "
               "'distill'" in line for line in swapped), swapped
    assert any(f"init.load_noun: {pronoun} was trained by stage 'pronoun'; stage 'distill' expects 'noun'"
               in line for line in swapped), swapped
    assert warnings_of("tiny_distill.yaml", f"init.load={pronoun}", f"init.load_noun={noun}") == []

    distilled = tmp_path / "distilled" / "checkpoint.pth"
    Trainer(_config("tiny_distill.yaml", synth_root, tmp_path / "distilled", "schedule.max_steps=1",
                    "distill.bank_size=8", f"init.load={pronoun}", f"init.load_noun={noun}"), DistEnv()).run()
    [warning] = warnings_of("tiny_mask_head.yaml", f"init.frozen_weights={distilled}")
    assert f"init.frozen_weights: {distilled} is a distilled detector" in warning and "mask_head_distill" in warning
    assert warnings_of("tiny_mask_head.yaml", f"init.frozen_weights={pronoun}") == []
    assert warnings_of("tiny_mask_head_distill.yaml", f"init.frozen_weights={distilled}") == []
    # A damaged file is named with the field that gave it (the message named the file only),
    # before anything is built (it was found at the weights' load, after the dataset).
    from toist_core.typed_config import ConfigError

    cut = tmp_path / "cut.pth"
    cut.write_bytes(noun.read_bytes()[: noun.stat().st_size // 2])
    for config, extra in (("tiny_distill.yaml", [f"init.load={pronoun}", f"init.load_noun={cut}"]),
                          ("tiny_mask_head.yaml", [f"init.frozen_weights={cut}"])):
        field = extra[-1].split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{field}: {cut}: damaged checkpoint archive"):
            warnings_of(config, *extra)


@pytest.mark.parametrize("strict", [True, False])
def test_init_load_refuses_non_finite_weights_strict_or_not(synth_root, tmp_path, strict):
    """init.strict: false (the paper configs' setting) is lenient about names and shapes, never
    about NaN / inf values: a diverged checkpoint is refused by file and tensor either way."""
    from toist_core.checkpoint import CheckpointError

    Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "src", "schedule.max_steps=1"), DistEnv()).run()
    ckpt_path = tmp_path / "src" / "checkpoint.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["model_ema"]["class_embed.weight"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "diverged.pth")
    cfg = _config("tiny_pronoun.yaml", synth_root, tmp_path / "next", f"init.load={tmp_path / 'diverged.pth'}",
                  f"init.strict={str(strict).lower()}")
    with pytest.raises(CheckpointError, match=r"diverged\.pth.*class_embed\.weight \(\d+ of \d+ values NaN/inf\)"):
        Trainer(cfg, DistEnv())


def test_check_gives_the_refusals_a_start_would_give(synth_root, tmp_path, capsys):
    """`toist train --check` said "configuration and paths OK" for a run that then refused at once."""
    from training.train import main as train_main

    run = tmp_path / "run"
    Trainer(_config("tiny_pronoun.yaml", synth_root, run, "schedule.max_steps=1"), DistEnv()).run()
    common = [f"data.root={synth_root}", *FAST]
    assert train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), "--output-dir", str(run), "--check",
                       *common]) == 2
    assert f"{run} already holds checkpoint.pth; continue it with --resume" in capsys.readouterr().err
    assert train_main(["--config", str(CONFIGS / "tiny_noun.yaml"), "--output-dir", str(tmp_path / "noun"),
                       "--resume", str(run / "checkpoint.pth"), "--check", *common]) == 2
    assert "checkpoint of stage 'pronoun', config stage 'noun'" in capsys.readouterr().err
    assert train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), "--output-dir", str(run),
                       "--resume", str(run / "checkpoint.pth"), "--check", *common]) == 0
    assert "configuration, paths and data OK" in capsys.readouterr().err


def test_mask_head_distill_refuses_a_detector_distilled_without_ccr_or_with_another_pronoun(synth_root, tmp_path):
    """A detector distilled with distill.ccr false never saw cluster centres (and is evaluated and
    exported without them): mask_head_distill switched CCR back on for it, and shipped a bank."""
    from toist_core.checkpoint import CheckpointError

    common = ("distill.bank_size=8", "init.load=null", "init.load_noun=null", "schedule.max_steps=1")
    for name, extra in (("ccr_off", ("distill.ccr=false",)), ("it", ("data.pronoun=it", "distill.pronoun=it"))):
        Trainer(_config("tiny_distill.yaml", synth_root, tmp_path / name, *common, *extra), DistEnv()).run()
    ccr_off, it = tmp_path / "ccr_off" / "checkpoint.pth", tmp_path / "it" / "checkpoint.pth"
    with pytest.raises(CheckpointError, match=rf"{ccr_off} was distilled with distill.ccr false: .* stage 'mask_head'"):
        Trainer(_config("tiny_mask_head_distill.yaml", synth_root, tmp_path / "mask_off", "distill.bank_size=8",
                        f"init.frozen_weights={ccr_off}"), DistEnv())
    logs = []  # the plain mask stage is right for it: no "use mask_head_distill" warning
    Trainer(_config("tiny_mask_head.yaml", synth_root, tmp_path / "mask_plain", f"init.frozen_weights={ccr_off}"),
            DistEnv(), log=logs.append)
    assert not [line for line in logs if line.startswith("warning")], logs
    with pytest.raises(CheckpointError, match=rf"{it} was distilled with the pronoun 'it'; .* data.pronoun 'something'"):
        Trainer(_config("tiny_mask_head_distill.yaml", synth_root, tmp_path / "mask_it", "distill.bank_size=8",
                        f"init.frozen_weights={it}"), DistEnv())


@pytest.mark.parametrize("stage", ["mask_head", "mask_head_distill"])
def test_a_mask_stage_refuses_a_noun_caption_detector(synth_root, tmp_path, stage, monkeypatch, capsys):
    """A noun teacher as init.frozen_weights trained without a word: its frozen detector reads
    noun captions, the head trained and evaluated on pronoun captions over it. Refused before
    the dataset is built (it was refused after: minutes on COCO-Tasks), and by --check (it said OK)."""
    import training.run_data as run_data
    from toist_core.checkpoint import CheckpointError
    from training.train import main as train_main

    Trainer(_config("tiny_noun.yaml", synth_root, tmp_path / "noun", "schedule.max_steps=1"), DistEnv()).run()
    teacher = tmp_path / "noun" / "checkpoint.pth"
    says = rf"{teacher} reads captions naming the objects \(stage 'noun'\); stage '{stage}' trains its mask head"

    def not_yet(*args, **kwargs):
        raise AssertionError("the dataset was built before the detector was checked")

    monkeypatch.setattr(run_data, "build_dataset", not_yet)
    with pytest.raises(CheckpointError, match=says):
        Trainer(_config(f"tiny_{stage}.yaml", synth_root, tmp_path / "masks", "distill.bank_size=8",
                        f"init.frozen_weights={teacher}"), DistEnv())
    assert not (tmp_path / "masks" / "checkpoint.pth").exists()
    config = str(Path(__file__).resolve().parents[1] / "training" / "configs" / f"tiny_{stage}.yaml")
    common = ["--config", config, "--check", f"output_dir={tmp_path / 'checked'}", f"data.root={synth_root}", *FAST,
              "distill.bank_size=8"]
    assert train_main([*common, f"init.frozen_weights={teacher}"]) == 2
    assert re.search(says, capsys.readouterr().err)
    # A run folder given there: the advice names its checkpoint files, not its model directory.
    assert train_main([*common, f"init.frozen_weights={tmp_path / 'noun'}"]) == 2
    err = capsys.readouterr().err
    assert f"a checkpoint file: give {teacher}" in err and "model directory" not in err


EVAL_AT_2 = ["eval.enabled=true", "eval.holdout_fraction=0.25", "eval.max_images=2", "eval.every_steps=2",
             "eval.every_epochs=0", "checkpoint.export_model_dir=true", "schedule.max_steps=2"]


def _exported(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def _same_weights(exported: dict, state: dict) -> bool:
    return all(torch.equal(tensor, state[key]) for key, tensor in exported.items())


def test_distillation_starts_from_a_model_used_without_contrastive_align(synth_root, tmp_path):
    """docs/own-data.md: a released TOIST file or a toist model directory can be the distill
    stage's init.load / init.load_noun. Those come from mask stages, which drop the contrastive
    projections; the strict load refused them for 4 missing tensors."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.model import build_model, load_tokenizer
    from toist_core.typed_config import merge

    cfg = _config("tiny_distill.yaml", synth_root, tmp_path / "run", "schedule.max_steps=1")
    assert cfg.model.contrastive_align and cfg.init.strict
    segm_cfg = merge(cfg.model, {"masks": True, "contrastive_align": False})
    torch.manual_seed(3)
    segm = build_model(segm_cfg, tokenizer=load_tokenizer(cfg.model.text.tokenizer)).eval()
    directory = save_model_dir(segm, tmp_path / "segm_model", segm_cfg)
    logged = []
    trainer = Trainer(_config("tiny_distill.yaml", synth_root, tmp_path / "run", "schedule.max_steps=1",
                              f"init.load={directory}", f"init.load_noun={directory}"), DistEnv(), log=logged.append)
    detector = {k[len("detr."):]: v for k, v in segm.state_dict().items() if k.startswith("detr.")}
    for module in (trainer.model, trainer.teacher):
        state = module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in detector.items())
        assert any("contrastive_align_projection_" in k for k in state)
    said = [line for line in logged if "has no contrastive-align projections" in line]
    assert len(said) == 2 and "contrastive_align_projection_image" in said[0], logged
    trainer.run()


def test_export_takes_best_only_when_it_is_this_runs(synth_root, tmp_path):
    """model/ came from whatever BEST_checkpoint.pth lay in output_dir: a run that evaluated
    nothing exported another run's best weights as its own."""
    logged = []
    Trainer(_config("tiny_pronoun.yaml", synth_root, tmp_path / "a", *EVAL_AT_2), DistEnv(), log=logged.append).run()
    other_best = load_training_checkpoint(tmp_path / "a" / "BEST_checkpoint.pth")
    assert other_best["best"]["step"] == 2
    assert "exported BEST_checkpoint.pth (ema weights) to the model directory" in " ".join(logged)
    assert _same_weights(_exported(tmp_path / "a"), other_best["model_ema"])

    # Run b (another seed, no evaluation) finds a's BEST beside its files (it was resumed from a
    # checkpoint of another folder, say): it exports its own last checkpoint, and says why.
    out = tmp_path / "b"
    logged.clear()
    trainer = Trainer(_config("tiny_pronoun.yaml", synth_root, out, "runtime.seed=1", "schedule.max_steps=2",
                              "checkpoint.export_model_dir=true"), DistEnv(), log=logged.append)
    (out / "BEST_checkpoint.pth").write_bytes((tmp_path / "a" / "BEST_checkpoint.pth").read_bytes())
    trainer.run()
    assert not _same_weights(_exported(out), other_best["model_ema"])
    assert _same_weights(_exported(out), load_training_checkpoint(out / "checkpoint.pth")["model_ema"])
    assert "no evaluation of this run chose a best checkpoint: exporting checkpoint.pth" in logged

    # A best of its own, but the file holds another update's: the last checkpoint again.
    logged.clear()
    trainer.best = dict(other_best["best"], step=1)
    trainer.export(out / "model")
    assert any(line.startswith(f"{out / 'BEST_checkpoint.pth'} holds update 2, not this run's best (update 1")
               and line.endswith("exporting checkpoint.pth") for line in logged), logged


def test_export_takes_the_weights_evaluation_scored(synth_root, tmp_path, caplog):
    """eval.use_ema: false chose the best on the raw weights, then model/ shipped the EMA's."""
    out = tmp_path / "raw"
    logged = []
    Trainer(_config("tiny_pronoun.yaml", synth_root, out, *EVAL_AT_2, "eval.use_ema=false"), DistEnv(),
            log=logged.append).run()
    best = load_training_checkpoint(out / "BEST_checkpoint.pth")
    assert not torch.equal(best["model"]["class_embed.weight"], best["model_ema"]["class_embed.weight"])
    assert _same_weights(_exported(out), best["model"])
    assert "exported BEST_checkpoint.pth (model weights) to the model directory" in " ".join(logged)
    # `toist export` of the file, and loading it directly, took the EMA's all the same: they now
    # take the weights the file's run evaluated too, unless told otherwise.
    from safetensors.torch import load_file
    from toist_core.checkpoint import load_official
    from toist_core.cli import main as toist

    assert toist(["export", str(out / "BEST_checkpoint.pth"), str(tmp_path / "cli")]) == 0
    assert _same_weights(load_file(tmp_path / "cli" / "model.safetensors"), best["model"])
    with caplog.at_level(logging.INFO, logger="toist_core.checkpoint.load"):
        assert _same_weights(load_official(out / "BEST_checkpoint.pth").model.state_dict(), best["model"])
    assert "raw weights (model: the ones its run evaluated, eval.use_ema false)" in caplog.text
    assert toist(["export", str(out / "BEST_checkpoint.pth"), str(tmp_path / "ema"), "--weights", "ema"]) == 0
    assert _same_weights(load_file(tmp_path / "ema" / "model.safetensors"), best["model_ema"])


def test_the_recipe_scores_a_distilled_run_with_its_own_k_means_settings(synth_root, tmp_path):
    """The default-model recipe rebuilt each run's bank with the reference's defaults (seed 0),
    while the exported model directory keeps the run's: metrics.json would describe another CCR."""
    from toist_core.model import load_tokenizer
    from training import default_model as recipe

    cfg = _config("tiny_distill.yaml", synth_root, tmp_path / "distilled", "init.load=null", "init.load_noun=null",
                  "distill.bank_size=8", "distill.seed=7", "distill.kmeans_rerun=every_use", "schedule.max_steps=1")
    Trainer(cfg, DistEnv()).run()
    checkpoint = tmp_path / "distilled" / "checkpoint.pth"
    _, bank = recipe._load(cfg, checkpoint, load_tokenizer(cfg.model.text.tokenizer))
    assert (bank.seed, bank.rerun) == (7, "every_use")
    assert torch.equal(bank.stale_flags(), load_training_checkpoint(checkpoint)["cluster_stale"])
