"""The SLURM driver's look for finished results, once per poll, while it waits for N batch jobs of which
none has finished (issue 29): the package's own functions (grid/slurm.py) on a run directory of N batch
directories, timed; run it under `strace -c` with 0 and with K polls to count the system calls a poll costs.

    OMP_NUM_THREADS=1 python benchmarks/slurm_poll.py --jobs 1000 --polls 20
    strace -f -c -o /tmp/st0 python benchmarks/slurm_poll.py --polls 0; strace -f -c -o /tmp/st10 python benchmarks/slurm_poll.py --polls 10
    # before: the same with PYTHONPATH=<a checkout of main at b2e5809> (a stat per job per poll)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import fastgrok
from fastgrok.grid import slurm as S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--polls", type=int, default=20)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    try:
        jobs = [{"kind": "batch", "id": f"b{i:04d}", "dir": str(d / "batches" / f"b{i:04d}"), "cells": [i]}
                for i in range(args.jobs)]
        for j in jobs:
            Path(j["dir"]).mkdir(parents=True)
        (d / S.FOLDER / "results").mkdir(parents=True)
        listing = hasattr(S, "_listed")
        if listing:                     # as SlurmMapper.__call__: the paths once, then a listing per poll
            paths = [S._result_paths(j, d) for j in jobs]

            def poll():
                listed = S._listed(d)
                return [S._staged(j, d, listed, p) for j, p in zip(jobs, paths)]
        else:                           # the driver of before: each job's file looked up
            def poll():
                return [S._staged(j, d) for j in jobs]
        ts = []
        for _ in range(args.polls):
            t = time.perf_counter()
            assert not any(g is not None for g in poll())
            ts.append(time.perf_counter() - t)
        med = sorted(ts)[len(ts) // 2] * 1e3 if ts else 0.0
        print(f"{fastgrok.__file__}: {'one listing' if listing else 'a look-up per job'}, {args.jobs} jobs, "
              f"{args.polls} polls, median {med:.2f} ms a poll")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
