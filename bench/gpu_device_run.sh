#!/usr/bin/env bash
# One unattended call of bench/bench_gpu.py on a lent GPU machine (the workplace's `device` tool:
# Python 3.12 with torch, transformers, onnxruntime (CPU), numba, opencv, ...; no network).
# What that machine lacks of the package's dependencies travels as wheels in .whl/
# (`make gpu-wheels` here; pass `.whl` in the run's `carry`). Sized to leave time for a rerun
# within a session's 15 device minutes: about 5 minutes on an H100.
#
#   run: command "bash bench/gpu_device_run.sh", carry [".whl"], timeout_s 480
#
# Output: the bench's log (its closing table is the figure for docs/performance.md) and
# nvidia-smi under $OUT. TensorRT is not measured there: neither onnxruntime-gpu nor tensorrt
# is installed, and their wheels exceed what a call carries (64 MiB).
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
python3 -c "import torch, transformers, pycocotools, faster_coco_eval, numba, cv2; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" \
    || { echo "a dependency is missing: make gpu-wheels here, then carry .whl"; exit 1; }
timeout "${BENCH_GPU_TIMEOUT:-420}" python3 bench/bench_gpu.py --reps 30 --compile-budget-s 120 \
    --train-steps 20 --train-timeout 150 "$@" 2>&1 | tee "$OUT/bench_gpu.log"
