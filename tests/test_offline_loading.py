"""Loading without network: hub names looked up locally first, a fast and helpful failure when
the hub cannot be had, exported model directories that need nothing else, and the one log
line that says what an official file held.

The network scenarios run in a fresh interpreter, so that the Hugging Face client sees an
empty cache (``HF_HOME``) and an endpoint on a closed loopback port from its import on, as a
robot would; nothing ever leaves this machine.
"""

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from toist_core import cli
from toist_core.checkpoint import export_model_dir, load_official
from toist_core.config import preset
from toist_core.model import build_model, load_tokenizer
from toist_core.model import hub as hub_module
from toist_core.model.hub import TextEncoderUnavailable, fetch_pretrained, hub_offline_reason, probe_hub
from toist_core.model.text import TINY_TOKENIZER_DIR, fetch_tokenizer
from toist_core.typed_config import save_yaml

REPO = Path(__file__).resolve().parent.parent
POSITION_IDS = "transformer.text_encoder.embeddings.position_ids"
FAIL_WITHIN_S = 2.0


def closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toist_args(distilled: bool, **options) -> dict:
    """The TOIST options every run's ``args`` holds (argparse writes their defaults)."""
    return {"cluster": distilled, "distillation": distilled, "verb_noun_input": False, "without_pretrain": False,
            **options}


def official_container(state, ema=True, cluster=None, args=None):
    """The dict the reference's ``main.py`` saves (``position_ids`` of transformers 4.5 included);
    ``args``: the run's options (default: a TOIST run's, distilled when there is a bank)."""
    state = dict(state)
    prefix = "detr." if any(k.startswith("detr.") for k in state) else ""
    rows = state[prefix + "transformer.text_encoder.embeddings.position_embeddings.weight"].shape[0]
    state[prefix + POSITION_IDS] = torch.arange(rows).unsqueeze(0)
    return {"model": state, "model_ema": dict(state) if ema else None, "model_noun": None, "model_noun_ema": None,
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 59,
            "args": argparse.Namespace(nheads=8, masks=bool(prefix), text_encoder_type="roberta-base",
                                       **(toist_args(cluster is not None) if args is None else args)),
            "cluster_criterion": cluster}


def bank_state(num_clusters=3, dim=128, size=8):
    generator = torch.Generator().manual_seed(5)
    return {"feature_bank": torch.randn(14, size, dim, generator=generator),
            "cluster_centers": torch.randn(14, num_clusters, dim, generator=generator),
            "update_count": torch.full((14,), float(size)), "full_label": torch.ones(14)}


def save_official(path, config, ema=True, cluster=None, seed=0, args=None):
    torch.manual_seed(seed)
    model = build_model(config, tokenizer=load_tokenizer("builtin:tiny"))
    torch.save(official_container(model.state_dict(), ema=ema, cluster=cluster, args=args), path)
    return path


@pytest.fixture(scope="module")
def offline_files(tmp_path_factory):
    """An official-format file whose text encoder is RoBERTa-shaped enough for the ``paper`` head
    count (so that, given no config, its tokenizer defaults to ``roberta-base``), and a model
    directory exported with ``toist export --text-encoder <local tokenizer dir>``."""
    root = tmp_path_factory.mktemp("offline")
    hub_default = preset("tiny_segm")
    hub_default.text.hidden_size, hub_default.text.num_heads = 96, 12
    pth = save_official(root / "toist_distilled.pth", hub_default, cluster=bank_state())
    segm = root / "tiny_segm.pth"
    save_official(segm, preset("tiny_segm"), cluster=bank_state())
    config_yaml = root / "tiny_segm.yaml"
    save_yaml(preset("tiny_segm"), config_yaml)
    exported = root / "exported"
    assert cli.main(["export", str(segm), str(exported), "--config", str(config_yaml),
                     "--text-encoder", str(TINY_TOKENIZER_DIR)]) == 0
    return {"pth": pth, "exported": exported, "root": root}


