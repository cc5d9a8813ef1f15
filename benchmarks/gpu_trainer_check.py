"""On a CUDA GPU: the compiled training step through the Triton kernels against the eager step through the
PyTorch twins (the only check of both custom ops inside the compiled step, the in-place clamp included).

    python benchmarks/gpu_trainer_check.py [--steps 100] [--out FILE]
    python benchmarks/gpu_trainer_check.py --determinism [--steps 60]    # bitwise: run to run, batched vs solo
    TRITON_INTERPRET=1 python benchmarks/gpu_trainer_check.py --device cpu --steps 60   # a dry run on a CPU

The study MLP at p = 59, 2 seeds x 2 temperatures, clamped from step 50 at norm 40, trained by the
Trainer, once compiled with kernels=triton and once eager with kernels=torch (one compile: a lent GPU's
minutes are few). Prints, and writes to
--out, the largest parameter difference relative to the largest parameter, the evaluation metrics of
both, the clamped models' norms against the target, and the per-step time of each (compile excluded).
Exit 1 when the runs disagree beyond float32 drift (relative 1e-3; a wrong gradient or a missed clamp
is off by order 1) or a clamped norm is off target.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(kernels: str, steps: int, device: str, compile_step: str, **over):
    from dataclasses import replace

    from fastgrok.config import TrainConfig
    from fastgrok.train.trainer import Trainer
    torch._dynamo.reset()
    cfg = TrainConfig(p=59, seeds=2, taus=(1.0, 1.3), norm_targets=(40.0,), clamp_from=50, steps=steps,
                      eval_every=25, device=device, compile=compile_step, kernels=kernels, stop_when_grokked=False,
                      checkpoint_every=10**9)
    cfg = replace(cfg, **over)
    tr = Trainer(cfg, tempfile.mkdtemp(prefix=f"fastgrok_gpu_{kernels}_"), progress=False)
    assert tr.backend == kernels, (tr.backend, kernels)
    t0 = time.perf_counter()
    tr.run()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    flat = tr.state["flat"].detach().double().cpu()
    norms = flat[:, tr.state["bounds"][0]:tr.state["bounds"][-1]].norm(dim=1)
    return flat, norms, tr.results(), wall


def determinism(steps: int, device: str) -> tuple[list[str], bool]:
    """Compiled, kernels=triton: each model trained twice bit for bit alike (two runs in this one process, so
    inductor's choices are shared), and a batch's model bit for bit its solo run (`--seeds 1 --seed0 1 --tau
    1.3`), for a small transformer first (its lookups' sums: CUDA's atomic index_add_) and the MLP (clamped:
    the clamp kernel's sums). On a CPU both hold (tests/test_batch_independence.py); on CUDA they show whether
    any sum is added in the order threads happen to run, or in an order that follows the number of models
    (cuBLAS's and inductor's choices included: docs/training.md, On a GPU)."""
    lines, ok = [], True
    cases = {"transformer": dict(model="transformer", p=23, d_model=32, d_mlp=64, n_heads=2, norm_targets=(20.0,)),
             "mlp": {}}
    for name, over in cases.items():
        a = run("triton", steps, device, "on", **over)
        b = run("triton", steps, device, "on", **over)
        solo = run("triton", steps, device, "on", seeds=1, seed0=1, taus=(1.3,), **over)
        row = [i for i, r in enumerate(a[2].itertuples()) if r.seed == 1 and r.tau == 1.3]
        same = torch.equal(a[0], b[0])
        alone = len(row) == 1 and torch.equal(a[0][row[0]], solo[0][0])
        lines.append(f"determinism, {name}: two runs bitwise {'equal' if same else 'DIFFERENT'} (max diff "
                     f"{float((a[0] - b[0]).abs().max()):.3g}); model (seed 1, tau 1.3) batched vs solo bitwise "
                     f"{'equal' if alone else 'DIFFERENT'}"
                     + ("" if alone or len(row) != 1 else f" (max diff {float((a[0][row[0]] - solo[0][0]).abs().max()):.3g})"))
        print(lines[-1], flush=True)
        ok &= same and alone
    return lines, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--determinism", action="store_true", help="instead: the compiled runs' bitwise determinism, "
                    "run to run and batched vs solo (MLP and a small transformer)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_trainer_check: no CUDA device visible; run this on a machine with an NVIDIA GPU")
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu, Triton interpreted"
    if args.determinism:
        lines, ok = determinism(args.steps, args.device)
        text = "\n".join([f"# Determinism of the compiled step, kernels=triton ({name}, torch {torch.__version__}, "
                          f"{args.steps} steps)", *lines, "PASS" if ok else "FAIL"])
        print(text.splitlines()[-1])
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0 if ok else 1
    lines = [f"# Trainer step, compiled with kernels=triton vs eager with kernels=torch ({name}, "
             f"torch {torch.__version__}, {args.steps} steps)"]
    res = {}
    for k, comp in (("torch", "off"), ("triton", "on")):
        res[k] = run(k, args.steps, args.device, comp)
        lines.append(f"kernels={k}, compile {comp}: wall {res[k][3]:.1f} s (compile included)")
        print(lines[-1], flush=True)
    (fa, na, ra, _), (fb, nb, rb, _) = res["torch"], res["triton"]
    rel = float((fa - fb).abs().max() / fa.abs().max())
    clamped = torch.tensor([x is not None and x == x for x in ra["norm_target"]]) if "norm_target" in ra else None
    off = 0.0
    if clamped is not None and bool(clamped.any()):
        off = float(((nb[clamped] - 40.0).abs() / 40.0).max())
    lines += [f"max |flat_torch - flat_triton| / max |flat| = {rel:.3g}",
              f"clamped models' norm vs target 40 (triton run): max relative error {off:.3g}",
              "results, kernels=torch:", ra.to_string(), "results, kernels=triton:", rb.to_string()]
    ok = rel <= 1e-3 and off <= 1e-5
    lines.append("PASS" if ok else "FAIL")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
