"""Running a recipe's training stages, several at once in worker processes, as one stoppable run.

A stage trains in a worker process (``--jobs`` > 1) or in the recipe's own process. Either way:

* Ctrl-C or SIGTERM stops the whole run the way ``toist train`` stops: each training stage
  finishes the update in progress and writes ``checkpoint.pth`` (its ``StopSignals``), the
  recipe waits for them and exits 128 + signal; the same command continues. The recipe passes
  the request on to its workers through shared memory: a SIGTERM sent to the recipe alone
  (``kill``, systemd, a job scheduler) would otherwise leave them training on, and a signal to
  an idle worker would kill it, which breaks the whole pool.
* A recipe killed outright (SIGKILL, the OOM killer) takes its workers with it: each asks Linux
  for a SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and so stops at its next update, with
  its checkpoint, instead of writing on into a work directory that a re-run is using.
* One recipe at a time per work directory (:func:`work_dir_lock`, refused at once), and one
  process at a time per stage (:func:`stage_lock`: a re-run waits for a worker of the run it
  replaces to write its last checkpoint, then resumes from it).
* A stage that fails stops the others the same way (checkpoint written, a re-run continues them)
  instead of letting them train on for up to half an hour before the failure is raised.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

from toist_core.parent_death import signal_when_parent_dies
from toist_core.stop_signals import StopSignals

__all__ = ["RecipeRefused", "StageStopped", "WorkDirBusy", "run_stages", "stage_lock", "stage_stop", "work_dir_lock"]

WORK_DIR_LOCK = ".recipe.lock"
_POLL_S = 0.5          # how soon the scheduler sees a stop signal while stages train



class _Stage(Protocol):
    name: str
    after: Sequence[str]  # the stages it starts from


Stage = TypeVar("Stage", bound=_Stage)


class StageStopped(Exception):
    """A stage stopped early by a signal, its ``checkpoint.pth`` written (picklable: it crosses
    from a worker process to the recipe)."""

    def __init__(self, stage: str, signum: int):
        super().__init__(stage, signum)
        self.stage, self.signum = stage, signum

    def __str__(self) -> str:
        return f"stage {self.stage!r} stopped by signal {self.signum}"


class WorkDirBusy(RuntimeError):
    """Another recipe run holds the work directory's lock."""


class RecipeRefused(ValueError):
    """The work directory holds what this run must not build on (other settings, a stage trained
    from since-retrained stages, an unreadable record); the message names the file and what to
    delete or change. Said to the user as an error, not a traceback (picklable: it crosses from a
    worker process to the recipe)."""