# The scenarios, in a fresh interpreter; prints one JSON object. Imports come before the clock
# starts: what is timed is the load itself (the waiting a robot would see on top of start-up).
SCENARIOS = r"""
import json, sys, time
t0 = time.monotonic()
import numpy as np
import transformers
from transformers import AutoTokenizer, RobertaModel
from toist_core.checkpoint import load_pretrained
from toist_core.inference import TaskSegmenter
from toist_core.model.text import TINY_TOKENIZER_DIR, load_tokenizer
imports = time.monotonic() - t0
pth, exported = sys.argv[1], sys.argv[2]
out = {"imports_s": imports}

def attempt(name, call):
    start = time.monotonic()
    try:
        call()
        out[name] = {"ok": True}
    except Exception as exc:
        out[name] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    out[name]["seconds"] = time.monotonic() - start

attempt("hub_tokenizer", lambda: load_tokenizer("roberta-base"))
attempt("paper_preset", lambda: TaskSegmenter.from_config("paper"))
attempt("official_file", lambda: load_pretrained(pth))
attempt("local_tokenizer", lambda: load_tokenizer(str(TINY_TOKENIZER_DIR)))
attempt("tiny_preset", lambda: TaskSegmenter.from_config("tiny_segm"))

def exported_dir():
    from toist_core.config import InferenceConfig
    seg = TaskSegmenter.from_pretrained(exported, device="cpu", task=2,
                                        inference=InferenceConfig(short_side=48, max_size=64))
    seg.predict(np.zeros((48, 64, 3), dtype=np.uint8))

attempt("exported_dir", exported_dir)
print(json.dumps(out))
"""


