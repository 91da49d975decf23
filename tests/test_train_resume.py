"""What training trains is what ships: the EMA follows every parameter through evaluations, and a
run SIGKILLed after evaluations ends, once resumed, bit-identical to an uninterrupted one.

Run as a script, this file is the worker that trains and kills itself with SIGKILL.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"

# Evaluation every 2 updates, a checkpoint every 3: the killed segment (updates 4-5) holds
# an evaluation, and so does the part before the checkpoint the run resumes from.
RUN = [
    "data.tasks=[1,2]", "data.train_sizes=[96,112]", "data.max_size=128", "data.crop_resize_sizes=[96]",
    "data.crop_min_size=64", "data.crop_max_size=112", "data.test_size=96",
    "loader.batch_size=2", "loader.num_workers=0", "runtime.progress=false", "runtime.tensorboard=false",
    "runtime.threads=1", "model.transformer.dropout=0.1", "optim.ema_decay=0.9",
    "eval.enabled=true", "eval.holdout_fraction=0.25", "eval.max_images=2", "eval.every_steps=2",
    "eval.every_epochs=0", "checkpoint.every_steps=3", "checkpoint.per_epoch=false",
    "checkpoint.export_model_dir=true", "schedule.max_steps=6",
]
STAGES = {
    "pronoun": ("tiny_pronoun.yaml", []),
    "distill": ("tiny_distill.yaml", ["init.load=null", "init.load_noun=null", "distill.bank_size=8"]),
    "mask_head": ("tiny_mask_head.yaml", []),   # + init.frozen_weights of a detector run
}
KILL_AT = 5


def _config(stage: str, root, out, extra=()):
    from training.config import load_config

    name, overrides = STAGES[stage]
    return load_config(CONFIGS / name, [f"data.root={root}", f"output_dir={out}", *RUN, *overrides, *extra])


def _killed_worker(stage: str, root: str, out: str, *extra: str) -> None:
    from training.distributed import DistEnv
    from training.loops import Trainer

    def kill(trainer, step):
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(_config(stage, root, out, extra), DistEnv(), on_step=kill).run()


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from toist_core.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[1, 2], splits=("train",), images_per_split=8, min_size=96, max_size=128, seed=3)
    return root


@pytest.fixture(scope="module")
def frozen_detector(synth_root, tmp_path_factory):
    from training.distributed import DistEnv
    from training.loops import Trainer

    out = tmp_path_factory.mktemp("detector")
    Trainer(_config("pronoun", synth_root, out, ["schedule.max_steps=1", "eval.enabled=false"]), DistEnv()).run()
    return out / "checkpoint.pth"


def _extra(stage, frozen_detector):
    return [f"init.frozen_weights={frozen_detector}"] if stage == "mask_head" else []


def test_ema_follows_every_parameter_across_evaluations(synth_root, tmp_path):
    """Between the first evaluation and the end, every tensor the model changed moved in the EMA
    too (conv weights included), and evaluating left the trained module's layout and modes alone."""
    from training.distributed import DistEnv
    from training.loops import Trainer

    snapshots = {}

    def snapshot(trainer, step):
        if step in (2, 6):   # right after the evaluations of update 2 and of the last update
            snapshots[step] = ({k: v.clone() for k, v in trainer.model.state_dict().items()},
                               {k: v.clone() for k, v in trainer.ema.state_dict().items()},
                               {name: (p.data_ptr(), p.stride()) for name, p in trainer.model.named_parameters()},
                               [m.training for m in trainer.model.modules()])

    trainer = Trainer(_config("pronoun", synth_root, tmp_path / "run", ["checkpoint.export_model_dir=false"]),
                      DistEnv(), on_step=snapshot)
    storage_before = {name: (p.data_ptr(), p.stride()) for name, p in trainer.model.named_parameters()}
    modes_before = [m.training for m in trainer.model.modules()]
    ema_storage = {name: (p.data_ptr(), p.stride()) for name, p in trainer.ema.module.named_parameters()}
    trainer.run()
    assert trainer.last_eval_step == 6
    model_2, ema_2, storage_2, modes_2 = snapshots[2]
    model_6, ema_6, storage_6, modes_6 = snapshots[6]
    moved = [key for key in model_2 if model_2[key].is_floating_point() and not torch.equal(model_2[key], model_6[key])]
    convs = [key for key in moved if model_6[key].dim() == 4]
    assert convs, "the run should train some convolution (input_proj, backbone)"
    stuck = [key for key in moved if torch.equal(ema_2[key], ema_6[key])]
    assert not stuck, f"EMA stopped following {len(stuck)} of {len(moved)} trained tensors, e.g. {stuck[:4]}"
    # Evaluating never re-laid out, moved or re-moded the trained module or the EMA's.
    assert storage_2 == storage_6 == storage_before
    assert modes_2 == modes_6 == modes_before
    assert {n: (p.data_ptr(), p.stride()) for n, p in trainer.ema.module.named_parameters()} == ema_storage


