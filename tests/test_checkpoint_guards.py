"""What checkpoint files and model directories record beyond their tensor shapes is checked and
kept: the config a model directory is written with must build the model it holds (variant,
wrapper, head counts, module settings); a file's recorded head count, dilation and stored model
config are compared with a given config and used without one; a local text encoder must describe
the checkpoint's RoBERTa; a distilled model's bank keeps the k-means settings and stale flags of
its training; and files saved in slightly other forms (args as a dict, ``module.`` keys) load.
"""

import argparse
import shutil

import pytest
import torch

from toist_core import typed_config
from toist_core.checkpoint import (CheckpointError, export_model_dir, load_model_dir, load_official, read_official,
                                   save_model_dir)
from toist_core.checkpoint import strict
from toist_core.config import BackboneConfig, preset
from toist_core.distill.cluster import ClusterModule
from toist_core.distill.config import DistillConfig
from toist_core.model import build_model, load_tokenizer
from toist_core.model.text import TINY_TOKENIZER_DIR, roberta_config
from toist_core.structures import ImageBatch

POSITION_IDS = "transformer.text_encoder.embeddings.position_ids"
CAPTION = ["sit comfortably on something"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


def build(cfg, tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, tokenizer=tokenizer).eval()


def tiny(nheads=None, text_heads=None, backbone=None, masks=False):
    cfg = preset("tiny_segm" if masks else "tiny")
    if nheads is not None:
        cfg.transformer.nheads = nheads
    if text_heads is not None:
        cfg.text.num_heads = text_heads
    if backbone is not None:
        cfg.backbone = backbone
    return cfg


@pytest.fixture(scope="module")
def image():
    return ImageBatch.from_images([torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))])


def logits(model, image):
    with torch.no_grad():
        return model(image, CAPTION)["pred_logits"]


def official(state, args=None, cluster=None, **extra):
    """The dict the reference's ``main.py`` saves (``position_ids`` of transformers 4.5 included)."""
    state = dict(state)
    prefix = "detr." if any(k.startswith("detr.") for k in state) else ""
    rows = state[prefix + "transformer.text_encoder.embeddings.position_embeddings.weight"].shape[0]
    state[prefix + POSITION_IDS] = torch.arange(rows).unsqueeze(0)
    return dict({"model": state, "model_ema": dict(state), "model_noun": None, "model_noun_ema": None,
                 "optimizer": {"state": {}, "param_groups": []}, "epoch": 59,
                 "args": args if args is not None else argparse.Namespace(nheads=8), "cluster_criterion": cluster},
                **extra)


def training_checkpoint(model, cfg, distill=None, bank=None, stale=True):
    """What ``toist train`` saves (the parts loading reads)."""
    return {"format": "toist-train", "version": 1, "stage": "distill", "model": model.state_dict(), "model_ema": None,
            "config": {"model": typed_config.to_dict(cfg),
                       "distill": typed_config.to_dict(distill or DistillConfig(feature_dim=cfg.transformer.d_model))},
            "cluster_criterion": bank.state_dict() if bank is not None else None,
            "cluster_stale": bank.stale_flags() if bank is not None and stale else None}


def text_encoder_folder(path, text_cfg):
    """A local RoBERTa folder: the packaged tiny tokenizer files and a config.json."""
    shutil.copytree(TINY_TOKENIZER_DIR, path)
    roberta_config(text_cfg).save_pretrained(str(path))
    return path


# -- save_model_dir: the config must build the model ------------------------------------------------------
def test_a_config_of_another_variant_is_refused_and_the_old_directory_kept(tmp_path, tokenizer):
    model = build(tiny(masks=True), tokenizer)
    directory = save_model_dir(model, tmp_path / "model", preset("tiny_segm"))
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=r"segmentation model .* config has masks: false; 220 missing tensor"):
        save_model_dir(model, directory, preset("tiny"))
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before
    load_model_dir(directory)


