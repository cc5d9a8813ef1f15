"""What an experiment costs before it runs (`fastgrok experiments`): its cells, models, step budgets and a
rough CPU time, every model trained to its budget (an upper bound: cells stop once their seeds grok).

The time scales one measured rate, 406 model-steps/s for the study's MLP at p = 59 (compiled, two threads
of the 2-core CPU machine; benchmarks/RESULTS.md), by the work of a step: train pairs x the parameters each
pair passes through (x 3 tokens for the transformer). A GPU runs the same grid many times faster."""
from __future__ import annotations

from .config import TrainConfig
from .experiments import ExperimentSpec

REF_RATE = 406.0
"""Model-steps per second of the reference: the study's MLP, p = 59, 2 CPU threads, compiled."""


def _work(cfg: TrainConfig) -> float:
    """Multiply-adds of one model's step, up to a constant: train pairs x weights each pair uses."""
    if cfg.model == "mlp":
        per_pair = 2 * cfg.d_embed * cfg.hidden + cfg.hidden * cfg.p
    else:
        d = cfg.d_model
        per_pair = 3 * (4 * d * d + 2 * d * cfg.d_mlp) * cfg.n_layers + d * cfg.p
    return cfg.n_train * per_pair


_REF_WORK = _work(TrainConfig())


def experiment_size(spec: ExperimentSpec) -> dict:
    """cells, models (calibration controls included), the smallest and largest step budget, model-steps
    (every model to its budget) and the CPU seconds they would take at the reference rate."""
    from .plan import calib_key, calibration_steps, cell_config, expand
    cells = expand(spec)
    model_steps, seconds, models = 0, 0.0, 0
    for c in cells:
        cfg = cell_config(spec, c)
        n = c["seeds"] * c["budget"]
        model_steps += n
        seconds += n * _work(cfg) / _REF_WORK / REF_RATE
        models += c["seeds"]
    if spec.calibration.w_c is None:                  # the free controls that set w_c, one per setting
        seen = set()
        for c in cells:
            key = calib_key(c)
            if c["rho"] is None or key in seen:
                continue
            seen.add(key)
            n_cal = spec.calibration.seeds or spec.seeds
            cfg = cell_config(spec, c)
            n = n_cal * calibration_steps(spec)
            model_steps += n
            seconds += n * _work(cfg) / _REF_WORK / REF_RATE
            models += n_cal
    budgets = [c["budget"] for c in cells]
    return {"cells": len(cells), "models": models, "min_steps": min(budgets), "max_steps": max(budgets),
            "model_steps": model_steps, "cpu_s": seconds}


def fmt_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
