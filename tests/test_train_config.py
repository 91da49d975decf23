"""The training configuration: strict YAML, stage consistency, path checks before training."""

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from toist_core.data.synth import generate
from toist_core.typed_config import ConfigError
from training.config import STAGES, check_paths, config_to_dict, load_config
from training.train import main as train_main

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
PAPER = ["pronoun", "noun", "distill", "mask_head", "mask_head_distill"]


def _write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1], splits=("train",), images_per_split=3, min_size=64, max_size=80, seed=1)
    return root


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_reproduce_the_reference_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.stage == name
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.text_encoder_lr) == (5e-5, 1e-5, 1e-5)
    assert (cfg.optim.weight_decay, cfg.optim.clip_max_norm, cfg.optim.ema_decay) == (1e-4, 0.1, 0.9998)
    assert (cfg.schedule.epochs, cfg.schedule.lr_drop, cfg.schedule.warmup_fraction) == (60, 7, 0.01)
    assert cfg.loader.batch_size == {"pronoun": 6, "noun": 6, "distill": 3}.get(name, 2)
    assert cfg.model.transformer.d_model == 256 and cfg.model.backbone.name == "resnet101"
    assert cfg.eval.split == "holdout"  # never the test split by default
    if name == "distill":
        assert (cfg.distill.cluster_loss, cfg.distill.sbtl, cfg.distill.bank_size, cfg.distill.num_clusters) == \
            (1e4, 50.0, 1024, 3)
        assert cfg.model.contrastive_align and cfg.loss.contrastive_align
    if name.startswith("mask_head"):
        assert cfg.model.masks and not cfg.model.aux_loss and not cfg.loss.contrastive_align
        assert cfg.init.frozen_weights is not None


@pytest.mark.parametrize("name", PAPER + ["grounding"])
def test_tiny_configs_exist_for_every_stage(name):
    cfg = load_config(CONFIGS / f"tiny_{name}.yaml")
    assert cfg.stage == name and cfg.model.transformer.d_model == 128
    assert cfg.runtime.device == "cpu"


def test_all_stages_have_configs():
    # grounding (MDETR-style pre-training) is not a paper stage: real runs start from MDETR's file.
    assert sorted(STAGES) == sorted(PAPER + ["grounding"])


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, {"stage": "pronoun", "optim": {"lr": 1e-4, "learning_rate": 2}})
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['learning_rate'\]") as info:
        load_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochz'\]"):
        load_config(_write(tmp_path, {"schedule": {"epochz": 3}}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_write(tmp_path, {}), ["model.transformer.heads=4"])


def test_data_eval_split_is_refused(tmp_path):
    """data.eval_split was accepted and did nothing (evaluation reads eval.split): gone, so refused."""
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['eval_split'\]"):
        load_config(_write(tmp_path, {"data": {"eval_split": "test"}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"loader\.batch_size: expected an integer, got 'six'"):
        load_config(_write(tmp_path, {"loader": {"batch_size": "six"}}))
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(_write(tmp_path, {"optim": {"lr": "fast"}}))
    with pytest.raises(ConfigError, match=r"runtime\.amp: 'fp8' is not one of"):
        load_config(_write(tmp_path, {}), ["runtime.amp=fp8"])
    with pytest.raises(ConfigError, match=r"stage: 'teacher' is not one of"):
        load_config(_write(tmp_path, {"stage": "teacher"}))


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", r"optim\.lr: expected a finite number, got 'nan'"),
    ("optim.lr=.inf", r"optim\.lr: expected a finite number, got inf"),
    ("optim.lr_backbone=-.inf", r"optim\.lr_backbone: expected a finite number, got -inf"),
    ("optim.weight_decay=.nan", r"optim\.weight_decay: expected a finite number, got nan"),
    ("optim.clip_max_norm=nan", r"optim\.clip_max_norm: expected a finite number"),
    ("loss.ce_loss_coef=nan", r"loss\.ce_loss_coef: expected a finite number"),
    ("loss.bbox_loss_coef=-5", r"loss: bbox_loss_coef: must be >= 0, got -5\.0"),
    ("loss.set_cost_giou=-1", r"loss: set_cost_giou: must be >= 0, got -1\.0"),
    ("loss.temperature=nan", r"loss\.temperature: expected a finite number"),
    ("distill.cluster_loss=nan", r"distill\.cluster_loss: expected a finite number"),
    ("distill.kmeans_tol=nan", r"distill\.kmeans_tol: expected a finite number"),
    ("distill.kmeans_tol=-1e-4", r"distill: kmeans_tol: must be >= 0, got -0\.0001"),
    ("model.transformer.dropout=nan", r"model\.transformer\.dropout: expected a finite number"),
    ("distributed.timeout_s=-5", r"distributed: timeout_s: must be >= 1 \(seconds\), got -5"),
    ("runtime.threads=-2", r"runtime: threads: must be >= 1 or null \(torch's default\), got -2"),
])
def test_non_finite_and_out_of_range_values_are_named(override, message):
    """YAML's .nan / .inf and the strings nan / inf pass no float field (a NaN also slips through
    every `value < 0` check); the file, the field and the value are named."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(CONFIGS / "tiny_distill.yaml", [override])
    assert "tiny_distill.yaml" in str(info.value)


def test_numbered_epoch_checkpoints_need_per_epoch_checkpoints():
    """Numbered files are written beside the epoch's checkpoint.pth: without per_epoch none came."""
    with pytest.raises(ConfigError, match=r"checkpoint: keep_epochs: 3 numbered epoch checkpoints .* "
                                          r"per_epoch, which is false"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["checkpoint.keep_epochs=3", "checkpoint.per_epoch=false"])
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["checkpoint.keep_epochs=3"]).checkpoint.keep_epochs == 3


