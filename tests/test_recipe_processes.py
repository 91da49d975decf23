"""The default-model recipe as one stoppable run (training/stage_processes.py): a signal to the
recipe stops the stages training in its worker processes at the end of their update, with their
checkpoints, and the recipe exits 128 + signal; a recipe killed outright takes its workers with
it; one recipe per work directory, one process per stage."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from training import default_model as recipe
from training.checkpointing import load_training_checkpoint
from training.stage_processes import stage_lock, work_dir_lock

REPO = Path(__file__).resolve().parent.parent

# The recipe's main() with --quick settings and a plan of long stages (a checkpoint every update):
# "a" and "b" train at once; "d" is short, and "c" starts from "a": with "d,a,c" the worker that
# trained "d" waits idle while "a" trains; "x" fails as it starts, after "d".
_DRIVER = """
import sys
from training import default_model as recipe
plan_names = sys.argv[2].split(",")
def plan(settings, out, ablations):
    every = ["checkpoint.every_steps=1", "checkpoint.per_epoch=false", "eval.enabled=false", "loader.num_workers=0"]
    stages = {"a": recipe.Stage("a", "tiny_pronoun.yaml", 500, every),
              "b": recipe.Stage("b", "tiny_noun.yaml", 500, every),
              "c": recipe.Stage("c", "tiny_pronoun.yaml", 500, every, after=("a",)),
              "d": recipe.Stage("d", "tiny_pronoun.yaml", 1, ["eval.enabled=false", "loader.num_workers=0"]),
              "x": recipe.Stage("x", "no_such_config.yaml", 1, [], after=("d",))}
    return [stages[name] for name in plan_names]
recipe.stages = plan
sys.exit(recipe.main(["--out", sys.argv[1], "--quick", "--jobs", "2"]))
"""


@pytest.fixture()
def start():
    """``start(out, plan)`` runs the driver in a process group of its own; whatever of the group
    is left (workers of a failed test) is killed at the end."""
    groups = []

    def run(out: Path, plan: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(out), plan], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        groups.append(proc.pid)
        return proc

    yield run
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _workers(pid: int) -> list[int]:
    """The pool's worker processes among ``pid``'s children."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except FileNotFoundError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return " Z " not in state + " "   # a zombie has exited


