"""`fastgrok analyze` and `fastgrok status` of a grid of N models, written synthetically (issue 29, item 3).

The run directory is a real one (spec.json, plan.json, config.json by `rundir.init_run_dir`; parts by
`rundir.write_part`'s writers), of a free lr x wd x train_frac grid at p = 59 with 4 seeds a cell, 100 models
a batch, and curves shaped like real ones: 160 evaluations x 16 metrics a model (the progress measures
included; logit_scale every 2nd evaluation), accuracies k/N, smooth losses and norms. No training.
Then `fastgrok status DIR` and `fastgrok analyze DIR --out DIR/report` run as subprocesses, each timed
with its peak RSS (GNU time's maximum resident set size of the process).

    OMP_NUM_THREADS=1 python benchmarks/analysis_scale.py --models 10000 --out /tmp/fg_scale10k
    OMP_NUM_THREADS=1 python benchmarks/analysis_scale.py --models 100000 --out /tmp/fg_scale100k
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

EVALS, SEEDS, PER_BATCH, P = 160, 4, 100, 59
METRICS = ("train_loss", "train_acc", "test_acc", "sc_rate", "logit_scale", "weight_norm", "test_loss",
           "fourier_sparsity", "key_freq_1", "key_freq_2", "key_freq_3", "key_freq_4", "key_freq_5",
           "norm_E", "norm_W1", "norm_W2")


def spec_dict(n_models: int) -> dict:
    n_cells = n_models // SEEDS
    n_tf = 10
    k = n_cells // n_tf
    side = max(d for d in range(1, int(k ** 0.5) + 1) if k % d == 0)          # lr values
    n_wd = k // side
    if side * n_wd * n_tf * SEEDS != n_models:
        sys.exit("--models must be a multiple of 40")
    lr = [float(f"{1e-4 * 10 ** (3 * i / max(1, side - 1)):.4g}") for i in range(side)]
    wd = [float(f"{0.05 * 10 ** (2.5 * i / max(1, n_wd - 1)):.4g}") for i in range(n_wd)]
    tf = [round(0.2 + 0.07 * i, 2) for i in range(n_tf)]
    return {"name": f"scale{n_models}", "seeds": SEEDS, "p": [P], "train": {"compile": "off", "eval_every": 25},
            "budget": {"steps": 25 * (EVALS - 1)}, "engine": {"max_models": PER_BATCH},
            "grid": [{"lr": lr, "wd": wd, "train_frac": tf}]}


def write_dir(out: Path, n_models: int) -> float:
    from fastgrok.grid import rundir
    from fastgrok.grid.experiments import ExperimentSpec
    from fastgrok import store
    t0 = time.perf_counter()
    spec = ExperimentSpec.from_dict(spec_dict(n_models))
    plan = rundir.init_run_dir(spec, out, "cpu", check=False)
    fp = rundir.run_fingerprint(out)
    cells = plan["cells"]
    rng = np.random.default_rng(0)
    steps = np.arange(EVALS, dtype=np.int64) * 25
    n_test = P * P // 2
    for b in plan["batches"]:
        rows = [(cells[c], c, s) for c in b["cells"] for s in range(cells[c]["seeds"])]
        M = len(rows)
        ids = np.array([r[0]["model0"] + r[2] for r in rows], np.int64)
        t_mem = rng.integers(5, 40, M) * 25
        t_grok = np.where(rng.random(M) < 0.6, t_mem + rng.integers(4, 100, M) * 25, -1)
        models = pd.DataFrame({
            "model": ids, "cell": [c for _, c, _ in rows], "seed": [s for _, _, s in rows],
            "experiment": spec.name, "p": P, "op": "add", "arch": "mlp", "loss": "ce",
            "lr": [r[0]["lr"] for r in rows], "wd": [r[0]["wd"] for r in rows],
            "train_frac": [r[0]["train_frac"] for r in rows], "dtype": "float32", "tau": 1.0,
            "norm_target": np.nan, "rho": np.nan, "arm": None,
            "t_mem": pd.array(t_mem, dtype="Int64"),
            "t_grok": pd.array([int(t) if t > 0 else None for t in t_grok], dtype="Int64"),
            "logit_scale_at_grok": rng.random(M) * 10, "train_acc": 1.0, "test_acc": rng.random(M),
            "train_loss": rng.random(M) * 1e-3, "test_loss": rng.random(M), "sc_rate": rng.random(M) * 0.01,
            "weight_norm": 40 + rng.random(M) * 10, "diverged": False, "steps": int(steps[-1])})
        # curves (R = M x EVALS rows): sigmoids in step around each model's t_mem / t_grok
        s = steps[None, :].astype(np.float64)                                   # (1, T)
        up = lambda t: 1 / (1 + np.exp(np.clip(-(s - t[:, None]) / 50.0, -50, 50)))   # (M, T)
        g = np.where(t_grok > 0, t_grok, 10 ** 6).astype(np.float64)
        cols = {"train_acc": np.round(up(t_mem.astype(float)) * 1740) / 1740,
                "test_acc": np.round(up(g) * 1741) / 1741,
                "train_loss": np.exp(-s / 300.0) * (1 + 0.01 * rng.random((M, EVALS))),
                "test_loss": 4.0 * (1 - up(g)) + 0.01 * rng.random((M, EVALS)),
                "sc_rate": 0.001 * rng.random((M, EVALS)),
                "weight_norm": 60 - 15 * up(g) + 0.1 * rng.random((M, EVALS))}
        for k in METRICS:
            if k not in cols:
                cols[k] = rng.random((M, EVALS)).astype(np.float32).astype(np.float64)
        logit_mask = np.broadcast_to((np.arange(EVALS) % 2 == 0)[None, :], (M, EVALS)).reshape(-1)
        table = pa.table({"model": np.repeat(ids, EVALS), "step": np.tile(steps, M),
                          **{k: pa.array(cols[k].reshape(-1), mask=(~logit_mask if k == "logit_scale" else None))
                             for k in METRICS}})
        store.write_curves_part(store.part_path(out, b["id"], "curves"), table, fp)
        store.write_parquet(store.part_path(out, b["id"], "models"), models, fingerprint=fp)
    return time.perf_counter() - t0


def timed(cmd: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(rss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="reuse the directory --out when it holds this grid already")
    args = ap.parse_args()
    if args.keep and (args.out / "plan.json").exists() and \
            json.loads((args.out / "spec.json").read_text())["name"] == f"scale{args.models}":
        write_s = None
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        write_s = write_dir(args.out, args.models)
    parts = args.out / "parts"
    size = sum(p.stat().st_size for p in (parts / "curves").iterdir())
    fg = [str(Path(sys.executable).with_name("fastgrok"))]
    row = {"bench": "analysis_scale", "models": args.models, "cells": args.models // SEEDS,
           "batches": len(list((parts / "models").iterdir())), "evals": EVALS, "metrics": len(METRICS),
           "write_s": None if write_s is None else round(write_s, 1), "curves_bytes_on_disk": size,
           "curves_bytes_per_value": round(size / (args.models * EVALS * len(METRICS)), 3),
           "status": timed([*fg, "status", str(args.out)]),
           "analyze": timed([*fg, "analyze", str(args.out), "--out", str(args.out / "report")]),
           "threads": os.environ.get("OMP_NUM_THREADS"), "host": platform.node(), "load_avg": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
