"""Official checkpoint files and model directories: safe, strict, exact."""

import argparse
import decimal
import fractions
import pathlib
import re

import pytest
import torch

from toist_core import cli
from toist_core.checkpoint import (CheckpointError, detect_architecture, export_model_dir, load_model_dir,
                                   load_official, load_official_weights, load_pretrained, read_official,
                                   save_model_dir)
from toist_core.config import preset
from toist_core.model import TOIST, build_model, load_tokenizer
from toist_core.structures import ImageBatch
from toist_core.typed_config import save_yaml

POSITION_IDS = "transformer.text_encoder.embeddings.position_ids"
CAPTIONS = ["sit comfortably on something", "open parcel with something"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


def build(name, tokenizer, seed):
    torch.manual_seed(seed)
    return build_model(preset(name), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def segm_model(tokenizer):
    return build("tiny_segm", tokenizer, seed=0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(3)
    return ImageBatch.from_images([torch.randn(3, 64, 96, generator=generator),
                                   torch.randn(3, 72, 64, generator=generator)])


def bank_state(num_clusters=3, dim=128, size=16):
    generator = torch.Generator().manual_seed(5)
    return {"feature_bank": torch.randn(14, size, dim, generator=generator),
            "cluster_centers": torch.randn(14, num_clusters, dim, generator=generator),
            "update_count": torch.full((14,), float(size + 4)), "full_label": torch.ones(14)}


def official_container(ema_state, other_state, cluster=None, args=None):
    """The dict ``main.py`` of the reference saves (transformers-4.5 ``position_ids`` included)."""
    def with_position_ids(state):
        state = dict(state)
        prefix = "detr." if any(k.startswith("detr.") for k in state) else ""
        rows = state[prefix + "transformer.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        state[prefix + POSITION_IDS] = torch.arange(rows).unsqueeze(0)
        return state

    return {"model": with_position_ids(other_state), "model_ema": with_position_ids(ema_state),
            "model_noun": None, "model_noun_ema": None,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0, 1]}]},
            "epoch": 59, "args": args or argparse.Namespace(nheads=8, masks=True, cluster=cluster is not None,
                                                          text_encoder_type="roberta-base", lr=5e-5),
            "cluster_criterion": cluster}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, segm_model, tokenizer):
    """A distilled segmentation file: model_ema = segm_model, model = other random weights."""
    other = build("tiny_segm", tokenizer, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "toist_distilled.pth"
    torch.save(official_container(segm_model.state_dict(), other.state_dict(), cluster=bank_state()), path)
    return path


def outputs(model, images):
    with torch.no_grad():
        return model(images, CAPTIONS)


def test_official_file_loads_ema_weights_and_reproduces_outputs(official_file, segm_model, images, tokenizer):
    loaded = load_official(official_file, config=preset("tiny_segm"), tokenizer=tokenizer)
    expected, got = outputs(segm_model, images), outputs(loaded.model, images)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(expected[key], got[key]), key
    # model_ema was used, not model (which holds other weights).
    other = build("tiny_segm", tokenizer, seed=1)
    assert not torch.equal(outputs(other, images)["pred_logits"], got["pred_logits"])
    ckpt = read_official(official_file)
    assert ckpt.source_key == "model_ema" and ckpt.had_position_ids and ckpt.is_segmentation
    assert isinstance(ckpt.args, argparse.Namespace) and ckpt.args.nheads == 8
    assert not any(k.endswith("position_ids") for k in ckpt.state_dict)


def test_memory_bank_of_distilled_file(official_file, tokenizer):
    loaded = load_official(official_file, config=preset("tiny_segm"), tokenizer=tokenizer)
    expected = bank_state()
    bank = loaded.memory_bank
    assert (bank.num_tasks, bank.size, bank.dim, bank.num_clusters) == (14, 16, 128, 3)
    for key, value in expected.items():
        assert torch.equal(getattr(bank, key), value), key
    assert detect_architecture(read_official(official_file).state_dict, expected).num_clusters == 3


def test_model_is_used_when_model_ema_is_none(tmp_path, segm_model, tokenizer, images):
    container = official_container(segm_model.state_dict(), segm_model.state_dict())
    container["model_ema"] = None
    container["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in container["model"].items()}
    torch.save(container, tmp_path / "plain.pth")
    loaded = load_official(tmp_path / "plain.pth", config=preset("tiny_segm"), tokenizer=tokenizer)
    assert read_official(tmp_path / "plain.pth").source_key == "model"
    first = next(iter(container["model"]))
    assert torch.equal(loaded.model.state_dict()[first], container["model"][first])
    assert loaded.memory_bank is None


def test_detection_only_file(tmp_path, tokenizer, images):
    detector = build("tiny", tokenizer, seed=2)
    torch.save(official_container(detector.state_dict(), detector.state_dict()), tmp_path / "det.pth")
    loaded = load_official(tmp_path / "det.pth", config=preset("tiny"), tokenizer=tokenizer)
    assert isinstance(loaded.model, TOIST) and not loaded.config.masks
    expected, got = outputs(detector, images), outputs(loaded.model, images)
    assert torch.equal(expected["pred_boxes"], got["pred_boxes"])
    assert torch.equal(expected["proj_tokens"], got["proj_tokens"])
    # An MDETR-style file with a head TOIST lacks: refused, unless that head is left out on purpose.
    state = dict(detector.state_dict(), **{"isfinal_embed.weight": torch.zeros(1, 128),
                                           "isfinal_embed.bias": torch.zeros(1)})
    torch.save(official_container(state, state), tmp_path / "mdetr.pth")
    with pytest.raises(CheckpointError, match="2 unexpected tensor.*isfinal_embed"):
        load_official_weights(loaded.model, tmp_path / "mdetr.pth")
    load_official_weights(loaded.model, tmp_path / "mdetr.pth", ignore_prefixes=["isfinal_embed."])


def test_segmentation_file_into_detector_needs_detector_only(official_file, segm_model, tokenizer, images):
    detector = build("tiny", tokenizer, seed=7)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*detr\."):
        load_official_weights(detector, official_file)
    load_official_weights(detector, official_file, detector_only=True)
    with torch.no_grad():
        expected = segm_model.detr(images, CAPTIONS)
        got = detector(images, CAPTIONS)
    assert torch.equal(expected["pred_logits"], got["pred_logits"])


@pytest.mark.parametrize("damage, named, says", [
    ("missing", "detr.class_embed.bias", "1 missing tensor"),
    ("extra", "detr.class_embed.extra", "1 unexpected tensor"),
    ("misshaped", "detr.bbox_embed.layers.2.weight", "1 mis-shaped tensor"),
    # load_state_dict would cast integers into the float weight without a word.
    ("integer", "detr.bbox_embed.layers.2.weight", "1 mis-shaped tensor"),
])
def test_bad_tensors_are_refused_by_name(tmp_path, segm_model, tokenizer, damage, named, says):
    state = dict(segm_model.state_dict())
    if damage == "missing":
        del state[named]
    elif damage == "extra":
        state[named] = torch.zeros(3)
    elif damage == "integer":
        state[named] = torch.ones(4, 128, dtype=torch.int64)
    else:
        state[named] = torch.zeros(5, 128)
    torch.save(official_container(state, state), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=f"{says}.*{named}") as error:
        load_official(tmp_path / "bad.pth", config=preset("tiny_segm"), tokenizer=tokenizer)
    if damage == "misshaped":
        assert "file [5, 128], model [4, 128]" in str(error.value)
    if damage == "integer":
        assert "file dtype torch.int64, model dtype torch.float32" in str(error.value)


def test_non_finite_weights_are_refused_naming_file_key_and_count(tmp_path, segm_model, tokenizer):
    """NaN / inf weights (a diverged training, a damaged file) load nowhere: not from a file, not
    from a model directory, not into an export; no buffer of the official files holds an inf."""
    state = {k: v.clone() for k, v in segm_model.state_dict().items()}
    state["detr.class_embed.weight"][0, :2] = float("nan")
    state["detr.transformer.encoder.layers.0.linear1.weight"][1, 1] = float("-inf")
    torch.save(official_container(state, state), tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=(
            rf"^{tmp_path / 'diverged.pth'} \[model_ema\]: 2 tensor\(s\) hold non-finite values.*"
            r"detr.transformer.encoder.layers.0.linear1.weight \(1 of 16384 values NaN/inf\), "
            r"detr.class_embed.weight \(2 of 32768 values NaN/inf\)")):
        load_official(tmp_path / "diverged.pth", config=preset("tiny_segm"), tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="2 tensor"):
        export_model_dir(tmp_path / "diverged.pth", tmp_path / "exported", config=preset("tiny_segm"))
    assert not (tmp_path / "exported").exists()
    # A model gone NaN in memory is not written: the directory it would replace stays as it was
    # (it was replaced by one that never loads).
    from toist_core.distill.memory_bank import MemoryBank

    directory = save_model_dir(build("tiny_segm", tokenizer, seed=0), tmp_path / "model", preset("tiny_segm"))
    good = (directory / "model.safetensors").read_bytes()
    with torch.no_grad():
        broken = build("tiny_segm", tokenizer, seed=0)
        broken.mask_head.out_lay.bias.fill_(float("inf"))
    with pytest.raises(CheckpointError, match=rf"^the model to be written to {directory}: 1 tensor.*"
                                              r"mask_head.out_lay.bias \(1 of 1 values NaN/inf\); nothing was written$"):
        save_model_dir(broken, directory, preset("tiny_segm"))
    nan_bank = MemoryBank(num_tasks=14, size=16, dim=128)
    with torch.no_grad():
        nan_bank.cluster_centers[2, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"^the memory bank to be written to {directory}: 1 tensor.*"
                                              r"cluster_centers.*; nothing was written$"):
        save_model_dir(build("tiny_segm", tokenizer, seed=0), directory, preset("tiny_segm"), memory_bank=nan_bank)
    assert (directory / "model.safetensors").read_bytes() == good
    assert not (directory / "memory_bank.safetensors").exists()
    load_model_dir(directory)
    # One that holds them anyway (damaged, edited, an older toist's) is refused when read.
    from damaged_model_dirs import fill, with_weights_edited

    with_weights_edited(directory, lambda tensors: fill(tensors, "mask_head.out_lay.bias", float("inf")))
    with pytest.raises(CheckpointError, match=rf"^{directory / 'model.safetensors'}: 1 tensor.*"
                                              r"mask_head.out_lay.bias \(1 of 1 values NaN/inf\)"):
        load_model_dir(directory)
    # The memory bank too.
    bank = bank_state()
    bank["cluster_centers"][3, 1, :5] = float("nan")
    torch.save(official_container(segm_model.state_dict(), segm_model.state_dict(), cluster=bank),
               tmp_path / "bank.pth")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'bank.pth'} \[cluster_criterion\]: 1 tensor.*"
                                              r"cluster_centers \(5 of 5376 values NaN/inf\)"):
        load_official(tmp_path / "bank.pth", config=preset("tiny_segm"), tokenizer=tokenizer)
    # Large finite values whose sum overflows are no NaN (the scan's fast path is a sum).
    from toist_core.checkpoint.strict import non_finite_tensors

    assert non_finite_tensors({"large": torch.full((4,), 3e38), "half": torch.full((4,), 6e4).half()}) == []


