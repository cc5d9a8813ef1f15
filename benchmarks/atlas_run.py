"""`fastgrok run atlas --max-steps 50` on the CPU for a bounded time, then stopped as Ctrl-C stops it (issue 29,
item 5): the whole atlas (103,680 models) takes hours, so this runs it for --minutes, stops it with SIGINT (the
run is resumable: a rerun of the same command continues), and reports what it measured, with the clocks of
`benchmarks/store_growth.py` around the library's own functions: `rundir.init_run_dir` (planning and writing
the plan), `jobs.run_job` (training a batch) and `rundir.write_part` (storing it). Reported: batches and
models done, wall time, time in planning, training and storing, batches per hour, peak RSS, and a linear
extrapolation to the plan's batches (stated as such; batches differ in p, so the mean over the batches done
is weighted by the plan's batches of each p when it has batches of every p).

    OMP_NUM_THREADS=1 python benchmarks/atlas_run.py --minutes 10 --out /tmp/fg_atlas --json benchmarks/results/atlas_run.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/fg_atlas"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (as a rerun of the command "
                    "does) instead of starting afresh; the figures are this session's batches")
    args = ap.parse_args()
    from fastgrok import store
    from fastgrok.grid import executors, jobs, rundir
    from fastgrok.train.signals import Interrupted

    if not args.resume:
        shutil.rmtree(args.out, ignore_errors=True)
    before = set(rundir.done_batches(args.out)) if args.out.exists() else set()
    clocks = {"plan": 0.0, "train": 0.0, "store": 0.0}
    done_at = []
    run_job, write_part, init_run_dir = jobs.run_job, rundir.write_part, rundir.init_run_dir

    def timed(name, fn, after=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clocks[name] += time.perf_counter() - t
                if after is not None:
                    after.append(time.perf_counter())
        return wrapper

    jobs.run_job = timed("train", run_job)
    rundir.write_part = timed("store", write_part, done_at)
    rundir.init_run_dir = timed("plan", init_run_dir)
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, args.minutes * 60)
    t0 = time.perf_counter()
    stopped = False
    try:
        executors.run_experiment("atlas", overrides={"max_steps": args.max_steps}, out=args.out, device="cpu",
                                 progress=False)
    except (KeyboardInterrupt, Interrupted):
        stopped = True
    wall = time.perf_counter() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    plan = store.read_plan(args.out)
    cells = {c["cell"]: c for c in plan["cells"]}
    done = set(rundir.done_batches(args.out)) - before             # this session's batches
    p_of = {b["id"]: cells[b["cells"][0]]["p"] for b in plan["batches"]}
    models_of = {b["id"]: sum(cells[c]["seeds"] for c in b["cells"]) for b in plan["batches"]}
    n_models = sum(models_of[b] for b in done)
    # the extrapolation: the time of the batches done over their CPU estimate (grid.sizes, every model to its
    # budget, uncompiled as --max-steps 50 runs), times the estimate of every batch (batches differ in p)
    from fastgrok.grid import sizes
    from fastgrok.grid.plan import batch_config
    spec = executors.apply_overrides(executors.load_experiment("atlas"), max_steps=args.max_steps)
    est = {b["id"]: sum(cells[c]["seeds"] * cells[c]["budget"] for c in b["cells"]) * sizes.model_step_seconds(
        batch_config(spec, [cells[c] for c in b["cells"]]), compiled=False) for b in plan["batches"]}
    spent = (done_at[-1] - t0 - clocks["plan"]) if done else float("nan")
    ratio = spent / sum(est[b] for b in done) if done else float("nan")
    rest = len(plan["batches"]) - len(done)
    row = {"bench": "atlas_run", "max_steps": args.max_steps, "minutes": args.minutes, "stopped_by_sigint": stopped,
           "plan_batches": len(plan["batches"]), "plan_models": sum(models_of.values()),
           "batches_done_before": len(before), "batches_done": len(done), "models_done": n_models, "p_done": sorted({p_of[b] for b in done}),
           "wall_s": round(wall, 1), "plan_s": round(clocks["plan"], 2), "train_s": round(clocks["train"], 1),
           "store_s": round(clocks["store"], 2),
           "store_share_of_wall": round(clocks["store"] / wall, 4),
           "outside_training_share": round((wall - clocks["train"]) / wall, 4),
           "batches_per_hour": round(3600 * len(done) / (wall - clocks["plan"]), 2) if done else None,
           "models_per_s": round(n_models / (wall - clocks["plan"]), 2),
           "measured_over_estimate": round(ratio, 3) if done else None,
           "estimate_whole_grid_h": round(sum(est.values()) / 3600, 2),
           "extrapolated_whole_grid_h": round((clocks["plan"] + ratio * sum(est.values())) / 3600, 2)
           if done else None, "batches_left": rest - len(before),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": os.environ.get("OMP_NUM_THREADS"), "host": platform.node(), "load_avg": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(row, indent=1) + "\n"
    print(text, end="")
    if args.json:                                   # benchmarks/results/atlas_run.json
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
