"""Ctrl-C / SIGTERM during `toist train` (one process and torchrun): the update in progress
finishes, checkpoint.pth is written atomically, the resume command is printed, the exit status
is 130 / 143; the printed command continues the run and clears stale temporary files."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.checkpointing import load_training_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "tiny_pronoun.yaml"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from toist_core.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1], splits=("train",), images_per_split=8, min_size=96, max_size=112, seed=3)
    return root


def _overrides(root, out, max_steps):
    return [f"data.root={root}", f"output_dir={out}", "data.tasks=[1]", "data.train_sizes=[96]", "data.max_size=112",
            "data.crop_resize_sizes=[96]", "data.crop_min_size=64", "data.crop_max_size=112", "data.test_size=96",
            "loader.batch_size=1", "loader.num_workers=1", "runtime.progress=false", "runtime.tensorboard=false",
            "runtime.threads=1", "checkpoint.export_model_dir=false", "checkpoint.every_steps=1",
            "checkpoint.per_epoch=false", "eval.enabled=false", f"schedule.max_steps={max_steps}"]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _signal_once_training(proc, out: Path, signum: int, group: bool = False, timeout: float = 180):
    """Send ``signum`` once the run has written its first checkpoint (it is inside the loop)."""
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote a checkpoint"
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signum)   # Ctrl-C in a terminal: the whole foreground process group
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr


def _resume_line(stderr: str) -> list[str]:
    match = re.search(r"resume with:\n  (.+)", stderr)
    assert match, stderr[-3000:]
    return shlex.split(match.group(1))


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_with_a_checkpoint_and_the_resume_command(signum, status, synth_root, tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(CONFIG), *_overrides(synth_root, out, 400)]
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = _signal_once_training(proc, out, signum)
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert 1 <= ckpt["step"] < 400
    assert f"stopped after update {ckpt['step']}" in stderr
    assert not list(out.glob(".*.tmp"))
    command = _resume_line(stderr)
    assert command[:3] == ["python", "-m", "training.train"]
    assert command[command.index("--resume") + 1] == str(out / "checkpoint.pth")
    if signum != signal.SIGTERM:
        return   # what follows does not depend on the signal that stopped the run: once is enough

    # The printed command continues the run (here only a few updates further) and removes the
    # temporary file a SIGKILL mid-write would have left.
    stale = out / ".checkpoint.pth.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 1024)
    command = [arg for arg in command if not arg.startswith("schedule.max_steps=")]
    command += [f"schedule.max_steps={ckpt['step'] + 2}"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at update {ckpt['step']}" in resumed.stderr
    assert f"removed {stale}" in resumed.stderr and not stale.exists()
    assert load_training_checkpoint(out / "checkpoint.pth")["step"] == ckpt["step"] + 2


def test_ctrl_c_under_torchrun_stops_every_process_at_one_update(synth_root, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.train",
                             "--config", str(CONFIG), *_overrides(synth_root, out, 400)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stderr = _signal_once_training(proc, out, signal.SIGINT, group=True, timeout=240)
    # torchrun itself reports the signal with a traceback of its own and status 1 (its
    # SignalException, not ours); nothing of the workers' may appear in a traceback.
    frames = re.findall(r'File "([^"]+)"', stderr)
    assert all("site-packages/torch" in f or f.endswith("/torchrun") for f in frames), stderr[-4000:]
    assert "KeyboardInterrupt" not in stderr, stderr[-4000:]
    ckpt = load_training_checkpoint(out / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert f"stopped after update {ckpt['step']}" in stderr
    command = _resume_line(stderr)
    assert command[:5] == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m"]
    assert command[command.index("--resume") + 1] == str(out / "checkpoint.pth")
    assert stderr.count("stopped by signal 2 after update") == 1   # rank 0 logs, every rank stopped there