@pytest.mark.parametrize("change, says", [
    (dict(feature_bank=torch.zeros(14, 128)), r"feature_bank has shape \[14, 128\]; expected \[tasks, size, dim\]"),
    (dict(cluster_centers=torch.zeros(14)), r"cluster_centers has shape \[14\]; expected \[tasks, K, dim\]"),
    (dict(cluster_centers=torch.zeros(13, 3, 128)),
     r"cluster_centers \[13, 3, 128\] does not fit feature_bank \[14, 16, 128\]"),
    (dict(feature_bank=torch.zeros(14, 16, 64), cluster_centers=torch.zeros(14, 3, 64)),
     r"feature_bank \[14, 16, 64\] holds 64-d features but the model's transformer.d_model is 128"),
    (dict(cluster_centers=torch.zeros(14, 17, 128)), r"need 1 <= num_clusters <= size, got 17 and 16"),
])
def test_memory_bank_that_does_not_fit_the_model_is_refused_by_name(tmp_path, segm_model, tokenizer, change, says):
    """Not a raw unpack / index error, and not at the first predict of a distilled task."""
    bank = dict(bank_state(), **change)
    torch.save(official_container(segm_model.state_dict(), segm_model.state_dict(), cluster=bank),
               tmp_path / "bank.pth")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'bank.pth'} \[cluster_criterion\]: .*{says}"):
        load_official(tmp_path / "bank.pth", config=preset("tiny_segm"), tokenizer=tokenizer)


