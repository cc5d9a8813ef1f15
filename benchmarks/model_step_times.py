"""Seconds per model-step of `fastgrok train` on this CPU: the figures behind `fastgrok experiments`' CPU time
(fastgrok/sizes.py; table in benchmarks/RESULTS.md).

    OMP_NUM_THREADS=1 python benchmarks/model_step_times.py                  # every case
    OMP_NUM_THREADS=1 python benchmarks/model_step_times.py "study p59 M12"  # one

Each case: a warm-up run of 50 steps (compiles, when compiled), then runs of 200 and of 700 steps,
evaluations every 25, `stop_when_grokked` off, one thread; the difference over 500 steps per model (start-up
and compilation cancel). Prints the measured time next to `sizes.model_step_seconds`' estimate.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
import time

import torch

from fastgrok.config import TrainConfig
from fastgrok.core.models import step_flops
from fastgrok.grid.sizes import REF_FLOPS, model_step_seconds
from fastgrok.train.trainer import Trainer

CASES = {
    "study p59 M12": (TrainConfig(p=59, seeds=12), "on"),
    "quick p31 M36": (TrainConfig(p=31, train_frac=0.6, lr=3e-3, d_embed=64, hidden=128, seeds=36), "on"),
    "phase p31 M4 frac0.9": (TrainConfig(p=31, train_frac=0.9, d_embed=64, hidden=128, seeds=4), "on"),
    "study p97 M4": (TrainConfig(p=97, seeds=4), "on"),
    "study p59 M12 eager": (TrainConfig(p=59, seeds=12), "off"),
    "study p59 M12 float64": (TrainConfig(p=59, seeds=12, dtype="float64"), "on"),
    "transformer p59 M4 eager": (TrainConfig(model="transformer", p=59, seeds=4), "off"),
}


def measure(cfg: TrainConfig, compile_mode: str) -> float:
    cfg = dataclasses.replace(cfg, stop_when_grokked=False, compile=compile_mode, eval_every=25)
    wall = {}
    for steps in (50, 200, 700):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            Trainer(dataclasses.replace(cfg, steps=steps), d, progress=False).run()
            wall[steps] = time.perf_counter() - t0
    return (wall[700] - wall[200]) / 500 / cfg.n_models


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CASES)
    for name in names:
        cfg, mode = CASES[name]
        t = measure(cfg, mode)
        est = model_step_seconds(cfg, compiled=mode == "on")
        print(f"{name}: {t * 1e3:.2f} ms per model-step (estimate {est * 1e3:.2f} ms), work / the study MLP's "
              f"{step_flops(cfg) / REF_FLOPS:.3f}", flush=True)


if __name__ == "__main__":
    main()