def test_kmeans_without_tolerance_needs_an_iteration_cap():
    with pytest.raises(ConfigError, match="kmeans_tol: 0 with kmeans_max_iter null would never stop"):
        load_config(CONFIGS / "tiny_distill.yaml", ["distill.kmeans_tol=0", "distill.kmeans_max_iter=null"])
    assert load_config(CONFIGS / "tiny_distill.yaml", ["distill.kmeans_tol=0"]).distill.kmeans_tol == 0


def test_stage_contradictions_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.caption_mode: stage 'noun' trains on 'noun' captions"):
        load_config(_write(tmp_path, {"stage": "noun"}))
    with pytest.raises(ConfigError, match=r"init\.frozen_weights: stage 'mask_head' needs"):
        load_config(CONFIGS / "mask_head.yaml", ["init.frozen_weights=null"])
    with pytest.raises(ConfigError, match=r"loss\.num_decoder_layers \(6\) must equal model\.transformer\.dec_layers"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["loss.num_decoder_layers=6"])
    with pytest.raises(ConfigError, match=r"distill\.feature_dim \(256\) must equal"):
        load_config(CONFIGS / "tiny_distill.yaml", ["distill.feature_dim=256"])
    # A detector has no masks to score: the first evaluation would fail with a KeyError, before
    # the epoch's checkpoint is written.
    with pytest.raises(ConfigError, match=r"eval\.iou_type: 'segm' scores masks; stage 'pronoun' trains a detector"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["eval.iou_type=segm"])
    assert load_config(CONFIGS / "tiny_mask_head.yaml", ["eval.iou_type=segm"]).metric_iou_type == "segm"
    # Both mask stages (only mask_head_distill refused it; mask_head then failed at the start, or
    # loaded a head silently): `--check` gives the refusal a start gives.
    for config in ("tiny_mask_head.yaml", "tiny_mask_head_distill.yaml"):
        with pytest.raises(ConfigError, match=r"init\.load: stage 'mask_head(_distill)?' takes no init\.load"):
            load_config(CONFIGS / config, ["init.load=runs/pronoun/BEST_checkpoint.pth"])
    # mask_head_distill with distill.ccr false trained, evaluated and exported the mask head over
    # the distilled detector without its cluster-centre replacement (nor its bank), silently.
    with pytest.raises(ConfigError, match=r"distill\.ccr: stage 'mask_head_distill' keeps the distilled detector's "
                                          r"cluster-centre replacement .* stage 'mask_head'"):
        load_config(CONFIGS / "tiny_mask_head_distill.yaml", ["distill.ccr=false"])
    assert load_config(CONFIGS / "tiny_mask_head.yaml", ["distill.ccr=false"]).stage == "mask_head"


