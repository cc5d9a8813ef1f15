"""Whole-run throughput at p = 59, MLP, 12 seeds, evaluation every 25 steps: the study's baseline cell.

    python benchmarks/run_length.py [--steps 3700] [--e2e-steps 0] [--threads N] [--json out.json]

Trainers:
  baseline           fastgrok.bench.baseline (eager per-cell, the study's way): step, evaluation every 25 steps,
                     logit-scale readout every 200; measured twice: with glibc's default allocator (as the
                     study's code runs) and with the allocator setting fastgrok applies on a CPU
                     (step.keep_freed_memory: freed memory stays in the heap, no page faults per step)
  fastgrok eager     fastgrok's batched step and evaluation, torch.compile off
  fastgrok compiled  the same compiled (the CPU default), compile time = first step + first evaluation
                     call minus one steady call of each, with an empty inductor cache (a first run)
Phase 1 times the baseline alone under the default allocator. Phase 2 compiles, then alternates short
blocks of calls of every trainer (all see the same machine load; each block starts with an untimed call,
as a trainer running alone is warm). A run of `--steps` steps (3,700 = the study's baseline-cell median
T_grok) is projected from the medians, compile time included. With --e2e-steps N each trainer also runs N
steps end to end in a fresh process of its own (fastgrok through Trainer.run, compile cold), a check on
the projection. Prints Markdown; --json writes everything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")   # before torch

import json                 # noqa: E402
import statistics           # noqa: E402
import time                 # noqa: E402

import torch                # noqa: E402

from fastgrok.bench.baseline import BaselineCell  # noqa: E402
from fastgrok.bench.sections import meta  # noqa: E402
from fastgrok.config import TrainConfig  # noqa: E402
from fastgrok.core.step import build_step_fns  # noqa: E402
from fastgrok.train.trainer import Trainer  # noqa: E402

CFG = dict(p=59, seeds=12, device="cpu", compile="off", stop_when_grokked=False)


def blocks(calls: dict, rounds: int, block: int) -> dict:
    """Median seconds per call: `rounds` rounds of `block` timed calls per trainer, alternating."""
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            for i in range(block + 1):               # the first call of a block warms caches and heap
                t0 = time.perf_counter()
                fn()
                if i:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def per_call(args) -> dict:
    cfg = TrainConfig(**CFG)
    S, T = cfg.seeds, args.steps
    cell = BaselineCell(cfg)
    # phase 1: the baseline alone, glibc's default allocator (nothing has called keep_freed_memory yet)
    base_calls = {"baseline step": cell.step, "baseline eval": cell.evaluate, "baseline logit": cell.logit_scale}
    med_default = blocks(base_calls, args.rounds, args.block)
    # phase 2: compile, then everything alternating (fastgrok's CPU allocator setting now in force)
    fg = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    e_step, e_eval = build_step_fns(fg.model, cfg, fg.backend, False)
    c_step, c_eval = build_step_fns(fg.model, cfg, fg.backend, True)
    state, batch = fg.state, fg.batch
    t0 = time.perf_counter()
    c_step(state, batch)
    t1 = time.perf_counter()
    c_eval(state, batch)
    first = {"step": t1 - t0, "eval": time.perf_counter() - t1}
    med = blocks({**base_calls, "eager step": lambda: e_step(state, batch), "eager eval": lambda: e_eval(state, batch),
                  "compiled step": lambda: c_step(state, batch), "compiled eval": lambda: c_eval(state, batch)},
                 args.rounds, args.block)
    compile_s = first["step"] - med["compiled step"] + first["eval"] - med["compiled eval"]
    n_eval, n_logit = T // cfg.eval_every + 1, T // cfg.logit_every + 1

    def run_s(m, key):
        return T * m[key + " step"] + n_eval * m[key + " eval"] + (n_logit * m["baseline logit"]
                                                                   if key == "baseline" else 0.0)
    proj = {"baseline, default allocator": run_s(med_default, "baseline"), "baseline": run_s(med, "baseline"),
            "fastgrok eager": run_s(med, "eager"), "fastgrok compiled, excl. compile": run_s(med, "compiled")}
    proj["fastgrok compiled"] = compile_s + proj["fastgrok compiled, excl. compile"]
    out = {"meta": meta(torch.device("cpu"), quick=False), "args": vars(args), "medians_s": med,
           "medians_default_allocator_s": med_default, "first_calls_s": first, "compile_s": compile_s,
           "projected_s": proj, "projected_seed_steps_per_s": {k: S * T / v for k, v in proj.items()}}

    b0, b1 = S * T / proj["baseline, default allocator"], S * T / proj["baseline"]
    print(f"\n{out['meta']['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{out['meta']['date']}; compile {compile_s:.1f} s (empty inductor cache)\n")
    print(f"| trainer | step (ms) | eval (ms) | seed-steps/s, steps only | seed-steps/s, {T}-step run "
          "| vs baseline (default allocator) | vs baseline (same allocator) |")
    print("|---|---|---|---|---|---|---|")
    rows = [("baseline, default allocator", med_default, "baseline"), ("baseline", med, "baseline"),
            ("fastgrok eager", med, "eager"), ("fastgrok compiled, excl. compile", med, "compiled"),
            ("fastgrok compiled", med, "compiled")]
    for name, m, key in rows:
        sps = S * T / proj[name]
        label = name if name != "baseline" else "baseline, fastgrok's allocator setting"
        print(f"| {label} | {m[key + ' step'] * 1e3:.1f} | {m[key + ' eval'] * 1e3:.1f} | "
              f"{S / m[key + ' step']:.0f} | {sps:.0f} | {sps / b0:.2f}x | {sps / b1:.2f}x |")
    print(f"\nbaseline logit readout {med_default['baseline logit'] * 1e3:.1f} ms (default allocator), "
          f"{med['baseline logit'] * 1e3:.1f} ms (fastgrok's), every {cfg.logit_every} steps")
    return out


CHILD = """
import os, sys, tempfile, time
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")
import torch
from dataclasses import replace
from fastgrok.bench.baseline import run_baseline
from fastgrok.config import TrainConfig
from fastgrok.train.trainer import Trainer
name, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
cfg = TrainConfig(**{cfg!r})
t0 = time.perf_counter()
if name == "baseline":
    run_baseline(cfg, n)
else:
    Trainer(replace(cfg, steps=n, compile="on" if name == "compiled" else "off"), tempfile.mkdtemp(),
            progress=False).run()
print(time.perf_counter() - t0)
"""


def end_to_end(args) -> dict:
    """Seconds for args.e2e_steps steps of each trainer, each in a fresh process (compile cold)."""
    out = {}
    for name in args.e2e:
        res = subprocess.run([sys.executable, "-c", CHILD.format(cfg=CFG), name, str(args.e2e_steps),
                              str(args.threads or 0)], capture_output=True, text=True, check=True)
        out[name] = float(res.stdout.strip().splitlines()[-1])
        print(f"end to end, {args.e2e_steps} steps, {name}: {out[name]:.1f} s "
              f"({12 * args.e2e_steps / out[name]:.0f} seed-steps/s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3700, help="projected run length")
    ap.add_argument("--e2e-steps", type=int, default=0, help="end-to-end runs of this many steps (0: none)")
    ap.add_argument("--e2e", nargs="*", default=["baseline", "compiled", "eager"],
                    choices=["baseline", "eager", "compiled"], help="trainers to run end to end")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of alternating blocks")
    ap.add_argument("--block", type=int, default=4, help="timed calls per block (after one warm-up call)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = per_call(args)
    if args.e2e_steps:
        out["end_to_end_s"] = end_to_end(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
