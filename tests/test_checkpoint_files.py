"""Checkpoint files as users meet them: one export path for official and training checkpoints,
corruption refused before anything is overwritten, non-checkpoints named as such, model
directories replaced whole (SIGKILL mid-export leaves the old or the new model), and the
tasks a model was trained on recorded and warned about."""

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from toist_core import cli
from toist_core.checkpoint import CheckpointError, load_pretrained, read_official, save_model_dir
from toist_core.config import preset
from toist_core.inference import TaskSegmenter, UntrainedTaskWarning
from toist_core.model import build_model, load_tokenizer
from training.checkpointing import load_training_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"
FAST = [
    "data.tasks=[1,2]", "data.train_sizes=[96]", "data.max_size=128", "data.crop_resize_sizes=[96]",
    "data.crop_min_size=64", "data.crop_max_size=112", "data.test_size=96", "loader.batch_size=2",
    "loader.num_workers=0", "runtime.progress=false", "runtime.tensorboard=false", "runtime.threads=2",
    "checkpoint.export_model_dir=false", "eval.enabled=false", "schedule.max_steps=1", "model.num_queries=7",
]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A one-update tiny pronoun run: its checkpoint.pth (7 queries, tasks 1 and 2)."""
    from toist_core.data.synth import generate
    from training.config import load_config
    from training.distributed import DistEnv
    from training.loops import Trainer

    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1, 2], splits=("train",), images_per_split=4, min_size=96, max_size=112, seed=3)
    out = tmp_path_factory.mktemp("run")
    Trainer(load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={root}", f"output_dir={out}", *FAST]),
            DistEnv()).run()
    return out / "checkpoint.pth"


def test_a_checkpoint_recording_the_removed_data_eval_split_still_loads(train_run, tmp_path):
    """Checkpoints of earlier versions record data.eval_split (removed: it did nothing); their
    data section is read strictly for the tasks and the input size, and must not be refused."""
    ckpt = torch.load(train_run, map_location="cpu", weights_only=False)
    ckpt["config"]["data"]["eval_split"] = "val"
    torch.save(ckpt, tmp_path / "older.pth")
    loaded = load_pretrained(tmp_path / "older.pth")
    assert loaded.tasks == (1, 2) and loaded.input_size.short_side == 96


def _flip_tensor_byte(path: Path) -> str:
    """Flip one byte inside the largest tensor record of a torch.save archive; returns its name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


def _flip_safetensors_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_toist_export_takes_training_checkpoints_with_their_config(train_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", str(train_run), str(out)]) == 0
    assert "tasks 1,2" in capsys.readouterr().out
    loaded = load_pretrained(out)
    ckpt = load_training_checkpoint(train_run)
    assert loaded.config.num_queries == 7 and loaded.tasks == (1, 2)
    assert (loaded.input_size.short_side, loaded.input_size.max_size) == (96, 128)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ckpt["model_ema"][key]), key
    # training.export is the same path: the same tensors.
    from training.export import main as training_export

    assert training_export([str(train_run), str(tmp_path / "other")]) == 0
    other = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert all(torch.equal(v, other[k]) for k, v in load_file(str(out / "model.safetensors")).items())
    # --weights model takes the raw weights.
    assert cli.main(["export", str(train_run), str(tmp_path / "raw"), "--weights", "model"]) == 0
    raw = load_file(str(tmp_path / "raw" / "model.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n" * 40, bytes(range(256)) * 8, b""])