@pytest.mark.parametrize("wrap, remedy", [
    (torch.compile, r"pass model\._orig_mod, the module torch\.compile wrapped"),
    (torch.nn.DataParallel, r"pass model\.module, the module DataParallel"),
])
def test_a_wrapped_model_is_refused_naming_the_module_to_pass(tmp_path, tokenizer, wrap, remedy):
    model = build(tiny(), tokenizer)
    directory = save_model_dir(model, tmp_path / "model", preset("tiny"))
    with pytest.raises(CheckpointError, match=remedy):
        save_model_dir(wrap(model), directory, preset("tiny"))
    load_model_dir(directory)


@pytest.mark.parametrize("built, says", [
    (tiny(nheads=4), r"transformer\.nheads: model 4 \(transformer\.encoder\.layers\.0\.self_attn\), config 8"),
    (tiny(text_heads=4), r"text\.num_heads: model 4 \(transformer\.text_encoder\.encoder\.layer\.0\.attention\.self\), "
                         r"config 2"),
    (tiny(backbone=BackboneConfig(name="resnet50", dilation=True)),
     r"module\(s\) set up otherwise: backbone\.0\.body\.layer4\.0\.conv2 \(model .*stride=\(1, 1\)"),
])
def test_settings_shapes_cannot_tell_are_compared_with_the_config(tmp_path, tokenizer, built, says):
    """A model of 4 heads saved with a config of 8 used to load silently, with other logits."""
    config = tiny(backbone=BackboneConfig(name=built.backbone.name))
    with pytest.raises(CheckpointError, match=says):
        save_model_dir(build(built, tokenizer), tmp_path / "model", config)
    assert not (tmp_path / "model").exists()


def test_a_memory_bank_of_another_width_is_refused_when_saved(tmp_path, tokenizer):
    from toist_core.distill.memory_bank import MemoryBank

    with pytest.raises(CheckpointError, match=r"memory bank of 64-d features, config transformer\.d_model 128"):
        save_model_dir(build(tiny(), tokenizer), tmp_path / "model", preset("tiny"),
                       memory_bank=MemoryBank(num_tasks=14, size=16, dim=64))


def test_a_part_that_cannot_be_built_on_the_meta_device_is_built_on_the_cpu(tmp_path, tokenizer, monkeypatch):
    import toist_core.model

    real, devices = toist_core.model.build_model, []

    def meta_refusing(cfg, tokenizer=None):
        devices.append(torch.get_default_device().type)
        if devices[-1] == "meta":
            raise NotImplementedError("no meta kernel")
        return real(cfg, tokenizer=tokenizer)

    monkeypatch.setattr(toist_core.model, "build_model", meta_refusing)
    model = build(tiny(nheads=4), tokenizer)
    with pytest.raises(CheckpointError, match=r"transformer\.nheads: model 4"):
        save_model_dir(model, tmp_path / "model", preset("tiny"))
    assert devices == ["meta", "cpu"]
    save_model_dir(model, tmp_path / "model", tiny(nheads=4))


# -- what a file records besides its shapes --------------------------------------------------------------
def test_args_nheads_is_compared_with_a_given_config_and_used_without(tmp_path, tokenizer, image):
    trained = build(tiny(nheads=4), tokenizer)
    path = tmp_path / "nheads4.pth"
    torch.save(official(trained.state_dict(), argparse.Namespace(nheads=4)), path)
    with pytest.raises(CheckpointError, match=r"transformer\.nheads: checkpoint 4 \(args\.nheads\), config 8"):
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)
    folder = text_encoder_folder(tmp_path / "roberta", preset("tiny").text)
    loaded = load_official(path, text_encoder=str(folder))
    assert loaded.config.transformer.nheads == 4
    assert torch.equal(logits(loaded.model, image), logits(trained, image))


