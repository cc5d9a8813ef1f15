"""One-shot GPU check of the Triton kernels: correctness, CUDA-graph capture, then timings (< 5 min on H100/H200).

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check.md] [--no-compile]

1. Correctness on CUDA against a float64 reference (s = fl32(z/τ), everything after in float64; the
   tolerances of tests/test_kernels_triton.py): the CE kernel at a few shapes/dtypes/masks, per-model loss
   kinds (softmax CE, StableMax CE, MSE) mixed in one launch, the clamp kernel on several segment layouts.
2. CUDA-graph capture: both launchers captured after a warm-up, replayed, compared with eager.
3. Timings with triton.testing.do_bench (warm-up excluded, L2 flushed between calls; p20/p50/p80 ms):
   the CE kernel vs the eager reference vs torch.compile of the reference, at the study's shapes
   (M = 12, N = 3481, V in {59, 97, 113}) and at shapes with M·N·V >= 16M logits; the device's copy bandwidth
   (a large tensor copy_); the CE kernel's GB/s as a fraction of it; the clamp kernel vs eager.
4. A sweep of the CE kernel's tile (rows per program x warps) at the study's shapes, the default marked.
The report is rewritten after each part, so a run cut off by a time limit keeps what it measured.
Targets reported: CE >= 80% of copy bandwidth for M·N·V >= 16M; CE >= 2x eager at the study shapes.
Writes a Markdown report (--out) and prints it. Exits non-zero when a correctness check fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STUDY = [(12, 3481, 59), (12, 3481, 97), (12, 3481, 113)]
LARGE = [(1, 4096, 4099), (4, 4096, 4099), (12, 65536, 59)]      # >= 16M logits (M·N·V) each
TAUS = (1e-3, 0.5, 1.0, 1.7, 1e3)


def _import_kernels():
    """Make `fastgrok.kernels` importable from this checkout even when fastgrok is not pip-installed."""
    import importlib.util
    try:
        import fastgrok.kernels  # noqa: F401
        return
    except ImportError:
        pass
    root = HERE.parent
    sys.path.insert(0, str(root))                       # fastgrok/ (a namespace package)
    spec = importlib.util.spec_from_file_location("fastgrok.kernels", root / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(root / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastgrok.kernels"] = mod
    spec.loader.exec_module(mod)


def _need_cuda():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("gpu_check: TRITON_INTERPRET=1 is set; unset it, this script times compiled kernels on a GPU")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run this on a "
                 "machine with an NVIDIA GPU (H100/H200). The CPU tests are tests/test_kernels_triton.py.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("gpu_check: the triton package is not installed (pip install 'triton>=3.6')")


# --------------------------------------------------------------------------------------------------
# 1. Correctness
# --------------------------------------------------------------------------------------------------

def _ce_inputs(M, N, V, dtype, scale, mask_kind, seed, labels_2d=False):
    g = torch.Generator().manual_seed(seed)
    tau = torch.tensor([TAUS[m % len(TAUS)] for m in range(M)], dtype=torch.float32)
    z = torch.randn(M, N, V, generator=g).clamp(-3, 3) * (scale / 3)
    y2 = torch.randint(0, V, (M, N), generator=g)
    rows = torch.arange(N) % 4 == 0                      # planted clearly collapsed rows
    zmax = z.amax(-1)
    lift = torch.maximum(60 * tau[:, None], 0.05 * zmax.abs())
    zy = z.gather(-1, y2[..., None])[..., 0]
    z.scatter_(-1, y2[..., None], torch.where(rows, zmax + lift, zy)[..., None])
    mask = None
    if mask_kind:
        mask = torch.rand(M, N, generator=g) < 0.7
        if mask_kind == "empty_model":
            mask[M // 2] = False
    y = y2 if labels_2d else y2[0].clone()
    return z.to(dtype), y, tau, mask


def _ce_ref64(z, y, tau, mask):
    M, N, V = z.shape
    t32 = tau.float()
    s = (z.float() / t32[:, None, None]).double()
    y2 = (y if y.dim() == 2 else y.expand(M, N)).long()
    if mask is None:
        w = torch.full((M, N), 1.0 / N, dtype=torch.float64, device=z.device)
    else:
        w = mask.double() / mask.double().sum(1, keepdim=True).clamp_min(1.0)
    lse = torch.logsumexp(s, -1)
    s_y = s.gather(-1, y2[..., None])[..., 0]
    onehot = torch.nn.functional.one_hot(y2, V).double()
    coef = w / t32.double()[:, None]
    grad = (torch.softmax(s, -1) - onehot) * coef[..., None]
    r = torch.where(onehot.bool(), 0.0, torch.exp(s - s_y[..., None])).sum(-1)
    return dict(loss=((lse - s_y) * w).sum(1), grad=grad, correct=s.argmax(-1) == y2,
                collapsed=r < 2.0 ** -27, ambiguous=(r >= 2.0 ** -27) & (r <= 2.0 ** -20),
                norm=s.norm(dim=-1), scale=s.abs().amax((1, 2)).clamp_min(1.0), coef=coef)


def check_ce(M, N, V, dtype, scale, mask_kind, labels_2d=False, seed=0) -> str:
    """'' when the kernel matches, else what differs."""
    from fastgrok.kernels.cross_entropy import tempered_ce_triton
    z, y, tau, mask = _ce_inputs(M, N, V, dtype, scale, mask_kind, seed, labels_2d)
    z, y, tau = z.cuda(), y.cuda(), tau.cuda()
    mask = None if mask is None else mask.cuda()
    z0 = z.clone()
    loss, grad, correct, collapsed, norm, _ = tempered_ce_triton(z, y, tau, mask)
    torch.cuda.synchronize()
    ref = _ce_ref64(z, y, tau, mask)
    errs = []
    if not torch.equal(z, z0):
        errs.append("logits modified")
    if not bool(((loss.double() - ref["loss"]).abs() <= 1e-5 * (ref["loss"].abs() + ref["scale"])).all()):
        errs.append(f"loss max err {float((loss.double() - ref['loss']).abs().max()):.3g}")
    # half an ulp of the output dtype: a GPU rounds fp32 -> bf16/fp16 to nearest (the CPU tests allow a
    # whole bf16 ulp because the interpreter's cast truncates)
    low = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    tol = 1e-5 * ref["coef"][..., None] + low * ref["grad"].abs() + (2.0 ** -24 if dtype == torch.float16 else 0)
    nbad = int(((grad.double() - ref["grad"]).abs() > tol).sum())
    if nbad or not bool(torch.isfinite(grad).all()):
        errs.append(f"{nbad} grad elements off")
    if not torch.equal(correct, ref["correct"]):
        errs.append(f"correct differs on {int((correct != ref['correct']).sum())} rows")
    clear = ~ref["ambiguous"]
    if not torch.equal(collapsed[clear], ref["collapsed"][clear]):
        errs.append(f"collapsed differs on {int((collapsed[clear] != ref['collapsed'][clear]).sum())} rows")
    if not torch.allclose(norm.double(), ref["norm"], rtol=1e-5, atol=0):
        errs.append("logit_norm off")
    return "; ".join(errs)


def check_kinds(M, N, V, kinds, dtype, scale, seed=0) -> str:
    """Per-model loss kinds (0 softmax CE, 1 StableMax CE, 2 MSE) in one launch against the float64 twin run
    on s = fl32(z/τ) itself; the tolerances of tests/test_kernels_triton.py (_check_kinds_once)."""
    from fastgrok.kernels.cross_entropy import tempered_ce_triton
    from fastgrok.kernels.reference import tempered_ce_reference
    z, y, tau, mask = _ce_inputs(M, N, V, dtype, scale, "empty_model", seed)
    kind = torch.tensor(kinds)
    z, y, tau, mask, kind = (t.cuda() for t in (z, y, tau, mask, kind))
    loss, grad, correct, collapsed, norm, row = tempered_ce_triton(z, y, tau, mask, kind)
    torch.cuda.synchronize()
    s = (z.float() / tau[:, None, None]).double()
    r_loss, dlds_w, r_correct, _, r_norm, r_row = tempered_ce_reference(s, y, torch.ones_like(tau).double(), mask, kind)
    w = mask.double() / mask.double().sum(1, keepdim=True).clamp_min(1.0)
    coef = w / tau.double()[:, None]
    dlds = (dlds_w / torch.where(w > 0, w, 1.0)[..., None]).abs()
    scale_k = torch.where(kind == 0, s.abs().amax((1, 2)).clamp_min(1.0), 1.0)
    low = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    errs = []
    if not bool(((loss.double() - r_loss).abs() <= 1e-5 * (r_loss.abs() + scale_k)).all()):
        errs.append(f"loss max err {float((loss.double() - r_loss).abs().max()):.3g}")
    if not bool(((row.double() - r_row).abs() <= 1e-5 * (r_row.abs() + scale_k[:, None])).all()):
        errs.append(f"row_loss max err {float((row.double() - r_row).abs().max()):.3g}")
    r_grad = dlds_w / tau.double()[:, None, None]
    tol = 1e-5 * coef[..., None] * dlds.clamp_min(1.0) + low * r_grad.abs() + (2.0 ** -24 if dtype == torch.float16 else 0)
    nbad = int(((grad.double() - r_grad).abs() > tol).sum())
    if nbad or not bool(torch.isfinite(grad).all()):
        errs.append(f"{nbad} grad elements off")
    if not torch.equal(correct, r_correct):
        errs.append(f"correct differs on {int((correct != r_correct).sum())} rows")
    if not torch.allclose(norm.double(), r_norm, rtol=1e-5, atol=0):
        errs.append("logit_norm off")
    none, zero = tempered_ce_triton(z, y, tau, mask), tempered_ce_triton(z, y, tau, mask, torch.zeros_like(kind))
    if not all(torch.equal(a, b) for a, b in zip(none, zero)):
        errs.append("kind=None differs from kind = all 0")
    return "; ".join(errs)


def check_clamp(M, P, bounds, dtype, seed=0) -> str:
    from fastgrok.kernels.norm_clamp import clamp_flat_triton_
    g = torch.Generator().manual_seed(seed)
    S = len(bounds) - 1
    flat0 = (torch.randn(M, P, generator=g) * 0.3).to(dtype).cuda()
    target = (torch.rand(M, S, generator=g) * 4 + 0.5).cuda()
    act = (torch.arange(M) % 3 != 1).cuda()
    flat = flat0.clone()
    norms = clamp_flat_triton_(flat, bounds, target, act)
    torch.cuda.synchronize()
    seg = lambda f: torch.stack([f[:, lo:hi].double().norm(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], 1)  # noqa: E731
    errs = []
    if not torch.allclose(norms.double(), seg(flat0), rtol=1e-6, atol=1e-30):
        errs.append(f"norms max rel err {float(((norms.double() - seg(flat0)).abs() / seg(flat0)).max()):.3g}")
    if not torch.equal(flat[~act], flat0[~act]):
        errs.append("inactive model modified")
    if not (torch.equal(flat[:, :bounds[0]], flat0[:, :bounds[0]]) and torch.equal(flat[:, bounds[-1]:], flat0[:, bounds[-1]:])):
        errs.append("columns outside the segments modified")
    nonempty = torch.tensor([hi > lo for lo, hi in zip(bounds[:-1], bounds[1:])], device="cuda")
    sel = act[:, None] & nonempty[None, :]
    rel = ((seg(flat) - target.double()).abs() / target.double())[sel]
    rtol = 1e-6 if dtype == torch.float32 else 2.0 ** -8
    if rel.numel() and float(rel.max()) > rtol:
        errs.append(f"clamped norm off target by {float(rel.max()):.3g}")
    return "; ".join(errs)


def check_readouts_only() -> str:
    """The evaluations' readouts-only launch (write_grad=False) against the full kernel: same bits."""
    from fastgrok.kernels.cross_entropy import tempered_ce_triton
    errs = []
    for M, N, V in ((12, 3481, 59), (3, 257, 10007)):
        z, y, tau, mask = (t.cuda() for t in _ce_inputs(M, N, V, torch.float32, 30.0, "random", 5))
        full = tempered_ce_triton(z, y, tau, mask)
        part = tempered_ce_triton(z, y, tau, mask, write_grad=False)
        for i, name in ((0, "loss"), (2, "correct"), (3, "collapsed"), (4, "norm")):
            if not torch.equal(full[i], part[i]):
                errs.append(f"{name} differs at {M}x{N}x{V}")
    return "; ".join(errs)