def test_model_directory_bank_of_another_width_is_refused(tmp_path, segm_model):
    from toist_core.checkpoint.integrity import save_safetensors
    from toist_core.distill.memory_bank import MemoryBank

    # save_model_dir refuses such a bank itself; a directory whose bank file was replaced must be refused too.
    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"),
                               memory_bank=MemoryBank(num_tasks=14, size=16, dim=128))
    save_safetensors(MemoryBank(num_tasks=14, size=16, dim=64).state_dict(), directory / "memory_bank.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{directory / 'memory_bank.safetensors'}: memory bank feature_bank "
                                              r"\[14, 16, 64\] holds 64-d features .*transformer.d_model is 128"):
        load_model_dir(directory)


def test_a_state_dict_of_another_network_is_named_with_its_file(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    for config in (None, preset("tiny")):
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'resnet18.pth'}: not a TOIST/MDETR state_dict: "
                                                  "missing query_embed.weight"):
            load_official(tmp_path / "resnet18.pth", config=config, text_encoder="builtin:tiny")


@pytest.mark.parametrize("kept, says", [
    ("format: toist-model\nversion: 4\n", "no model"),
    ("version: 4\n", "no format, model"),
    ("", "it is empty"),
])
def test_model_directory_config_must_record_format_version_and_model(tmp_path, segm_model, kept, says):
    """Defaults would build the paper network for a directory whose config.yaml lost its model."""
    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"))
    (directory / "config.yaml").write_text(kept)
    with pytest.raises(CheckpointError, match=rf"^{directory / 'config.yaml'}: not a model directory config: {says} "
                                              r"\(it must record format, version, model\)"):
        load_pretrained(directory)


def test_config_mismatch_is_named(official_file, tokenizer):
    cfg = preset("tiny_segm")
    cfg.num_queries = 50
    with pytest.raises(CheckpointError, match="num_queries: checkpoint 100, config 50"):
        load_official(official_file, config=cfg, tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="masks: checkpoint True, config False"):
        load_official(official_file, config=preset("tiny"), tokenizer=tokenizer)


@pytest.mark.parametrize("foreign", [fractions.Fraction(1, 3), decimal.Decimal("0.5")])
def test_foreign_pickled_objects_are_refused(tmp_path, segm_model, foreign):
    container = official_container(segm_model.state_dict(), segm_model.state_dict())
    container["args"].output_dir = foreign  # hidden inside the allowed Namespace
    torch.save(container, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=f"refused.*{type(foreign).__name__}"):
        read_official(tmp_path / "evil.pth")


@pytest.mark.parametrize("path", [pathlib.PosixPath("/checkpoint/mdetr/1234"), pathlib.PurePosixPath("/data/out"),
                                  pathlib.PureWindowsPath("C:/runs/out")])