def test_args_given_as_a_dict_are_read_like_a_namespace(tmp_path, tokenizer):
    """Files re-saved with ``vars(args)`` used to be refused ("'args' is a dict")."""
    trained = build(tiny(nheads=4), tokenizer)
    path = tmp_path / "dict_args.pth"
    torch.save(official(trained.state_dict(), {"nheads": 4, "masks": False}), path)
    assert read_official(path).args == argparse.Namespace(nheads=4, masks=False)
    with pytest.raises(CheckpointError, match=r"transformer\.nheads: checkpoint 4 \(args\.nheads\), config 8"):
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)
    assert load_official(path, config=tiny(nheads=4), tokenizer=tokenizer).config.transformer.nheads == 4


def test_args_dilation_is_compared_with_a_given_config_and_used_without(tmp_path, tokenizer, image):
    """The reference's DC5 option (--dilation) leaves every shape alone."""
    dc5 = tiny(backbone=BackboneConfig(name="resnet50", dilation=True))
    trained = build(dc5, tokenizer)
    path = tmp_path / "dc5.pth"
    torch.save(official(trained.state_dict(), argparse.Namespace(nheads=8, dilation=True, backbone="resnet50")), path)
    with pytest.raises(CheckpointError, match=r"backbone\.dilation: checkpoint True \(args\.dilation\), config False"):
        load_official(path, config=tiny(backbone=BackboneConfig(name="resnet50")), tokenizer=tokenizer)
    folder = text_encoder_folder(tmp_path / "roberta", preset("tiny").text)
    loaded = load_official(path, text_encoder=str(folder))
    assert loaded.config.backbone.dilation
    with torch.no_grad():
        assert torch.equal(loaded.model(image, CAPTION)["pred_boxes"], trained(image, CAPTION)["pred_boxes"])


@pytest.mark.parametrize("option, says", [
    (dict(pass_pos_and_query=False), r"args\.pass_pos_and_query=False, i\.e\. --no_pass_pos_and_query"),
    (dict(pre_norm=True), r"args\.pre_norm=True, i\.e\. --pre_norm"),
    (dict(position_embedding="learned"), r"args\.position_embedding='learned'"),
])
def test_reference_options_toist_cannot_run_are_refused(tmp_path, tokenizer, option, says):
    path = tmp_path / "option.pth"
    torch.save(official(build(tiny(), tokenizer).state_dict(), argparse.Namespace(nheads=8, **option)), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: trained with {says}.*cannot be used"):
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)


def test_the_reference_defaults_of_those_options_load(tmp_path, tokenizer):
    path = tmp_path / "defaults.pth"
    args = argparse.Namespace(nheads=8, dilation=False, pass_pos_and_query=True, pre_norm=False,
                              position_embedding="sine", contrastive_loss=False, backbone="resnet18")
    torch.save(official(build(tiny(), tokenizer).state_dict(), args), path)
    assert load_official(path, config=preset("tiny"), tokenizer=tokenizer).config.transformer.nheads == 8


def _renamed_backbone(state, old, new, drop=()):
    return {k.replace(old, new): v for k, v in state.items() if not k.startswith(tuple(drop))}


@pytest.mark.parametrize("args, edit, says", [
    (argparse.Namespace(nheads=8, backbone="timm_tf_efficientnet_b3_ns"),
     lambda state: _renamed_backbone(state, "backbone.0.body.", "backbone.0.body.blocks_"),   # timm's names
     r"trained with args\.backbone='timm_tf_efficientnet_b3_ns'; its state_dict holds backbone tensors of another "
     r"network \(backbone\.0\.body\.blocks_conv1\.weight, "),
    (None, lambda state: _renamed_backbone(state, "", "", drop=("backbone.0.body.layer3.1.",)),
     r"its state_dict holds a ResNet of 2, 2, 1, 2 basic blocks in layer1\.\.4, which no torchvision ResNet has"),
    (argparse.Namespace(nheads=8), lambda state: _renamed_backbone(state, "", "", drop=("backbone.0.body.",)),
     r"its state_dict holds no backbone tensors \(backbone\.0\.body\.\*\)"),
], ids=["efficientnet", "resnet_of_other_blocks", "no_backbone"])
def test_a_backbone_toist_cannot_build_is_refused_by_name_before_a_model_is_built(tmp_path, tokenizer, monkeypatch,
                                                                                  args, edit, says):
    """An MDETR EfficientNet file built a paper-size ResNet-101 (the paper's backbone stood in for
    the one the keys did not name), whose strict load then listed 520 missing tensors."""
    import toist_core.model

    path = tmp_path / "other_backbone.pth"
    state = edit(build(tiny(), tokenizer).state_dict())
    torch.save(official(state, args) if args is not None else state, path)
    monkeypatch.setattr(toist_core.model, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    supported = r"toist builds only the torchvision backbones resnet18, resnet34, resnet50, resnet101, resnet152, " \
                r"mobilenet_v2, so these weights cannot be loaded"
    # With the text encoder's config.json every other size derives: only the backbone is unknown.
    folder = text_encoder_folder(tmp_path / "roberta", preset("tiny").text)
    with pytest.raises(CheckpointError, match=rf"^{path}: {says}.*: {supported}$"):
        load_official(path, text_encoder=str(folder))
    with pytest.raises(CheckpointError, match=supported):   # a given config does not make it loadable
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)