def check_graph_capture() -> str:
    """Capture both launchers in a CUDA graph (after a warm-up on a side stream), replay, compare."""
    from fastgrok.kernels.cross_entropy import tempered_ce_triton
    from fastgrok.kernels.norm_clamp import clamp_flat_triton_
    z, y, tau, mask = (t.cuda() for t in _ce_inputs(12, 3481, 59, torch.float32, 10.0, "random", 3))
    bounds = [0, 1000, 5000, 9000]
    flat = torch.randn(12, 9100, device="cuda")
    target = torch.rand(12, 3, device="cuda") + 0.5
    act = torch.ones(12, dtype=torch.bool, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            tempered_ce_triton(z, y, tau, mask)
            clamp_flat_triton_(flat, bounds, target, act)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tempered_ce_triton(z, y, tau, mask)
        norms = clamp_flat_triton_(flat, bounds, target, act)
    flat.mul_(3.0)                                      # the replay must see new values
    z.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    want = tempered_ce_triton(z, y, tau, mask)
    errs = []
    for name, a, b in zip(("loss", "grad", "correct", "collapsed", "norm"), out, want):
        if not torch.equal(a, b):
            errs.append(f"CE {name} differs after replay")
    seg = torch.stack([flat[:, lo:hi].norm(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], 1)
    if not torch.allclose(seg, target, rtol=1e-5):
        errs.append("clamp replay did not set the norms")
    if not torch.allclose(norms, 3.0 * target, rtol=1e-5):
        errs.append("clamp replay norms-before are not 3x target")
    return "; ".join(errs)


# --------------------------------------------------------------------------------------------------
# 3. Timings
# --------------------------------------------------------------------------------------------------

def bench(fn) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds, warm-up excluded, L2 flushed between calls."""
    from triton.testing import do_bench
    return tuple(do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8]))


def copy_bandwidth() -> float:
    """GB/s of dst.copy_(src) over 1 GiB (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    _, p50, _ = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (p50 * 1e-3) / 1e9


def ce_rows(shapes, dtype, providers, copy_bw):
    from fastgrok.kernels.cross_entropy import tempered_ce_triton
    from fastgrok.kernels.reference import tempered_ce_reference
    rows = []
    for M, N, V in shapes:
        z, y, tau, mask = (t.cuda() for t in _ce_inputs(M, N, V, dtype, 10.0, "random", 7))
        nbytes = 2 * z.numel() * z.element_size() + M * N * 11
        fns = {"triton": lambda: tempered_ce_triton(z, y, tau, mask),
               "eager": lambda: tempered_ce_reference(z, y, tau, mask)}
        if "compile" in providers:
            try:
                compiled = torch.compile(tempered_ce_reference, dynamic=False)
                t0 = time.time()
                compiled(z, y, tau, mask)
                torch.cuda.synchronize()
                print(f"  compiled reference for {M}x{N}x{V} in {time.time() - t0:.1f} s", flush=True)
                fns["compile"] = lambda: compiled(z, y, tau, mask)
            except Exception as e:      # a compile failure costs this provider only
                print(f"  torch.compile(reference) failed for {M}x{N}x{V}: {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
        times = {}
        for prov in providers:
            if prov not in fns:
                continue
            try:
                times[prov] = bench(fns[prov])
            except Exception as e:
                print(f"  {prov} failed for {M}x{N}x{V}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        for prov, (p20, p50, p80) in times.items():
            gbs = nbytes / (p50 * 1e-3) / 1e9
            eager = times.get("eager", (float("nan"),) * 3)[1]
            rows.append(dict(op="tempered_ce", shape=f"{M}x{N}x{V}", dtype=str(dtype).replace("torch.", ""),
                             provider=prov, p20=p20, p50=p50, p80=p80, gbs=gbs, frac=gbs / copy_bw,
                             vs_eager=eager / p50, nv=M * N * V))
        del z, fns
        torch.cuda.empty_cache()
    return rows


SWEEP = [(12, 3481, 59), (12, 3481, 113), (96, 3481, 59)]


def tile_sweep(copy_bw) -> list[str]:
    """The CE kernel at the study's shapes over tiles (BLOCK_N rows x next_pow2(V)) and warps: the default
    (`ce_config`, chosen by register counts) against the alternatives, so the GPU decides."""
    from fastgrok.kernels.cross_entropy import ce_config, tempered_ce_triton
    lines = ["## CE tile sweep (float32, masked; p50 ms and GB/s)", "",
             "| shape | BLOCK_N x BLOCK_V | warps | p50 ms | GB/s | % copy bw | default |", "|---|---|---|---|---|---|---|"]
    for M, N, V in SWEEP:
        z, y, tau, mask = (t.cuda() for t in _ce_inputs(M, N, V, torch.float32, 10.0, "random", 7))
        nbytes = 2 * z.numel() * z.element_size() + M * N * 11
        dn, dv, dw = ce_config(N, V, z.device)
        for bn in (4, 8, 16, 32, 64):
            for nw in (4, 8):
                _, p50, _ = bench(lambda: tempered_ce_triton(z, y, tau, mask, block_n=bn, block_v=dv, num_warps=nw))
                gbs = nbytes / (p50 * 1e-3) / 1e9
                lines.append(f"| {M}x{N}x{V} | {bn} x {dv} | {nw} | {p50:.4f} | {gbs:.0f} | {gbs / copy_bw:.0%} | "
                             f"{'yes' if (bn, nw) == (dn, dw) else ''} |")
        del z
        torch.cuda.empty_cache()
    return lines + [""]


def clamp_rows(copy_bw):
    from fastgrok.kernels.norm_clamp import clamp_flat_triton_
    from fastgrok.kernels.reference import clamp_flat_reference_, clamp_list_reference_
    mlp = [0, 59 * 128, 59 * 128 + 256 * 256, 59 * 128 + 256 * 256 + 256 * 59]   # the study MLP: d 128, H 256
    rows = []
    for M, bounds in ((12, mlp), (12, [0, 1 << 20, 3 << 20, 4 << 20]), (12, [0, 4 << 20])):
        S = len(bounds) - 1
        flat = torch.randn(M, bounds[-1], device="cuda")
        target = torch.rand(M, S, device="cuda") + 0.5
        act = torch.ones(M, dtype=torch.bool, device="cuda")
        views = [flat[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        fns = {"triton": lambda: clamp_flat_triton_(flat, bounds, target, act),
               "eager-flat": lambda: clamp_flat_reference_(flat, bounds, target, act),
               "eager-per-tensor": lambda: [clamp_list_reference_([v], target[:, k]) for k, v in enumerate(views)]}
        nbytes = 3 * M * (bounds[-1] - bounds[0]) * 4
        times = {p: bench(f) for p, f in fns.items()}
        for prov, (p20, p50, p80) in times.items():
            gbs = nbytes / (p50 * 1e-3) / 1e9
            rows.append(dict(op="clamp_flat", shape=f"{M}x{bounds[-1]} S={S}", dtype="float32", provider=prov,
                             p20=p20, p50=p50, p80=p80, gbs=gbs, frac=gbs / copy_bw,
                             vs_eager=times["eager-per-tensor"][1] / p50, nv=0))
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _table(rows, with_target):
    head = "| op | shape | dtype | provider | p20 ms | p50 ms | p80 ms | GB/s | % copy BW | x eager |"
    head += " target |" if with_target else ""
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['p20']:.4f} | {r['p50']:.4f} | "
                f"{r['p80']:.4f} | {r['gbs']:.0f} | {100 * r['frac']:.0f}% | {r['vs_eager']:.2f} |")
        if with_target:
            verdict = ""
            if r["provider"] == "triton":
                if r["nv"] >= 16_000_000:
                    verdict = "PASS (>= 80% BW)" if r["frac"] >= 0.8 else "MISS (< 80% BW)"
                elif r["shape"].startswith("12x3481x"):
                    verdict = "PASS (>= 2x eager)" if r["vs_eager"] >= 2 else "MISS (< 2x eager)"
            line += f" {verdict} |"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "gpu_check.md"), help="Markdown report path")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (saves minutes)")
    args = ap.parse_args(argv)
    _need_cuda()
    _import_kernels()
    import triton
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = ["# GPU check of the Triton kernels", "",
             f"- device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})",
             f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]

    # 1. correctness
    print("1. correctness", flush=True)
    checks = [("CE 1x5x2 f32 no mask", lambda: check_ce(1, 5, 2, torch.float32, 3.0, None)),
              ("CE 3x37x59 f32 empty model, labels (M,N)", lambda: check_ce(3, 37, 59, torch.float32, 30.0, "empty_model", True)),
              ("CE 16x300x97 f32 |z|<=1e4, all taus", lambda: check_ce(16, 300, 97, torch.float32, 1e4, "random")),
              ("CE 12x3481x113 bf16", lambda: check_ce(12, 3481, 113, torch.bfloat16, 30.0, "random")),
              ("CE 3x333x113 fp16", lambda: check_ce(3, 333, 113, torch.float16, 20.0, "random")),
              ("CE 3x257x1000 f32 |z|<=1e4", lambda: check_ce(3, 257, 1000, torch.float32, 1e4, "empty_model", True)),
              ("CE 5x129x4099 f32", lambda: check_ce(5, 129, 4099, torch.float32, 100.0, "random")),
              ("CE 2x65x10007 bf16 (looped V)", lambda: check_ce(2, 65, 10007, torch.bfloat16, 1e4, "random")),
              ("kinds 0,1,2,1 12x3481x59 f32", lambda: check_kinds(12, 3481, 59, [0, 1, 2, 1] * 3, torch.float32, 30.0)),
              ("kinds 1,2,0,1,2 5x300x97 f32 |z|<=1e4, all taus", lambda: check_kinds(5, 300, 97, [1, 2, 0, 1, 2], torch.float32, 1e4)),
              ("kinds 2,1,0 3x333x113 bf16", lambda: check_kinds(3, 333, 113, [2, 1, 0], torch.bfloat16, 30.0)),
              ("kinds 1,2,0,1 4x65x10007 f32 (looped V)", lambda: check_kinds(4, 65, 10007, [1, 2, 0, 1], torch.float32, 100.0)),
              ("clamp total 3x3000", lambda: check_clamp(3, 3000, [0, 3000], torch.float32)),
              ("clamp layers 4x13000 (empty segment, offsets)", lambda: check_clamp(4, 13000, [10, 3000, 3000, 3010, 12000], torch.float32)),
              ("clamp MLP 12x88507", lambda: check_clamp(12, 88507, [0, 7552, 73088, 88192], torch.float32)),
              ("clamp bf16 2x7770", lambda: check_clamp(2, 7770, [0, 5000, 7770], torch.bfloat16)),
              ("clamp 3x1100, 9 segments (transformer per-layer)", lambda: check_clamp(3, 1100, [0, 65, 68, 132, 196, 260, 324, 580, 836, 900], torch.float32)),
              ("clamp 2x56000, 27 segments straddling chunks", lambda: check_clamp(2, 56000, list(range(0, 54001, 2000)), torch.float32)),
              ("CE readouts only (evaluations) = full kernel", check_readouts_only),
              ("CUDA graph capture + replay (CE, clamp)", check_graph_capture)]
    lines += ["## Correctness vs float64", "", "| check | result |", "|---|---|"]
    failed = 0
    for name, fn in checks:
        try:
            err = fn()
        except Exception as e:                           # report and go on: the table shows what broke
            err = f"raised {type(e).__name__}: {e}"
        failed += bool(err)
        lines.append(f"| {name} | {'ok' if not err else 'FAIL: ' + err} |")
        print(f"  {name}: {'ok' if not err else 'FAIL: ' + err}", flush=True)
    lines.append("")

    # 3. timings (the report is rewritten after each part: a run cut off by a time limit keeps its part)
    def save(extra=()):
        report = "\n".join(list(lines) + list(extra)) + "\n"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        return report

    save()
    print("3. timings", flush=True)
    copy_bw = copy_bandwidth()
    print(f"  copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    lines += ["## Timings (triton.testing.do_bench, L2 flushed, warm-up excluded)", "",
              f"Device copy bandwidth (1 GiB copy_, read + write): **{copy_bw:.0f} GB/s**.", "",
              "CE bytes = read logits + write grad + 10 B/row of readouts; targets: triton >= 80% of copy "
              "bandwidth for M·N·V >= 16M logits, >= 2x eager at the study shapes (M = 12, N = 3481).", ""]
    provs = ("triton", "eager") if args.no_compile else ("triton", "eager", "compile")
    rows = []
    ce_parts = [(STUDY, torch.float32, provs), (LARGE, torch.float32, provs),
                ([(4, 4096, 4099)], torch.bfloat16, ("triton", "eager"))]
    for shapes, dtype, prov in ce_parts:           # each part on its own: one failure costs that part only
        try:
            rows += ce_rows(shapes, dtype, prov, copy_bw)
        except Exception as e:
            failed += 1
            lines += [f"CE timings at {shapes} ({dtype}) stopped: {type(e).__name__}: {e}", ""]
        save([_table(rows, True), ""])
    lines += [_table(rows, True), ""]
    try:
        crow = clamp_rows(copy_bw)
        lines += ["Clamp bytes = 2 reads + 1 write of the segments; x eager is against the per-tensor clamp.", "",
                  _table(crow, False), ""]
    except Exception as e:
        failed += 1
        lines += [f"clamp timings stopped: {type(e).__name__}: {e}", ""]
    save()
    print("4. CE tile sweep", flush=True)
    try:
        lines += tile_sweep(copy_bw)
    except Exception as e:
        failed += 1
        lines += [f"tile sweep stopped: {type(e).__name__}: {e}", ""]
    lines.append(f"Total wall time {time.time() - t_start:.0f} s.")
    report = save()
    print(report)
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
