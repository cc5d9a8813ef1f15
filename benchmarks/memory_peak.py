"""Peak memory of `fastgrok train` against its estimate (`fastgrok.train.memory.estimate_bytes`), on a CPU.

Each case runs in a fresh process (`memory.measure_peak`): 3 steps with an evaluation at every step, so
the step, the evaluation and (compile on) a cold compilation all happen. Measured: the process's peak
resident set less its resident set once torch and fastgrok are imported; and the largest child process
(the compiler's C++ builds). The estimate must bound the first (and, compiled, the sum).

    python benchmarks/memory_peak.py                             # the table of benchmarks/RESULTS.md
    python benchmarks/memory_peak.py --case mlp 97 24 off
    python benchmarks/memory_peak.py --case mlp 97 10 off --restricted-loss
"""
from __future__ import annotations

import argparse

import torch

from fastgrok.config import TrainConfig
from fastgrok.train.memory import estimate_bytes, measure_peak

CASES = [("mlp", 59, 1, "off"), ("mlp", 59, 12, "off"), ("mlp", 97, 12, "off"), ("mlp", 97, 48, "off"),
         ("mlp", 199, 4, "off"), ("mlp", 401, 1, "off"), ("mlp", 59, 12, "on"),
         ("transformer", 59, 1, "off"), ("transformer", 59, 4, "off"), ("transformer", 97, 2, "off"),
         ("transformer", 59, 2, "on"), ("mlp", 97, 12, "off", True)]


def run_case(model: str, p: int, M: int, comp: str, restricted: bool = False) -> dict:
    args = ["--model", model, "--p", str(p), "--seeds", str(M), "--steps", "3", "--eval-every", "1",
            "--compile", comp, *(["--restricted-loss"] if restricted else [])]
    r = measure_peak(args)
    cfg = TrainConfig(model=model, p=p, seeds=M, steps=3, eval_every=1, logit_every=1, compile=comp, device="cpu",
                      restricted_loss=restricted)
    return {**r, "used": r["peak"] - r["base"], "estimate": estimate_bytes(cfg, M, torch.device("cpu"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=4, default=None, metavar=("MODEL", "P", "M", "COMPILE"))
    ap.add_argument("--restricted-loss", action="store_true", help="with --case: the opt-in restricted losses on")
    args = ap.parse_args()
    cases = [(args.case[0], int(args.case[1]), int(args.case[2]), args.case[3], args.restricted_loss)] \
        if args.case else CASES
    print("| model | p | M | compile | restricted loss | peak - base (MiB) | largest child (MiB) | estimate (MiB) "
          "| estimate / peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        model, p, M, comp, restricted = (*case, False)[:5]          # restricted losses off unless the case says
        r = run_case(model, p, M, comp, restricted)
        print(f"| {model} | {p} | {M} | {comp} | {'yes' if restricted else 'no'} | {r['used'] / 2**20:,.0f} | "
              f"{r['child'] / 2**20:,.0f} | "
              f"{r['estimate'] / 2**20:,.0f} | {r['estimate'] / r['used']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
