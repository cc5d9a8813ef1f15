"""Where the compile time of fastgrok's step and evaluation goes on a CPU (first calls, one process).

    python benchmarks/compile_time.py                      # fresh inductor cache: the first run on a machine
    python benchmarks/compile_time.py --cache DIR          # reuse DIR: run it twice, or with another --p

Prints the first step's and the first evaluation's wall time, and inside them the time inductor spends
probing which vector ISAs the C++ compiler can build (`VecISA.check_build`: it compiles a test program per
ISA the CPU reports; the results are kept in the cache directory, so this is paid once per machine and
cache) and waiting for its C++ kernel compiles.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=59)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="TORCHINDUCTOR_CACHE_DIR (default: a new empty directory)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="fastgrok_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache          # before torch._inductor reads it

    import torch
    from torch._inductor import async_compile, cpu_vec_isa

    from fastgrok.bench.sections import fastgrok_step
    from fastgrok.config import TrainConfig

    spent = {"isa probe": 0.0, "kernel compile wait": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    cpu_vec_isa.VecISA.check_build = timed("isa probe", cpu_vec_isa.VecISA.check_build)
    async_compile.AsyncCompile.wait = timed("kernel compile wait", async_compile.AsyncCompile.wait)

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(p=args.p, seeds=args.seeds, device="cpu", compile="off")
    step, evaluate = fastgrok_step(cfg, torch.device("cpu"), compile_step=True)
    t0 = time.perf_counter()
    step()
    t1 = time.perf_counter()
    evaluate()
    t2 = time.perf_counter()
    print(f"p = {args.p}, M = {args.seeds}, {args.threads} thread(s), cache {cache}")
    print(f"first step {t1 - t0:.1f} s, first evaluation {t2 - t1:.1f} s, together {t2 - t0:.1f} s; of which "
          + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()))


if __name__ == "__main__":
    main()
