"""bench/bench_gpu.py runs unattended (bench/gpu_device_run.sh, one GPU run a session may get):
each section goes on past a failure, and the exit status must still say that rows failed (a run
whose every row failed exited 0, and steps.txt read as a good run)."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_gpu():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_gpu


def test_a_run_whose_rows_all_failed_exits_1(tmp_path, capsys):
    bench_gpu = _bench_gpu()
    code = bench_gpu.main(["--quick", "--device", "cpu", "--no-train", "--no-compile", "--cudnn-benchmark", "off",
                           "--checkpoint", str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 1 and "goal: no inference row was measured" in captured.out
    assert "bench_gpu: failed: " in captured.err and "bf16 eager" in captured.err


def test_rows_skipped_for_the_budget_or_an_absent_tensorrt_are_no_failure(capsys):
    bench_gpu = _bench_gpu()
    report = bench_gpu.Report(torch.device("cpu"), None)
    measured = {"path": "bf16 eager", "fps": 12.0}
    skipped = [{"path": "fp16 compile:reduce-overhead", "error": "skipped: 250 s spent + ~100 s to compile > 245"},
               {"path": "tensorrt", "error": "not available: needs CUDA"}]
    report.rows = [measured, *skipped]
    assert bench_gpu.exit_status(report, 0) == 0
    report.rows.append({"path": "training (torchrun)", "error": "RuntimeError: NCCL error"})
    assert bench_gpu.exit_status(report, 0) == 1
    assert "bench_gpu: failed: training (torchrun)" in capsys.readouterr().err
    report.rows = list(skipped)   # nothing measured
    assert bench_gpu.exit_status(report, 0) == 1
    report.rows = [measured, {"path": "(run stopped)", "error": "SIGTERM after 240 s"}]
    assert bench_gpu.exit_status(report, 143) == 143