def test_a_mobilenet_file_is_recognised_by_its_keys(tmp_path, tokenizer, image):
    """Without a config, a MobileNetV2 backbone (the default model's) was taken for the paper's
    ResNet-101; with a config of another backbone its strict load listed 360 tensors by name."""
    trained = build(tiny(backbone=BackboneConfig(name="mobilenet_v2")), tokenizer)
    path = tmp_path / "mobilenet.pth"
    torch.save(official(trained.state_dict(), argparse.Namespace(nheads=8)), path)
    with pytest.raises(CheckpointError, match=r"backbone\.name: checkpoint 'mobilenet_v2', config 'resnet18'"):
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)
    loaded = load_official(path, text_encoder=str(text_encoder_folder(tmp_path / "roberta", preset("tiny").text)))
    assert loaded.config.backbone.name == "mobilenet_v2"
    assert torch.equal(logits(loaded.model, image), logits(trained, image))


def test_a_segmentation_file_whose_args_contradict_its_mask_head_is_refused(tmp_path, tokenizer):
    """The mask head takes d_model + nheads channels: its shape tells the head count."""
    path = tmp_path / "segm.pth"
    torch.save(official(build(tiny(masks=True), tokenizer).state_dict(), argparse.Namespace(nheads=4)), path)
    with pytest.raises(CheckpointError, match=r"args\.nheads is 4 but mask_head\.lay1\.weight \[136, 136, 3, 3\] was "
                                              r"built for 8 heads"):
        load_official(path, config=preset("tiny_segm"), tokenizer=tokenizer)


def test_a_training_checkpoint_stored_config_is_compared_with_a_given_config(tmp_path, tokenizer):
    cfg4 = tiny(nheads=4)
    path = tmp_path / "train4.pth"
    torch.save(training_checkpoint(build(cfg4, tokenizer), cfg4), path)
    with pytest.raises(CheckpointError, match=r"transformer\.nheads: checkpoint 4 \(its stored config\.model\), "
                                              r"config 8"):
        load_official(path, config=preset("tiny"), tokenizer=tokenizer)
    # Training switches and starting weights are not the network: another tokenizer / dropout is fine.
    given = tiny(nheads=4)
    given.transformer.dropout, given.text.tokenizer, given.aux_loss = 0.0, "elsewhere", False
    assert load_official(path, config=given, tokenizer=tokenizer).config.transformer.nheads == 4
    assert load_official(path, tokenizer=tokenizer).config.transformer.nheads == 4