def test_paths_in_args_load_as_mdetr_submitit_runs_saved_them(tmp_path, segm_model, path):
    """MDETR's run_with_submitit.py sets args.output_dir / job_dir to pathlib paths, saved with
    the checkpoint (its pre-trained R101 file): refused as a foreign pickled object."""
    container = official_container(segm_model.state_dict(), segm_model.state_dict())
    container["args"].output_dir = container["args"].job_dir = path
    torch.save(container, tmp_path / "submitit.pth")
    assert read_official(tmp_path / "submitit.pth").args.output_dir == path


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_official(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_official(tmp_path / "absent.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no 'model_ema' or 'model'"):
        read_official(tmp_path / "empty.pth")


def test_without_pretrain_position_table(tmp_path, tokenizer, images):
    cfg = preset("tiny")
    cfg.text.max_position_embeddings, cfg.text.layer_norm_eps = 512, 1e-12
    torch.manual_seed(4)
    model = build_model(cfg, tokenizer=tokenizer).eval()
    torch.save(official_container(model.state_dict(), model.state_dict()), tmp_path / "wp.pth")
    ckpt = read_official(tmp_path / "wp.pth")
    assert ckpt.had_position_ids and detect_architecture(ckpt.state_dict).text_max_positions == 512
    loaded = load_official(tmp_path / "wp.pth", config=cfg, tokenizer=tokenizer)
    assert torch.equal(outputs(model, images)["pred_logits"], outputs(loaded.model, images)["pred_logits"])
    with pytest.raises(CheckpointError, match="max_position_embeddings: checkpoint 512, config 514"):
        load_official(tmp_path / "wp.pth", config=preset("tiny"), tokenizer=tokenizer)


def test_model_directory_round_trip(tmp_path, official_file, segm_model, tokenizer, images):
    loaded = load_official(official_file, config=preset("tiny_segm"), tokenizer=tokenizer)
    directory = save_model_dir(loaded.model, tmp_path / "model", loaded.config, memory_bank=loaded.memory_bank,
                               pronoun="something", source="toist_distilled.pth")
    for name in ("config.yaml", "model.safetensors", "memory_bank.safetensors", "tokenizer/tokenizer.json"):
        assert (directory / name).is_file(), name
    again = load_pretrained(directory)  # no tokenizer argument: the directory has its own
    assert again.config.masks and again.pronoun == "something"
    assert torch.equal(outputs(segm_model, images)["pred_masks"], outputs(again.model, images)["pred_masks"])
    assert torch.equal(again.memory_bank.cluster_centers, loaded.memory_bank.cluster_centers)
    # A directory missing a tensor is refused by name; one whose file lost its digest too.
    from safetensors.torch import load_file, save_file

    from toist_core.checkpoint.integrity import save_safetensors
    state = load_file(str(directory / "model.safetensors"))
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors: no toist_sha256 in its metadata"):
        load_pretrained(directory)
    del state["mask_head.out_lay.bias"]
    save_safetensors(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="mask_head.out_lay.bias"):
        load_model_dir(directory)


def test_model_directory_records_the_input_size_inference_uses(tmp_path, segm_model):
    from toist_core.config import InferenceConfig, InputSize
    from toist_core.inference import TaskSegmenter

    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"),
                               input_size=InputSize(short_side=112, max_size=256))
    assert load_model_dir(directory).input_size == InputSize(112, 256)
    seg = TaskSegmenter.from_pretrained(directory, device="cpu")
    assert (seg.inference.short_side, seg.inference.max_size) == (112, 256)
    # An explicit size wins; a version 1 directory (no input_size) gets the reference's size.
    seg = TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(short_side=64))
    assert (seg.inference.short_side, seg.inference.max_size) == (64, 256)
    config = directory / "config.yaml"
    text = config.read_text()
    assert "input_size:" in text and "version: 5" in text
    config.write_text(text.split("input_size:")[0].replace("version: 5", "version: 1"))
    # (Weights as the toist of that version wrote them: no record of config.yaml's fields.)
    from toist_core.checkpoint.integrity import read_safetensors, save_safetensors

    weights = directory / "model.safetensors"
    state, metadata = read_safetensors(weights, required_digest=True)
    save_safetensors(state, weights, metadata={k: v for k, v in metadata.items() if k != "toist_manifest"})
    assert load_model_dir(directory).input_size == InputSize(800, 1333)
    config.write_text(text.replace("version: 5", "version: 6"))
    with pytest.raises(CheckpointError, match="version 6 is not a 'toist-model' directory of version 5 or older; a "
                                              "newer toist wrote it: update toist here"):
        load_model_dir(directory)


@pytest.mark.parametrize("cut", ["tasks", "pronoun", "vocabulary"])
def test_a_config_yaml_cut_short_or_edited_is_refused_naming_its_fields(tmp_path, segm_model, cut):
    """A copy cut short inside config.yaml loaded with defaults for what it lost: trained tasks
    1..7 of 14, a phrase cut to 'pound ca', pronoun captions with 'something' instead of 'it'."""
    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"), pronoun="it",
                               tasks=list(range(1, 15)))
    config = directory / "config.yaml"
    text = config.read_text()
    assert load_model_dir(directory).pronoun == "it"
    if cut == "tasks":
        broken = text[: text.index("- 8", text.index("tasks:"))]   # the list's end lost: tasks 1..7
    elif cut == "pronoun":
        broken = text.replace("pronoun: it\n", "")
    else:
        start = text.index("phrase: pound carpet")
        broken = text[: start + len("phrase: pound ca")]
    config.write_text(broken)
    with pytest.raises(CheckpointError, match=rf"config.yaml: {cut} \(.* when exported, .* now\).* differ from what "
                                              "was exported with its weights"):
        load_model_dir(directory)
    config.write_text(text.replace("source: ''", "source: my note") + "# a comment\n")   # neither changes the model
    assert load_model_dir(directory).pronoun == "it"


