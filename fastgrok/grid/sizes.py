"""What an experiment costs before it runs (`fastgrok experiments`): its cells, models, step budgets, a
CPU time and an estimated GPU time, every model trained to its budget (cells stop once their seeds grok, so
runs are usually shorter). The CPU time is from measured model-step times; the GPU time is an estimate
from FLOPs and an assumed utilisation (GPU_PEAK_FLOPS, GPU_UTIL, GPU_STEP_S), until a GPU measures it.

The CPU time of one model-step is FIXED_S + WORK_S x (the step's FLOPs / the study MLP's at p = 59; core.models.step_flops), times
EAGER for an uncompiled MLP (`--compile auto` runs of at most step.QUICK_STEPS steps), TRANSFORMER for the
transformer (eager on a CPU), FLOAT64 in float64; plus COMPILE_S per compiled batch. A batch's models are
padded to its most train rows, so each model costs its batch's work. The constants are fitted to
`benchmarks/model_step_times.py` on one thread of the 2-core CPU machine; benchmarks/RESULTS.md ("Model-step
times behind `fastgrok experiments`' CPU time") holds the measurements and the end-to-end checks.
"""
from __future__ import annotations

from fastgrok.config import TrainConfig
from fastgrok.core.models import step_flops
from fastgrok.grid.experiments import ExperimentSpec

WORK_S = 3.64e-3
"""Seconds per model-step per unit of the study MLP's work at p = 59 (one thread, compiled)."""
FIXED_S = 0.26e-3
"""Seconds per model-step whatever its size: the optimizer, the evaluations, per-row elementwise work."""
TRANSFORMER = 3.6
"""The transformer's model-step time over the MLP fit's at the same work (26.9 / 7.38 ms at p = 59, its work
as `step_flops` counts it since issue 31's rewrites; before them 98.4 / 28.0 ms)."""
EAGER = 1.9
"""The uncompiled MLP's model-step time over the compiled one's (7.46 / 3.90 ms at p = 59; 8.78 / 4.16 before
the table sums by index_add_)."""
FLOAT64 = 2.4
"""A float64 model-step's time over a float32 one's (9.28 / 3.90 ms, the study MLP at p = 59, compiled;
10.31 / 3.51 before the table sums by index_add_)."""
COMPILE_S = 45.0
"""Seconds to compile one batch's step and evaluation on a CPU (p = 59 MLP; more at large train fractions).
Set when that took ~45 s; kept, not re-measured through the trainer, after issue 31's cuts (a cold compile of
the p = 59 step and evaluation ~11 s, plus inductor's ~14 s ISA probe once a process: benchmarks/RESULTS.md),
so it now errs long."""

# GPU time: an estimate, not a measurement (no GPU has run fastgrok's grids yet; benchmarks/gpu_session.sh
# measures it when one is lent): each batch's FLOPs (core.models.step_flops, every model to its budget)
# at GPU_UTIL of an H100's float32 peak, plus GPU_STEP_S a batch step.
GPU_PEAK_FLOPS = 67e12
"""An H100 SXM's float32 (non-tensor-core) peak, FLOP/s (bench.sections.FP32_PEAK_TFLOPS)."""
GPU_UTIL = 0.2
"""The share of that peak assumed sustained by a packed step of many small models (assumed, not measured)."""
GPU_STEP_S = 1e-3
"""Seconds assumed per batch step whatever its size: the compiled step's launches, the evaluations amortised
(assumed, not measured)."""


REF_FLOPS = step_flops(TrainConfig())
"""The study MLP's step at p = 59: the unit of WORK_S."""


def model_step_seconds(cfg: TrainConfig, compiled: bool = True) -> float:
    """One model-step of cfg (a batch's config: its most train rows) on one CPU thread."""
    t = (FIXED_S + WORK_S * step_flops(cfg) / REF_FLOPS) * (FLOAT64 if cfg.dtype == "float64" else 1.0)
    if cfg.model == "transformer":
        return t * TRANSFORMER
    return t * (1.0 if compiled else EAGER)


def experiment_size(spec: ExperimentSpec) -> dict:
    """cells, models (calibration controls included), the smallest and largest step budget, model-steps
    (every model to its budget) and the CPU seconds they would take (`model_step_seconds` for each batch
    of the plan, plus compilation)."""
    import torch

    from fastgrok.grid.plan import batch_config, calibration_steps, make_plan, resolve_compile
    from fastgrok.core.step import use_compile
    plan = make_plan(spec, "cpu")
    cells = {c["cell"]: c for c in plan["cells"]}
    mode = resolve_compile(spec, plan)
    jobs = []                                 # (config, models, model-steps, batch steps): one trainer each
    for b in plan["batches"]:
        members = [cells[i] for i in b["cells"]]
        jobs.append((batch_config(spec, members, compile=mode), sum(c["seeds"] for c in members),
                     sum(c["seeds"] * c["budget"] for c in members), max(c["budget"] for c in members)))
    n_cal = spec.calibration.seeds or spec.seeds
    for cal in plan["calibrations"]:                  # the free controls that set w_c, one batch per setting
        jobs.append((spec.base_config(**cal["shape"], compile=mode), n_cal, n_cal * calibration_steps(spec),
                     calibration_steps(spec)))
    seconds = gpu = 0.0
    for cfg, _, n, steps in jobs:
        comp = use_compile(cfg, torch.device("cpu"))
        seconds += n * model_step_seconds(cfg, comp) + (COMPILE_S if comp else 0.0)
        gpu += steps * GPU_STEP_S + n * step_flops(cfg) / (GPU_UTIL * GPU_PEAK_FLOPS)
    models, model_steps = sum(j[1] for j in jobs), sum(j[2] for j in jobs)
    budgets = [c["budget"] for c in plan["cells"]]
    return {"cells": len(cells), "models": models, "min_steps": min(budgets), "max_steps": max(budgets),
            "model_steps": model_steps, "cpu_s": seconds, "gpu_s": gpu}


def fmt_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
