"""The run directory's cost per finished batch as a grid grows (issue 29, items 1 and 6).

A spec of 1,000 free cells x 1 seed (p = 11, d_embed 8, hidden 16, 100 steps, compile off,
`[engine] max_models = 4`: 250 batches) runs in this process through `executors.run_experiment`, the
local executor, with two clocks around the library's own functions: `jobs.run_job` (training a batch)
and `rundir.write_part` (storing it). Reported: wall time, time in training, the driver's time outside
training (wall - training) and its share, the time in write_part, and the median time between two
consecutive batches' parts in the first and the last quarter of the run (and their ratio), and the
bytes of the curves parts per recorded curve value.

    OMP_NUM_THREADS=1 python benchmarks/store_growth.py --out /tmp/fg_growth --json benchmarks/results/store_growth_after.json
    # before: the same script against main's package (PYTHONPATH=<a checkout of main>)

--cells N cuts the grid (a slice: lr x wd with N cells); the figures scale with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path


def spec_text(n_cells: int) -> str:
    n_lr = 40 if n_cells >= 40 else n_cells
    n_wd = max(1, n_cells // n_lr)
    lrs = [1e-3 * (300 ** (i / max(1, n_lr - 1))) for i in range(n_lr)]          # 1e-3 .. 3e-1
    wds = [0.1 * (80 ** (j / max(1, n_wd - 1))) for j in range(n_wd)]             # 0.1 .. 8
    return f"""name = "growth"
description = "store growth benchmark: {n_lr * n_wd} free cells x 1 seed"
seeds = 1
p = [11]

[train]
d_embed = 8
hidden = 16
compile = "off"

[budget]
steps = 100

[[grid]]
lr = [{", ".join(f"{x:.6g}" for x in lrs)}]
wd = [{", ".join(f"{x:.6g}" for x in wds)}]

[engine]
max_models = 4
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/fg_growth"))
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import fastgrok
    from fastgrok import store
    from fastgrok.grid import executors, jobs, rundir

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    spec = args.out / "growth.toml"
    spec.write_text(spec_text(args.cells))
    train_s, store_s, part_done = [0.0], [0.0], []
    run_job, write_part = jobs.run_job, rundir.write_part

    def timed_run_job(job, progress=False):
        t = time.perf_counter()
        try:
            return run_job(job, progress=progress)
        finally:
            train_s[0] += time.perf_counter() - t

    def timed_write_part(*a, **k):
        t = time.perf_counter()
        try:
            return write_part(*a, **k)
        finally:
            store_s[0] += time.perf_counter() - t
            part_done.append(time.perf_counter())

    jobs.run_job, rundir.write_part = timed_run_job, timed_write_part       # executors calls them by module
    t0 = time.perf_counter()
    executors.run_experiment(str(spec), out=args.out / "run", progress=False)
    wall = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(part_done, part_done[1:])]
    q = max(1, len(gaps) // 4)
    first, last = statistics.median(gaps[:q]), statistics.median(gaps[-q:])
    run = args.out / "run"
    n_values = len(store.Results(run).curves())                 # recorded curve values (the long table's rows)
    sizes = {k: sum(p.stat().st_size for p in store.part_files(run, k).values()) for k in ("curves", "models")}
    row = {"bench": "store_growth", "package": os.path.dirname(fastgrok.__file__), "cells": args.cells,
           "batches": len(part_done), "wall_s": round(wall, 2), "train_s": round(train_s[0], 2),
           "outside_training_s": round(wall - train_s[0], 2),
           "outside_training_share": round((wall - train_s[0]) / wall, 4), "write_part_s": round(store_s[0], 2),
           "gap_median_first_quarter_s": round(first, 4), "gap_median_last_quarter_s": round(last, 4),
           "gap_ratio_last_over_first": round(last / first, 3),
           "curve_values": n_values, "curves_parts_bytes": sizes["curves"], "models_parts_bytes": sizes["models"],
           "curves_disk_bytes_per_value": round(sizes["curves"] / n_values, 2),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": os.environ.get("OMP_NUM_THREADS"), "host": platform.node(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