def _wait_for_checkpoints(proc: subprocess.Popen, out: Path, names: list[str], done: tuple[str, ...] = (),
                          timeout: float = 240) -> list[int]:
    """The two workers' pids, once every stage of ``names`` has a checkpoint and ``done`` are done."""
    deadline = time.monotonic() + timeout
    while not (all((out / name / "checkpoint.pth").is_file() for name in names)
               and all((out / name / recipe.DONE).is_file() for name in done)):
        if proc.poll() is not None:
            pytest.fail(f"the recipe ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint of every stage in time"
        time.sleep(0.1)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    return workers


def _stopped_cleanly(out: Path, names: list[str], stderr: str, signum: int) -> None:
    for name in names:
        assert f"stopped by signal {signum} after update" in stderr and f"{out / name / 'checkpoint.pth'} written" \
            in stderr, stderr[-3000:]
        assert load_training_checkpoint(out / name / "checkpoint.pth")["step"] >= 1
        assert not (out / name / recipe.DONE).exists()


@pytest.mark.parametrize("signum, plan, group, training, done", [
    (signal.SIGTERM, "a,b", False, ["a", "b"], ()),  # kill <recipe>: the workers hear of it from the recipe alone
    (signal.SIGINT, "d,a,c", True, ["a"], ("d",)),   # Ctrl-C: the whole process group, one worker idle
], ids=["sigterm-to-recipe", "ctrl-c-with-an-idle-worker"])
def test_a_signal_to_the_recipe_stops_every_stage_with_its_checkpoint(tmp_path, start, signum, plan, group, training,
                                                                      done):
    out = tmp_path / "recipe"
    proc = start(out, plan)
    workers = _wait_for_checkpoints(proc, out, training, done)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "run the same command again to continue" in stderr
    assert "failed" not in stderr and "BrokenProcessPool" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    _stopped_cleanly(out, training, stderr, signum)
    assert not (out / "c").exists()  # nothing new starts once stopped
    assert not [pid for pid in workers if _alive(pid)]
    minutes = json.loads((out / recipe.TRAINING_MINUTES).read_text())
    assert minutes["minutes"] > 0


def test_a_signal_to_one_worker_stops_the_run_as_one(tmp_path, start):
    """`kill <worker pid>`: that stage stops with its checkpoint; the recipe used to drop the
    stop, leave the stages after it unstarted and fail on the missing record (KeyError)."""
    out = tmp_path / "recipe"
    proc = start(out, "a,b")
    workers = _wait_for_checkpoints(proc, out, ["a", "b"])
    os.kill(workers[0], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "run the same command again to continue" in stderr and "Traceback" not in stderr, stderr[-3000:]
    _stopped_cleanly(out, ["a", "b"], stderr, signal.SIGTERM)


def test_a_recipe_killed_outright_takes_its_workers_with_it(tmp_path, start):
    """SIGKILL (the OOM killer): no handler runs in the recipe; its workers get a SIGTERM from
    Linux and stop at the end of their update with their checkpoints, instead of training on."""
    out = tmp_path / "recipe"
    proc = start(out, "a,b")
    workers = _wait_for_checkpoints(proc, out, ["a", "b"])
    proc.kill()
    _, stderr = proc.communicate(timeout=120)  # the workers hold the pipes until they end
    deadline = time.monotonic() + 60
    while [pid for pid in workers if _alive(pid)]:
        assert time.monotonic() < deadline, "a worker outlived the recipe"
        time.sleep(0.1)
    _stopped_cleanly(out, ["a", "b"], stderr, signal.SIGTERM)


def test_a_failed_stage_stops_the_others_with_their_checkpoints(tmp_path, start):
    """They used to train on (up to ~35 min) before the failure was raised."""
    out = tmp_path / "recipe"
    proc = start(out, "d,a,x")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr[-3000:]
    assert "[x] failed: " in stderr and "no_such_config.yaml" in stderr
    assert "stopping a at the end of its update" in stderr
    _stopped_cleanly(out, ["a"], stderr, signal.SIGTERM)
    assert (out / "d" / recipe.DONE).is_file()


def test_one_recipe_per_work_directory(tmp_path, capsys):
    out = tmp_path / "recipe"
    out.mkdir()
    with work_dir_lock(out):
        assert recipe.main(["--out", str(out), "--quick"]) == 1
    err = capsys.readouterr().err
    assert f"another recipe run (pid {os.getpid()}) is using this work directory" in err and "kill -TERM" in err
    assert not (out / recipe.RECIPE_FILE).exists() and not (out / "synth").exists()  # refused before writing


def test_a_stage_waits_for_the_process_still_training_it(tmp_path, capsys):
    """A re-run right after a recipe was killed: its worker is still writing the stage's last
    checkpoint, and the stage must resume from that, not from the one before."""
    stage = recipe.Stage("a", "tiny_pronoun.yaml", 1, [])
    (tmp_path / "a").mkdir()
    events = []
    held, release = threading.Event(), threading.Event()

    def earlier_process():
        with stage_lock(tmp_path, "a"):
            held.set()
            release.wait(30)
            (tmp_path / "a" / recipe.DONE).write_text(json.dumps({"finished": 1.0}))
            events.append("finished")

    holder = threading.Thread(target=earlier_process)
    holder.start()
    held.wait(30)
    threading.Timer(0.5, release.set).start()
    record = recipe.run_stage(recipe.RecipeSettings(), tmp_path, stage)
    events.append("re-run")
    holder.join()
    assert events == ["finished", "re-run"] and record == {"finished": 1.0}
    assert f"[a] waiting for pid {os.getpid()}, still training this stage" in capsys.readouterr().err
