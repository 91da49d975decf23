#!/usr/bin/env bash
# One unattended call on a lent GPU machine (the workplace's `device` tool: one H100, Python 3.12
# with torch, transformers, onnxruntime (CPU), opencv, ...; no network). What that machine lacks
# of the package's dependencies travels as wheels in .whl/ (`make gpu-wheels` here).
#
#   run: command "bash bench/gpu_device_run.sh", carry [".whl"], timeout_s 540; then give_back
#
# The whole script ends within BENCH_TOTAL_S (480 s): every step has its own timeout, cut to what
# is left of that total (less what the later steps need), so a hang costs its step only. A
# session's 15 device minutes hold one such call (start 1-2 min + 8 min + 30 s warm); the 4.5-5.5
# minutes left may allow a fresh start for a short rerun of one step (a machine start needs 4).
#
# Steps, each logging "exit <code> after <s>s" (steps.txt has them all):
#   1. nvidia-smi.txt and cpu.txt (lscpu, bf16 / AMX flags), before anything can fail;
#   2. the carried wheels installed, the dependencies imported (setup.log);
#   3. bench/bench_gpu.py (<= 270 s): eager bf16 / fp16 / fp32 and a cudnn.benchmark row at
#      800 px, the bf16 torch.compile row (CUDA graphs), 20 training updates of the paper model
#      under torchrun (NCCL, DDP, bf16 AMP), the fp16 and fp32 compiled rows as long as they fit,
#      TensorRT when installed (it is not: neither onnxruntime-gpu nor tensorrt is, and their
#      wheels exceed what a call carries, 64 MiB); then any process still on the GPU is logged
#      (not killed: nvidia-smi's pids may be another namespace's);
#   4. bench/bench_precision_accuracy.py --device cuda (<= 150 s): fp32 (TF32 off) / fp16 / bf16
#      accuracy of the embedded default model, each path printed when done;
#   5. only with BENCH_CPU_BF16=1 (or =auto and amx_bf16 / avx512_bf16 in /proc/cpuinfo):
#      bench/bench_inference.py on 2 of the CPU's cores (<= 110 s). Off by default: the project's
#      VM now has AMX-bf16 itself (docs/performance.md), and the 120 s it keeps back are the GPU
#      steps' time.
#
# Output under $OUT (logs written as they go, so a killed step keeps what it printed):
# nvidia-smi.txt, cpu.txt, steps.txt, setup.log, bench_gpu.log, bench_precision_accuracy_gpu.log,
# bench_inference_cpu.log. Exit status 1 when a step that ran failed (steps.txt says which), else 0.
# Arguments are passed on to bench_gpu.py; a CPU rehearsal:
#   OUT=/tmp/x BENCH_ACCURACY_ARGS="--device cpu --paths fp32,bf16 --images 10" \
#     bash bench/gpu_device_run.sh --quick --device cpu
set -uo pipefail
OUT=${OUT:-/tmp/bench_gpu_out}
mkdir -p "$OUT"
TOTAL_S=${BENCH_TOTAL_S:-480}
START=$SECONDS
FAILED_STEPS=""

log() { echo "[gpu_device_run +$((SECONDS - START))s] $*" | tee -a "$OUT/steps.txt"; }
left() { echo $((TOTAL_S - (SECONDS - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# step NAME LIMIT_S LOGFILE COMMAND...: COMMAND under its own timeout (SIGTERM at LIMIT_S,
# SIGKILL 20 s later), its output shown and appended to $OUT/LOGFILE as it comes.
step() {
    local name=$1 limit=$2 logfile=$3 t0=$SECONDS rc
    shift 3
    STEP_RC=skipped
    if [ "$limit" -lt 15 ]; then
        log "$name: skipped, ${limit}s of the ${TOTAL_S}s left"
        return 0
    fi
    log "$name: start, timeout ${limit}s"
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$OUT/$logfile"
    rc=${PIPESTATUS[0]}
    STEP_RC=$rc
    [ "$rc" -eq 0 ] || FAILED_STEPS="$FAILED_STEPS $name;"
    log "$name: exit $rc after $((SECONDS - t0))s$( [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo " (timed out)")"
    return 0
}

# 1. The machine, first: nothing below can keep these from being written.
timeout 20 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (exit $?)" >> "$OUT/nvidia-smi.txt"
{ lscpu; echo "nproc: $(nproc)"; df -h /dev/shm; grep -o -w -E 'amx_bf16|amx_tile|avx512_bf16|avx512_vnni|avx_vnni' /proc/cpuinfo \
    | sort | uniq -c; } > "$OUT/cpu.txt" 2>&1
case "${BENCH_CPU_BF16:-0}" in
    1) CPU_BF16=1 ;;
    0) CPU_BF16=0 ;;
    *) if grep -q -w -E 'amx_bf16|avx512_bf16' /proc/cpuinfo; then CPU_BF16=1; else CPU_BF16=0; fi ;;
esac
CPU_RESERVE=$(( CPU_BF16 ? 120 : 0 ))   # step 5 took 107 s, and prints its figures at the end
log "start: total ${TOTAL_S}s; CPU bf16 step $( [ "$CPU_BF16" = 1 ] && echo on || echo off) (cpu.txt)"

# 2. Carried wheels and the dependency check (no bench needs numba). A failure is logged and the
# steps still run: each then fails fast with its own message.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install carried wheels" "$(min 90 "$(left)")" setup.log \
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    if [ "$STEP_RC" = 0 ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
else
    log "no .whl/*.whl here (make gpu-wheels, carry .whl): using what the machine has"
fi
step "dependency check" "$(min 60 "$(left)")" setup.log python3 -c "import torch, transformers, pycocotools, \
faster_coco_eval, cv2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda, \
'transformers', transformers.__version__)"

# 3. The GPU bench; its compiled rows start only while they fit in its own timeout.
limit=$(min 270 $(( $(left) - 100 - CPU_RESERVE )))
step "bench_gpu.py" "$limit" bench_gpu.log python3 bench/bench_gpu.py --reps 50 --warmup 10 --train-steps 20 \
    --train-warmup 5 --train-timeout 100 --compile-budget-s $(( limit > 40 ? limit - 25 : 15 )) "$@"
# A process still on the GPU now would skew step 4: logged, not killed (bench_gpu.py stops its
# training tree itself, and nvidia-smi's pids may be another namespace's).
if command -v nvidia-smi >/dev/null; then
    left_on_gpu=$(timeout 10 nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null)
    [ -z "$left_on_gpu" ] || log "still on the GPU after bench_gpu.py: $left_on_gpu"
fi

# 4. Accuracy of the reduced precisions on the GPU.
# shellcheck disable=SC2086
step "bench_precision_accuracy.py" "$(min 150 $(( $(left) - CPU_RESERVE )))" bench_precision_accuracy_gpu.log \
    python3 bench/bench_precision_accuracy.py ${BENCH_ACCURACY_ARGS:---device cuda --paths fp32,bf16,fp16}

# 5. bf16 on this machine's CPU, where it has the instructions.
if [ "$CPU_BF16" = 1 ]; then
    step "bench_inference.py (CPU, 2 cores)" "$(min 110 "$(left)")" bench_inference_cpu.log \
        taskset -c 0,1 python3 bench/bench_inference.py --reps 1 --threads 2 --no-int8 --no-stages
fi
if [ -n "$FAILED_STEPS" ]; then
    log "done; failed:$FAILED_STEPS"
    exit 1
fi
log "done"
