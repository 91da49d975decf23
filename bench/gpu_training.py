"""The training part of bench/bench_gpu.py: a few updates of the paper model under torchrun
(NCCL on GPUs, gloo on CPU, bf16 AMP), updates/s and peak memory per rank.

``training_section(args, device, report)`` writes a small synthetic COCO-Tasks set, runs
``torchrun --standalone --nproc_per_node N bench/gpu_training.py WARMUP STEPS -- <toist train
arguments>`` in a session of its own (echoing its output as it comes, stopping its whole process
tree on a time limit) and adds one row to ``report``. Run by torchrun, this file is the worker:
``toist train`` in-process with its optimizer steps timed by a hook, one ``BENCH_GPU_TRAIN {json}``
line per rank.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TRAIN_TAG = "BENCH_GPU_TRAIN "


def _process_tree(root: int) -> set[int]:
    """Process groups of ``root`` and its descendants (Linux /proc): torchrun starts each worker
    in a session of its own, and each worker's DataLoader workers sit in the worker's group."""
    parents: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(fields[1])].append((int(entry.name), int(fields[2])))  # ppid -> (pid, pgid)
    groups, todo = {root}, [root]
    while todo:
        for pid, pgid in parents.get(todo.pop(), []):
            groups.add(pgid)
            todo.append(pid)
    return groups


def _stop_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM torchrun's process group (torchrun forwards it to its workers; a worker finishes
    its update and exits), wait up to ``grace_s``, then SIGKILL every process group of the tree
    as it was before the signal (workers left behind by a torchrun that died first included)."""
    groups = _process_tree(proc.pid) if proc.poll() is None else {proc.pid}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for group in sorted(groups):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        print(f"torchrun (pid {proc.pid}) did not exit after SIGKILL", flush=True)


def run_torchrun(cmd: list[str], timeout_s: float) -> dict:
    """Run ``cmd`` (torchrun) in a session of its own, echoing its output as it comes (a run
    stopped by a time limit keeps it) and collecting the TRAIN_TAG lines; on timeout or SIGTERM
    stop its whole process tree."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)
    tails = {"stdout": collections.deque(maxlen=25), "stderr": collections.deque(maxlen=25)}
    results: list[dict] = []

    def pump(stream, name):
        for line in stream:
            line = line.rstrip("\n")
            tails[name].append(line)
            if name == "stdout" and line.startswith(TRAIN_TAG):
                try:
                    results.append(json.loads(line[len(TRAIN_TAG):]))
                except json.JSONDecodeError:
                    pass
            print(f"  [train {name}] {line}", flush=True)

    pumps = [threading.Thread(target=pump, args=(getattr(proc, name), name), daemon=True) for name in tails]
    for thread in pumps:
        thread.start()
    started = time.perf_counter()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"torchrun: timed out after {timeout_s:.0f} s: SIGTERM to its process group, SIGKILL after 20 s",
              flush=True)
        _stop_tree(proc, 20.0)
    except BaseException:  # Terminated (SIGTERM to this process), KeyboardInterrupt
        print("stopping torchrun (this process was signalled)", flush=True)
        _stop_tree(proc, 8.0)
        raise
    finally:
        for thread in pumps:
            thread.join(timeout=5)
    return {"code": proc.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - started,
            "results": results, "tails": tails}


def _train_config(config: str, overrides: list[str]):
    """The run's TrainConfig as ``toist train`` reads it (presets, defaults, checks)."""
    from training.config import load_config

    return load_config(ROOT / config, overrides)


