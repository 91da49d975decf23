"""Two processes under torchrun (gloo, CPU): a distillation run ends with identical weights and
memory banks on both ranks. One process under torchrun still gets a process group and DDP (the
code path of N processes, which the one-GPU benchmark measures).

Run as a script, this file is the torchrun worker: it trains and writes each rank's state.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FAST = [
    "data.tasks=[1,2]", "data.train_sizes=[96]", "data.max_size=112", "data.crop_resize_sizes=[96]",
    "data.crop_min_size=64", "data.crop_max_size=112", "data.test_size=96", "loader.batch_size=1",
    "loader.num_workers=0", "runtime.progress=false", "runtime.tensorboard=false", "runtime.threads=1",
    "checkpoint.export_model_dir=false", "init.load=null", "init.load_noun=null", "distill.bank_size=8",
    "schedule.max_steps=3", "model.transformer.dropout=0.1", "eval.holdout_fraction=0.25", "eval.max_images=2",
]


def _worker(root: str, out: str, *extra: str) -> None:
    """``extra``: more overrides, and ``--resume=<checkpoint>``."""
    from training.config import load_config
    from training.distributed import cleanup_distributed, init_distributed
    from training.loops import Trainer

    resume = next((arg.split("=", 1)[1] for arg in extra if arg.startswith("--resume=")), None)
    overrides = [arg for arg in extra if not arg.startswith("--resume=")]
    cfg = load_config(REPO / "training" / "configs" / "tiny_distill.yaml",
                      [f"data.root={root}", f"output_dir={out}", *FAST, *overrides])
    env = init_distributed("cpu", "auto")
    assert env.distributed and env.backend == "gloo" and env.world_size == int(os.environ["WORLD_SIZE"])
    trainer = Trainer(cfg, env, resume=resume)
    result = trainer.run()
    torch.save({"model": trainer.model.state_dict(), "model_ema": trainer.ema.state_dict(),
                "teacher": trainer.teacher.state_dict(), "bank": trainer.cluster.bank.state_dict(),
                "step": result.step, "best": result.best,
                # What ran, read from torch itself rather than from DistEnv.
                "group": {"initialized": torch.distributed.is_initialized(),
                          "backend": str(torch.distributed.get_backend()),
                          "world_size": torch.distributed.get_world_size(),
                          "ddp": isinstance(trainer.train_module, torch.nn.parallel.DistributedDataParallel)}},
               Path(out) / f"rank{env.rank}.pt")
    cleanup_distributed()


def _torchrun(tmp_path, nproc: int, *extra: str, run: str = "run") -> Path:
    """This file as the worker under ``torchrun --nproc_per_node nproc`` on a small synthetic
    set (``extra``: see :func:`_worker`); returns the run's output folder ``tmp_path / run``."""
    from toist_core.data.synth import generate

    root = tmp_path / "synth"
    if not root.exists():
        generate(root, tasks=[1, 2], splits=("train",), images_per_split=6, min_size=96, max_size=112, seed=5)
    out = tmp_path / run
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(nproc),
                           str(Path(__file__).resolve()), str(root), str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (tmp_path / f"{run}.stderr").write_text(proc.stderr)
    return out


def test_one_process_torchrun_initialises_the_group_and_trains(tmp_path):
    """``torchrun --nproc_per_node 1`` runs the multi-process code path: a gloo group of one,
    the model wrapped in DDP, and the run trains and writes its checkpoint."""
    out = _torchrun(tmp_path, 1)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    assert rank0["group"] == {"initialized": True, "backend": "gloo", "world_size": 1, "ddp": True}
    assert rank0["step"] == 3
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1
    # torch 2.13's deprecation of broadcast_buffers, said by every process at every start: noise.
    assert "broadcast_buffers" not in (tmp_path / "run.stderr").read_text()
    for key, value in rank0["model"].items():
        assert torch.equal(ckpt["model"][key], value)


def test_two_process_gloo_run_has_identical_weights(tmp_path):
    out = _torchrun(tmp_path, 2)
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["group"] == {"initialized": True, "backend": "gloo", "world_size": 2, "ddp": True}
    for part in ("model", "model_ema", "teacher", "bank"):
        assert rank0[part].keys() == rank1[part].keys()
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{part}.{key} differs between ranks"
    assert rank0["bank"]["update_count"].sum() > 0
    assert rank0["best"] == rank1["best"] and rank0["best"] is not None
    # Training moved the weights, and rank 0's checkpoint holds exactly those weights.
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    for key, value in rank0["model"].items():
        assert torch.equal(ckpt["model"][key], value)


def test_every_use_kmeans_resumes_exactly_on_each_process(tmp_path):
    """distill.kmeans_rerun every_use (the reference's): each process's warm-started k-means runs
    move its own centres. The checkpoint held rank 0's only and a resume gave them to every process:
    rank 1 continued from other centres (its losses and all weights differed from an uninterrupted run)."""
    every_use = ["distill.kmeans_rerun=every_use", "distill.bank_size=4", "loader.batch_size=2",
                 "eval.enabled=false", "checkpoint.keep_epochs=5", "checkpoint.every_steps=0"]
    full = _torchrun(tmp_path, 2, *every_use, "schedule.max_steps=6", run="full")
    epochs = sorted(full.glob("checkpoint_epoch*.pth"))
    assert len(epochs) == 2, epochs  # 3 updates an epoch
    ckpt = torch.load(epochs[0], weights_only=True)
    centres = ckpt["cluster_centers_per_rank"]
    assert len(centres) == 2 and not torch.equal(centres[0], centres[1]), "the processes' centres never parted"
    resumed = _torchrun(tmp_path, 2, *every_use, "schedule.max_steps=6", f"--resume={epochs[0]}", run="resumed")
    for rank in (0, 1):
        a = torch.load(full / f"rank{rank}.pt", weights_only=True)
        b = torch.load(resumed / f"rank{rank}.pt", weights_only=True)
        assert a["step"] == b["step"] == 6
        for part in ("model", "teacher", "bank"):
            for key, value in a[part].items():
                assert torch.equal(value, b[part][key]), f"rank {rank}: {part}.{key} differs after the resume"


if __name__ == "__main__":
    _worker(*sys.argv[1:])
