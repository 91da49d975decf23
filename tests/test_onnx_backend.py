"""ONNX export and the onnxruntime / tensorrt backends: ORT on CPU against PyTorch (fp32)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements/base.txt: run `make setup`")

from toist_core.checkpoint import CheckpointError, save_model_dir  # noqa: E402
from toist_core.checkpoint.model_dir import ONNX_DIGESTS_FILE  # noqa: E402
from toist_core.config import InferenceConfig, preset  # noqa: E402
from toist_core.distill.memory_bank import MemoryBank  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.inference import onnx_export  # noqa: E402
from toist_core.inference.onnx_backend import OnnxNetwork  # noqa: E402
from toist_core.inference.onnx_export import (DETECTOR_FILE, MASK_HEAD_FILE, MAX_BOX_DIFF, MAX_LOGIT_DIFF,  # noqa: E402
                                              MIN_MASK_IOU, check_passes, compare_backends, export_onnx)
from toist_core.model import build_model, load_tokenizer  # noqa: E402
from toist_core.typed_config import ConfigError  # noqa: E402

SMALL = dict(short_side=64, max_size=128)
# (H, W) of the test images: landscape, portrait, odd sizes (padded to multiples of 32 under the
# default pad_multiple; test_..._padded_sizes_of_no_multiple_of_32 runs them unpadded).
SIZES = ((48, 64), (90, 50), (53, 97))


def _model(seed: int):
    """Random ``tiny_segm`` weights, unprepared (exactly the tensors a model directory holds)."""
    cfg = preset("tiny_segm")
    torch.manual_seed(seed)
    return build_model(cfg, tokenizer=load_tokenizer(cfg.text.tokenizer)).eval(), cfg


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A plain and a distilled model directory with the same weights (so the same graphs: the
    graph takes the cluster centres as an input), exported once."""
    root = tmp_path_factory.mktemp("onnx")
    model, cfg = _model(seed=0)
    plain = save_model_dir(model, root / "plain", cfg)
    export_onnx(model, plain)
    bank = MemoryBank(num_tasks=14, size=32, dim=128, num_clusters=3, seed=3)
    bank.full_label.fill_(1)
    distilled = save_model_dir(model, root / "distilled", cfg, memory_bank=bank)
    for name in (DETECTOR_FILE, MASK_HEAD_FILE, ONNX_DIGESTS_FILE):
        shutil.copy(plain / name, distilled / name)
    return plain, distilled


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("which", ["plain", "distilled"])
def test_onnxruntime_matches_torch_on_dynamic_sizes_and_tasks(dirs, which):
    directory = dirs[0] if which == "plain" else dirs[1]
    result = compare_backends(directory, tasks=(1, 2), sizes=SIZES, **SMALL)
    assert result["providers"] == ["CPUExecutionProvider"]
    assert result["logits"] <= MAX_LOGIT_DIFF and result["boxes"] <= MAX_BOX_DIFF, result
    assert result["mask_iou"] >= MIN_MASK_IOU, result
    assert check_passes(result)


@pytest.mark.parametrize("inference", [dict(pad_multiple=1), dict(protocol="reference")])
def test_onnxruntime_matches_torch_on_padded_sizes_of_no_multiple_of_32(dirs, inference):
    """The graphs' separate stride-4/8/16 sizes exist for such inputs (pad_multiple other than 32,
    the reference protocol's padding to the batch); the images above, padded to multiples of 32,
    never gave one."""
    result = compare_backends(dirs[1], tasks=(1,), sizes=SIZES, **SMALL, **inference)
    assert all(h % 32 or w % 32 for h, w in result["padded"]), result["padded"]
    assert check_passes(result), result