def _comparable(state: dict) -> dict:
    """A trainer's full checkpoint state without the wall-clock evaluation time and what names the
    run (its output_dir, its run_id: the uninterrupted run compared with is another run)."""
    state = dict(state)
    state["metrics"] = {k: v for k, v in (state["metrics"] or {}).items() if k != "seconds"}
    state.pop("config")
    assert isinstance(state.pop("run_id"), str)
    return state


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# (The pronoun stage's state is a part of distill's: its student, EMA, optimizer, schedule,
# random states; test_train_run.py resumes a pronoun run in-process.)
@pytest.mark.parametrize("stage", ["distill", "mask_head"])
def test_sigkilled_run_resumes_bit_identical(stage, synth_root, frozen_detector, tmp_path):
    from training.checkpointing import load_training_checkpoint
    from training.distributed import DistEnv
    from training.loops import Trainer

    if stage == "mask_head":   # a copy: it is removed before the resume, which must not need it
        frozen_detector = Path(shutil.copy(frozen_detector, tmp_path / "detector.pth"))
    extra = _extra(stage, frozen_detector) + ["runtime.tensorboard=true"]   # the default: on
    full = Trainer(_config(stage, synth_root, tmp_path / "full", extra), DistEnv())
    full.run()
    assert full.last_eval_step == 6

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), stage, str(synth_root), str(killed), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = load_training_checkpoint(killed / "checkpoint.pth")
    assert ckpt["step"] == 3 and ckpt["last_eval_step"] == 2   # evaluated before and after it
    assert not (killed / "model").exists()

    if stage == "mask_head":
        # The checkpoint holds all the init file gave; a later rerun of the detector stage may
        # have replaced or removed it (the resume refused: "init.frozen_weights: ... not found").
        frozen_detector.unlink()
    torch.manual_seed(12345)   # the resume must restore every random state itself
    resumed = Trainer(_config(stage, synth_root, killed, extra), DistEnv(), resume=str(killed / "checkpoint.pth"))
    assert resumed.run_id == ckpt["run_id"] != full.run_id   # the same run goes on
    resumed.run()
    resumed.writer.close()
    full.writer.close()
    _assert_same(_comparable(full.state()), _comparable(resumed.state()), stage)
    # TensorBoard: updates 4-5, logged by the killed run and again by the resume, shown once.
    assert _scalars(killed / "tb") == _scalars(tmp_path / "full" / "tb")
    for name in ("model.safetensors", "memory_bank.safetensors"):
        if (tmp_path / "full" / "model" / name).exists() or name == "model.safetensors":
            _assert_same(load_file(tmp_path / "full" / "model" / name), load_file(killed / "model" / name), name)


def _scalars(tb_dir: Path) -> dict:
    """What TensorBoard shows: tag -> [(step, value)], the timings (throughput, evaluation
    seconds) left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag != "train/samples_per_s" and not tag.endswith("/seconds")}


class _Killed(BaseException):
    """Stands for SIGKILL in-process (nothing catches a BaseException that is not an Exception)."""


def test_a_run_stopped_between_its_epoch_copy_and_its_checkpoint_keeps_every_epoch_copy(synth_root, tmp_path,
                                                                                       monkeypatch):
    """checkpoint.keep_epochs: the numbered copy of an epoch end was written after checkpoint.pth;
    a run stopped between the two resumed from that epoch end and never wrote the copy."""
    from training.checkpointing import load_training_checkpoint
    from training.distributed import DistEnv
    from training.loops import Trainer

    extra = ["checkpoint.per_epoch=true", "checkpoint.keep_epochs=5", "checkpoint.every_steps=2",
             "eval.enabled=false", "schedule.max_steps=null", "schedule.epochs=2",
             "data.tasks=[1]"]   # one task: shorter epochs (4 epochs are trained in all)
    full = Trainer(_config("pronoun", synth_root, tmp_path / "full", extra), DistEnv())
    full.run()
    copies = sorted(p.name for p in (tmp_path / "full").glob("checkpoint_epoch*.pth"))
    assert copies == ["checkpoint_epoch0001.pth", "checkpoint_epoch0002.pth"]

    stopped = tmp_path / "stopped"
    trainer = Trainer(_config("pronoun", synth_root, stopped, extra), DistEnv())
    epoch_end = trainer.steps_per_epoch
    save, saves_at_epoch_end = trainer._save, []

    def stop_between_the_two(name):
        if trainer.step == epoch_end:
            saves_at_epoch_end.append(name)
            if len(saves_at_epoch_end) == 2:
                raise _Killed(name)
        save(name)

    monkeypatch.setattr(trainer, "_save", stop_between_the_two)
    with pytest.raises(_Killed):
        trainer.run()
    resumed = Trainer(_config("pronoun", synth_root, stopped, extra), DistEnv(), resume=str(stopped / "checkpoint.pth"))
    resumed.run()
    assert sorted(p.name for p in stopped.glob("checkpoint_epoch*.pth")) == copies
    for name in copies:
        _assert_same(_comparable(load_training_checkpoint(tmp_path / "full" / name)),
                     _comparable(load_training_checkpoint(stopped / name)), name)


if __name__ == "__main__":
    _killed_worker(*sys.argv[1:])
