"""Model / inference configuration: presets, YAML round trip, validation."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from toist_core.config import (TINY_TOKENIZER, BackboneConfig, InferenceConfig, InputSize, ModelConfig, PRESETS,
                               preset)
from toist_core.typed_config import ConfigError, from_dict, load_yaml, merge, save_yaml, to_dict


def test_paper_preset_has_reference_sizes():
    cfg = preset("paper")
    assert cfg.backbone.name == "resnet101" and not cfg.backbone.dilation
    assert cfg.backbone.channels == (256, 512, 1024, 2048)
    t = cfg.transformer
    assert (t.d_model, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward, t.dropout) == (256, 8, 6, 6, 2048, 0.1)
    x = cfg.text
    assert (x.vocab_size, x.hidden_size, x.num_layers, x.num_heads, x.intermediate_size) == (50265, 768, 12, 12, 3072)
    assert (x.max_position_embeddings, x.layer_norm_eps, x.type_vocab_size) == (514, 1e-5, 1)
    assert (cfg.num_queries, cfg.contrastive_dim, cfg.contrastive_align, cfg.masks) == (100, 64, True, False)
    assert x.weights is None and cfg.backbone.weights is None  # random weights by default


def test_variant_presets():
    segm = preset("paper_segm")
    assert segm.masks and not segm.contrastive_align and not segm.aux_loss
    wp = preset("paper_without_pretrain")
    assert (wp.text.max_position_embeddings, wp.text.layer_norm_eps) == (512, 1e-12)
    tiny = preset("tiny")
    assert tiny.text.tokenizer == TINY_TOKENIZER and tiny.backbone.channels == (64, 128, 256, 512)
    assert preset("tiny_segm").masks


def test_presets_are_fresh_copies():
    a = preset("paper")
    a.transformer.d_model = 7
    assert preset("paper").transformer.d_model == 256


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="papr"):
        preset("papr")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    cfg = preset(name)
    path = tmp_path / "model.yaml"
    save_yaml(cfg, path)
    assert load_yaml(ModelConfig, path) == cfg


def test_yaml_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("transformer:\n  d_model: wide\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*transformer.d_model"):
        load_yaml(ModelConfig, path)
    path.write_text("backbone:\n  name: resnet7\n")
    with pytest.raises(ConfigError, match="resnet7"):
        load_yaml(ModelConfig, path)
    with pytest.raises(ConfigError, match="num_querys"):
        from_dict(ModelConfig, {"num_querys": 3})


def test_yaml_alias_bombs_and_deep_nesting_are_refused_naming_the_file(tmp_path):
    """A kilobyte of nested aliases ("billion laughs") expands to billions of nodes once printed
    in an error (30 s and 1.8 GB at eight levels); deep nesting raised a bare RecursionError."""
    from toist_core.typed_config import read_yaml

    bomb = tmp_path / "bomb.yaml"
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]" for k in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\ntransformer:\n  d_model: *a8\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: not valid YAML: expands to more than 1,000,000 values"):
        load_yaml(ModelConfig, bomb)
    # Anchors, aliases and merge keys as people write them stay fine.
    shared = tmp_path / "shared.yaml"
    shared.write_text("base: &base {d_model: 64, nheads: 4}\ntransformer:\n  <<: *base\n  enc_layers: 2\n")
    assert read_yaml(shared)["transformer"] == {"d_model": 64, "nheads": 4, "enc_layers": 2}
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50000 + "]" * 50000)
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML: nested too deeply to read"):
        read_yaml(deep)
    assert read_yaml(_plain(tmp_path)) == {"a": [1, 2]}


def _plain(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("a: [1, 2]\n")
    return path


def test_merge_and_validation():
    cfg = merge(preset("tiny"), {"masks": True, "transformer": {"dec_layers": 3}})
    assert cfg.masks and cfg.transformer.dec_layers == 3 and cfg.transformer.d_model == 128
    # The mask head's GroupNorm(8) needs d_model >= 128.
    with pytest.raises(ConfigError, match="GroupNorm"):
        merge(preset("tiny"), {"masks": True, "transformer": {"d_model": 64}})
    with pytest.raises(ConfigError, match="divisible"):
        merge(preset("tiny"), {"transformer": {"nheads": 5}})
    with pytest.raises(ConfigError, match="num_heads"):
        merge(preset("paper"), {"text": {"num_heads": 7}})


def test_inference_config_validation():
    assert InferenceConfig().short_side is None and InferenceConfig().max_size is None  # the model's own
    with pytest.raises(ConfigError, match="score_threshold"):
        InferenceConfig(score_threshold=1.5)
    with pytest.raises(ConfigError, match="precision"):
        from_dict(InferenceConfig, {"precision": "int8"})
    with pytest.raises(ConfigError, match="short_side"):
        InferenceConfig(short_side=900, max_size=800)
    with pytest.raises(ConfigError, match="max_size must be 1..16384"):
        InferenceConfig(max_size=0)
    assert to_dict(InferenceConfig())["mean"] == [0.485, 0.456, 0.406]


def test_inference_sizes_left_to_the_model_come_from_its_input_size():
    own = InputSize(short_side=112, max_size=256)
    resolved = InferenceConfig(score_threshold=0.3).with_input_size(own)
    assert (resolved.short_side, resolved.max_size, resolved.score_threshold) == (112, 256, 0.3)
    assert InferenceConfig(short_side=800, max_size=1333).with_input_size(own).short_side == 800  # set: kept
    # One side given: the other follows the model's without contradicting it.
    assert InferenceConfig(short_side=400).with_input_size(own).max_size == 400
    assert InferenceConfig(max_size=100).with_input_size(own).short_side == 100
    assert InferenceConfig().with_input_size(InputSize()).short_side == 800  # the reference's


@pytest.mark.parametrize("field, value, says", [
    ("ccr", "false", "inference.ccr must be true or false, got 'false'"),      # a non-empty string is true
    ("channels_last", 1, "inference.channels_last must be true or false, got 1"),
    ("pronoun", 5, "inference.pronoun: expected a word"),
    ("pronoun", " ", "inference.pronoun: expected a word"),
    # kept in every caption as tokens of their own: every score moved, without a word
    ("pronoun", " something ", "inference.pronoun: expected a word without spaces or newlines around it"),
    ("pronoun", "something\n", "inference.pronoun: expected a word without spaces"),
    # reached predict, which asked torch for 9e18 bytes
    ("short_side", 10 ** 9, r"inference.short_side must be 1..16384 \(or None"),
    ("max_size", 20000, r"inference.max_size must be 1..16384"),
    ("mean", (float("nan"), 0.5, 0.5), r"inference.mean must be finite numbers, got \[nan, 0.5, 0.5\]"),
    ("std", (float("inf"), 0.2, 0.2), "inference.std must be finite numbers"),
    ("short_side", 800.0, "inference.short_side must be an integer, got 800.0"),
    ("score_threshold", True, "inference.score_threshold must be a number, got True"),
])
def test_inference_config_refuses_ill_typed_fields(field, value, says):
    with pytest.raises(ConfigError, match=says):
        InferenceConfig(**{field: value})


def test_backbone_channels():
    assert BackboneConfig(name="resnet34").channels == (64, 128, 256, 512)
    assert BackboneConfig(name="resnet50").channels == (256, 512, 1024, 2048)


def test_config_imports_without_torch():
    code = "import sys, toist_core.config, toist_core.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("data, says", [
    ({"transformer": {"nheads": 0}}, "transformer: transformer.nheads must be >= 1, got 0"),
    ({"transformer": {"d_model": 130, "nheads": 2}}, "transformer.d_model must be a multiple of 4"),
    ({"text": {"num_heads": 0}}, "text: text.num_heads must be >= 1, got 0"),
    ({"transformer": {"d_model": 0}}, "transformer: transformer.d_model must be >= 1, got 0"),
    ({"transformer": {"enc_layers": -1}}, "transformer: transformer.enc_layers must be >= 0, got -1"),
    ({"transformer": {"dropout": 2.0}}, r"transformer: transformer.dropout must be in \[0, 1\], got 2.0"),
    ({"text": {"resizer_dropout": -0.1}}, r"text: text.resizer_dropout must be in \[0, 1\], got -0.1"),
    ({"text": {"max_position_embeddings": 3}}, "text: text.max_position_embeddings 3 leaves no room for a caption"),
    ({"backbone": {"name": "resnet34", "dilation": True}},
     "backbone: backbone.dilation: true is not possible with resnet34"),
    ({"contrastive_dim": 0}, ": contrastive_dim must be >= 1, got 0"),
])
def test_out_of_range_model_values_are_refused_naming_file_and_field(tmp_path, data, says):
    """Refused when the file is read, not later as a ZeroDivisionError, a NotImplementedError of
    torchvision or an index error inside RoBERTa."""
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}.*{says}"):
        load_yaml(ModelConfig, path)


def test_edge_values_that_build_a_network_are_kept():
    cfg = merge(preset("tiny"), {"transformer": {"enc_layers": 0, "dropout": 0.0}, "text": {"resizer_dropout": 1.0}})
    assert cfg.transformer.enc_layers == 0
    for name in ("resnet50", "resnet101", "mobilenet_v2"):
        assert BackboneConfig(name=name, dilation=True).dilation
    assert merge(preset("paper"), {"text": {"max_position_embeddings": 4}}).text.max_position_embeddings == 4


def test_normalisation_and_input_size_ranges_are_checked():
    with pytest.raises(ConfigError, match=r"^inf.yaml: inference.std must be > 0 for every channel, got \[0.0, 0.0"):
        from_dict(InferenceConfig, {"std": [0, 0, 0]}, "inf.yaml")
    with pytest.raises(ConfigError, match=r"inference.std must be > 0 .*got \[-1.0, 1.0, 1.0\]"):
        InferenceConfig(std=(-1.0, 1.0, 1.0))
    # A model directory's input_size: the error names that section, not inference.short_side.
    with pytest.raises(ConfigError, match=r"^config.yaml.input_size: input_size.short_side must be 1\.\.16384, got 0"):
        from_dict(InputSize, {"short_side": 0, "max_size": 0}, "config.yaml.input_size")
    with pytest.raises(ConfigError, match="input_size: need short_side <= max_size, got 800 / 700"):
        InputSize(800, 700)
    # A "no cap" 10000 of a training config is a size a model may record; 10**9 (a damaged or
    # crafted directory) is refused when read, not when predict asked torch for 9e18 bytes.
    resolved = InferenceConfig(score_threshold=0.3).with_input_size(InputSize(800, 10000))
    assert (resolved.short_side, resolved.max_size, resolved.score_threshold) == (800, 10000, 0.3)
    import dataclasses

    assert dataclasses.replace(resolved, mask_threshold=0.6).max_size == 10000   # a run-time change
    with pytest.raises(ConfigError, match=r"input_size.max_size must be 1..16384, got 1000000000"):
        InputSize(800, 10 ** 9)
    from toist_core.data.config import DataConfig

    with pytest.raises(ValueError, match=r"max_size: 20000: a size in pixels, 1..16384"):
        DataConfig(max_size=20000)
    assert InputSize(64, 64) == InputSize(short_side=64, max_size=64)


def test_caption_length_is_capped_by_the_position_table():
    """RoBERTa numbers positions from pad_token_id + 1: a 100-row table holds 98 tokens. A longer
    caption is refused by name, not an index error inside the embedding; the usual tables keep
    the class head's 256-token cap, and captions within the limit tokenize as before."""
    import torch

    from toist_core.model import build_model, load_tokenizer
    from toist_core.model.text import max_caption_tokens, tokenize

    tokenizer = load_tokenizer(TINY_TOKENIZER)
    assert max_caption_tokens(preset("paper").text) == 256                      # 514 rows: 512 usable
    assert max_caption_tokens(preset("paper_without_pretrain").text) == 256     # 512 rows: 510 usable
    short = merge(preset("tiny"), {"text": {"max_position_embeddings": 100}})
    assert max_caption_tokens(short.text) == 98
    torch.manual_seed(0)
    model = build_model(short, tokenizer=tokenizer).eval()
    fits, too_long = " ".join(["on"] * 96), " ".join(["on"] * 98)            # 98 and 100 tokens with <s> </s>
    assert len(tokenizer(fits)["input_ids"]) == 98 and len(tokenizer(too_long)["input_ids"]) == 100
    ids = tokenize(tokenizer, [fits], torch.device("cpu"), short.text)["input_ids"]
    assert ids.tolist() == [tokenizer(fits)["input_ids"]]
    with torch.no_grad():
        assert model.encode_text([fits]).num_tokens == 98
        with pytest.raises(ValueError, match=r"caption too long: 100 tokens \(at most 98: "
                                             r"text.max_position_embeddings 100 less RoBERTa's pad_token_id \+ 1"):
            model.encode_text([too_long])
    # A text longer than any 98 tokens can be is refused unread: the tokenizer took seconds for
    # millions of characters (a task topic message) before the token count refused it.
    from toist_core.model.text import MAX_CHARS_PER_TOKEN

    class Counting:
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return tokenizer(*args, **kwargs)

    huge = "on " * (98 * MAX_CHARS_PER_TOKEN // 3 + 1)
    with pytest.raises(ValueError, match=rf"caption too long: {len(huge)} characters, more than 98 tokens can hold"):
        tokenize(Counting(), ["sit on", huge], torch.device("cpu"), short.text)
    assert Counting.calls == 0
    longest_fitting = "x" * (98 * MAX_CHARS_PER_TOKEN)   # refused by its token count, after tokenizing
    with pytest.raises(ValueError, match=r"caption too long: \d+ tokens"):
        tokenize(Counting(), [longest_fitting], torch.device("cpu"), short.text)
    assert Counting.calls == 1


def test_yaml_files_are_read_as_utf_8_whatever_the_locale(tmp_path):
    """A task vocabulary with `phrase: "découper avec"` was refused as "not a UTF-8 text file"
    under LANG=C (Python read it in the locale's encoding; convert-coco read the same file as
    UTF-8). Model directories' config.yaml files are read the same way."""
    import os

    vocabulary = tmp_path / "vocabulary.yaml"
    vocabulary.write_text('name: atelier\ntasks:\n  - {id: 1, phrase: "découper avec", pronoun: "quelque chose"}\n',
                          encoding="utf-8")
    code = ("import sys; from toist_core.typed_config import read_yaml; "
            "print(read_yaml(sys.argv[1])['tasks'][0]['phrase'].encode('utf-8').hex())")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(vocabulary)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert bytes.fromhex(done.stdout.strip()).decode("utf-8") == "découper avec"


def test_a_key_given_twice_is_refused_naming_the_file_and_both_lines(tmp_path):
    """yaml.safe_load keeps the last copy of a repeated key: a second `optim:` block appended to a
    training config replaced the first, its other fields back at their defaults, and --check
    said OK. Merge keys overridden beside them stay fine."""
    from training.config import load_config
    from toist_core.typed_config import read_yaml

    base = (Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_pronoun.yaml").read_text()
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(base + "optim:\n  lr: 0.5\n")
    first = next(n for n, line in enumerate(base.splitlines(), 1) if line.startswith("optim:"))
    second = len(base.splitlines()) + 1
    with pytest.raises(ConfigError, match=rf"doubled\.yaml: not valid YAML: key 'optim' given twice, on line "
                                          rf"{first} and on line {second}"):
        load_config(doubled)
    inline = tmp_path / "inline.yaml"
    inline.write_text("optim: {lr: 1.0e-4, lr: 2.0e-4}\n")
    with pytest.raises(ConfigError, match=r"inline\.yaml: not valid YAML: key 'lr' given twice, on line 1 and on line 1"):
        read_yaml(inline)
    original = tmp_path / "original.yaml"
    original.write_text(base)
    with pytest.raises(ConfigError, match=r"key 'lr' given twice"):   # in an override's value too
        load_config(original, ["optim={lr: 1.0e-4, lr: 2.0e-4}"])
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &base {d_model: 64, nheads: 4}\ntransformer:\n  <<: *base\n  d_model: 32\n")
    assert read_yaml(merged)["transformer"] == {"d_model": 32, "nheads": 4}
    # An anchored mapping with its own merge and override, merged again at a shallower level:
    # PyYAML splices the merged pairs into the node in place, which read as the key given twice.
    nested = tmp_path / "nested.yaml"
    nested.write_text("a:\n  b: &base\n    <<: {k: 0}\n    k: 1\nc:\n  <<: *base\n  k: 2\n")
    assert read_yaml(nested) == {"a": {"b": {"k": 1}}, "c": {"k": 2}}
    # The same key node twice through an alias is a repeat too; "=" (YAML's value key) is a key.
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text("&k lr: 1\n*k : 2\n")
    with pytest.raises(ConfigError, match=r"aliased\.yaml: not valid YAML: key 'lr' given twice"):
        read_yaml(aliased)
    equals = tmp_path / "equals.yaml"
    equals.write_text("a: {=: 1, b: 2}\n")
    assert read_yaml(equals) == {"a": {"=": 1, "b": 2}}