def test_cli_export(tmp_path, official_file, segm_model, images, capsys):
    config_yaml = tmp_path / "tiny_segm.yaml"
    save_yaml(preset("tiny_segm"), config_yaml)
    out = tmp_path / "exported"
    code = cli.main(["export", str(official_file), str(out), "--config", str(config_yaml)])
    assert code == 0 and "segmentation, memory bank" in capsys.readouterr().out
    loaded = load_model_dir(out)
    assert torch.equal(outputs(segm_model, images)["pred_logits"], outputs(loaded.model, images)["pred_logits"])
    assert loaded.memory_bank is not None
    # Errors come back as an exit code and a message naming the file.
    assert cli.main(["export", str(tmp_path / "absent.pth"), str(tmp_path / "x")]) == 2
    assert "absent.pth" in capsys.readouterr().err


def test_export_never_replaces_a_folder_of_other_files(tmp_path, official_file, segm_model, capsys, monkeypatch):
    """A model directory replaces its folder whole: only a new or empty folder, or a model
    directory holding toist's own files, may be replaced; refused before the checkpoint is read."""
    import shutil

    import toist_core.checkpoint.load as load_module

    config_yaml = tmp_path / "tiny_segm.yaml"
    save_yaml(preset("tiny_segm"), config_yaml)
    export = ["--config", str(config_yaml)]
    read = []
    real = load_module.load_official
    monkeypatch.setattr(load_module, "load_official", lambda *a, **k: read.append(a) or real(*a, **k))
    # The checkpoint's own folder: exporting "into" it would have deleted the checkpoint.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(official_file, run / "toist.pth")
    (run / "notes.txt").write_text("keep me")
    assert cli.main(["export", str(run / "toist.pth"), str(run)] + export) == 2
    err = capsys.readouterr().err
    assert f"{run}: not empty and not a toist model directory (no config.yaml)" in err
    assert "would delete notes.txt, toist.pth" in err and "new or empty folder" in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "toist.pth"] and not read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny_segm.yaml"]   # no staging left
    # A model directory, also with toist's ONNX graphs and TensorRT cache: re-exported in place.
    model = tmp_path / "model"
    assert cli.main(["export", str(official_file), str(model)] + export) == 0
    (model / "detector.onnx").write_bytes(b"graph")
    (model / "trt_cache").mkdir()
    assert cli.main(["export", str(official_file), str(model)] + export) == 0
    assert len(read) == 2 and not (model / "detector.onnx").exists()
    # ... but not with a file of the user's in it.
    (model / "my_eval.csv").write_text("ap\n0.5\n")
    assert cli.main(["export", str(official_file), str(model)] + export) == 2
    err = capsys.readouterr().err
    assert "a toist model directory that also holds other files" in err and "would delete my_eval.csv." in err
    assert (model / "my_eval.csv").exists() and len(read) == 2
    # Another tool's config.yaml is no model directory; an empty folder is fine; a file is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("lr: 0.1\n")
    with pytest.raises(CheckpointError, match=r"its config.yaml has format None.*would delete config.yaml"):
        save_model_dir(segm_model, other, preset("tiny_segm"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_model_dir(save_model_dir(segm_model, empty, preset("tiny_segm"))).config.masks
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        save_model_dir(segm_model, config_yaml, preset("tiny_segm"))


@pytest.mark.slow
def test_paper_size_segmentation_file_loads_without_config(tmp_path, tokenizer):
    """The released files' key set (paper size, ``detr.``, position_ids) loads strictly, with the
    config read from the file."""
    torch.manual_seed(0)
    model = build_model(preset("paper_segm"), tokenizer=tokenizer)
    state = model.state_dict()
    path = tmp_path / "paper_segm.pth"
    container = official_container(state, state)
    container["model"] = None
    torch.save(container, path)
    marker = state["detr.class_embed.bias"].clone()
    del model, state, container
    loaded = load_official(path, tokenizer=tokenizer)
    expected = preset("paper_segm")
    expected.text.tokenizer = loaded.config.text.tokenizer
    assert loaded.config == expected
    assert torch.equal(loaded.model.state_dict()["detr.class_embed.bias"], marker)
    # A 512-row table reads as the "without pretraining" variant (transformers' default eps).
    ckpt = read_official(path)
    ckpt.state_dict["detr.transformer.text_encoder.embeddings.position_embeddings.weight"] = torch.zeros(512, 768)
    variant = detect_architecture(ckpt.state_dict).apply_to(preset("paper"))
    assert (variant.text.max_position_embeddings, variant.text.layer_norm_eps, variant.masks) == (512, 1e-12, True)


def _distilled_dir(model, directory, seed):
    """A model directory of ``model`` with a memory bank of its own (tiny_segm, 14 task slots)."""
    from toist_core.distill.memory_bank import MemoryBank

    torch.manual_seed(seed)
    bank = MemoryBank(num_tasks=14, size=16, dim=128)
    bank.feature_bank.normal_()
    return save_model_dir(model, directory, preset("tiny_segm"), memory_bank=bank), bank


def test_a_directory_records_the_captions_its_model_reads(tmp_path, tokenizer):
    """What the model was trained to read (a noun teacher: noun captions) is in the weights'
    metadata, which older toist ignores; a directory without it reads pronoun captions, and a
    value that is neither is refused by file, key and value."""
    from toist_core.checkpoint.integrity import read_safetensors, save_safetensors

    model = build("tiny", tokenizer, seed=1)
    plain = save_model_dir(model, tmp_path / "plain", preset("tiny"))
    teacher = save_model_dir(model, tmp_path / "teacher", preset("tiny"), captions="noun")
    assert (load_model_dir(plain).captions, load_model_dir(teacher).captions) == ("pronoun", "noun")
    # Given a task's pronoun caption, a noun teacher's results mean little: said, as for an untrained task.
    from toist_core.inference import TaskSegmenter

    segmenter = TaskSegmenter.from_pretrained(teacher, device="cpu")
    assert segmenter.captions == "noun"
    assert "noun teacher" in segmenter.encode_task(2).warning and "'sit comfortably on chair'" in \
        segmenter.encode_task(2).warning
    assert segmenter.encode_task("sit comfortably on couch").warning is None   # free text naming the object
    # One that records its tasks (an official noun teacher: all 14) warned on that free text too,
    # "not one this model was trained on": the very input the first warning asks for.
    with_tasks = save_model_dir(model, tmp_path / "teacher_tasks", preset("tiny"), captions="noun", tasks=[1, 2])
    segmenter = TaskSegmenter.from_pretrained(with_tasks, device="cpu")
    assert segmenter.trained_tasks == (1, 2) and "noun teacher" in segmenter.encode_task(2).warning
    assert segmenter.encode_task("sit comfortably on couch").warning is None
    assert TaskSegmenter.from_pretrained(plain, device="cpu").encode_task(2).warning is None
    with pytest.raises(CheckpointError, match="captions must be one of"):
        save_model_dir(model, tmp_path / "bad", preset("tiny"), captions="verb")
    assert not (tmp_path / "bad").exists()

    weights = teacher / "model.safetensors"
    state, metadata = read_safetensors(weights, required_digest=True)
    save_safetensors(state, weights, metadata={k: v for k, v in metadata.items() if k != "toist_captions"})
    assert load_model_dir(teacher).captions == "pronoun"   # written before the key
    save_safetensors(state, weights, metadata={**metadata, "toist_captions": "nouns"})
    with pytest.raises(CheckpointError, match=rf"^{weights}: metadata toist_captions is 'nouns'"):
        load_model_dir(teacher)


def test_a_directory_replaced_while_it_loads_is_read_again_whole(tmp_path, tokenizer, monkeypatch):
    """Files are read one by one, by path: an export to the same directory between reading the
    weights and the bank gave a model with one export's weights and the other's bank, without a
    word. The load now notices the change and reads the directory again."""
    import toist_core.checkpoint.model_dir as model_dir

    first, second = build("tiny_segm", tokenizer, seed=1), build("tiny_segm", tokenizer, seed=2)
    directory, _ = _distilled_dir(first, tmp_path / "model", seed=1)
    read = model_dir.read_safetensors
    replaced = []

    def export_in_between(path, **kwargs):
        if pathlib.Path(path).name == "memory_bank.safetensors" and not replaced:
            replaced.append(_distilled_dir(second, directory, seed=2)[1])
        return read(path, **kwargs)

    monkeypatch.setattr(model_dir, "read_safetensors", export_in_between)
    loaded = load_model_dir(directory)
    assert replaced
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert torch.equal(loaded.memory_bank.feature_bank, replaced[0].feature_bank)

    # A config.yaml of another model read before its weights: read again, not a shape error.
    other = build("tiny", tokenizer, seed=3)
    directory, _ = _distilled_dir(first, tmp_path / "again", seed=1)
    replaced.clear()

    def export_before_weights(path, **kwargs):
        if pathlib.Path(path).name == "model.safetensors" and not replaced:
            replaced.append(save_model_dir(other, directory, preset("tiny")))
        return read(path, **kwargs)

    monkeypatch.setattr(model_dir, "read_safetensors", export_before_weights)
    loaded = load_model_dir(directory)
    assert replaced and not loaded.config.masks and loaded.memory_bank is None
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.model.state_dict().items())

    # Replaced at every read: an error that says so, after a bounded number of reads.
    def export_every_time(path, **kwargs):
        if pathlib.Path(path).name == "model.safetensors":
            save_model_dir(other, directory, preset("tiny"))
        return read(path, **kwargs)

    monkeypatch.setattr(model_dir, "read_safetensors", export_every_time)
    with pytest.raises(CheckpointError, match=rf"^{directory}: replaced while it loaded, 3 times in a row"):
        load_model_dir(directory)


def test_a_bank_file_of_another_export_is_refused(tmp_path, tokenizer):
    """A memory bank copied in from another export of the same model (same shapes) loaded as if
    it belonged to these weights; the files record which export wrote them."""
    model = build("tiny_segm", tokenizer, seed=1)
    directory, _ = _distilled_dir(model, tmp_path / "a", seed=1)
    other, _ = _distilled_dir(model, tmp_path / "b", seed=2)
    assert load_model_dir(directory).memory_bank is not None
    (directory / "memory_bank.safetensors").write_bytes((other / "memory_bank.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=rf"^{directory / 'memory_bank.safetensors'}: written by another export "
                                              rf"than {directory / 'model.safetensors'} \(export ids [0-9a-f]{{32}} "
                                              r"and [0-9a-f]{32}\): the two files were put together"):
        load_model_dir(directory)


def _edit_config(directory, edit):
    import yaml

    data = yaml.safe_load((directory / "config.yaml").read_text())
    edit(data)
    (directory / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["model"]["text"].update(num_heads=4), r"model.text.num_heads \(2 when exported, 4 now\)"),
    (lambda d: d["model"]["text"].update(layer_norm_eps=1e-12), r"model.text.layer_norm_eps \(1e-05 when exported"),
    (lambda d: d.update(memory_bank=False), "says memory_bank: false but .*memory_bank.safetensors, written by the same "
                                            "export, is there"),
    (lambda d: d.update(tasks=[2, 99]), r"field 'tasks': \[99\] are not task ids of"),
    (lambda d: d.update(version=0), "field 'version': 0 is not a version"),
])
def test_an_edited_directory_config_is_refused_not_loaded_into_another_network(tmp_path, tokenizer, edit, says):
    """config.yaml rebuilds the network: an edited head count or LayerNorm eps loaded the same
    weights into another network (other logits, no error), memory_bank: false dropped cluster-
    centre replacement, and out-of-range fields loaded. The weights record the exported network."""
    model = build("tiny_segm", tokenizer, seed=1)
    directory, _ = _distilled_dir(model, tmp_path / "model", seed=1)
    _edit_config(directory, lambda d: d.update(source="my note"))   # says nothing about the model: still loads
    _edit_config(directory, lambda d: d["model"].update(aux_loss=not d["model"]["aux_loss"]))   # training-only
    _edit_config(directory, lambda d: d["model"]["transformer"].update(dropout=0.5))
    assert load_model_dir(directory).model is not None
    _edit_config(directory, edit)
    with pytest.raises(CheckpointError, match=f"{directory / 'config.yaml'}: .*{says}"):
        load_model_dir(directory)