def test_a_text_encoder_of_another_vocabulary_than_the_training_checkpoints_is_refused(tmp_path, tokenizer):
    """A training checkpoint took any text_encoder: its captions became other token ids, and an
    export carried that tokenizer on, without a word (a model directory refused the same)."""
    import json

    cfg = tiny()   # records builtin:tiny, which is here to compare with
    path = tmp_path / "train.pth"
    torch.save(training_checkpoint(build(cfg, tokenizer), cfg), path)
    swapped = tmp_path / "swapped"
    shutil.copytree(TINY_TOKENIZER_DIR, swapped)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = tokenizer("sit comfortably on something")["input_ids"][1:3]
    names = {index: token for token, index in vocab.items()}
    vocab[names[first]], vocab[names[second]] = second, first   # two ordinary tokens' ids swapped
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    in_config = tiny()
    in_config.text.tokenizer = str(swapped)
    for call in (lambda: load_official(path, text_encoder=str(swapped)),
                 lambda: export_model_dir(path, tmp_path / "exported", text_encoder=str(swapped)),
                 lambda: export_model_dir(path, tmp_path / "exported", config=in_config)):
        with pytest.raises(CheckpointError, match=r"train\.pth: tokenizer '.*swapped' is not the one this checkpoint "
                                                  r"was trained with \('builtin:tiny', whose vocabulary differs\)"):
            call()
    assert not (tmp_path / "exported").exists()
    same = tmp_path / "same"   # a copy of the recorded tokenizer: fine
    shutil.copytree(TINY_TOKENIZER_DIR, same)
    assert load_official(path, text_encoder=str(same)).model is not None
    # Another recorded name (a hub name, a folder of the training machine) is never opened here
    # (nor the network): the one used is logged beside it.
    elsewhere = training_checkpoint(build(cfg, tokenizer), cfg)
    elsewhere["config"]["model"]["text"]["tokenizer"] = str(tmp_path / "training_machine" / "roberta")
    torch.save(elsewhere, tmp_path / "elsewhere.pth")
    assert load_official(tmp_path / "elsewhere.pth", text_encoder=str(same)).model is not None


def test_a_training_checkpoint_never_opens_the_vocabulary_file_it_names(tmp_path, tokenizer, monkeypatch):
    """A downloaded file whose config.data named a vocabulary path without its entries had that path
    read (any YAML on the machine became the model's tasks; /dev/zero was read until memory ran
    out; an unreadable file's error quoted its content)."""
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("name: elsewhere\ntasks:\n- {id: 1, phrase: 'not the checkpoint's'}\n")
    cfg = tiny()
    checkpoint = training_checkpoint(build(cfg, tokenizer), cfg)
    checkpoint["config"]["data"] = {"vocabulary": str(elsewhere), "tasks": [1]}
    torch.save(checkpoint, tmp_path / "named.pth")
    from toist_core import tasks

    opened = []
    monkeypatch.setattr(tasks.TaskVocabulary, "load", classmethod(lambda cls, path: opened.append(path)))
    with pytest.raises(CheckpointError, match=r"named\.pth: \[config\.data\] names the vocabulary file .*elsewhere"
                                              r"\.yaml' but records no vocabulary_entries"):
        load_official(tmp_path / "named.pth", tokenizer=tokenizer)
    assert opened == []
    # With its entries (what training writes) the path is left alone, wherever it points.
    checkpoint["config"]["data"] = {"vocabulary": "/dev/zero", "vocabulary_name": "mine", "tasks": [1],
                                    "vocabulary_entries": [{"id": 1, "phrase": "cut paper with"}]}
    torch.save(checkpoint, tmp_path / "recorded.pth")
    loaded = load_official(tmp_path / "recorded.pth", tokenizer=tokenizer)
    assert [e.phrase for e in loaded.vocabulary.entries] == ["cut paper with"] and opened == []


