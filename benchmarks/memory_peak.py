"""Peak memory of `fastgrok train` against the estimate `trainer.bytes_per_model` (CPU: resident set).

Each case runs in a fresh process: the step and the evaluation (every step), compiled or not, for a few
steps. Measured: the process's peak resident set (ru_maxrss) minus its resident set once torch and
fastgrok are imported (what any run costs before it allocates). The estimate must bound it.

    python benchmarks/memory_peak.py                 # the table of benchmarks/RESULTS.md
    python benchmarks/memory_peak.py --case mlp 97 24 off
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile
import torch
torch.set_num_threads(1)
from fastgrok.cli import main
from fastgrok.config import TrainConfig
from fastgrok.trainer import estimate_bytes
model, p, M, comp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
base = rss()
args = ["train", "--model", model, "--p", str(p), "--seeds", str(M), "--steps", "3", "--eval-every", "1",
        "--compile", comp, "--quiet", "--device", "cpu"]
with tempfile.TemporaryDirectory() as d:
    rc = main([*args, "--out", d + "/run"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = TrainConfig(model=model, p=p, seeds=M, steps=3, eval_every=1, logit_every=1, compile=comp, device="cpu")
print(json.dumps({"rc": rc, "base": base, "peak": peak, "estimate": estimate_bytes(cfg, M, torch.device("cpu"))}))
"""


def measure(model: str, p: int, M: int, compile_mode: str = "off") -> dict:
    """{"rc", "base", "peak", "estimate"} in bytes, from a fresh process (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, model, str(p), str(M), compile_mode], capture_output=True,
                       text=True, env=env, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


CASES = [("mlp", 59, 1, "off"), ("mlp", 59, 12, "off"), ("mlp", 97, 12, "off"), ("mlp", 97, 48, "off"),
         ("mlp", 199, 4, "off"), ("mlp", 401, 1, "off"), ("mlp", 59, 12, "on"),
         ("transformer", 59, 1, "off"), ("transformer", 59, 4, "off"), ("transformer", 97, 2, "off"),
         ("transformer", 59, 2, "on")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=4, default=None, metavar=("MODEL", "P", "M", "COMPILE"))
    args = ap.parse_args()
    cases = [(args.case[0], int(args.case[1]), int(args.case[2]), args.case[3])] if args.case else CASES
    print("| model | p | M | compile | measured peak - base (MiB) | estimate (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for model, p, M, comp in cases:
        r = measure(model, p, M, comp)
        used = r["peak"] - r["base"]
        print(f"| {model} | {p} | {M} | {comp} | {used / 2**20:,.0f} | {r['estimate'] / 2**20:,.0f} | "
              f"{r['estimate'] / used:.2f} |", flush=True)


if __name__ == "__main__":
    main()