def test_a_text_encoder_given_for_a_directory_must_be_its_own_tokenizer(tmp_path, tokenizer):
    """`--text-encoder /data/roberta-base`, kept from an official file's command line, replaced a
    directory's own tokenizer: ids of another vocabulary (an IndexError mid-forward, or wrong
    rows). The directory's own tokenizer given again is fine."""
    import json
    import shutil

    model = build("tiny_segm", tokenizer, seed=1)
    directory = save_model_dir(model, tmp_path / "model", preset("tiny_segm"))
    assert load_model_dir(directory, tokenizer=str(directory / "tokenizer")).model is not None
    other = tmp_path / "other_tokenizer"
    shutil.copytree(directory / "tokenizer", other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]       # the same words, other ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"text_encoder '{other}' is not the tokenizer this model directory "
                                              r"was exported with .*leave text_encoder \(--text-encoder\) out"):
        load_model_dir(directory, tokenizer=str(other))
    # A hub name kept from an official file's command line, offline: the remedy is to leave it
    # out (the hub error's own remedy, `toist export`, is what made the directory).
    with pytest.raises(CheckpointError, match=r"text_encoder 'toist-tests/not-cached' is not on this machine .*own tokenizer "
                                              r"folder \('tokenizer'\): leave text_encoder \(--text-encoder\) out"):
        load_model_dir(directory, tokenizer="toist-tests/not-cached")