def run_scenarios(files, tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and not k.lower().endswith("_proxy")}
    hf_home = tmp_path / "empty_hf_home"
    hf_home.mkdir()
    env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), NO_PROXY="*",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **env_changes)
    done = subprocess.run([sys.executable, "-c", SCENARIOS, str(files["pth"]), str(files["exported"])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), hf_home


def check_fast_failure(result, hf_home, reason):
    for name in ("hub_tokenizer", "paper_preset", "official_file"):
        failure = result[name]
        assert not failure["ok"], name
        assert failure["seconds"] < FAIL_WITHIN_S, (name, failure["seconds"])
        message = failure["message"]
        assert failure["type"] == "TextEncoderUnavailable", (name, message)
        assert "tokenizer 'roberta-base'" in message and str(hf_home) in message, message
        assert reason in message, message
        assert "--text-encoder roberta-base" in message and "text_encoder=<dir>" in message, message
        assert "text_encoder:=<dir>" in message, message
    # Loading a file: the recipe names that very file.
    assert "toist_distilled.pth toist_distilled_dir/ --text-encoder" in result["official_file"]["message"]


def check_local_loads(result):
    for name in ("local_tokenizer", "tiny_preset", "exported_dir"):
        assert result[name]["ok"], (name, result[name])


def test_hub_unreachable_fails_fast_and_local_sources_load(offline_files, tmp_path):
    port = closed_loopback_port()
    result, hf_home = run_scenarios(offline_files, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    check_fast_failure(result, hf_home, f"cannot connect to 127.0.0.1:{port}")
    check_local_loads(result)
    print({k: round(v["seconds"], 3) for k, v in result.items() if isinstance(v, dict)},
          "imports", round(result["imports_s"], 2))


def test_offline_mode_never_tries_the_hub(offline_files, tmp_path):
    # The endpoint is a closed port too, so a client that tried anyway would fail differently.
    # (TRANSFORMERS_OFFLINE: test_offline_variables_are_read_at_call_time.)
    port = closed_loopback_port()
    result, hf_home = run_scenarios(offline_files, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}",
                                    HF_HUB_OFFLINE="1")
    check_fast_failure(result, hf_home, "HF_HUB_OFFLINE=1 is set")
    check_local_loads(result)


def test_probe_is_bounded_when_the_connection_hangs(monkeypatch):
    """A connection attempt (or name lookup) that hangs past the timeout: the probe answers while
    it still hangs (a probe that waited for it would return its error instead)."""
    entered, release = threading.Event(), threading.Event()

    def hang(address, timeout=None):
        entered.set()
        release.wait(30)
        raise OSError("never answered")

    monkeypatch.setattr(hub_module.socket, "create_connection", hang)
    try:
        reason = probe_hub("https://hub.invalid", timeout=0.3)
        still_hanging = entered.is_set() and not release.is_set()
    finally:
        release.set()
    assert still_hanging
    assert reason == "no connection to hub.invalid:443 within 0.3 s"


def test_probe_goes_to_the_proxy(monkeypatch):
    seen = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout=None):
        seen.append(address)
        return Connection()

    monkeypatch.setattr(hub_module.socket, "create_connection", connect)
    monkeypatch.setenv("https_proxy", "http://proxy.lan:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert probe_hub("https://huggingface.co") is None
    assert seen == [("proxy.lan", 3128)]


def test_offline_variables_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub_offline_reason() == "TRANSFORMERS_OFFLINE=yes is set"


def test_missing_path_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist and it is not a Hugging Face model name"):
        fetch_pretrained(lambda *a, **k: None, str(tmp_path / "no_such_tokenizer"), "tokenizer")


def test_local_sources_say_where_they_came_from():
    assert fetch_tokenizer("builtin:tiny").origin.startswith("packaged tiny tokenizer")
    assert fetch_tokenizer(str(TINY_TOKENIZER_DIR)).origin == f"local directory {TINY_TOKENIZER_DIR}"


def test_unavailable_error_names_the_checkpoint_in_the_recipe():
    error = TextEncoderUnavailable("tokenizer", "roberta-base", ["the Hugging Face cache /x"],
                                   "HF_HUB_OFFLINE=1 is set")
    message = str(error.for_checkpoint("/data/toist_k5.pth"))
    assert "`toist export /data/toist_k5.pth toist_k5_dir/ --text-encoder roberta-base`" in message
    assert isinstance(error, OSError)


# -- the one log line of an official file ------------------------------------------------------
def load_records(caplog, path, config, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="toist_core"):
        loaded = load_official(path, config=config, **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "toist_core.checkpoint.load"]
    assert len(lines) == 1, lines
    return loaded, lines[0]


def test_log_line_of_a_distilled_segmentation_file(tmp_path, caplog):
    path = save_official(tmp_path / "toist_distilled.pth", preset("tiny_segm"), cluster=bank_state())
    loaded, line = load_records(caplog, path, preset("tiny_segm"))
    assert loaded.memory_bank is not None
    assert line.startswith(f"loaded {path} (official TOIST file): segmentation (mask head); ")
    assert "distilled: memory bank for 14 tasks (8 features each, K=3 cluster centres)" in line
    assert "EMA weights (model_ema)" in line
    assert "text encoder RoBERTa 2 layers x 64, 514 positions (weights from the file" in line
    assert f"tokenizer 'builtin:tiny' from packaged tiny tokenizer ({TINY_TOKENIZER_DIR})" in line


@pytest.mark.parametrize("kind", ["mdetr", "noun teacher"])
def test_mdetr_and_noun_teacher_files_say_what_they_read_and_warn_on_task_captions(tmp_path, caplog, capsys, kind):
    """MDETR's pre-training file (args without TOIST's options) and TOIST's noun teacher loaded as
    pronoun TOIST models without a word, and `toist export` offered them to the node."""
    from toist_core.inference import TaskSegmenter, UntrainedTaskWarning

    args = {} if kind == "mdetr" else toist_args(False, verb_noun_input=True)
    path = save_official(tmp_path / f"{kind.replace(' ', '_')}.pth", preset("tiny"), args=args)
    loaded, line = load_records(caplog, path, preset("tiny"))
    assert loaded.captions == "noun"
    if kind == "mdetr":
        assert f"loaded {path} (MDETR file, not TOIST: trained on captions naming objects, on no COCO-Tasks task" in line
        assert loaded.tasks == ()
    else:
        assert f"loaded {path} (official TOIST file, noun teacher: reads captions naming the objects" in line
        assert loaded.tasks == tuple(range(1, 15))
    seg = TaskSegmenter.from_pretrained(str(path), device="cpu", config=preset("tiny"))
    with pytest.warns(UntrainedTaskWarning, match="trained on captions that name the objects"):
        seg.set_task(2)
    out = tmp_path / "exported"
    assert cli.main(["export", str(path), str(out), "--config", str(_config_file(tmp_path, "tiny"))]) == 0
    printed = capsys.readouterr().out
    assert "not the node" in printed and "checkpoint:=" not in printed
    assert TaskSegmenter.from_pretrained(str(out), device="cpu").captions == "noun"


def test_a_bare_state_dict_says_it_cannot_tell_and_loads_as_toist(tmp_path, caplog):
    """No args to read: neither MDETR nor a noun teacher can be told; loaded as a TOIST file."""
    torch.manual_seed(0)
    model = build_model(preset("tiny"), tokenizer=load_tokenizer("builtin:tiny"))
    path = tmp_path / "weights_only.pth"
    torch.save(model.state_dict(), path)
    loaded, line = load_records(caplog, path, preset("tiny"))
    assert f"loaded {path} (official file without its args (TOIST or MDETR)): " in line
    assert loaded.captions == "pronoun" and loaded.tasks == tuple(range(1, 15))


def test_a_toist_file_is_offered_to_the_node(tmp_path, capsys):
    path = save_official(tmp_path / "toist_plain.pth", preset("tiny"))
    out = tmp_path / "exported"
    assert cli.main(["export", str(path), str(out), "--config", str(_config_file(tmp_path, "tiny"))]) == 0
    assert f"checkpoint:={out} for the node" in capsys.readouterr().out


def _config_file(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    save_yaml(preset(name), path)
    return path


def test_log_line_names_the_bank_slots_training_filled(tmp_path, caplog):
    """A model trained on some tasks keeps random features in the other slots: the line says
    which slots hold features, not that there is a bank for all 14."""
    bank = bank_state()
    bank["update_count"] = torch.zeros(14)
    bank["update_count"][[0, 1, 2, 4]] = 8.0
    path = save_official(tmp_path / "toist_four_tasks.pth", preset("tiny_segm"), cluster=bank)
    _, line = load_records(caplog, path, preset("tiny_segm"))
    assert ("distilled: memory bank for 4 of its 14 task slots (tasks 1, 2, 3, 5; "
            "8 features each, K=3 cluster centres)") in line
    bank["update_count"] = torch.zeros(14)
    path = save_official(tmp_path / "toist_unfilled.pth", preset("tiny_segm"), cluster=bank)
    _, line = load_records(caplog, path, preset("tiny_segm"))
    assert "distilled: memory bank of 14 task slots, none ever filled (8 features each" in line


def test_log_line_of_a_plain_detection_file(tmp_path, caplog):
    path = save_official(tmp_path / "toist_plain.pth", preset("tiny"), ema=False)
    _, line = load_records(caplog, path, preset("tiny"), text_encoder=str(TINY_TOKENIZER_DIR))
    assert "detection only (no mask head); not distilled (no memory bank)" in line
    assert "raw weights (model; the file has no EMA)" in line
    assert f"from local directory {TINY_TOKENIZER_DIR}" in line
    _, line = load_records(caplog, path, preset("tiny"), weights="model")
    assert "raw weights (model, as asked)" in line


def test_local_text_encoder_directory_gives_tokenizer_and_architecture(tmp_path, caplog):
    """A local RoBERTa directory (tokenizer files + config.json) is all an official file needs:
    no model config, no hub; the log line says where the architecture came from."""
    import shutil

    from toist_core.model.text import roberta_config

    encoder_dir = tmp_path / "roberta-local"
    shutil.copytree(TINY_TOKENIZER_DIR, encoder_dir)
    roberta_config(preset("tiny_segm").text).save_pretrained(str(encoder_dir))
    path = save_official(tmp_path / "toist_distilled.pth", preset("tiny_segm"), cluster=bank_state())
    loaded, line = load_records(caplog, path, None, text_encoder=str(encoder_dir))
    assert loaded.config.text.num_heads == 2 and loaded.config.masks
    assert f"architecture from {encoder_dir / 'config.json'}" in line
    assert f"from local directory {encoder_dir}" in line


def test_home_relative_text_encoder_directory_gives_its_architecture_too(tmp_path, monkeypatch, caplog):
    """``~/dir`` names the same folder for the tokenizer and for config.json: without the
    config.json the paper's 12 heads would not divide the 64-wide text encoder."""
    import shutil

    from toist_core.model.text import roberta_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    encoder_dir = tmp_path / "home" / "tok"
    shutil.copytree(TINY_TOKENIZER_DIR, encoder_dir)
    roberta_config(preset("tiny_segm").text).save_pretrained(str(encoder_dir))
    path = save_official(tmp_path / "toist_distilled.pth", preset("tiny_segm"), cluster=bank_state())
    loaded, line = load_records(caplog, path, None, text_encoder="~/tok")
    assert loaded.config.text.num_heads == 2
    assert f"architecture from {encoder_dir / 'config.json'}" in line


# -- a tokenizer folder without its vocabulary ------------------------------------------------------
def vocabulary_files(directory: Path) -> Path:
    """``vocab.json`` + ``merges.txt`` (what a roberta-base download holds besides
    tokenizer.json) of the packaged tiny tokenizer, without tokenizer.json."""
    model = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return directory


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path):
    """transformers builds a tokenizer of the 5 special tokens from tokenizer_config.json or a
    RoBERTa config.json alone: every caption would become [</s>, <unk>] and every task give the
    same output. The folder is refused by name; the folders toist and roberta-base ship load."""
    import shutil

    from toist_core.model.text import roberta_config

    config_only = tmp_path / "config_only"
    roberta_config(preset("tiny").text).save_pretrained(str(config_only))
    settings_only = tmp_path / "settings_only"
    settings_only.mkdir()
    shutil.copy(TINY_TOKENIZER_DIR / "tokenizer_config.json", settings_only)
    for folder, holds in ((config_only, "config.json"), (settings_only, "tokenizer_config.json")):
        with pytest.raises(OSError, match=f"local directory {folder}: it has no vocabulary "
                                          rf"\(tokenizer.json or vocab.json \+ merges.txt needed; it holds {holds}\)"):
            fetch_tokenizer(str(folder))
    caption = "sit comfortably on something"
    expected = load_tokenizer("builtin:tiny")(caption)["input_ids"]
    assert load_tokenizer(str(vocabulary_files(tmp_path / "bpe_files")))(caption)["input_ids"] == expected
    # Exporting with such a folder as the text encoder writes nothing.
    from toist_core.checkpoint import export_model_dir

    segm = save_official(tmp_path / "tiny_segm.pth", preset("tiny_segm"))
    with pytest.raises(OSError, match=f"{config_only}: it has no vocabulary"):
        export_model_dir(segm, tmp_path / "exported", text_encoder=str(config_only), config=preset("tiny_segm"))
    assert not (tmp_path / "exported").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused_before_anything_is_written(tmp_path):
    """A saved WordPiece (BERT-style) tokenizer given as --text-encoder for an official file was
    accepted: captions became ids the RoBERTa never learnt, and export froze it into the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(["sit comfortably on something", "step on chair"] * 10,
                                  trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                                            "[SEP]"]))
    folder = tmp_path / "bert_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    path = save_official(tmp_path / "toist.pth", preset("tiny"))
    config = preset("tiny")
    with pytest.raises(ValueError, match=r"pads with token id 0, the text encoder with 1 \(text.pad_token_id\): "
                                         r"a tokenizer of another vocabulary"):
        export_model_dir(path, tmp_path / "exported", text_encoder=str(folder), config=config)
    assert not (tmp_path / "exported").exists()


def test_model_directory_that_lost_its_tokenizer_json_is_refused(offline_files, tmp_path):
    import shutil

    from toist_core.checkpoint import load_pretrained

    broken = tmp_path / "model"
    shutil.copytree(offline_files["exported"], broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(OSError, match=f"local directory {broken / 'tokenizer'}: it has no vocabulary"):
        load_pretrained(broken)


def test_a_tokenizer_of_special_tokens_only_builds_no_model(tmp_path):
    """Whatever loaded it: a tokenizer with no ordinary token maps every caption alike."""
    from transformers import AutoTokenizer

    from toist_core.model.text import roberta_config

    roberta_config(preset("tiny").text).save_pretrained(str(tmp_path / "config_only"))
    specials_only = AutoTokenizer.from_pretrained(str(tmp_path / "config_only"), local_files_only=True)
    assert len(specials_only) == 5
    with pytest.raises(ValueError, match=f"tokenizer '{tmp_path / 'config_only'}' has only its 5 special tokens"):
        build_model(preset("tiny"), tokenizer=specials_only)
    wider = preset("tiny")
    wider.text.vocab_size = 50265
    build_model(wider, tokenizer=load_tokenizer("builtin:tiny"))  # fewer tokens than rows: fine (test_model_keys)
