"""What subnormal floats cost a CPU step: a run that makes many of them, timed with and without flushing.

    OMP_NUM_THREADS=1 python benchmarks/subnormal_step.py                 # cubic, p 67, ⊥Grad, wd 0
    OMP_NUM_THREADS=1 python benchmarks/subnormal_step.py --steps 2000 --repeats 5

⊥Grad without weight decay at p = 67 on the cubic task (MLP d_embed 64, hidden 512, fraction 0.95, lr 7e-3,
compiled) drives part of its parameters and Adam moments into subnormal floats (|x| < 1.18e-38 in float32);
x86 CPUs can take microcode assists on those. This trains that model for --steps steps, prints the share of
subnormal entries in each matrix and in Adam's moments, then times --timed steps from copies of that same
state with torch.set_flush_denormal off and on, alternating, --repeats times: the ratio off / on is what
subnormals cost a step here (flushing changes the numbers, so it is timing only; the state is restored
before each timing).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from fastgrok.config import TrainConfig
from fastgrok.train.trainer import Trainer

TINY = torch.finfo(torch.float32).tiny


def subnormal_share(x: torch.Tensor) -> float:
    return float(((x != 0) & (x.abs() < TINY)).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--timed", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(p=67, op="cubic", train_frac=0.95, lr=7e-3, wd=0.0, orthograd=True, d_embed=64, hidden=512,
                      seeds=1, steps=args.steps + 1, eval_every=250, logit_every=250, compile="on")
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d, progress=False)
        st, batch = tr.state, tr.batch
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.step_fn(st, batch)
        print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s (compilation included)")
        views = tr.model.layout.views(st["flat"])
        print("subnormal share: " + ", ".join(f"{n} {subnormal_share(v):.3f}" for n, v in views.items())
              + f"; all parameters {subnormal_share(st['flat']):.3f}, Adam m {subnormal_share(st['m']):.3f}, "
              f"v {subnormal_share(st['v']):.3f}")
        saved = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
        times = {False: [], True: []}
        try:
            for _ in range(args.repeats):
                for flush in (False, True):
                    for k, v in saved.items():
                        st[k].copy_(v)
                    torch.set_flush_denormal(flush)
                    tr.step_fn(st, batch)                    # one untimed step after the switch
                    t0 = time.perf_counter()
                    for _ in range(args.timed):
                        tr.step_fn(st, batch)
                    times[flush].append((time.perf_counter() - t0) / args.timed)
        finally:
            torch.set_flush_denormal(False)
        off, on = np.median(times[False]), np.median(times[True])
        print(f"step: {off * 1e3:.2f} ms with subnormals, {on * 1e3:.2f} ms flushed (medians of {args.repeats} x "
              f"{args.timed} steps); off / on = {off / on:.2f}")


if __name__ == "__main__":
    main()