def test_a_file_that_is_no_checkpoint_gets_a_clear_error(content, tmp_path, capsys):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"notes.pth: not a PyTorch checkpoint \(it starts with bytes"):
        read_official(path)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_training_checkpoint(path)
    assert cli.main(["export", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("holds, says", [
    ({"TOIST/distilled.pth": b"PK\x03\x04 a checkpoint", "TOIST/README.txt": b"weights"},
     r"download.pth: a zip archive holding TOIST/distilled.pth, not a checkpoint itself: unzip it and give that file"),
    ({"README.txt": b"hello", "data/values.csv": b"1,2"},
     r"download.pth: a zip archive, but not one torch.save writes \(no <folder>/data.pkl among its 2 entries\)"),
])
def test_a_zip_that_torch_save_did_not_write_is_named_as_such(tmp_path, capsys, holds, says):
    """A cloud drive's folder download (a zip holding the .pth) renamed .pth got torch's internal
    errors ('Expected hasRecord("version") to be true ... Could this error message be improved?')."""
    import zipfile

    path = tmp_path / "download.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in holds.items():
            archive.writestr(name, data)
    with pytest.raises(CheckpointError, match=says):
        read_official(path)
    with pytest.raises(CheckpointError, match=says):
        load_training_checkpoint(path)
    assert cli.main(["export", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_flipped_byte_in_a_training_checkpoint_is_refused_before_anything_is_written(train_run, tmp_path):
    from training.config import load_config
    from training.distributed import DistEnv
    from training.loops import Trainer

    broken = tmp_path / "run" / "checkpoint.pth"
    broken.parent.mkdir()
    broken.write_bytes(train_run.read_bytes())
    record = _flip_tensor_byte(broken)
    before = {p.name: p.stat().st_mtime_ns for p in broken.parent.iterdir()}
    message = rf"checkpoint.pth: corrupted: record '{record}' fails its CRC-32 check"
    with pytest.raises(CheckpointError, match=message):
        load_training_checkpoint(broken)
    with pytest.raises(CheckpointError, match=message):
        read_official(broken)       # init.load / frozen_weights / export read it this way
    root = load_training_checkpoint(train_run)["config"]["data"]["root"]
    cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={root}", f"output_dir={broken.parent}", *FAST])
    with pytest.raises(CheckpointError, match=message):
        Trainer(cfg, DistEnv(), resume=str(broken))
    # A model directory is not overwritten from a corrupted file either.
    target = tmp_path / "model"
    assert cli.main(["export", str(train_run), str(target)]) == 0
    weights = (target / "model.safetensors").read_bytes()
    assert cli.main(["export", str(broken), str(target)]) == 2
    assert (target / "model.safetensors").read_bytes() == weights
    assert {p.name: p.stat().st_mtime_ns for p in broken.parent.iterdir()} == before


def test_a_flipped_byte_in_a_model_directory_is_refused(train_run, tmp_path):
    out = tmp_path / "model"
    assert cli.main(["export", str(train_run), str(out)]) == 0
    _flip_safetensors_byte(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted: its tensors do not match the SHA-256"):
        load_pretrained(out)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted"):
        TaskSegmenter.from_pretrained(out, device="cpu")


def test_a_changed_tokenizer_file_in_a_model_directory_is_refused(train_run, tmp_path):
    """The tokenizer folder had no checksum: an edited tokenizer.json (two vocabulary entries'
    ids swapped) loaded and turned captions into other tokens; a damaged one failed in the
    tokenizers library with an error naming no file."""
    import json

    out = tmp_path / "model"
    assert cli.main(["export", str(train_run), str(out)]) == 0
    load_pretrained(out)   # as exported: loads
    (out / "tokenizer" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")   # a stray file a copy adds: still loads
    (out / "tokenizer" / "._tokenizer.json").write_bytes(b"\0\5\26\7")
    load_pretrained(out)
    vocab_file = out / "tokenizer" / "tokenizer.json"
    exported = vocab_file.read_bytes()
    data = json.loads(exported)
    vocab = data["model"]["vocab"]
    vocab["sit"], vocab["on"] = vocab["on"], vocab["sit"]
    vocab_file.write_text(json.dumps(data))
    from toist_core.model import load_tokenizer

    assert load_tokenizer(str(out / "tokenizer"))("sit on")["input_ids"] != load_tokenizer("builtin:tiny")("sit on")[
        "input_ids"]  # loads, and reads other tokens
    for damaged in (json.dumps(data), exported[: len(exported) // 2].decode("utf-8", "ignore")):
        vocab_file.write_text(damaged)
        with pytest.raises(CheckpointError, match=r"tokenizer: its files changed since the export"):
            load_pretrained(out)
        with pytest.raises(CheckpointError, match=r"tokenizer: its files changed since the export"):
            TaskSegmenter.from_pretrained(out, device="cpu")


def test_sigkill_while_exporting_onto_a_directory_leaves_the_old_or_the_new_model(train_run, tmp_path):
    """The old directory (100 queries) is replaced by an export of the training checkpoint
    (7 queries); SIGKILL at three moments after writing began: one of the two always loads."""
    target = tmp_path / "model"
    cfg = preset("tiny")
    old_model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    found = set()
    for delay in (0.0, 0.01, 0.1):
        save_model_dir(old_model, target, cfg)
        entries = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        proc = subprocess.Popen([sys.executable, "-m", "toist_core.cli", "export", str(train_run), str(target)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                now = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
            except FileNotFoundError:   # an entry renamed while listed: it has begun
                break
            if now.keys() != entries.keys() or any(now.get(p) != t for p, t in entries.items()):
                break   # it began writing
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        loaded = load_pretrained(target)
        assert loaded.config.num_queries in (100, 7)
        found.add(loaded.config.num_queries)
    assert 100 in found   # at least one kill landed before the swap (else the test proves little)
    # The next export clears what the kills left beside the target, then completes.
    assert cli.main(["export", str(train_run), str(target)]) == 0
    assert load_pretrained(target).config.num_queries == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def recorded_source(directory: Path) -> str:
    import yaml

    return yaml.safe_load((directory / "config.yaml").read_text())["source"]


def test_a_symlinked_model_directory_stays_a_link_to_the_replaced_folder(tmp_path):
    """``current -> models_v1``: writing through the link replaces models_v1 and keeps the link,
    twice over, with nothing left beside either; a staging entry that is itself a symlink (what
    exchanging the link used to leave behind) is unlinked, its target kept."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer))
    real, link = tmp_path / "models_v1", tmp_path / "current"
    save_model_dir(model, real, cfg, source="v1")
    link.symlink_to(real)
    leftover = tmp_path / ".current.staging-old"
    leftover.symlink_to(real)
    for source in ("v2", "v3"):
        assert save_model_dir(model, link, cfg, source=source) == link
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert recorded_source(real) == source and load_pretrained(link).config.masks is False
        assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "models_v1"]


def test_two_replacements_of_one_folder_at_once_both_complete(tmp_path):
    """Two exports into one folder at the same time: the second removed the first's staging tree
    as a crash's leftover, and the first failed with a bare FileNotFoundError. Trees a writer
    holds (its lock) are left alone, every other leftover goes, and a folder name with glob
    characters matches only its own."""
    import threading

    from toist_core.checkpoint.atomic_dir import write_directory

    target = tmp_path / "model"
    first_inside, go_on = threading.Event(), threading.Event()
    errors = []

    def slow(staging: Path) -> None:
        (staging / "who").write_text("first")
        first_inside.set()
        go_on.wait(10)
        (staging / "done").write_text("yes")

    def first() -> None:
        try:
            write_directory(target, slow)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_inside.wait(10)
    write_directory(target, lambda staging: (staging / "who").write_text("second"))
    assert (target / "who").read_text() == "second"
    go_on.set()
    thread.join(10)
    assert errors == []
    assert (target / "who").read_text() == "first" and (target / "done").is_file()   # the last to finish

    target = tmp_path / "model[1]"
    crashed = tmp_path / ".model[1].staging-abc"
    # A leftover named like a live process's (process ids are reused after a reboot; 1 in a container)
    reused = tmp_path / f".model[1].staging-{os.getpid()}-old"
    other = tmp_path / ".model1.staging-abc"     # another folder's
    crashed_new = tmp_path / ".model[1].new-abc"   # a crash before its tree was locked and named
    for folder in (crashed, reused, other, crashed_new):
        folder.mkdir()
    os.utime(crashed_new, (time.time() - 120, time.time() - 120))
    fresh = tmp_path / ".model[1].new-xyz"   # made this instant: its writer may be about to lock it
    fresh.mkdir()
    write_directory(target, lambda staging: (staging / "who").write_text("third"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model1.staging-abc", ".model[1].new-xyz", "model",
                                                          "model[1]"]


def test_model_directories_record_their_tasks_and_other_tasks_warn_once(train_run, tmp_path):
    out = tmp_path / "model"
    assert cli.main(["export", str(train_run), str(out)]) == 0
    seg = TaskSegmenter.from_pretrained(out, device="cpu")
    assert seg.trained_tasks == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seg.set_task(2).warning is None
    with pytest.warns(UntrainedTaskWarning, match=r"task 8 is not one this model was trained on \(tasks 1, 2\)"):
        state = seg.set_task(8)
    assert "not one this model was trained on" in state.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg.set_task(8)           # once per task
    with pytest.warns(UntrainedTaskWarning, match="free-text task"):
        seg.set_task("reach the top shelf with")
    # Random weights know no tasks: nothing to warn about.
    assert TaskSegmenter.from_config("tiny").trained_tasks is None
    # The command line warns too.
    import numpy as np
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(np.full((40, 48, 3), 120, dtype=np.uint8)).save(image)
    with pytest.warns(UntrainedTaskWarning, match="task 8 is not one this model was trained on"):
        assert cli.main(["predict", "--checkpoint", str(out), "--task", "8", "--device", "cpu", str(image),
                         "--out", str(tmp_path / "pred")]) == 0


def _tiny_model_dir(directory: Path) -> Path:
    cfg = preset("tiny")
    torch.manual_seed(0)
    return save_model_dir(build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)), directory, cfg)


def _edit_config(directory: Path, edit) -> None:
    config = directory / "config.yaml"
    data = yaml.safe_load(config.read_text())
    edit(data)
    config.write_text(yaml.safe_dump(data))


def test_a_model_directory_reads_its_own_tokenizer_and_no_starting_weights(tmp_path):
    """config.yaml's model.text.tokenizer pointed anywhere (another folder: other token ids, past
    the digest check of the directory's own; a hub name: the network) and its starting weights
    (model.text.weights, model.backbone.weights) were fetched only to be overwritten."""
    other = tmp_path / "other_tokenizer"
    shutil.copytree(_tiny_model_dir(tmp_path / "model") / "tokenizer", other)
    for value in (str(other), "../other_tokenizer", "roberta-base"):
        directory = tmp_path / f"edited_{len(value)}"
        shutil.copytree(tmp_path / "model", directory)
        _edit_config(directory, lambda data: data["model"]["text"].update(tokenizer=value))
        with pytest.raises(CheckpointError, match=rf"config.yaml: field 'model.text.tokenizer' is {re.escape(repr(value))}; "
                                                  r"a model directory reads its own tokenizer folder"):
            load_pretrained(directory)
    # text_encoder given: the caller's choice, as documented.
    assert load_pretrained(tmp_path / "model", text_encoder=str(other)).model is not None
    starting = tmp_path / "starting"
    shutil.copytree(tmp_path / "model", starting)
    _edit_config(starting, lambda data: (data["model"]["text"].update(weights="roberta-base"),
                                         data["model"]["backbone"].update(weights="imagenet")))
    assert load_pretrained(starting).model is not None   # offline: no fetch of either


def test_a_compressed_record_is_no_torch_save_archive_and_is_not_inflated(tmp_path):
    """A 2 MB repacked .pth with one deflated 2 GiB record took 40 s and 2.5 GB before torch
    refused it; torch.save stores every record as it is."""
    import zipfile

    source = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(4)}, source)
    repacked = tmp_path / "repacked.pth"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(repacked, "w") as out:
        for info in original.infolist():
            out.writestr(info.filename, original.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"repacked.pth: record '.+' is compressed; torch.save stores every "
                                              r"record as it is"):
        read_official(repacked)
    with pytest.raises(CheckpointError, match="is compressed"):
        load_training_checkpoint(repacked)


def _run_folder(folder: Path, files=("BEST_checkpoint.pth", "checkpoint.pth"), header=True) -> Path:
    """A `toist train` output_dir: its config.yaml (with or without the header line of runs since
    it was added) and the given files (weights never read: the folder is refused before)."""
    from training.config import TrainConfig, config_to_dict, save_config

    folder.mkdir(parents=True)
    if header:
        save_config(TrainConfig(), folder / "config.yaml")
    else:
        (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(TrainConfig()), sort_keys=False))
    for name in files:
        torch.save({"epoch": 1}, folder / name)
    return folder


def test_a_training_run_folder_is_named_as_such_with_what_to_give_instead(tmp_path, capsys):
    """A run folder has a config.yaml too: it was "a model directory already" to `toist export`
    (which then suggested `toist export --onnx` on it) and "not a model directory config ... export
    the model again" to a load."""
    run = _run_folder(tmp_path / "runs" / "distill")
    model = _tiny_model_dir(run / "model")
    what = rf"^{run}: a toist train run folder \(its config.yaml is the run's configuration\), not "
    give = rf"give {run / 'BEST_checkpoint.pth'} \(or {run / 'checkpoint.pth'}\)"
    with pytest.raises(CheckpointError, match=rf"{what}a model directory: {give}, or {model} \(its exported model "
                                              r"directory\)$"):
        load_pretrained(run)
    with pytest.raises(CheckpointError, match=rf"{what}a model directory: {give}, or {model} "):
        TaskSegmenter.from_pretrained(run, device="cpu")
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"a toist train run folder .*not a checkpoint file: {give}; {model} is the model directory "
                     r"it exported already", err), err
    assert "model directory already" not in err and not (tmp_path / "out").exists()
    assert cli.main(["export", "--onnx", str(run)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{run}: a toist train run folder .*not a model directory: give {model} ", err), err
    # The ONNX backends too (the node's backend:=onnxruntime) and the export's own check.
    from toist_core.inference.onnx_backend import open_network
    from toist_core.inference.onnx_export import export_checked

    for attempt in (lambda: open_network(run, "onnxruntime", torch.device("cpu")), lambda: export_checked(run)):
        with pytest.raises(CheckpointError, match=rf"^{run}: a toist train run folder .*not a model directory: give "
                                                  rf"{model} "):
            attempt()
    assert load_pretrained(model).model is not None   # its model directory still is one
    # An older run (no header line; only its last checkpoint, no model/): only what it holds is named.
    older = _run_folder(tmp_path / "runs" / "older", files=("checkpoint.pth",), header=False)
    with pytest.raises(CheckpointError, match=rf"^{older}: a toist train run folder .*: give "
                                              rf"{older / 'checkpoint.pth'}$"):
        load_pretrained(older)
    started = _run_folder(tmp_path / "runs" / "started", files=())
    with pytest.raises(CheckpointError, match=rf"^{started}: a toist train run folder .*holds no checkpoint yet"):
        load_pretrained(started)


def test_what_a_run_folder_holds_is_named_as_training_writes_it():
    """toist_core restates training's file names (a robot installs it without `training`)."""
    from toist_core.checkpoint import files
    from training import start_checks
    from training.config import RUN_CONFIG_HEADER

    assert RUN_CONFIG_HEADER.encode().startswith(files.RUN_CONFIG_MARK)
    assert files.RUN_CHECKPOINTS == (start_checks.BEST, start_checks.LAST)
    assert (files.RUN_EPOCH_PATTERN, files.RUN_MODEL_DIR) == (start_checks.EPOCH_PATTERN, start_checks.MODEL_DIR)


def test_a_zip_checkpoint_is_memory_mapped_and_a_legacy_one_still_loads(tmp_path, monkeypatch):
    """A distillation file (~6 GB: optimizer, teacher, raw and EMA copies) was read whole into
    memory to use one state_dict of it: out of memory on an 8 GB robot. A zip archive is mapped
    (only the pages read come in); a legacy pickle file cannot be and is read as before. Both give
    the very tensors saved, and the loaded model owns its weights (the file may be replaced)."""
    import argparse

    from toist_core.checkpoint import load_official

    cfg = preset("tiny")
    tokenizer = load_tokenizer(cfg.text.tokenizer)
    torch.manual_seed(0)
    state = build_model(cfg, tokenizer=tokenizer).state_dict()
    container = {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "model_ema": state,
                 "optimizer": {"state": {0: {"exp_avg": torch.ones(1000)}}, "param_groups": []},
                 "args": argparse.Namespace(nheads=8)}
    torch.save(container, tmp_path / "zip.pth")
    torch.save(container, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    mapped, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: mapped.append(kwargs.get("mmap")) or real_load(
        *args, **kwargs))
    for name, mmap in (("zip.pth", True), ("legacy.pth", False)):
        ckpt = read_official(tmp_path / name)
        assert bool(mapped[-1]) is mmap, name
        assert ckpt.source_key == "model_ema" and ckpt.state_dict.keys() == state.keys()
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state.items()), name
    loaded = load_official(tmp_path / "zip.pth", config=cfg, tokenizer=tokenizer)
    with open(tmp_path / "zip.pth", "r+b") as handle:   # overwritten in place, as no toist writer does
        handle.write(bytes((tmp_path / "zip.pth").stat().st_size))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
