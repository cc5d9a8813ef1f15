"""Where the compiled training step's time goes: per-kernel self time, per step, from torch.profiler.

    python benchmarks/profile_step.py                    # p = 59 MLP, 12 models, 2 threads, CPU
    python benchmarks/profile_step.py --seeds 96 --device cuda

On a CPU, inductor is asked to wrap each generated kernel in a profiler record (its cache key changes,
so the first step compiles from scratch: ~45 s at p = 59); the matrix products are ATen's `bmm` /
`baddbmm` calls. On CUDA the device activity is read instead. Prints one row per kernel (ms per step,
share of the step) and the executed GFLOP/s of the matrix products.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (after 8 warm-up steps)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()

    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from fastgrok.bench.sections import fastgrok_step, mlp_table_flops
    from fastgrok.config import TrainConfig

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if not cuda:
        inductor_config.cpp.enable_kernel_profile = True
    dev = torch.device(args.device)
    cfg = TrainConfig(p=args.p, seeds=args.seeds, device=args.device, compile="off")
    fn, _ = fastgrok_step(cfg, dev, compile_step=True)
    t0 = time.perf_counter()
    fn()
    print(f"first step (compile) {time.perf_counter() - t0:.1f} s")

    def sync():
        if cuda:
            torch.cuda.synchronize()
    for _ in range(8):
        fn()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    step_ms = sorted(times)[len(times) // 2] * 1e3

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        t_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        is_kernel = (e.key.startswith("graph_") or e.key.startswith("aten::bmm") or e.key.startswith("aten::baddbmm")
                     or e.key.startswith("aten::mm") or e.key.startswith("aten::copy_")) if not cuda else t_us > 0
        if is_kernel and t_us > 0:
            rows.append((t_us / 1e3 / args.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"p = {args.p}, M = {args.seeds}, {args.threads} thread(s), {args.device}: step median {step_ms:.2f} ms "
          f"(unprofiled); kernels below sum to {total:.2f} ms per step")
    gemm = sum(t for t, k in rows if k.startswith(("aten::bmm", "aten::baddbmm", "aten::mm")) or "gemm" in k.lower())
    for t, k in rows[:20]:
        print(f"  {t:8.2f} ms  {100 * t / total:5.1f}%  {k[:110]}")
    flops = mlp_table_flops(cfg) * args.seeds
    if gemm:
        print(f"matrix products: {gemm:.2f} ms per step ({100 * gemm / total:.0f}%), "
              f"{flops / (gemm / 1e3) / 1e9:.0f} GFLOP/s executed; everything else {total - gemm:.2f} ms")


if __name__ == "__main__":
    main()