def test_a_config_naming_a_far_larger_network_is_refused_before_it_is_built(tmp_path, tokenizer):
    """400 million queries in a model directory's config.yaml (older directories record no config
    beside the weights to compare it with) or a training checkpoint's stored config: 205 GB asked
    for, and a bare RuntimeError, before the strict load could name the tensor."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = tiny()
    model = build(cfg, tokenizer)
    directory = save_model_dir(model, tmp_path / "model", cfg)
    weights = directory / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    for key in ("toist_model_config", "toist_manifest"):   # as a directory written before they were recorded
        metadata.pop(key)
    save_file(tensors, str(weights), metadata=metadata)
    settings = yaml.safe_load((directory / "config.yaml").read_text())
    settings["model"]["num_queries"] = 400_000_000
    (directory / "config.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(CheckpointError, match=r"query_embed\.weight \(file \[100, 128\], model \[400000000, 128\]\)"):
        load_model_dir(directory, tokenizer="builtin:tiny")
    checkpoint = training_checkpoint(model, cfg)
    checkpoint["config"]["model"]["num_queries"] = 400_000_000
    torch.save(checkpoint, tmp_path / "huge.pth")
    with pytest.raises(CheckpointError, match=r"stored config\.model differ: num_queries: checkpoint 100, config "
                                              r"400000000"):
        load_official(tmp_path / "huge.pth", tokenizer=tokenizer)


def test_a_text_encoder_folder_of_another_roberta_is_refused(tmp_path, tokenizer):
    """Its head count (8) divides the checkpoint's width and loaded silently, with other logits."""
    path = tmp_path / "tiny.pth"
    torch.save(official(build(tiny(), tokenizer).state_dict()), path)
    other = preset("tiny").text
    other.hidden_size, other.num_layers, other.num_heads, other.intermediate_size = 256, 4, 8, 512
    folder = text_encoder_folder(tmp_path / "other", other)
    with pytest.raises(CheckpointError, match=rf"the text encoder folder {folder} describes another RoBERTa than the "
                                              r"checkpoint's \(hidden_size: checkpoint 64, config\.json 256; "
                                              r"num_layers: checkpoint 2, config\.json 4; intermediate_size: "
                                              r"checkpoint 128, config\.json 512\)"):
        load_official(path, text_encoder=str(folder))


# -- files saved in other forms --------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_weights_saved_from_a_wrapper_load_without_its_prefix(tmp_path, tokenizer, image, prefix, caplog):
    trained = build(tiny(), tokenizer)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {prefix + k: v for k, v in trained.state_dict().items()}, "model_ema": None,
                "args": argparse.Namespace(nheads=8)}, path)
    with caplog.at_level("INFO", logger="toist_core.checkpoint"):
        loaded = load_official(path, config=preset("tiny"), tokenizer=tokenizer)
    assert torch.equal(logits(loaded.model, image), logits(trained, image))
    assert read_official(path).stripped_prefix == prefix
    assert f"the '{prefix}' prefix of every key removed" in caplog.text


def test_asking_for_model_weights_when_only_the_ema_is_there_says_so(tmp_path, tokenizer):
    container = official(build(tiny(), tokenizer).state_dict())
    container["model"] = None
    torch.save(container, tmp_path / "ema_only.pth")
    with pytest.raises(CheckpointError, match=r"'model' is None in the checkpoint but 'model_ema' holds weights"):
        read_official(tmp_path / "ema_only.pth", weights="model")
    container["model_ema"] = None
    del container["model"]
    torch.save(container, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"no 'model_ema' or 'model' weights in the checkpoint \('model_ema' is "
                                              r"None, 'model' is absent"):
        read_official(tmp_path / "none.pth")


# -- the memory bank keeps its training's k-means settings ------------------------------------------------
def trained_bank(distill, batches, spread=False):
    """A ClusterModule's bank after ``batches`` updates of task 1, and the centres training used.
    ``spread``: a last update replaces the whole (full) bank by points spread unevenly along a
    line, on which a warm-started k-means needs many iterations to settle."""
    module = ClusterModule(distill)
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        module.bank.update(torch.randn(20, distill.feature_dim, generator=generator) * 3, [0] * 20)
    if spread:
        direction = torch.randn(distill.feature_dim, generator=generator)
        rows = (torch.arange(distill.bank_size, dtype=torch.float32) ** 2)[:, None] * direction / direction.norm()
        module.bank.update(rows, [0] * distill.bank_size)
    return module.bank, module.bank.cluster(0).clone()


