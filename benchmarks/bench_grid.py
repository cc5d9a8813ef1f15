"""pytest-benchmark suite: wall-clock of a whole small grid, packed fastgrok vs eager per-cell, side by side.

    pytest benchmarks/bench_grid.py --benchmark-only -s [--benchmark-json out.json]
    FASTGROK_BENCH_QUICK=1 pytest benchmarks/bench_grid.py --benchmark-only    # tiny sizes: a smoke check

The grid: the mediation cells (baseline rho 1, tau 1; rho 1.15 x tau {1.0, 1.3, 1.7}) at p = 59, 12 seeds
each, the study's MLP, clamp from step 100 at rho * w_c with w_c = 54.5 given (no calibration runs), and
a fixed number of steps per cell (stop_when_grokked off) so both providers do the same work: 200 steps on
a CPU (about two minutes in all), 2000 on a GPU. Evaluation every 25 steps, logit scale every 200.

Providers (each runs the grid once: a grid is run once, first calls and compilation included):
  eager per-cell   fastgrok.bench.baseline.run_baseline, the study's way: one cell's 12 seeds as one stack of
                   tensors, eager PyTorch, autograd, a Python AdamW loop; the cells one after another
  fastgrok packed  `fastgrok run` of the same spec (run_experiment, local executor, engine defaults): all
                   cells in one batch of 48 models, into a fresh run directory
The packed test records both wall-clocks and the ratio (eager per-cell / packed) in extra_info.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from fastgrok.bench.baseline import run_baseline
from fastgrok.bench.sections import meta
from fastgrok.grid.executors import run_experiment
from fastgrok.grid.experiments import SHAPE_AXES, ExperimentSpec
from fastgrok.grid.plan import expand

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTGROK_BENCH_QUICK") == "1"
if QUICK:
    P, SEEDS, STEPS, W_C, TRAIN = 17, 2, 30, 19.0, {"d_embed": 16, "hidden": 32, "clamp_from": 10}
else:
    P, SEEDS, STEPS, W_C, TRAIN = 59, 12, 2000 if DEV.type == "cuda" else 200, 54.5, {"clamp_from": 100}
SPEC = ExperimentSpec.from_dict({
    "name": "bench_grid", "seeds": SEEDS, "p": [P],
    "train": {**TRAIN, "stop_when_grokked": False},
    "budget": {"max_steps": STEPS}, "calibration": {"w_c": W_C},
    "grid": [{"rho": [1.0], "tau": [1.0]}, {"rho": [1.15], "tau": [1.0, 1.3, 1.7]}]})
CELLS = expand(SPEC)
GROUP = f"grid: {len(CELLS)} cells x {SEEDS} seeds, p={P}, {STEPS} steps ({DEV.type})"
WALL: dict[str, float] = {}


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def per_cell() -> None:
    """The grid the study's way: each cell a stack of its seeds, cells one after another."""
    t0 = time.perf_counter()
    for c in CELLS:
        cfg = SPEC.base_config(**{a: c[a] for a in SHAPE_AXES})
        run_baseline(cfg, c["budget"], tau=c["tau"], norm_target=c["rho"] * W_C, device=DEV,
                     seeds=[cfg.seed0 + s for s in range(c["seeds"])])
    _sync()
    WALL["eager per-cell"] = time.perf_counter() - t0


def packed(out) -> None:
    """The same grid through fastgrok's engine: one batch of every cell's seeds."""
    t0 = time.perf_counter()
    run_experiment(SPEC, out=out, device=DEV.type, progress=False)
    _sync()
    WALL["fastgrok packed"] = time.perf_counter() - t0


def _record(benchmark, provider, extra=None):
    benchmark.extra_info.update({"op": "grid", "provider": provider, "p": P, "cells": len(CELLS), "seeds": SEEDS,
                                 "models": len(CELLS) * SEEDS, "steps": STEPS, "wall_s": WALL[provider],
                                 "runs_per_hour": len(CELLS) / WALL[provider] * 3600,
                                 **meta(DEV, quick=QUICK), **(extra or {})})


def test_grid_eager_per_cell(benchmark):
    benchmark.group = GROUP
    benchmark.pedantic(per_cell, rounds=1, iterations=1)
    _record(benchmark, "eager per-cell")


def test_grid_fastgrok_packed(benchmark, tmp_path_factory):
    benchmark.group = GROUP
    benchmark.pedantic(packed, setup=lambda: ((tmp_path_factory.mktemp("bench_grid") / "run",), {}),
                       rounds=1, iterations=1)
    if "eager per-cell" not in WALL:            # run alone (-k): measure the reference here
        per_cell()
    ratio = WALL["eager per-cell"] / WALL["fastgrok packed"]
    _record(benchmark, "fastgrok packed", {"baseline_wall_s": WALL["eager per-cell"], "speedup_vs_baseline": ratio})
    print(f"\n{GROUP}: eager per-cell {WALL['eager per-cell']:.1f} s, fastgrok packed "
          f"{WALL['fastgrok packed']:.1f} s -> {ratio:.2f}x")
    assert ratio > 0
