"""What the progress measures (fastgrok/progress.py) add to an evaluation: time, in one process, alternating.

    python benchmarks/progress_cost.py                    # p = 59, 12 models, the study's MLP, eager
    python benchmarks/progress_cost.py --compile          # the compiled evaluation (as CUDA and long CPU runs)
    python benchmarks/progress_cost.py --model transformer --p 31

Three evaluations of the same state, called in turn (base, base + Fourier/norms, base + Fourier/norms +
restricted/excluded losses), `--reps` rounds; prints each one's median and its ratio to the base. "base" is
`evaluate` with the progress measures stubbed out (empty columns), i.e. the evaluation before them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
import types

import torch

import fastgrok.core.step as step
from fastgrok.config import TrainConfig
from fastgrok.train.state import build_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(p=args.p, seeds=args.seeds, model=args.model, device=args.device,
                      compile="on" if args.compile else "off", restricted_loss=True)
    tr = build_state(cfg)                       # the models' state: no run directory

    # the evaluation before the progress measures: evaluate's code with their Fourier and norm columns
    # empty (a copy of the function with its own globals; the restricted losses are off in "base")
    stubs = {"fourier_stats": lambda E: (E.new_zeros(E.shape[0], 0, dtype=torch.float64),
                                         torch.ones(E.shape[0], 5, dtype=torch.int64, device=E.device)),
             "matrix_norms": lambda model, flat: flat.new_zeros(flat.shape[0], 0, dtype=torch.float64)}
    ev = step.evaluate
    base_eval = types.FunctionType(ev.__code__, {**ev.__globals__, **stubs}, "evaluate_base", ev.__defaults__)

    def build(restricted: bool, stub: bool):
        c = dataclasses.replace(cfg, restricted_loss=restricted)
        fn = functools.partial(base_eval if stub else ev, tr.model, c, tr.backend)
        return torch.compile(fn, dynamic=False) if args.compile else fn

    fns = {"base": build(False, True), "+fourier,norms": build(False, False), "+restricted": build(True, False)}
    times = {k: [] for k in fns}
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for k, fn in fns.items():          # warm up (and compile)
        for _ in range(3):
            fn(tr.tensors, tr.batch)
    for _ in range(args.reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn(tr.tensors, tr.batch).cpu()
            sync()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["base"])
    print(f"p={cfg.p} M={cfg.n_models} model={cfg.model} compile={args.compile} threads={args.threads} "
          f"device={tr.device} torch={torch.__version__}")
    for k, t in times.items():
        m = statistics.median(t)
        print(f"  {k:16s} median {m * 1e3:8.2f} ms  ratio {m / base:.3f}")


if __name__ == "__main__":
    main()
