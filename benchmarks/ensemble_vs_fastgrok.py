"""fastgrok against the torch.func ensemble of PyTorch's tutorial and the study's eager loop, end to end.

    python benchmarks/ensemble_vs_fastgrok.py [--models 1,12,96] [--kinds mlp,transformer]
        [--steps-mlp 100] [--steps-transformer 50] [--device cpu] [--threads N] [--json out.json] [--warm-cache]
        [--providers ensemble[,eager,study]]       # fastgrok compiled and the ensemble always; default all
    python benchmarks/ensemble_vs_fastgrok.py --profile [--models 12] [--threads N]   # where the steps' time goes

The `ensemble` section of `fastgrok bench` (fastgrok/bench_ensemble.py: the three ways side by side in
this one process, their chunks of steps interleaved, compile time apart), with an empty inductor cache
(a first compile of each shape, as a new run meets it; --warm-cache keeps the user's) whose one-off ISA
probe is paid before the first case, so that neither trainer is charged for it. Prints a Markdown table
(benchmarks/RESULTS.md) and the goal's check: fastgrok >= 2x the compiled ensemble at M >= 12 (CPU) or
>= 10x at M >= 96 (GPU), end to end, and for a run of RUN_STEPS steps projected from the same figures.
--profile: the steady training step of fastgrok compiled and of the compiled ensemble (the first of --kinds),
alternated (median ms), then torch.profiler's self time per kernel: matrix products (ATen's bmm/baddbmm/mm)
against inductor's generated kernels (asked to record themselves on a CPU), per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __name__ == "__main__" and "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")   # before torch

import json                 # noqa: E402
import time                 # noqa: E402
from pathlib import Path    # noqa: E402

import torch                # noqa: E402

from fastgrok.bench.sections import meta  # noqa: E402
from fastgrok.bench.ensemble import (EAGER, ENSEMBLE, FASTGROK, PROVIDERS, STUDY, goal_lines,  # noqa: E402
                                     markdown, section_ensemble)
from fastgrok.core.step import keep_freed_memory  # noqa: E402
from fastgrok.train.state import resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="M values, comma-separated (default 1,12,96 on a CPU, "
                                                   "1,12,96,768 on a GPU)")
    ap.add_argument("--kinds", default="mlp,transformer")
    ap.add_argument("--steps-mlp", type=int, default=None, help="steps per MLP run (default 100 CPU, 200 GPU)")
    ap.add_argument("--steps-transformer", type=int, default=None, help="(default 50 CPU, 100 GPU)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's; on a shared "
                                                              "CPU 1 keeps other jobs' load from stalling a thread team)")
    ap.add_argument("--providers", default=None, help="which ways, comma-separated, among: fastgrok compiled, "
                    "fastgrok eager, ensemble, study (default all; fastgrok compiled and ensemble always run), "
                    "e.g. a study-length run of the two compiled ones: --steps-mlp 3675 --providers ensemble")
    ap.add_argument("--quick", action="store_true", help="the small --quick cells of `fastgrok bench`")
    ap.add_argument("--warm-cache", action="store_true", help="keep the inductor cache (default: an empty one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="profile the two compiled steps instead (first M)")
    args = ap.parse_args()
    providers = None
    if args.providers:
        short = {"fastgrok compiled": FASTGROK, "fastgrok eager": EAGER, "eager": EAGER, "ensemble": ENSEMBLE,
                 "study": STUDY}
        bad = [x for x in args.providers.split(",") if x.strip() not in short]
        if bad:
            ap.error(f"--providers: unknown {', '.join(bad)} (known: {', '.join(short)})")
        chosen = {FASTGROK, ENSEMBLE} | {short[x.strip()] for x in args.providers.split(",")}
        providers = tuple(x for x in PROVIDERS if x in chosen)
    if args.profile:
        return profile(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        keep_freed_memory()             # fastgrok's CPU allocator setting, for every provider alike
    t0 = time.perf_counter()
    torch.compile(lambda x: torch.sin(x) + 1.0)(torch.ones(8, device=dev))   # the ISA probe, paid up front
    probe_s = time.perf_counter() - t0
    cpu = dev.type == "cpu"
    steps = {"mlp": args.steps_mlp or (100 if cpu else 200),
             "transformer": args.steps_transformer or (50 if cpu else 100)}
    models = tuple(int(m) for m in args.models.split(",")) if args.models else None
    info = meta(dev, args.quick)
    print(f"{info['device_name']} ({dev.type}), torch {info['torch']}, {info['threads']} threads, {info['date']}; "
          f"inductor cache {'kept' if args.warm_cache else 'empty'}, first compile (ISA probe) {probe_s:.1f} s, "
          "paid before the cases", flush=True)
    result = {"meta": {**info, "args": vars(args) | {"json": str(args.json)}, "probe_s": probe_s,
                       "cold_cache": not args.warm_cache}, "ensemble": []}

    def save(rows):
        result["ensemble"] = rows
        print(markdown([r for r in rows if r["case"] == rows[-1]["case"]]), flush=True)   # each case as it ends
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    rows = section_ensemble(dev, args.quick, models, steps=steps, kinds=tuple(args.kinds.split(",")), on_rows=save,
                            providers=providers)
    print("\n" + markdown(rows))
    goal_m, goal_x = (12, 2.0) if cpu else (96, 10.0)
    print(f"\ngoal: fastgrok >= {goal_x:g}x the compiled torch.func ensemble at M >= {goal_m}, end to end")
    for line in goal_lines(rows, goal_m, goal_x):
        print("  " + line)


def profile(args) -> None:
    import statistics
    from dataclasses import replace

    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from fastgrok.bench.sections import _sync, fastgrok_step, mlp_table_flops
    from fastgrok.core.models import step_flops
    from fastgrok.bench.ensemble import ensemble_configs
    from fastgrok.bench.ensemble_baseline import EnsembleCell
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        keep_freed_memory()
        inductor_config.cpp.enable_kernel_profile = True
    M = int((args.models or "12").split(",")[0])
    kind = args.kinds.split(",")[0]
    cfg = replace(ensemble_configs(args.quick)[kind], seeds=M, device=dev.type)
    fg, _ = fastgrok_step(cfg, dev, compile_step=True)
    ens = EnsembleCell(cfg, device=dev)
    mlp = kind == "mlp"                             # FLOPs counted for the MLP only
    steps = {"fastgrok compiled": (fg, mlp_table_flops(cfg) if mlp else 0),
             "torch.func ensemble": (ens.step, step_flops(cfg) if mlp else 0)}
    times = {k: [] for k in steps}
    for i in range(13):                              # 3 warm-up rounds (compiles), then 10 alternating
        for k, (fn, _) in steps.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    print(f"{kind} p = {cfg.p}, M = {M}, {torch.get_num_threads()} thread(s), {dev.type}: median step "
          + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for k, (fn, flops) in steps.items():
        with torch_profile(activities=acts) as prof:
            for _ in range(5):
                fn()
            _sync(dev)
        rows = sorted(((e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total) / 5e3, e.key)
                      for e in prof.key_averages())
        rows = [(t, n) for t, n in rows[::-1] if t > 0 and (dev.type == "cuda" or n.startswith(("graph_", "aten::")))]
        total = sum(t for t, _ in rows)
        gemm = sum(t for t, n in rows if n.startswith(("aten::bmm", "aten::baddbmm", "aten::mm")) or "gemm" in n.lower())
        print(f"\n{k}: kernels {total:.1f} ms per step; matrix products {gemm:.1f} ms"
              + (f" ({M * flops / (gemm / 1e3) / 1e9:.0f} GFLOP/s executed)" if gemm and flops else "")
              + f", the rest {total - gemm:.1f} ms")
        calls = {e.key: e.count // 5 for e in prof.key_averages()}
        for t, n in rows[:8]:
            print(f"  {t:7.2f} ms {100 * t / total:5.1f}%  {calls[n]:4d} calls  {n[:100]}")


if __name__ == "__main__":
    main()