def test_distilled_graph_applies_cluster_centre_replacement(dirs):
    """The in-graph replacement is the torch path's: with a centre far from the rows the logits
    change, and ORT follows torch (not the unreplaced memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_seg = TaskSegmenter.from_pretrained(dirs[1], device="cpu", inference=InferenceConfig(**SMALL))
        onnx_seg = TaskSegmenter.from_pretrained(dirs[1], device="cpu",
                                                 inference=InferenceConfig(backend="onnxruntime", **SMALL))
        state = torch_seg.encode_task(3)
    assert state.uses_ccr
    unreplaced = dataclasses.replace(state, centres=None)  # the same caption without replacement
    batch, _ = torch_seg.preprocess([_image(60, 80, seed=1)])
    with torch.inference_mode():
        ref = torch_seg._detect(batch, state)[0]
        ort = onnx_seg._onnx.detect(batch, state)[0]
        ref_plain = torch_seg._detect(batch, unreplaced)[0]
        ort_plain = onnx_seg._onnx.detect(batch, unreplaced)[0]
    assert (ref - ref_plain).abs().max() > 100 * MAX_LOGIT_DIFF  # the replacement matters here
    assert (ref - ort).abs().max() <= MAX_LOGIT_DIFF
    assert (ref_plain - ort_plain).abs().max() <= MAX_LOGIT_DIFF


def test_segmenter_backend_onnxruntime_returns_the_same_instances(dirs):
    inference = dict(score_threshold=0.5, max_instances=20, **SMALL)
    torch_seg = TaskSegmenter.from_pretrained(dirs[0], device="cpu", task=2, inference=InferenceConfig(**inference))
    onnx_seg = TaskSegmenter.from_pretrained(dirs[0], device="cpu", task=2,
                                             inference=InferenceConfig(backend="onnxruntime", **inference))
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    for single, batched in ((True, False), (False, True)):
        refs = [torch_seg.predict(img) for img in images] if single else torch_seg.predict_batch(images)
        outs = [onnx_seg.predict(img) for img in images] if single else onnx_seg.predict_batch(images)
        for ref, out in zip(refs, outs):
            assert len(ref) > 0
            np.testing.assert_array_equal(ref.queries, out.queries)
            np.testing.assert_allclose(ref.scores, out.scores, atol=1e-5)
            np.testing.assert_allclose(ref.boxes, out.boxes, atol=1e-3)  # pixels
            assert out.masks.shape == ref.masks.shape and out.masks.dtype == np.bool_
            inter = np.logical_and(ref.masks, out.masks).sum((1, 2))
            union = np.logical_or(ref.masks, out.masks).sum((1, 2))
            assert np.all(np.where(union == 0, 1.0, inter / np.maximum(union, 1)) >= MIN_MASK_IOU)
    assert onnx_seg.predict(images[0], with_masks=False).masks is None


def test_weights_loaded_into_an_onnx_segmenter_are_refused_not_mixed(dirs):
    """The graphs hold the exported weights: a load_state_dict of new weights used to re-encode
    the text with them while the detector ran the old ones, without a word."""
    seg = TaskSegmenter.from_pretrained(dirs[0], device="cpu", task=2,
                                        inference=InferenceConfig(backend="onnxruntime", **SMALL))
    before = seg.predict(_image(48, 64, seed=0))
    other, _ = _model(seed=1)
    with pytest.raises(CheckpointError, match=r"loaded anew .* `toist export --onnx` it and open a new TaskSegmenter"):
        seg.model.load_state_dict(other.state_dict())
    with pytest.raises(CheckpointError, match="the graphs still hold the exported weights"):
        seg.predict(_image(48, 64, seed=0))
    # The refused load is complete: the model holds every new tensor (what the message says to
    # save), not the first part's alone (the parts' hooks run inside the load).
    for key, value in other.state_dict().items():
        assert torch.equal(seg.model.state_dict()[key], value), key
    # A load into a submodule (the detector alone) was accepted: the text was re-encoded with
    # the new weights at the next set_task while the graphs ran the exported ones.
    seg = TaskSegmenter.from_pretrained(dirs[0], device="cpu", task=2,
                                        inference=InferenceConfig(backend="onnxruntime", **SMALL))
    seg.model.detr.load_state_dict(other.detr.state_dict())
    seg.set_task(3)
    with pytest.raises(CheckpointError, match=r"weights of a part of the model \(\w+\) were loaded anew .* the graphs "
                                              r"still hold the exported weights"):
        seg.predict(_image(48, 64, seed=0))
    # A memory bank's load is fine: the centres are an input of the graph.
    distilled = TaskSegmenter.from_pretrained(dirs[1], device="cpu", task=2,
                                              inference=InferenceConfig(backend="onnxruntime", **SMALL))
    distilled.memory_bank.load_state_dict(distilled.memory_bank.state_dict())
    assert len(distilled.predict(_image(48, 64, seed=0))) >= 0 and len(before) >= 0


@pytest.mark.parametrize("side", ["onnxruntime", "torch"])
def test_a_non_finite_output_on_either_side_fails_the_check(dirs, monkeypatch, side):
    """max(0.0, nan) is 0.0: a NaN in ONNX Runtime's (or PyTorch's) outputs passed the export
    check as "max |logits diff| 0.00e+00" and the graphs were installed."""
    if side == "onnxruntime":
        real = OnnxNetwork.detect

        def detect(self, batch, state):
            logits, boxes, masks = real(self, batch, state)
            logits = logits.clone()
            logits[:, :5] = float("nan")
            return logits, boxes, masks

        monkeypatch.setattr(OnnxNetwork, "detect", detect)
    else:
        real = TaskSegmenter._detect

        def detect(self, batch, state):
            logits, boxes, masks = real(self, batch, state)
            return logits, boxes.clone().fill_(float("inf")), masks

        monkeypatch.setattr(TaskSegmenter, "_detect", detect)
    result = compare_backends(dirs[0], tasks=(2,), sizes=SIZES[:1], **SMALL)
    assert not check_passes(result), result
    what = "logits of ONNX Runtime" if side == "onnxruntime" else "boxes of PyTorch"
    assert what in result["non_finite"] and what in onnx_export.describe_check(result)


def test_a_provider_that_did_not_start_is_not_run_under_the_backend_s_name(dirs, monkeypatch):
    """onnxruntime falls back to the next provider when TensorRT (or CUDA) fails to start: the
    session is created without fallback and must run on the provider asked for first."""
    import onnxruntime as ort

    from toist_core.inference import onnx_backend

    created = []
    real = ort.InferenceSession

    class FellBack(real):
        def __init__(self, *args, **kwargs):
            created.append(kwargs)
            super().__init__(*args, **{**kwargs, "providers": ["CPUExecutionProvider"]})

    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    monkeypatch.setattr(onnx_backend, "providers_for", lambda *a: [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"opened detector.onnx on CPUExecutionProvider, not on "
                                           r"CUDAExecutionProvider; is the CUDA provider's runtime"):
        OnnxNetwork(dirs[0], "onnxruntime")
    assert created and all(kwargs.get("enable_fallback") == 0 for kwargs in created)
    monkeypatch.setattr(onnx_backend, "providers_for", lambda *a: [("TensorrtExecutionProvider", {}), "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"not on TensorrtExecutionProvider; TensorRT needs onnxruntime-gpu"):
        OnnxNetwork(dirs[0], "tensorrt")


def test_export_errors_name_the_command_that_fits(dirs, tmp_path):
    from toist_core.checkpoint import export_model_dir
    from toist_core.inference.onnx_export import export_checked

    with pytest.raises(CheckpointError, match=r"plain: a model directory already, not a checkpoint file"):
        export_model_dir(dirs[0], tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    official = tmp_path / "off.pth"
    torch.save({"model": {}}, official)
    with pytest.raises(CheckpointError, match=rf"make one first: `toist export {official} <model_dir> --onnx`"):
        export_checked(official)


def test_missing_onnx_files_name_the_export_command(tmp_path):
    model, cfg = _model(seed=1)
    directory = save_model_dir(model, tmp_path / "bare", cfg)
    with pytest.raises(CheckpointError, match=r"toist export --onnx"):
        TaskSegmenter.from_pretrained(directory, inference=InferenceConfig(backend="onnxruntime"))


def test_graphs_of_other_weights_are_refused(dirs, tmp_path):
    model, cfg = _model(seed=1)
    directory = save_model_dir(model, tmp_path / "other", cfg)
    for name in (DETECTOR_FILE, MASK_HEAD_FILE, ONNX_DIGESTS_FILE):   # whole, as copied: the record passes
        shutil.copy(dirs[0] / name, directory / name)
    with pytest.raises(CheckpointError, match="exported from other weights"):
        OnnxNetwork(directory)


def test_export_refuses_a_model_that_is_not_the_directory_s(tmp_path):
    """The graphs carry model.safetensors' digest: a model with other weights (e.g. fine-tuned
    and not saved) is refused before anything is traced; the directory's own weights pass, also
    folded and channels-last as a segmenter prepares them, also in a directory without digests."""
    import copy

    from safetensors.torch import load_file, save_file

    from toist_core.inference.device import prepared

    model, cfg = _model(seed=1)
    directory = save_model_dir(model, tmp_path / "m", cfg)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.detector.class_embed.bias[-1] -= 5.0
    with pytest.raises(CheckpointError, match=r"m: the model given to export_onnx does not hold the weights of "
                                              r".*model.safetensors.*toist export --onnx"):
        export_onnx(tuned, directory)
    assert not any((directory / name).exists() for name in (DETECTOR_FILE, MASK_HEAD_FILE))
    from toist_core.inference.onnx_export import check_same_weights

    check_same_weights(prepared(copy.deepcopy(model), torch.device("cpu"), None), directory)
    save_file(load_file(str(directory / "model.safetensors")), str(directory / "model.safetensors"))  # no digest
    check_same_weights(model, directory)
    with pytest.raises(CheckpointError, match="does not hold the weights"):
        check_same_weights(tuned, directory)


def test_tensorrt_without_gpu_says_what_it_needs(dirs):
    import onnxruntime as ort

    if torch.cuda.is_available() and "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    with pytest.raises(RuntimeError, match=r"TensorRT needs onnxruntime-gpu with the TensorRT execution provider "
                                           r"and an NVIDIA GPU; available providers: .*CPUExecutionProvider"):
        TaskSegmenter.from_pretrained(dirs[0], device="cpu", inference=InferenceConfig(backend="tensorrt"))


def test_onnxruntime_on_a_cuda_device_needs_the_cuda_provider(dirs, monkeypatch):
    """With the CPU-only onnxruntime wheel a segmenter on cuda ran its graphs on the CPU, saying
    cuda (the tensorrt backend refused the same)."""
    import onnxruntime as ort

    from toist_core.inference import onnx_backend
    from toist_core.inference.onnx_export import model_digest

    digest = model_digest(dirs[0])
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"backend 'onnxruntime' on cuda:0: this onnxruntime has no "
                                           r"CUDAExecutionProvider \(available: CPUExecutionProvider\); install "
                                           r"onnxruntime-gpu"):
        onnx_backend.providers_for("onnxruntime", torch.device("cuda", 0), dirs[0], digest)
    assert onnx_backend.providers_for("onnxruntime", torch.device("cpu"), dirs[0], digest) == ["CPUExecutionProvider"]
    # device "auto" on a GPU machine with the CPU-only wheel (what `make setup` installs): the CPU,
    # said once, for the API and the node alike (refusing it broke their documented default).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(RuntimeWarning, match="device auto: backend 'onnxruntime' runs on the CPU: this onnxruntime "
                                            "has no CUDAExecutionProvider"):
        seg = TaskSegmenter.from_pretrained(dirs[0], device="auto", inference=InferenceConfig(backend="onnxruntime"))
    assert seg.device.type == "cpu"
    from toist_ros import model_loader
    from toist_ros.params import Settings

    monkeypatch.setattr(model_loader, "cuda_device_count", lambda: 1)
    said = []
    loaded = model_loader.load_model(Settings().replace({"checkpoint": str(dirs[0]), "backend": "onnxruntime"}),
                                     warn=said.append)
    assert loaded.device == "cpu" and loaded.segmenter.device.type == "cpu"
    assert any(line.startswith("device auto: backend 'onnxruntime' runs on the CPU") for line in said), said
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_backend.providers_for("onnxruntime", torch.device("cuda", 1), dirs[0], digest) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_tensorrt_engine_cache_goes_with_the_model_or_to_the_user_cache(dirs, tmp_path, monkeypatch):
    """The TensorRT options a GPU machine gets (checked here without one): fp16, engine cache in
    the model directory; a model directory that cannot be written (here its ``trt_cache`` is a
    file, which no user, root included, can make a folder of) sends the engines to the user's
    cache under the weights' digest; nowhere writable is a clear error naming both places."""
    import onnxruntime as ort

    from toist_core.inference import onnx_backend
    from toist_core.inference.onnx_export import model_digest

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cuda = torch.device("cuda", 1)
    directory = tmp_path / "model"
    shutil.copytree(dirs[0], directory)

    def trt_options():
        providers = onnx_backend.providers_for("tensorrt", cuda, directory, model_digest(directory))
        assert [p if isinstance(p, str) else p[0] for p in providers] == [
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        assert providers[0][1]["device_id"] == 1 and providers[0][1]["trt_fp16_enable"] is True
        return Path(providers[0][1]["trt_engine_cache_path"])

    assert trt_options() == directory / onnx_backend.TRT_CACHE_DIR
    assert (directory / onnx_backend.TRT_CACHE_DIR).is_dir()

    shutil.rmtree(directory / onnx_backend.TRT_CACHE_DIR)
    (directory / onnx_backend.TRT_CACHE_DIR).write_text("not a folder")
    user_folder = tmp_path / "cache" / "toist" / "trt" / model_digest(directory)[:16]
    assert trt_options() == user_folder and user_folder.is_dir()

    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("not a folder either")
    with pytest.raises(RuntimeError, match=r"no cache folder can be written: .*model/trt_cache: .*; "
                                           r".*cache/toist/trt/[0-9a-f]{16}: .*XDG_CACHE_HOME"):
        trt_options()


def test_backend_is_validated_and_needs_a_model_directory():
    with pytest.raises(ConfigError, match="inference.backend must be one of torch, onnxruntime, tensorrt"):
        InferenceConfig(backend="openvino")
    with pytest.raises(ValueError, match="from_pretrained"):
        TaskSegmenter.from_config("tiny_segm", inference=InferenceConfig(backend="onnxruntime"))


def _dir_with_graphs(dirs, target: Path) -> Path:
    """A copy of the plain directory, graphs included (exported once by the fixture)."""
    shutil.copytree(dirs[0], target)
    return target


def _staging_leftovers(directory: Path) -> list:
    return [p.name for folder in (directory, directory.parent) for p in folder.iterdir() if ".onnx-staging-" in p.name]


def test_a_failed_check_keeps_the_graphs_the_directory_had(dirs, tmp_path, monkeypatch, capsys):
    """The new graphs were renamed in before the check, and a failed check deleted them: a
    directory whose graphs worked lost them (a node with backend:=onnxruntime then did not start)."""
    from toist_core.cli.export import run_onnx

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    before = {name: (directory / name).read_bytes() for name in (DETECTOR_FILE, MASK_HEAD_FILE)}
    bad = {"logits": 3e-3, "boxes": 1e-6, "mask_iou": 1.0, "images": 3, "tasks": [1, 2],
           "providers": ["CPUExecutionProvider"], "masks": True}
    checked = []
    monkeypatch.setattr(onnx_export, "compare_backends", lambda directory, **kw: checked.append(kw) or bad)
    assert run_onnx(str(directory), "torchscript") == 1
    err = capsys.readouterr().err
    assert "max |logits diff| 3.00e-03" in err and "were not installed (the ones it had stay)" in err
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert not _staging_leftovers(directory)
    assert checked[0]["tasks"] == (1, 2, "a cup on a table")   # two of the model's tasks and free text


def test_exporting_a_checkpoint_with_onnx_replaces_the_directory_only_once_its_graphs_pass(dirs, tmp_path,
                                                                                         monkeypatch, capsys):
    """`toist export b.pth DIR --onnx` replaced DIR (b's weights, its graphs deleted) before the
    check: a failed check left a directory without graphs, which backend:=onnxruntime refused."""
    from test_checkpoint import official_container
    from toist_core import cli
    from toist_core.typed_config import save_yaml

    model, cfg = _model(seed=7)
    save_yaml(cfg, tmp_path / "tiny_segm.yaml")
    torch.save(official_container(model.state_dict(), model.state_dict()), tmp_path / "b.pth")
    directory = _dir_with_graphs(dirs, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert DETECTOR_FILE in before and MASK_HEAD_FILE in before
    command = ["export", str(tmp_path / "b.pth"), str(directory), "--text-encoder", "builtin:tiny",
               "--config", str(tmp_path / "tiny_segm.yaml"), "--onnx"]
    bad = {"logits": 3e-3, "boxes": 1e-6, "mask_iou": 1.0, "images": 3, "tasks": [1, 2],
           "providers": ["CPUExecutionProvider"], "masks": True}
    monkeypatch.setattr(onnx_export, "compare_backends", lambda directory, **kw: bad)
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert (f"toist export --onnx: {directory}: the new ONNX graphs do not match PyTorch and were not installed: "
            in err and f"; {directory} was not written (it stays as it was)" in err), err
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging left
    # A check that passes installs b's weights and their graphs in one swap: they load together.
    monkeypatch.undo()
    assert cli.main(command) == 0
    assert "detector.onnx, mask_head.onnx written; check passed" in capsys.readouterr().out
    inference = dict(score_threshold=0.0, max_instances=10, **SMALL)
    onnx_seg = TaskSegmenter.from_pretrained(directory, device="cpu", task=2,
                                             inference=InferenceConfig(backend="onnxruntime", **inference))
    torch_seg = TaskSegmenter.from_pretrained(directory, device="cpu", task=2, inference=InferenceConfig(**inference))
    got, want = onnx_seg.predict(_image(48, 64, 0)), torch_seg.predict(_image(48, 64, 0))
    assert len(want) >= 1
    np.testing.assert_array_equal(got.queries, want.queries)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_an_interrupted_check_keeps_the_graphs_and_leaves_nothing_behind(dirs, tmp_path, monkeypatch):
    from toist_core.inference.onnx_export import export_checked

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    before = (directory / DETECTOR_FILE).read_bytes()

    def interrupted(directory, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "compare_backends", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checked(directory)
    assert (directory / DETECTOR_FILE).read_bytes() == before and not _staging_leftovers(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in dirs[0].iterdir())


@pytest.mark.parametrize("checked", [False, True], ids=["export_onnx", "export_checked"])
def test_weights_replaced_while_the_graphs_are_written_get_no_graphs(dirs, tmp_path, monkeypatch, checked):
    """export_onnx compared the directory's weights after writing with themselves (read after
    writing, not before): graphs of the old weights were installed beside new weights, replacing
    graphs that worked, and the node then refused the directory."""
    from toist_core.checkpoint.model_dir import WEIGHTS_FILE
    from toist_core.inference.onnx_export import export_checked

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    graphs_before = {name: (directory / name).read_bytes() for name in (DETECTOR_FILE, MASK_HEAD_FILE)}
    other, cfg = _model(seed=7)
    save_model_dir(other, tmp_path / "other", cfg)
    write = onnx_export._write_graphs

    def replaced_meanwhile(*args, **kwargs):
        written = write(*args, **kwargs)
        shutil.copy(tmp_path / "other" / WEIGHTS_FILE, directory / WEIGHTS_FILE)  # another export lands
        return written

    monkeypatch.setattr(onnx_export, "_write_graphs", replaced_meanwhile)
    with pytest.raises(CheckpointError, match="replaced while its ONNX graphs were exported; nothing was installed"):
        if checked:
            monkeypatch.setattr(onnx_export, "compare_backends", lambda directory, **kw: {
                "logits": 0.0, "boxes": 0.0, "mask_iou": 1.0, "images": 1, "tasks": [1],
                "providers": ["CPUExecutionProvider"], "masks": True})
            export_checked(directory)
        else:
            export_onnx(_model(seed=0)[0], directory)
    assert {name: (directory / name).read_bytes() for name in graphs_before} == graphs_before
    assert not _staging_leftovers(directory)


@pytest.mark.parametrize("moment", ["a reader between the renames", "killed before the record is final"])
def test_graphs_swapped_in_load_at_every_moment_of_the_swap(dirs, tmp_path, monkeypatch, moment):
    """The digests were recorded after the graphs were renamed in: a node starting during a
    re-export (new graph bytes, old digests) was refused as "damaged", and so was every load
    after an export killed between the renames and the record."""
    import toist_core
    from toist_core.atomic_file import write_text_atomic

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    before = (directory / DETECTOR_FILE).read_bytes()
    monkeypatch.setattr(toist_core, "__version__", "9.9.9-other")   # other graph bytes, same weights
    loaded = []
    replace = onnx_export.os.replace

    def replace_then_read(source, target):
        replace(source, target)
        if moment.startswith("a reader") and Path(target).name == DETECTOR_FILE:
            loaded.append(TaskSegmenter.from_pretrained(directory, device="cpu",
                                                        inference=InferenceConfig(backend="onnxruntime")))

    writes = []

    def killed_at_the_second_write(path, text, **kwargs):
        writes.append(path)
        if moment.startswith("killed") and len(writes) == 2:
            raise KeyboardInterrupt
        return write_text_atomic(path, text, **kwargs)

    monkeypatch.setattr(onnx_export.os, "replace", replace_then_read)
    monkeypatch.setattr(onnx_export, "write_text_atomic", killed_at_the_second_write)
    if moment.startswith("killed"):
        with pytest.raises(KeyboardInterrupt):
            export_onnx(_model(seed=0)[0], directory)
    else:
        export_onnx(_model(seed=0)[0], directory)
        assert len(loaded) == 1
    assert (directory / DETECTOR_FILE).read_bytes() != before   # the new graph is in place
    TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend="onnxruntime"))


def test_a_one_task_vocabulary_exports_and_checks(tmp_path):
    """The check ran tasks 1 and 2 whatever the model's vocabulary: a one-task model could never
    be exported (unknown task id 2), and its graphs were deleted."""
    from toist_core.inference.onnx_export import export_checked
    from toist_core.tasks import TaskVocabulary

    model, cfg = _model(seed=1)
    vocabulary = TaskVocabulary.from_data({"name": "workshop", "tasks": [{"id": 1, "phrase": "tighten a screw with"}]})
    directory = save_model_dir(model, tmp_path / "workshop", cfg, vocabulary=vocabulary)
    result = export_checked(directory, sizes=((48, 64),))
    assert result["tasks"] == [1, "a cup on a table"] and check_passes(result)
    assert (directory / DETECTOR_FILE).is_file()


@pytest.mark.parametrize("damage", ["truncated", "empty", "one byte"])
def test_a_damaged_graph_is_refused_naming_the_file_and_the_command(dirs, tmp_path, damage):
    """The digests the export recorded catch any change, a flipped byte in a weight included (it
    loaded and ran), and are required (graphs copied without them ran unchecked); a graph the
    record vouches for that onnxruntime cannot read is named too."""
    import json

    from toist_core.checkpoint.integrity import file_digest

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    graph = directory / DETECTOR_FILE
    data = bytearray(graph.read_bytes())
    if damage == "one byte":
        data[len(data) // 2] ^= 0x01   # inside the largest initializer: a valid graph still
    graph.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncated" else b"" if damage == "empty"
                      else bytes(data))
    with pytest.raises(CheckpointError, match=rf"detector.onnx: its SHA-256 is not the one the export recorded in "
                                              rf"onnx_sha256.json .*run `toist export --onnx {directory}` again"):
        TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend="onnxruntime"))
    record = json.loads((directory / ONNX_DIGESTS_FILE).read_text())
    (directory / ONNX_DIGESTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"onnx_sha256.json: missing beside detector.onnx, mask_head.onnx "
                                              rf".*run `toist export --onnx {directory}` again"):
        TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend="onnxruntime"))
    if damage == "one byte":
        return
    record[DETECTOR_FILE].append(file_digest(graph))   # a record that vouches for the damaged bytes
    (directory / ONNX_DIGESTS_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=rf"detector.onnx: onnxruntime cannot read it .*damaged or cut short: "
                                              rf"run `toist export --onnx {directory}` again"):
        TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend="onnxruntime"))


