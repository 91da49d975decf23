#!/usr/bin/env bash
# One unattended call on a lent GPU machine (the workplace's `device` tool: Python 3.12 with
# torch, transformers, onnxruntime (CPU), numba, opencv, ...; no network). What that machine
# lacks of the package's dependencies travels as wheels in .whl/ (`make gpu-wheels` here; pass
# `.whl` in the run's `carry`). Sized to leave time for a rerun within a session's 15 device
# minutes.
#
#   run: command "bash bench/gpu_device_run.sh",     carry [".whl"], timeout_s 540
#        bench/bench_gpu.py (about 5 min on an H100), then fp32 / fp16 / bf16 accuracy of the
#        embedded default model on the GPU (bench/bench_precision_accuracy.py, about 1 min)
#   run: command "bash bench/gpu_device_run.sh cpu", carry [".whl"], timeout_s 300
#        only where the first call's cpu.txt shows amx_bf16 or avx512_bf16: the CPU bench
#        (bench/bench_inference.py) on 2 of its cores, the bf16 row that this project's CPU
#        cannot give
#
# Output under $OUT: nvidia-smi.txt, cpu.txt and each bench's log (their closing tables are the
# figures for docs/performance.md). TensorRT is not measured there: neither onnxruntime-gpu nor
# tensorrt is installed, and their wheels exceed what a call carries (64 MiB).
set -uo pipefail
OUT=${OUT:-/tmp/bench_gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{ lscpu; grep -o -w -E 'amx_bf16|avx512_bf16|avx512_vnni|avx_vnni' /proc/cpuinfo | sort | uniq -c; } > "$OUT/cpu.txt" 2>&1
python3 -c "import torch, transformers, pycocotools, faster_coco_eval, numba, cv2; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" \
    || { echo "a dependency is missing: make gpu-wheels here, then carry .whl"; exit 1; }
if [ "${1:-}" = "cpu" ]; then
    shift
    timeout "${BENCH_CPU_TIMEOUT:-270}" taskset -c 0,1 python3 bench/bench_inference.py --reps 1 --threads 2 "$@" 2>&1 \
        | tee "$OUT/bench_inference_cpu.log"
    exit
fi
timeout "${BENCH_GPU_TIMEOUT:-400}" python3 bench/bench_gpu.py --reps 30 --compile-budget-s 120 \
    --train-steps 20 --train-timeout 150 "$@" 2>&1 | tee "$OUT/bench_gpu.log"
timeout "${BENCH_ACCURACY_TIMEOUT:-100}" python3 bench/bench_precision_accuracy.py --device cuda \
    --paths fp32,fp16,bf16 2>&1 | tee "$OUT/bench_precision_accuracy_gpu.log"