def _locked(path: Path, blocking: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None (non-blocking, taken)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def work_dir_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s recipe lock, or refuse at once when another recipe run holds it."""
    path = out / WORK_DIR_LOCK
    fd = _locked(path, blocking=False)
    if fd is None:
        pid = _holder(path)
        raise WorkDirBusy(f"{out}: another recipe run (pid {pid}) is using this work directory; wait for it "
                           f"to end or stop it (kill -TERM {pid}: it writes its checkpoints and exits)")
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def stage_lock(out: Path, name: str) -> Iterator[None]:
    """Hold stage ``name``'s lock; wait (saying so) while an earlier run's process still trains it."""
    path = out / f".{name}.lock"
    fd = _locked(path, blocking=False)
    if fd is None:
        print(f"[{name}] waiting for pid {_holder(path)}, still training this stage (a recipe stopped a moment "
              f"ago: it writes its checkpoint at the end of its update)", file=sys.stderr, flush=True)
        fd = _locked(path, blocking=True)
    try:
        yield
    finally:
        os.close(fd)


# In a worker process: the recipe's stop request (the signal number, 0 for none), shared memory
# set by _init_worker. Idle workers must not be signalled: one killed breaks the whole pool.
_recipe_stop = None
_recipe_pid = 0


def _init_worker(parent: int, recipe_stop) -> None:
    """Worker initializer. Ctrl-C reaches the whole process group: the recipe passes it on
    through ``recipe_stop`` to the stages that train, an idle worker ignores it. A SIGTERM when
    the recipe dies, however it dies (Linux only): it ends an idle worker, a training stage
    writes its checkpoint first (its StopSignals)."""
    global _recipe_stop, _recipe_pid
    _recipe_stop, _recipe_pid = recipe_stop, parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not signal_when_parent_dies(signal.SIGTERM, parent):  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def _train_in_worker(train: Callable[[Stage], dict], stage: Stage) -> dict:
    try:
        return train(stage)
    finally:
        # The recipe died while this stage trained (the stage stopped on the SIGTERM that
        # brought): nobody waits for the result, and the pool's queues would hold this process
        # forever (every worker holds both ends of them, so they never see an end of file).
        if os.getppid() != _recipe_pid:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)


class _StageStop:
    """What a stage's Trainer polls (``signum``): a stop signal to this process, else the
    recipe's request."""

    def __init__(self, signals: StopSignals):
        self._signals = signals

    @property
    def signum(self) -> int | None:
        if self._signals.signum is not None:
            return self._signals.signum
        return (_recipe_stop.value or None) if _recipe_stop is not None else None


@contextlib.contextmanager
def stage_stop() -> Iterator[_StageStop]:
    """``with stage_stop() as stop:`` ... ``Trainer(..., stop=stop)``: the stage ends after the
    update in progress on SIGINT / SIGTERM or when the recipe stops it."""
    with StopSignals() as signals:
        yield _StageStop(signals)


def run_stages(plan: Sequence[Stage], train: Callable[[Stage], dict], jobs: int) -> dict[str, dict]:
    """``train`` every stage of ``plan``, up to ``jobs`` at once (each once the stages it starts
    from are done; ``train`` must be picklable); returns each stage's record by name. Raises :class:`StageStopped` when a
    signal stopped the run, or the first stage's failure once every running stage has stopped."""
    records: dict[str, dict] = {}
    if jobs <= 1:
        with StopSignals() as stop:  # between stages; in a stage, its own StopSignals
            for stage in plan:
                if stop.requested:
                    raise StageStopped(stage.name, stop.signum)
                records[stage.name] = train(stage)
        return records
    pending: list[Stage] = list(plan)
    running: dict[Future, Stage] = {}
    failure: BaseException | None = None
    stopped: StageStopped | None = None  # a stage stopped by a signal to its worker alone
    context = multiprocessing.get_context("spawn")
    recipe_stop = context.Value("i", 0)
    with StopSignals() as stop, ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                                                    initargs=(os.getpid(), recipe_stop)) as pool:
        while pending or running:
            if (stop.requested or failure is not None or stopped is not None) and not recipe_stop.value:
                pending.clear()  # the stages after a stopped one could not start anyway
                recipe_stop.value = stop.signum or (stopped.signum if stopped is not None else signal.SIGTERM)
            ready = [stage for stage in pending if all(n in records for n in stage.after)]
            for stage in ready[: jobs - len(running)]:
                pending.remove(stage)
                running[pool.submit(_train_in_worker, train, stage)] = stage
            if not running:
                break
            finished, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    records[stage.name] = future.result()
                except StageStopped as exc:
                    stopped = stopped or exc
                except BaseException as exc:
                    others = ", ".join(s.name for s in running.values())
                    # A refusal that will be raised (the first failure) is said below in the recipe's
                    # one error line; any other, here in full.
                    said = isinstance(exc, RecipeRefused) and failure is None
                    print(f"[{stage.name}] " + ("refused" if said else f"failed: {type(exc).__name__}: {exc}")
                          + (f"; stopping {others} at the end of its update (checkpoint written, a re-run "
                             f"continues it)" if others else ""), file=sys.stderr, flush=True)
                    failure = failure or exc
    if failure is not None:
        raise failure
    if stop.requested or stopped is not None:
        raise StageStopped(", ".join(s.name for s in plan if s.name not in records),
                           stop.signum or stopped.signum)
    return records