def test_damaged_weights_are_refused_naming_the_file_on_the_onnx_backend_too(dirs, tmp_path):
    """The torch backend said "not a readable safetensors file"; the ONNX backend's digest check
    read the same header with a bare SafetensorError that named no file."""
    import os

    directory = _dir_with_graphs(dirs, tmp_path / "m")
    os.truncate(directory / "model.safetensors", 1000)
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
            TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend=backend))


def test_the_export_stages_inside_the_directory_wherever_it_lies(dirs, tmp_path, monkeypatch):
    """Staged beside the directory, the export failed for a directory reached through a link to
    another file system (a rename across devices), under a parent it may not write, and for "."
    (run from inside the directory). Staged inside it, each works, and a staging folder a killed
    export left does not make the directory "a folder of other files". "~" is the home folder."""
    import os
    import tempfile

    from toist_core.checkpoint.model_dir import check_replaceable
    from toist_core.inference.onnx_export import export_checked

    shm = Path("/dev/shm")
    elsewhere = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev
                                      else tmp_path))
    try:
        target = _dir_with_graphs(dirs, elsewhere / "m")
        for name in (DETECTOR_FILE, MASK_HEAD_FILE):
            (target / name).unlink()
        (tmp_path / "link").symlink_to(target)
        monkeypatch.setenv("HOME", str(tmp_path))   # the API expands the home folder, as the CLI does
        assert check_passes(export_checked("~/link", sizes=((48, 64),)))
        assert (target / DETECTOR_FILE).is_file() and (tmp_path / "link").is_symlink()
        assert os.path.samefile(tmp_path / "link", target) and not _staging_leftovers(target)
        monkeypatch.chdir(target)
        assert check_passes(export_checked(".", sizes=((48, 64),)))
        assert not _staging_leftovers(target)
        monkeypatch.chdir(tmp_path)
        (target / ".onnx-staging-abc123").mkdir()   # left by an export that was killed
        check_replaceable(target)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_the_node_parameter_selects_the_backend(dirs, tmp_path):
    """`backend:=onnxruntime` reaches the node's segmenter; a directory without graphs stops the node
    at start-up (exit code 3) with the export command."""
    from toist_ros.model_loader import EXIT_MODEL, StartupError, load_model
    from toist_ros.params import Settings

    warnings = []
    settings = Settings().replace({"checkpoint": str(dirs[0]), "device": "cpu", "backend": "onnxruntime",
                                   "precision": "bf16"})
    loaded = load_model(settings, warnings.append)
    assert loaded.segmenter.inference.backend == "onnxruntime" and loaded.segmenter.inference.precision == "fp32"
    assert any("applies to the torch backend" in w for w in warnings)
    model, cfg = _model(seed=1)
    bare = save_model_dir(model, tmp_path / "bare_for_node", cfg)
    with pytest.raises(StartupError) as info:
        load_model(settings.replace({"checkpoint": str(bare)}), warnings.append)
    assert info.value.code == EXIT_MODEL and "toist export --onnx" in str(info.value)


