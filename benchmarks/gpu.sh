#!/usr/bin/env bash
# CUDA checks and benchmarks of dan-layers, in about 5 minutes on one GPU.
#
#   benchmarks/gpu.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT if set, else benchmarks/results/gpu. Steps (each bounded by
# `timeout`; a failing step is recorded and the others still run):
#   1. pytest -m cuda tests/ --device cuda     CUDA-vs-CPU parity tests  (pytest.log, junit.xml)
#   2. heads_train.py      --device cuda, float32 and bfloat16 (autocast)     Q1
#   3. heads_inference.py  --device cuda, float32 and bfloat16 (autocast)     Q2
#   4. dan_throughput.py   --device cuda, float32 eager; bfloat16 eager + torch.compile at 224 px  Q4
#   5. report.py over OUT_DIR -> RESULTS.md and plots
# Results: OUT_DIR/<benchmark>-cuda-<dtype>.json, one log per step, steps.tsv (step, exit code, seconds).
# Without CUDA it stops at once with exit status 2 and says so. Needs torch (CUDA build) and
# einops; pytest, numpy and hypothesis for step 1; matplotlib for the plots. Python: $PYTHON,
# else .venv/bin/python, else python3.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dan_layers from this checkout, installed or not

if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu.sh: CUDA is not available (torch {torch.__version__}, built for CUDA "
          f"{torch.version.cuda}); run this on a machine with an NVIDIA GPU and a CUDA build of torch",
          file=sys.stderr)
    sys.exit(2)
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1

START=$(date +%s)
FAILED=0
printf "step\texit\tseconds\n" > "$OUT_DIR/steps.tsv"
step() {  # step NAME LIMIT_SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    printf "%s\t%s\t%s\n" "$name" "$rc" "$dt" >> "$OUT_DIR/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        echo "    FAILED (exit $rc$( [ "$rc" -eq 124 ] && echo ', timed out')) after ${dt}s; tail of $OUT_DIR/$name.log:"
        tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/    /'
    else
        echo "    ok in ${dt}s"
    fi
}

B="benchmarks"
step pytest_cuda 60 "$PY" -m pytest -m cuda tests/ --device cuda -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/junit.xml"
for DT in float32 bfloat16; do
    step "heads_train_$DT" 25 "$PY" $B/heads_train.py --device cuda --dtype $DT --out "$OUT_DIR" --budget 1.5
    step "heads_inference_$DT" 20 "$PY" $B/heads_inference.py --device cuda --dtype $DT --out "$OUT_DIR" --budget 1
done
step dan_throughput_float32 35 "$PY" $B/dan_throughput.py --device cuda --dtype float32 --batch 64 \
    --no-compile --out "$OUT_DIR" --budget 2 --matmul 8192
step dan_throughput_bfloat16 100 "$PY" $B/dan_throughput.py --device cuda --dtype bfloat16 --batch 64 \
    --compile-sizes 224 --out "$OUT_DIR" --budget 2 --matmul 8192
step report 10 "$PY" $B/report.py --results "$OUT_DIR"

echo "gpu.sh: done in $(( $(date +%s) - START ))s; results in $OUT_DIR (steps.tsv lists each step's exit status)"
exit $FAILED
