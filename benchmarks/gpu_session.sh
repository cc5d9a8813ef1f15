#!/usr/bin/env bash
# The prepared GPU check for a lent device (the device tool's `run`, timeout_s 600): about 8.5 minutes, all
# stages under one deadline. On the device machine (torch 2.11 + triton 3.6 preinstalled, no network):
#
#     bash benchmarks/gpu_session.sh        # results under $OUT (the device tool's output folder)
#
# 0. install fastgrok (no dependencies fetched: the image has them; if that fails, fastgrok runs from the
#    source tree), print versions;
# 1. benchmarks/gpu_check.py: correctness vs float64, CUDA-graph capture, kernel timings vs copy bandwidth
#    (the correctness that only a GPU can show comes first);
# 2. benchmarks/gpu_trainer_check.py: the compiled Trainer step through the Triton kernels vs the eager twins;
#    2b. its --determinism: two compiled runs bit for bit alike, a batch's model bit for bit its solo run
#    (MLP, transformer), appended to gpu_trainer_check.txt;
# 3. the kernel tests on CUDA (Triton kernels compiled, not interpreted);
# 4. fastgrok bench: the training step at M = 768, 3072, then 12, and the 1,200-model phase diagram packed vs
#    per cell (target >= 10x) (the GPU targets are at the best M;
#    runs/GPU-hour, FLOP/s vs fp32 peak), then
#    clamp and CE (the grid section, five compiling trainers, is left for a later run); JSON written after
#    each M and section, so a cut-off run keeps what it measured;
# 5. benchmarks/ensemble_vs_fastgrok.py (fastgrok bench's ensemble section, ENSEMBLE_S = 150 s kept for it):
#    fastgrok vs the torch.func ensemble vs the study's loop end to end, MLP then transformer, M = 96, 768
#    (target >= 10x the ensemble at M >= 96); its tables go to session.log, its JSON after each case.
# A failing stage does not stop the next; every stage's console output is kept under $OUT (8 files, the
# device tool's limit: session.log, gpu_check.md/.log, gpu_trainer_check.txt, pytest_gpu.txt,
# bench_gpu.json/.txt, bench_ensemble_gpu.json; the step plot is drawn here from bench_gpu.json:
# python -c "import json; from fastgrok.bench.sections import plot; plot(json.load(open('bench_gpu.json')), 'bench_gpu.png')").
# Copy what comes back into benchmarks/results/ and the figures into benchmarks/RESULTS.md (date, GPU,
# torch/triton versions).
set -uo pipefail
OUT=${OUT:-/tmp/fastgrok_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET                      # the interpreter must not leak into a GPU run
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_SESSION_S:-500}))
ENSEMBLE_S=${ENSEMBLE_S:-150}                # the last stage's share of the deadline
left() {                                    # seconds for the next stage: its own cap, within the deadline
    local cap=$1 rest=$((DEADLINE - SECONDS))
    (( rest < cap )) && cap=$rest
    (( cap < 5 )) && cap=5
    echo "$cap"
}
T="timeout -k 10"                           # SIGTERM at the limit, SIGKILL 10 s later (a hung compile or CUDA call)

{                                           # everything printed goes to session.log too (the pipe waits for tee)

$T 90 $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
echo "pip install exit ${PIPESTATUS[0]}"
if ! $PY -c "import fastgrok.kernels" 2>/dev/null; then
    echo "fastgrok not importable after install: running from the source tree"
    ln -sfn ../kernels fastgrok/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'PYEOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "| date", __import__("datetime").date.today())
PYEOF

echo "== 1. gpu_check ($(left 130) s)"
$T "$(left 130)" $PY benchmarks/gpu_check.py --no-compile --out "$OUT/gpu_check.md" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?"; tail -45 "$OUT/gpu_check.log"

echo "== 2. compiled trainer, triton vs torch kernels ($(left 70) s)"
$T "$(left 70)" $PY benchmarks/gpu_trainer_check.py > "$OUT/gpu_trainer_check.txt" 2>&1
echo "gpu_trainer_check exit $?"; grep -E "wall|max|PASS|FAIL|Error" "$OUT/gpu_trainer_check.txt" | tail -8

echo "== 2b. determinism: compiled runs bitwise run to run and batched vs solo, MLP and transformer ($(left 100) s)"
$T "$(left 100)" $PY benchmarks/gpu_trainer_check.py --determinism --steps 60 >> "$OUT/gpu_trainer_check.txt" 2>&1
echo "determinism exit $?"; grep -E "determinism|PASS|FAIL|Error" "$OUT/gpu_trainer_check.txt" | tail -4

echo "== 3. kernel tests on CUDA ($(left 60) s)"
$T "$(left 60)" $PY -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_reference.py \
    > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $?"; tail -6 "$OUT/pytest_gpu.txt"

B=$(( $(left 600) - ENSEMBLE_S )); (( B < 5 )) && B=5
echo "== 4. fastgrok bench ($B s)"
$T "$B" $PY -m fastgrok.cli bench --sections step,phase,clamp,ce --models 768,3072,12 \
    --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
echo "bench exit $?"; tail -40 "$OUT/bench_gpu.txt"

echo "== 5. fastgrok vs the torch.func ensemble ($(left 600) s)"
$T "$(left 600)" $PY benchmarks/ensemble_vs_fastgrok.py --device cuda --kinds mlp,transformer --models 96,768 \
    --json "$OUT/bench_ensemble_gpu.json" 2>&1 | grep -v Warning
echo "ensemble exit ${PIPESTATUS[0]}"
echo "gpu_session: done in ${SECONDS} s; files in $OUT"
} 2>&1 | tee -a "$OUT/session.log"