def test_a_directory_replaced_between_its_graphs_and_its_weights_is_read_again(dirs, tmp_path, monkeypatch):
    """The graphs are opened before the weights load: an export replacing the directory in between
    paired one export's graphs with another's text encoder (its cached task features fed into
    graphs of other weights). Both are now read again, as for a torch load."""
    from toist_core.inference import onnx_backend
    from toist_core.inference.onnx_export import model_digest

    other_model, cfg = _model(seed=1)
    other = save_model_dir(other_model, tmp_path / "other", cfg)
    export_onnx(other_model, other)
    directory = tmp_path / "model"
    shutil.copytree(dirs[0], directory)
    opened = onnx_backend.open_network
    calls = []

    def export_after_opening(path, backend, device):
        network = opened(path, backend, device)
        calls.append(network.digest)
        if len(calls) == 1:  # `toist export --onnx` to the same directory, just then
            shutil.rmtree(directory)
            shutil.copytree(other, directory)
        return network

    monkeypatch.setattr(onnx_backend, "open_network", export_after_opening)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = TaskSegmenter.from_pretrained(directory, device="cpu",
                                            inference=InferenceConfig(backend="onnxruntime", **SMALL))
    assert len(calls) == 2 and calls[0] != calls[1]
    assert seg._onnx.digest == model_digest(directory) == model_digest(other)
    assert all(torch.equal(v, other_model.state_dict()[k]) for k, v in seg.model.state_dict().items())

    # Replaced at every opening: an error that says so, after a bounded number of reads.
    def export_every_time(path, backend, device):
        network = opened(path, backend, device)
        source = dirs[0] if model_digest(directory) == model_digest(other) else other
        shutil.rmtree(directory)
        shutil.copytree(source, directory)
        return network

    monkeypatch.setattr(onnx_backend, "open_network", export_every_time)
    with pytest.raises(CheckpointError, match=rf"^{directory}: replaced while its ONNX graphs and weights loaded, 3"):
        TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(backend="onnxruntime", **SMALL))