def test_device_is_checked_when_read_and_when_resolved(monkeypatch):
    from training.distributed import resolve_device

    with pytest.raises(ConfigError, match=r"runtime\.device: 'gpu0' is not one of"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["runtime.device=gpu0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"runtime\.device: 'cuda' requested but no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_overrides_and_presets(tmp_path):
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", ["optim.lr=3e-4", "data.tasks=[2, 5]", "eval.split=test"])
    assert cfg.optim.lr == 3e-4 and cfg.data.tasks == [2, 5] and cfg.eval.split == "test"
    assert cfg.model.backbone.name == "resnet18"  # from the tiny preset
    assert cfg.model.transformer.dropout == 0.0   # the YAML's change on top of the preset
    with pytest.raises(ConfigError, match=r"cfg\.yaml\.model\.preset: unknown model preset 'huge'"):
        load_config(_write(tmp_path, {"model": {"preset": "huge"}}))
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["optim.lr"])
    # Round trip: the saved config reads back to the same tree.
    again = load_config(_write(tmp_path, config_to_dict(cfg), "saved.yaml"))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_missing_data_paths_are_named(tmp_path, synth_root):
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"data\.root: .*nowhere is not a directory"):
        check_paths(cfg)
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1,3]"])
    with pytest.raises(ConfigError, match=r"task_3_train\.json not found \(task 3"):
        check_paths(cfg)
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1]", "eval.split=val"])
    with pytest.raises(ConfigError, match=r"data\.image_dirs: no image folder for split 'val' \(eval\.split\)"):
        check_paths(cfg)
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1]",
                                                      "init.load=missing/ckpt.pth"])
    with pytest.raises(ConfigError, match=r"init\.load: missing/ckpt\.pth not found"):
        check_paths(cfg)
    # A file that is there but no checkpoint (an empty or cut copy): refused now, by --check too;
    # it was found when the weights were loaded, after the dataset had been built and checked.
    import torch

    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "good.pth")
    cut = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(cut[: len(cut) // 2])
    for name, says in (("empty.pth", "not a PyTorch checkpoint"), ("cut.pth", "damaged checkpoint archive")):
        cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1]",
                                                          f"init.load={tmp_path / name}"])
        with pytest.raises(ConfigError, match=rf"init\.load: .*{name}: {says}"):
            check_paths(cfg)
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1]",
                                                      f"init.load={tmp_path / 'good.pth'}"])
    check_paths(cfg)
    # A model directory (toist export's output) as the mask stage's detector: --check said OK, and
    # the start failed after building the data set, saying config.yaml was missing (it was not).
    model_dir = tmp_path / "exported"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text("format: toist-model-dir\n")
    (model_dir / "model.safetensors").write_bytes(b"")
    cfg = load_config(CONFIGS / "tiny_mask_head_distill.yaml", [f"data.root={synth_root}", "data.tasks=[1]",
                                                                f"init.frozen_weights={model_dir}"])
    with pytest.raises(ConfigError, match=r"init\.frozen_weights: .*exported is a model directory \(toist export's "
                                          r"output\); the mask stages take the detector's checkpoint file"):
        check_paths(cfg)
    from toist_core.checkpoint import CheckpointError
    from toist_core.checkpoint.files import check_torch_file

    with pytest.raises(CheckpointError, match=r"exported: a model directory, not a checkpoint file \(torch\.save\); "
                                              r"give the \.pth it was exported from"):
        check_torch_file(model_dir)
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={synth_root}", "data.tasks=[1]"])
    check_paths(cfg)
    with pytest.raises(ConfigError, match=r"--resume: .*nope\.pth not found"):
        check_paths(cfg, resume=str(tmp_path / "nope.pth"))
    # A run folder given for its checkpoint: it exists, "not found" sent people looking for it.
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError, match=r"--resume: .*run is a folder; give the checkpoint file in it \(it holds no "
                                          r"checkpoint\.pth\)"):
        check_paths(cfg, resume=str(run))
    (run / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"--resume: .*run is a folder; .*: --resume {run / 'checkpoint.pth'}"):
        check_paths(cfg, resume=str(run))