def training_section(args, device, report) -> None:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="toist_bench_gpu_"))
    try:
        _training(args, device, report, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _training(args, device, report, workdir: Path) -> None:
    nproc = args.nproc or (torch.cuda.device_count() if device.type == "cuda" else 1)
    config = "training/configs/tiny_pronoun.yaml" if args.quick else "training/configs/pronoun.yaml"
    batch = _train_config(config, args.train_override).loader.batch_size
    # One epoch that holds every timed update: an epoch end restarts the loader (and would write
    # a checkpoint), which is not what updates/s should measure.
    images = args.train_images or (args.train_steps + 1) * batch * nproc
    data = workdir / "synth"
    if not (data / "annotations").is_dir():
        synth = [sys.executable, "-m", "toist_core.cli", "synth", str(data), "--tasks", "1", "2",
                 "--splits", "train", "--images-per-split", str(images),
                 "--min-size", str(args.train_min_size), "--max-size", str(args.train_max_size)]
        print(" ".join(synth), flush=True)
        subprocess.run(synth, check=True, cwd=ROOT, timeout=120)
    workers = args.train_workers if args.train_workers is not None else \
        min(8, max(1, (os.cpu_count() or 2) // nproc - 2))
    amp = args.amp if device.type == "cuda" else "none"
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Evaluation, checkpoint writes and the model export are off: they are not updates, and the
    # paper model's checkpoint, BEST copy and export came to ~6.6 GB. (The final checkpoint
    # that Trainer writes regardless is skipped in the worker, train_worker.)
    overrides = [f"data.root={data}", "data.tasks=[1,2]", f"output_dir={workdir / 'run'}",
                 f"schedule.max_steps={args.train_steps}", "schedule.epochs=1",
                 "checkpoint.every_steps=0", "checkpoint.per_epoch=false", "checkpoint.export_model_dir=false",
                 "eval.enabled=false", "runtime.progress=false", "runtime.tensorboard=false",
                 "runtime.deterministic=false", f"loader.num_workers={workers}", "init.load=null",
                 f"runtime.device={'cuda' if device.type == 'cuda' else 'cpu'}", f"runtime.amp={amp}",
                 f"distributed.backend={backend}"]
    if not args.quick:
        overrides += ["model.text.tokenizer=builtin:tiny"]
    overrides += args.train_override
    # --local-addr: --standalone gives the workers this host's name to reach the store; a VM
    # whose name resolves nowhere (no /etc/hosts entry, no DNS) lost the training row.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1",
           f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), str(args.train_warmup), str(args.train_steps), "--",
           "--config", config, *overrides]
    print(" ".join(cmd), flush=True)
    # What the run's budget leaves, so that a time limit outside does not cut the row unwritten.
    timeout = max(15.0, min(args.train_timeout, args.compile_budget_s - (time.perf_counter() - args.started)))
    run = run_torchrun(cmd, timeout)
    label = f"train {Path(config).stem} x{nproc} {amp if amp != 'none' else 'fp32'}"
    status = (f"timed out after {timeout:.0f} s (--train-timeout, or what the budget left)" if run["timed_out"] else
              f"exit code {run['code']}" if run["code"] != 0 else "")
    if status:  # the output was echoed as it came; its last lines again, together
        for name, lines in run["tails"].items():
            print(f"--- torchrun {name}, last {len(lines)} lines:\n" + "\n".join(lines), flush=True)
    per_rank = sorted(run["results"], key=lambda r: r["rank"])
    if not per_rank or not any(r["timed_updates"] > 0 for r in per_rank):
        done = f"{per_rank[0]['steps']} updates done, none timed" if per_rank else "no result line"
        report.add({"path": label, "error": f"{status or 'finished'}; {done}; {run['wall_s']:.0f} s wall"})
        return
    first = per_rank[0]
    rate = statistics.median(r["updates_per_s"] for r in per_rank)
    group = (f"{first['backend']} group of {first['world_size']}" if first["dist_initialized"] else "no process group")
    wrapped = "DDP" if first["wrapped_in"] == "DistributedDataParallel" else f"no DDP ({first['wrapped_in']})"
    note = (f"{rate:.2f} updates/s, {rate * first['batch_size'] * nproc:.1f} img/s, {first['steps']} updates "
            f"({first['timed_updates']} timed), {group}, {wrapped}, batch {first['batch_size']}/GPU, "
            f"{workers} loader workers, {run['wall_s']:.0f} s wall" + (f"; {status}" if status else ""))
    report.add({"path": label, "updates_per_s": rate, "images_per_s": rate * first["batch_size"] * nproc,
                "peak_mib": max(r["peak_mib"] for r in per_rank), "steps": first["steps"],
                "timed_updates": first["timed_updates"], "wall_s": run["wall_s"], "exit_code": run["code"],
                "timed_out": run["timed_out"], "dist_initialized": first["dist_initialized"],
                "backend": first["backend"], "world_size": first["world_size"], "ddp": first["wrapped_in"],
                "loader_workers": workers, "note": note})


def train_worker(warmup: int, steps: int, train_argv: list[str]) -> int:
    """Runs under torchrun: ``toist train`` in this process, optimizer steps timed by a hook;
    the result line is printed as soon as the timed updates are done (a failure after them
    keeps it)."""
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import training.loops as loops
    from training.distributed import barrier
    from training.train import add_arguments, run

    config = next(train_argv[i + 1] for i, a in enumerate(train_argv) if a == "--config")
    settings = _train_config(config, [a for a in train_argv if "=" in a and not a.startswith("-")])
    batch_size, amp = settings.loader.batch_size, settings.runtime.amp
    stamps: list[float] = []
    reported = [False]
    # What ran, read from torch when the trainer wraps its model (the process group exists then;
    # train.run destroys it before a late report): group, backend, DDP or the module itself.
    ran = {"dist_initialized": None, "backend": None, "world_size": None, "wrapped_in": "not built"}
    wrap_ddp = loops.wrap_ddp

    def recording_wrap_ddp(module, env, *a, **kw):
        result = wrap_ddp(module, env, *a, **kw)
        initialized = dist.is_available() and dist.is_initialized()
        ran.update(dist_initialized=initialized, backend=str(dist.get_backend()) if initialized else None,
                   world_size=dist.get_world_size() if initialized else 1, wrapped_in=type(result).__name__)
        return result
    loops.wrap_ddp = recording_wrap_ddp

    # Trainer writes checkpoint.pth after its last update whatever the config says (~3 GB for
    # the paper model with EMA and optimizer state): not an update, so skipped in this bench.
    def no_checkpoint(self, name):
        if self.env.is_main:
            print(f"bench: {name} not written", file=sys.stderr, flush=True)
        barrier(self.env)
    loops.Trainer._save = no_checkpoint

    on_cuda = torch.cuda.is_available()

    def report():
        if reported[0]:
            return
        reported[0] = True
        timed = stamps[warmup:]
        rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) >= 2 else float("nan")
        print(TRAIN_TAG + json.dumps({
            "rank": int(os.environ.get("RANK", "0")), "steps": len(stamps), "timed_updates": max(len(timed) - 1, 0),
            "updates_per_s": rate, "batch_size": batch_size, "amp": amp,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda and torch.cuda.is_initialized()
            else float("nan"), **ran}), flush=True)

    def hook(optimizer, args, kwargs):
        if on_cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == steps:
            report()  # now, inside the run: the process group still exists

    register_optimizer_step_post_hook(hook)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    try:
        code = run(parser.parse_args(train_argv))
    finally:
        report()  # fewer updates than asked (a short epoch, a failure): what there was
    return int(code or 0)


def main(argv=None) -> int:
    """The torchrun worker: ``WARMUP STEPS -- <toist train arguments>``."""
    argv = sys.argv[1:] if argv is None else argv
    warmup, steps, rest = int(argv[0]), int(argv[1]), argv[2:]
    return train_worker(warmup, steps, rest[1:] if rest[:1] == ["--"] else rest)


if __name__ == "__main__":
    sys.exit(main())