def test_export_targets_and_inputs_that_cannot_work_are_named(tmp_path, official_file, capsys, monkeypatch):
    """`toist export x.pth .` read the whole file, then failed on an exchange of "." (EBUSY); a
    link to a folder not yet made was "not a folder"; a folder given as the checkpoint was "not
    found"; a config that is not UTF-8 named no file."""
    config_yaml = tmp_path / "tiny_segm.yaml"
    save_yaml(preset("tiny_segm"), config_yaml)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cases = [
        (["export", str(official_file), ".", "--config", str(config_yaml)],
         rf"\.: is the current folder \({here}\) or holds it"),
        (["export", str(official_file), str(tmp_path), "--config", str(config_yaml)], "or holds it"),
        (["export", str(tmp_path / "download"), str(tmp_path / "out"), "--config", str(config_yaml)],
         "download: a folder without config.yaml, so not a model directory; give the checkpoint file"),
        (["export", str(official_file), str(tmp_path / "current"), "--config", str(config_yaml)],
         rf"current: a link to {tmp_path / 'v2'}, which does not exist; create that folder first"),
        (["export", str(official_file), str(tmp_path / "out"), "--config", str(tmp_path / "latin1.yaml")],
         r"latin1.yaml: not a UTF-8 text file \(invalid start byte at byte 0\)"),
    ]
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "toist_distilled.pth").write_bytes(b"")
    (tmp_path / "current").symlink_to(tmp_path / "v2")
    (tmp_path / "latin1.yaml").write_bytes(b"\xff\xfe model: {}")
    for args, says in cases:
        assert cli.main(args) == 2, args
        assert re.search(says, capsys.readouterr().err), (args, says)
    assert sorted(p.name for p in here.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_checkpoint_path_may_start_with_the_home_folder(tmp_path, tokenizer, monkeypatch):
    """`checkpoint:=~/models/toist` reaches the node unexpanded (no shell)."""
    from toist_core.checkpoint import load_pretrained

    monkeypatch.setenv("HOME", str(tmp_path))
    save_model_dir(build("tiny_segm", tokenizer, seed=1), tmp_path / "models" / "toist", preset("tiny_segm"))
    assert load_pretrained("~/models/toist").source == str(tmp_path / "models" / "toist")
    import toist_core.inference.onnx_backend as onnx_backend
    from toist_core.config import InferenceConfig
    from toist_core.inference import TaskSegmenter

    given = []
    monkeypatch.setattr(onnx_backend, "load_with_network",
                        lambda path, *args: given.append(path) or (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):   # the ONNX backends are given the expanded path too
        TaskSegmenter.from_pretrained("~/models/toist", device="cpu", inference=InferenceConfig(backend="onnxruntime"))
    assert given == [tmp_path / "models" / "toist"]


def test_the_export_api_expands_the_home_folder_in_both_paths(tmp_path, tokenizer, monkeypatch):
    """export_model_dir("~/d.pth", "~/models/x") said the file was not found, and wrote a folder
    named "~" into the working directory before failing on its tokenizer."""
    from toist_core.checkpoint import export_model_dir, load_pretrained, read_official

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    model = build("tiny_segm", tokenizer, seed=1)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(nheads=8, masks=True)},
               tmp_path / "home" / "toist.pth")
    assert read_official("~/toist.pth").path == str(tmp_path / "home" / "toist.pth")
    export_model_dir("~/toist.pth", "~/models/toist", text_encoder="builtin:tiny", config=preset("tiny_segm"))
    assert not (tmp_path / "~").exists()
    assert load_pretrained(tmp_path / "home" / "models" / "toist").config.masks


