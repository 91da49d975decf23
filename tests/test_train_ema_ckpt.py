"""EMA of the whole state_dict, atomic checkpoint writes, resume-file checks, RNG capture, sampler."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from training.checkpointing import (CheckpointError, atomic_save, capture_rng_state, check_state_dict,
                                    load_training_checkpoint, restore_rng_state)
from training.ema import ModelEMA
from training.sampling import EpochBatchSampler, SeededSamples


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("position_ids", torch.arange(7).unsqueeze(0))


def test_ema_blends_floats_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = _Net()
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.running.fill_(5.0)
        model.position_ids.add_(1)
    ema.update(model)
    state = ema.state_dict()
    expected_w = 0.9 * start["linear.weight"] + 0.1 * model.linear.weight
    assert torch.allclose(state["linear.weight"], expected_w, atol=1e-6)
    assert torch.allclose(state["running"], torch.full((2,), 0.5))
    assert torch.equal(state["position_ids"], model.position_ids)  # copied, not blended
    assert state["position_ids"].dtype == torch.int64
    # Repeated updates converge to the model.
    for _ in range(300):
        ema.update(model)
    assert torch.allclose(ema.state_dict()["linear.weight"], model.linear.weight, atol=1e-5)


def test_ema_tracks_in_place_loaded_state():
    model = _Net()
    ema = ModelEMA(model, decay=0.5)
    ema.update(model)
    other = _Net()
    with torch.no_grad():
        other.linear.weight.fill_(2.0)
    model.load_state_dict(other.state_dict())  # in place: the cached pairs stay valid
    before = ema.state_dict()["linear.weight"].clone()
    ema.update(model)
    assert torch.allclose(ema.state_dict()["linear.weight"], 0.5 * before + 1.0)


def test_ema_follows_parameters_given_new_storage():
    """Channels-last conversion gives every 4-D weight new storage (model and EMA module alike);
    the EMA must keep blending what the modules use now, not the storage it first saw."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.5)
    ema.update(model)
    model.to(memory_format=torch.channels_last)
    ema.module.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_mean.fill_(4.0)
    before = ema.state_dict()["0.weight"].clone()
    ema.update(model)
    state = ema.state_dict()
    assert torch.allclose(state["0.weight"], 0.5 * before + 1.0)
    assert torch.allclose(state["1.running_mean"], torch.full((4,), 2.0))
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pth"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pth"]


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"a": torch.ones(1)}, path)

    class _Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": _Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def _minimal(**extra):
    ckpt = {"format": "toist-train", "version": 1, "stage": "pronoun", "model": {}, "optimizer": {},
            "scheduler": {}, "step": 3, "epoch": 0, "config": {}}
    ckpt.update(extra)
    return ckpt


def test_load_refuses_missing_corrupt_foreign_and_incomplete(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_training_checkpoint(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    atomic_save(_minimal(), good)
    assert load_training_checkpoint(good)["step"] == 3
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: damaged checkpoint archive.*truncated or corrupted"):
        load_training_checkpoint(truncated)
    official = tmp_path / "official.pth"
    torch.save({"model": {}, "model_ema": {}, "epoch": 59}, official)
    with pytest.raises(CheckpointError, match="not a toist training checkpoint"):
        load_training_checkpoint(official)
    incomplete = tmp_path / "incomplete.pth"
    ckpt = _minimal()
    del ckpt["optimizer"]
    torch.save(ckpt, incomplete)
    with pytest.raises(CheckpointError, match="missing \\['optimizer'\\]"):
        load_training_checkpoint(incomplete)


def test_check_state_dict_names_key_and_shape():
    net = _Net()
    check_state_dict(net.state_dict(), net, "model")
    state = net.state_dict()
    state["linear.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match="linear.weight has shape \\(5, 3\\)"):
        check_state_dict(state, net, "model")
    state = net.state_dict()
    del state["running"]
    with pytest.raises(CheckpointError, match="missing \\['running'\\]"):
        check_state_dict(state, net, "model_ema")


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state(torch.device("cpu"))
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"], torch.device("cpu"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_sampler_shards_resumes_and_is_seeded():
    full = EpochBatchSampler(10, batch_size=2, num_replicas=2, rank=0, seed=5)
    other = EpochBatchSampler(10, batch_size=2, num_replicas=2, rank=1, seed=5)
    assert len(full) == 2  # 5 samples per rank -> 2 complete batches
    full.set_epoch(3)
    other.set_epoch(3)
    batches = list(full)
    seen = [i for b in batches + list(other) for i, _ in b]
    assert len(set(seen)) == len(seen) == 8
    full.set_epoch(3, start_batch=1)
    assert list(full) == batches[1:]
    full.set_epoch(4)
    assert list(full) != batches  # reshuffled per epoch
    # The augmentation seed depends on (seed, epoch, index), not on the position.
    full.set_epoch(3)
    seeds = {i: s for b in full for i, s in b}
    assert len(set(seeds.values())) == len(seeds)


def test_seeded_samples_are_reproducible_and_leave_global_rng_alone():
    class _Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return float(torch.rand(())) + random.random()

    data = SeededSamples(_Noisy())
    torch.manual_seed(0)
    first = data[(2, 1234)]
    after = float(torch.rand(()))
    torch.manual_seed(0)
    assert data[(2, 1234)] == first
    assert data[(2, 1235)] != first
    assert float(torch.rand(())) == after


def test_seeded_samples_leave_the_cuda_generators_alone(monkeypatch):
    """torch.manual_seed also seeds every CUDA generator: a GPU run loading in its own process
    (loader.num_workers 0) had its GPU dropout reseeded by each sample it loaded."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)   # what a GPU process would get
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    data = SeededSamples(type("One", (torch.utils.data.Dataset,), {"__len__": lambda self: 1,
                                                                  "__getitem__": lambda self, i: float(torch.rand(()))})())
    first = data[(0, 77)]
    assert seeded == [] and data[(0, 77)] == first


def test_the_loader_pins_the_images_too(monkeypatch):
    """loader.pin_memory pinned the targets only: ImageBatch passed through the DataLoader's
    pinning unchanged, and its copy to the GPU was not asynchronous."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pinning

    from toist_core.structures import ImageBatch

    pinned = []

    def pin(tensor, *args):   # what page-locking would return; here (no CUDA) a recorded copy
        pinned.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    images = ImageBatch.from_images([torch.rand(3, 8, 10), torch.rand(3, 6, 12)])
    out, targets = loader_pinning((images, [{"boxes": torch.rand(1, 4)}]))
    assert isinstance(out, ImageBatch) and torch.equal(out.tensors, images.tensors) and torch.equal(out.mask, images.mask)
    assert sorted(pinned) == sorted([(2, 3, 8, 12), (2, 8, 12), (1, 4)])