def test_cli_fails_before_training_and_names_the_problem(tmp_path, synth_root, capsys):
    out = tmp_path / "run"
    code = train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={synth_root}",
                       "data.tasks=[1,4]", f"output_dir={out}"])
    assert code == 2
    assert "task_4_train.json not found" in capsys.readouterr().err
    assert not out.exists()
    code = train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), "optim.momentum=0.9", f"output_dir={out}"])
    assert code == 2 and "unknown key(s) ['momentum']" in capsys.readouterr().err
    code = train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={synth_root}",
                       "data.tasks=[1]", "eval.enabled=false", "--check"])   # (a holdout of 8 images: none)
    captured = capsys.readouterr()
    assert code == 0 and "configuration, paths and data OK" in captured.err
    assert yaml.safe_load(captured.out)["data"]["tasks"] == [1]


def test_data_tasks_are_read_as_listed(tmp_path):
    """An explicit data.tasks of 1..14 with a 16-task vocabulary was replaced by every task (the
    default could not be told from it); [1, 1] trained on task 1 twice as often."""
    spec = tmp_path / "sixteen.yaml"
    spec.write_text("name: sixteen\ntasks:\n" + "".join(f"- {{id: {k}, phrase: 'use thing {k} for'}}\n"
                                                           for k in range(1, 17)))
    listed = list(range(1, 15))
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.vocabulary={spec}", f"data.tasks={listed}"])
    assert cfg.data.tasks == listed
    assert load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.vocabulary={spec}", "data.tasks=[]"]).data.tasks == \
        list(range(1, 17))                                                  # []: every task of the vocabulary
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["data.tasks=[]"]).data.tasks == list(range(1, 15))
    with pytest.raises(ConfigError, match=r"overrides\.data: tasks: \[1\] listed more than once"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["data.tasks=[1, 2, 1]"])


def test_output_dir_is_a_path_as_written_and_a_torchrun_resume_says_torchrun(synth_root, capsys, monkeypatch):
    """--output-dir 'runs/exp #2' became runs/exp (YAML comment), 2024-05-01 a date; under
    torchrun --nproc_per_node 1 the resume command printed was a plain python one."""
    from training.train import resume_command

    for name in ("runs/exp #2", "2024-05-01", "yes", "exp: a"):
        code = train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={synth_root}",
                           "data.tasks=[1]", "eval.enabled=false", "--output-dir", name, "--check"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert yaml.safe_load(captured.out)["output_dir"] == name
    args = argparse.Namespace(config="run.yaml", output_dir=None, overrides=[])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resume_command(args, "runs/x/checkpoint.pth", 1).startswith("torchrun --standalone --nproc_per_node 1 "
                                                                        "-m training.train --config run.yaml")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert resume_command(args, "runs/x/checkpoint.pth", 1).startswith("python -m training.train --config run.yaml")


def test_an_empty_output_dir_is_refused_not_the_current_folder(synth_root, capsys):
    """`--output-dir "$RUN"` with RUN unset was ignored (the config's folder was used) and
    output_dir="" wrote the run into the current folder."""
    for argv in (["--output-dir", ""], ["output_dir=''"], ["output_dir='  '"]):
        code = train_main(["--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={synth_root}",
                           "data.tasks=[1]", "--check"] + argv)
        err = capsys.readouterr().err
        assert code == 2 and "names no folder" in err, (argv, err)
    with pytest.raises(ConfigError, match=r"output_dir: '' names no folder; give the run's folder"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir=''"])
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir=."]).output_dir == "."


def test_an_evaluation_size_above_the_long_side_cap_is_refused():
    """data.test_size 800 with data.max_size 600: evaluation resized a 480 x 640 image to
    600 x 800, the reference's test transform (and docs/training.md) to 450 x 600."""
    with pytest.raises(ConfigError, match=r"data.test_size \(800\) must be at most data.max_size \(600\)"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["data.test_size=800", "data.max_size=600"])
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["data.test_size=600", "data.max_size=600"]).data.test_size == 600


def test_toist_cli_has_the_train_subcommand(capsys):
    from toist_core.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "x.yaml", "optim.lr=1"])
    assert args.command == "train" and args.overrides == ["optim.lr=1"] and args.config == "x.yaml"