def test_a_bank_file_an_older_export_left_beside_memory_bank_false_is_ignored_and_said(tmp_path, tokenizer, caplog):
    """The first toist versions re-exported into a folder without clearing it: a model without a
    bank exported over a distilled one left the old bank file; those directories loaded, without
    the bank, and still do."""
    import logging

    from toist_core.checkpoint.integrity import save_safetensors
    from toist_core.checkpoint.model_dir import bank_tensors

    model = build("tiny_segm", tokenizer, seed=1)
    directory = save_model_dir(model, tmp_path / "model", preset("tiny_segm"))
    _, bank = _distilled_dir(model, tmp_path / "distilled", seed=1)
    save_safetensors(bank_tensors(bank), directory / "memory_bank.safetensors", metadata={})   # no export id
    with caplog.at_level(logging.WARNING, logger="toist_core.checkpoint"):
        assert load_model_dir(directory).memory_bank is None
    assert "memory_bank.safetensors: not this model's (config.yaml says memory_bank: false" in caplog.text


def test_a_weights_file_its_reader_may_not_read_is_said_to_be_unreadable(tmp_path, segm_model):
    """safetensors said "No such file or directory" for a file that is there (mode 000: an export
    under umask 077 read by a node running as another user)."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("capsh") is None:
        pytest.skip("capsh (libcap) is not installed: root cannot be denied a read without it")
    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"))
    (directory / "model.safetensors").chmod(0)
    script = ("import sys; from toist_core.checkpoint import load_model_dir\n"
              "try:\n    load_model_dir(sys.argv[1])\nexcept Exception as exc:\n    print(exc)\n")
    # Root without the capability to override file permissions, as another user would be.
    result = subprocess.run(["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
                             f'"{sys.executable}" -c "$0" "$1"', script, str(directory)],
                            capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert f"{directory / 'model.safetensors'}: permission denied: make it readable" in result.stdout, \
        (result.stdout, result.stderr)


def test_a_folder_or_file_of_a_model_directory_given_wrongly_is_explained(tmp_path, segm_model):
    """A copy nested one level down, one without config.yaml, or the weights file itself were all
    told to "give the checkpoint file (.pth) inside it", which none of them holds."""
    directory = save_model_dir(segm_model, tmp_path / "copies" / "model", preset("tiny_segm"))
    with pytest.raises(CheckpointError, match=rf"copies: a folder without config.yaml, so not a model directory; "
                                              rf"it holds the model directory {directory} \(a copy nested one level"):
        load_pretrained(tmp_path / "copies")
    (directory / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"it holds model.safetensors: an incomplete copy of a model directory "
                                              r"\(config.yaml is missing\)"):
        load_pretrained(directory)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: not a PyTorch checkpoint .*it is a model "
                                              rf"directory's weights file: give its folder, {directory}"):
        load_pretrained(directory / "model.safetensors")
    # A safetensors file of another name, not in a model directory: that advice led nowhere.
    alone = tmp_path / "converted.safetensors"
    alone.write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"converted.safetensors: not a PyTorch checkpoint .*; a .safetensors "
                                              r"file alone is not a checkpoint toist reads: give the official .pth "
                                              r"file, or a model directory that toist export wrote$"):
        load_pretrained(alone)


def test_a_weights_file_cut_short_says_to_copy_it_again(tmp_path, segm_model):
    """safetensors' own words ("incomplete metadata, file not fully covered") did not say what to do."""
    directory = save_model_dir(segm_model, tmp_path / "model", preset("tiny_segm"))
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file \(.*\); a copy "
                                              r"cut short or damaged\? copy it again"):
        load_model_dir(directory)
