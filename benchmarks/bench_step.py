"""pytest-benchmark suite: the training step at p = 59 with M = 12 seeds, side by side.

    pytest benchmarks/bench_step.py --benchmark-only [--benchmark-json out.json]

Providers: `baseline` (fastgrok.bench.baseline: the eager per-cell trainer written the study's way, the
reference of every speed-up claim), `fastgrok-eager` and `fastgrok-compiled` (fastgrok's batched step,
compile time excluded and recorded). The compiled test also runs the baseline and itself alternately
in the same conditions and records their median times and the ratio in extra_info (printed with -s).
Steps only: the evaluation every 25 steps is not included here (see `fastgrok bench` and
benchmarks/RESULTS.md for whole-run figures).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pytest
import torch

from fastgrok.bench.baseline import BaselineCell
from fastgrok.bench.sections import fastgrok_step, meta, step_config
from fastgrok.core.models import step_flops

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CFG = replace(step_config(quick=False), seeds=12)                    # the study's MLP, p = 59
ROUNDS = 10 if DEV.type == "cpu" else 50


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    def run():
        fn()
        _sync()
    return run


@pytest.fixture(scope="module")
def steps():
    cell = BaselineCell(CFG, device=DEV)
    eager, _ = fastgrok_step(CFG, DEV, compile_step=False)
    compiled, _ = fastgrok_step(CFG, DEV, compile_step=True)
    t0 = time.perf_counter()
    compiled()
    _sync()
    compile_s = time.perf_counter() - t0
    return {"baseline": _timed(cell.step), "fastgrok-eager": _timed(eager),
            "fastgrok-compiled": _timed(compiled), "compile_s": compile_s}


def _record(benchmark, provider, extra=None):
    benchmark.extra_info.update({"op": "train_step", "provider": provider, "p": CFG.p, "M": CFG.seeds,
                                 "flops_per_step": step_flops(CFG) * CFG.seeds, **meta(DEV, quick=False),
                                 **(extra or {})})


@pytest.mark.parametrize("provider", ["baseline", "fastgrok-eager"])
def test_step(benchmark, steps, provider):
    benchmark.group = f"train step p={CFG.p} M={CFG.seeds}"
    benchmark.pedantic(steps[provider], rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(benchmark, provider)


def test_step_compiled_vs_baseline(benchmark, steps):
    benchmark.group = f"train step p={CFG.p} M={CFG.seeds}"
    benchmark.pedantic(steps["fastgrok-compiled"], rounds=ROUNDS * 3, warmup_rounds=2, iterations=1)
    # side by side: alternate the two so that both see the same machine load
    times = {"baseline": [], "fastgrok-compiled": []}
    for _ in range(ROUNDS):
        for name in times:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["baseline"] / med["fastgrok-compiled"]
    _record(benchmark, "fastgrok-compiled", {
        "compile_s": steps["compile_s"], "baseline_median_s": med["baseline"],
        "compiled_median_s": med["fastgrok-compiled"], "speedup_vs_baseline": ratio,
        "seed_steps_per_s": CFG.seeds / med["fastgrok-compiled"],
        "baseline_seed_steps_per_s": CFG.seeds / med["baseline"]})
    print(f"\nstep p={CFG.p} M={CFG.seeds}: baseline {med['baseline'] * 1e3:.1f} ms, compiled "
          f"{med['fastgrok-compiled'] * 1e3:.1f} ms -> {ratio:.2f}x (compile {steps['compile_s']:.1f} s)")
    assert ratio > 0