@pytest.mark.parametrize("distill, batches, stale", [
    # Not yet full: k-means starts from rows drawn with distill.seed (used to be seed 0 after loading).
    (DistillConfig(seed=7, bank_size=64, feature_dim=128, num_clusters=3), 2, True),
    (DistillConfig(seed=7, bank_size=64, feature_dim=128, num_clusters=3), 2, False),
    # Full, 1 k-means iteration per update: its centres moved again at the first use after loading
    # (every task stale); the saved stale flags say they are current.
    (DistillConfig(seed=3, bank_size=16, feature_dim=128, num_clusters=3, kmeans_max_iter=1), 2, True),
])
def test_a_distilled_training_checkpoint_keeps_its_cluster_centres(tmp_path, tokenizer, distill, batches, stale):
    bank, centres = trained_bank(distill, batches, spread=distill.kmeans_max_iter == 1)
    cfg = tiny()
    path = tmp_path / "distilled.pth"
    torch.save(training_checkpoint(build(cfg, tokenizer), cfg, distill, bank, stale=stale), path)
    loaded = load_official(path, tokenizer=tokenizer)
    assert torch.equal(loaded.memory_bank.cluster(0), centres)
    exported = export_model_dir(path, tmp_path / "model")
    reloaded = load_model_dir(tmp_path / "model")
    assert torch.equal(reloaded.memory_bank.stale_flags(), exported.memory_bank.stale_flags())
    assert torch.equal(reloaded.memory_bank.cluster(0), centres)
    settings = strict.BankSettings(seed=distill.seed, kmeans_tol=distill.kmeans_tol,
                                   kmeans_max_iter=distill.kmeans_max_iter)
    assert strict.BankSettings.of_bank(loaded.memory_bank) == settings
    assert strict.BankSettings.of_bank(reloaded.memory_bank) == settings


def test_official_banks_keep_the_reference_settings_and_the_directory_records_them(tmp_path, tokenizer):
    generator = torch.Generator().manual_seed(5)
    cluster = {"feature_bank": torch.randn(14, 16, 128, generator=generator),
               "cluster_centers": torch.randn(14, 3, 128, generator=generator),
               "update_count": torch.full((14,), 4.0), "full_label": torch.zeros(14)}
    path = tmp_path / "official.pth"
    torch.save(official(build(tiny(), tokenizer).state_dict(), cluster=cluster), path)
    loaded = export_model_dir(path, tmp_path / "model", config=preset("tiny"), text_encoder="builtin:tiny")
    bank = loaded.memory_bank
    reference = strict.BankSettings(seed=0, kmeans_tol=1e-4, kmeans_max_iter=None, kmeans_rerun="on_change",
                                    update="closest")
    assert strict.BankSettings.of_bank(bank) == strict.BankSettings() == reference
    assert bank.stale_flags().all()
    text = (tmp_path / "model" / "config.yaml").read_text()
    assert "memory_bank_settings:\n  seed: 0\n  kmeans_tol: 0.0001\n  kmeans_max_iter: null" in text
    reloaded = load_model_dir(tmp_path / "model")
    assert reloaded.memory_bank.stale_flags().all()
    assert torch.equal(reloaded.memory_bank.cluster(2), bank.cluster(2))
    # Settings edited into a k-means that would never stop are refused by name.
    (tmp_path / "model" / "config.yaml").write_text(text.replace("kmeans_tol: 0.0001", "kmeans_tol: 0"))
    with pytest.raises(ValueError, match=r"memory_bank_settings: kmeans_tol: must be > 0"):
        load_model_dir(tmp_path / "model")


def test_a_distill_section_that_does_not_describe_the_bank_is_refused(tmp_path, tokenizer):
    distill = DistillConfig(seed=7, bank_size=64, feature_dim=128)
    bank, _ = trained_bank(distill, 1)
    cfg = tiny()
    path = tmp_path / "distilled.pth"
    torch.save(training_checkpoint(build(cfg, tokenizer), cfg, DistillConfig(bank_size=32, feature_dim=128), bank),
               path)
    with pytest.raises(CheckpointError, match=r"\[config\.distill\]: does not describe the file's memory bank "
                                              r"\(bank_size 32, bank 64\)"):
        load_official(path, tokenizer=tokenizer)
