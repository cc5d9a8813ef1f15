#!/usr/bin/env bash
# The prepared GPU check for a lent device (the device tool's `run`; about 8 minutes, under its 10-minute
# command limit). On the device machine (torch 2.11 + triton 3.6 preinstalled, no network):
#
#     bash benchmarks/gpu_session.sh        # results under $OUT (the device tool's output folder)
#
# 1. install fastgrok (no dependencies fetched: the image has them), print versions;
# 2. the kernel tests on CUDA (Triton kernels compiled, not interpreted) and the trainer tests;
# 3. benchmarks/gpu_check.py: correctness vs float64, CUDA-graph capture, kernel timings vs copy bandwidth;
# 4. fastgrok bench: the training step up to M = 3072 (runs/GPU-hour, FLOP/s vs fp32 peak), CE, clamp
#    (the grid section, five compiling trainers, is left for a later run); JSON written after each M and
#    section, so a cut-off run keeps what it measured.
# Each stage has its own time limit; a failing stage does not stop the next. Copy what comes back into
# benchmarks/results/ and the figures into benchmarks/RESULTS.md (date, GPU, torch/triton versions).
set -uo pipefail
OUT=${OUT:-/tmp/fastgrok_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY - <<'PYEOF' 2>&1 | tee "$OUT/versions.txt"
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "| date", __import__("datetime").date.today())
PYEOF
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_reference.py \
    tests/test_trainer.py -k "not quick_preset" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -8
timeout 230 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check.md" 2>&1 | tail -60
timeout 220 $PY -m fastgrok.cli bench --sections step,ce,clamp --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png" 2>&1 \
    | tee "$OUT/bench_gpu.txt" | tail -60
echo "gpu_session: done; files in $OUT"