def test_a_comment_in_an_override_is_refused_and_a_quoted_hash_kept(synth_root, tmp_path, capsys):
    """'output_dir=runs/exp #2' trained into runs/exp: YAML read ' #2' as a comment."""
    with pytest.raises(ConfigError, match=r"override 'output_dir=runs/exp #2': a '#' there starts a YAML "
                                          r"comment, .*output_dir='runs/exp #2'"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir=runs/exp #2"])
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir='runs/exp #2'"]).output_dir == "runs/exp #2"
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir=runs/exp#2"]).output_dir == "runs/exp#2"
    # The advice works for a value holding a quote too.
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_pronoun.yaml", ["output_dir=it's #2"])
    advice = str(info.value).split("quote a value that holds one: ")[1].split(" (in the shell")[0]
    assert load_config(CONFIGS / "tiny_pronoun.yaml", [advice]).output_dir == "it's #2"


def test_check_names_an_output_dir_that_is_a_file_and_a_tokenizer_it_cannot_load(synth_root, tmp_path, capsys):
    """Both passed --check and failed the start late: a mkdir error naming no field, minutes in."""
    (tmp_path / "afile").write_text("")
    common = ["--config", str(CONFIGS / "tiny_pronoun.yaml"), "--check", f"data.root={synth_root}", "data.tasks=[1]"]
    assert train_main([*common, f"output_dir={tmp_path / 'afile'}"]) == 2
    assert f"output_dir: {tmp_path / 'afile'} exists and is not a folder" in capsys.readouterr().err
    assert train_main([*common, f"output_dir={tmp_path / 'run'}", f"model.text.tokenizer={tmp_path / 'nothing'}"]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["toist train", "python -m training.train"])
def test_overrides_may_follow_an_option(synth_root, capsys, entry):
    """`toist train --config run.yaml --check optim.lr=1e-4` (an override added after a docs
    command) failed with the top-level usage: "unrecognized arguments: optim.lr=1e-4"."""
    from toist_core import cli

    def run(*args):
        return cli.main(["train", *args]) if entry == "toist train" else train_main(list(args))

    code = run("--config", str(CONFIGS / "tiny_pronoun.yaml"), f"data.root={synth_root}", "data.tasks=[2]",
               "eval.enabled=false", "--check", "data.tasks=[1]", "optim.lr=3e-5")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    resolved = yaml.safe_load(captured.out)
    assert resolved["data"]["tasks"] == [1] and resolved["optim"]["lr"] == 3e-5   # in order: the later wins
    with pytest.raises(SystemExit) as info:
        run("--config", str(CONFIGS / "tiny_pronoun.yaml"), "--check", "--chek")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --chek" in err and ("usage: toist train" in err if entry == "toist train"
                                                         else "usage: python -m training.train" in err)


def test_docs_list_every_configuration_key_with_its_default_and_meaning():
    """docs/training.md named some keys and left others (checkpoint.per_epoch, eval.max_images,
    runtime.amp_on_cpu, ...) undocumented. Its table is generated from the dataclasses: it must be
    the generator's output, and every key needs a comment on its field."""
    from pathlib import Path

    from training.config_reference import markdown, rows

    missing = [key for key, _, meaning in rows() if not meaning]
    assert missing == [], f"fields without a comment (their meaning in the table): {missing}"
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    table = text.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert table == markdown(), "docs/training.md's key table is stale: paste `python -m training.config_reference`"
    assert "| `checkpoint.per_epoch` | `true` |" in table and "| `eval.max_images` | `null` |" in table


def test_an_override_into_a_mapping_the_file_does_not_set_adds_to_its_defaults():
    """docs/training.md gives the val split's images "as data.image_dirs.val": on a config
    without image_dirs the override replaced the default folders ("no image folder for split
    'train'")."""
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", ["data.image_dirs.val=images/val", "eval.split=val"])
    assert cfg.data.image_dirs == {"train": "images/train2014", "test": "images/val2014", "val": "images/val"}
    # A whole mapping given replaces, as in a file; a section's other fields keep their values.
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", ["data.image_dirs={train: a, test: b}", "optim.lr=0.001"])
    assert cfg.data.image_dirs == {"train": "a", "test": "b"}
    assert cfg.optim.lr == 0.001 and cfg.optim.ema_decay == load_config(CONFIGS / "tiny_pronoun.yaml").optim.ema_decay
