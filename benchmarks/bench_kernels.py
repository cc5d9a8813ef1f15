"""pytest-benchmark suite: the fused CE (loss + dL/dz + readouts) and the norm clamp, side by side.

    pytest benchmarks/bench_kernels.py --benchmark-only [--benchmark-json out.json]

Providers: `triton` (the kernels; CUDA only, skipped elsewhere), `eager` (the PyTorch reference twin)
and `compile` (torch.compile of the twin; its compile time is excluded). Each row's extra_info holds a
long-format record: op, provider, shape, device, dtype, torch/triton versions, bytes moved and GB/s at
the median. Timings on CUDA synchronise after every call (launch overhead included: see
benchmarks/gpu_check.py for CUDA-event timings). On a CPU only the torch providers run, with few
rounds and a smaller large-vocab shape, so the suite finishes in a couple of minutes.

Bytes moved (the minimum any implementation must move):
    CE:    read logits + write grad (M·N·V each) + labels, tau, mask, readouts (M·N·10 bytes)
    clamp: read the segments twice (norms, then rescale) and write them once (3·M·L)
"""
from __future__ import annotations

import platform

import pytest
import torch

from fastgrok.kernels.reference import clamp_flat_reference_, clamp_list_reference_, tempered_ce_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ROUNDS = 50 if CUDA else 3
PROVIDERS = ("triton", "eager", "compile")

# (M, N, V): the study's grid (12 seeds, all p^2 pairs for p = 59; V in the study's moduli) and a large
# vocabulary, >= 16M elements on a GPU
CE_SHAPES = [(12, 3481, 59), (12, 3481, 97), (12, 3481, 113),
             (4, 4096, 4099) if CUDA else (2, 512, 4099)]

# flat (M, P) with the study MLP's matrix segments (p = 59, d = 128, H = 256): embedding, W1, W2
_MLP_BOUNDS = [0, 59 * 128, 59 * 128 + 256 * 256, 59 * 128 + 256 * 256 + 256 * 59]
CLAMP_SHAPES = [(12, _MLP_BOUNDS)] + ([(12, [0, 1 << 20, 3 << 20, 4 << 20])] if CUDA else [])


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"


def _timed(fn):
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _record(benchmark, op, provider, shape, dtype, nbytes):
    info = dict(op=op, provider=provider, shape=str(shape), device=_device_name(), dtype=str(dtype),
                bytes=nbytes, **_versions())
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        med = stats.stats.median
        info["median_s"] = med
        info["GB/s"] = nbytes / med / 1e9
    benchmark.extra_info.update(info)


def _ce_inputs(M, N, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(M, N, V, generator=g) * 3).to(dtype).to(DEV)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    tau = torch.linspace(0.5, 2.0, M).to(DEV)
    mask = (torch.rand(M, N, generator=g) < 0.5).to(DEV)
    return z, y, tau, mask


def ce_provider(provider: str):
    if provider == "triton":
        if not CUDA:
            pytest.skip("the Triton provider needs CUDA (the interpreter is no benchmark)")
        from fastgrok.kernels.cross_entropy import tempered_ce_triton
        return tempered_ce_triton
    if provider == "eager":
        return tempered_ce_reference
    return torch.compile(tempered_ce_reference, dynamic=False)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ce_forward_backward(benchmark, provider, shape):
    M, N, V = shape
    z, y, tau, mask = _ce_inputs(M, N, V)
    fn = ce_provider(provider)
    run = _timed(lambda: fn(z, y, tau, mask))
    run()                                                   # compile / autotune / first launch excluded
    benchmark.group = f"ce {M}x{N}x{V}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    nbytes = 2 * z.numel() * z.element_size() + M * N * 11   # mask, row loss, 3 readouts
    _record(benchmark, "tempered_ce", provider, shape, z.dtype, nbytes)


def _clamp_inputs(M, bounds, seed=1):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(M, bounds[-1] + 64, generator=g).to(DEV)
    S = len(bounds) - 1
    target = (torch.rand(M, S, generator=g) + 0.5).to(DEV)
    active = torch.ones(M, dtype=torch.bool, device=DEV)
    return flat, target, active


@pytest.mark.parametrize("shape", CLAMP_SHAPES, ids=lambda s: f"M{s[0]}-P{s[1][-1]}-S{len(s[1]) - 1}")
@pytest.mark.parametrize("provider", ("triton", "eager-flat", "eager-per-tensor"))
def test_clamp(benchmark, provider, shape):
    M, bounds = shape
    flat, target, active = _clamp_inputs(M, bounds)
    if provider == "triton":
        if not CUDA:
            pytest.skip("the Triton provider needs CUDA (the interpreter is no benchmark)")
        from fastgrok.kernels.norm_clamp import clamp_flat_triton_
        fn = lambda: clamp_flat_triton_(flat, bounds, target, active)          # noqa: E731
    elif provider == "eager-flat":
        fn = lambda: clamp_flat_reference_(flat, bounds, target, active)       # noqa: E731
    else:
        # the per-tensor clamp a plain trainer does: each layer's (M, ...) tensor on its own
        views = [flat[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        fn = lambda: [clamp_list_reference_([v], target[:, k]) for k, v in enumerate(views)]  # noqa: E731
    run = _timed(fn)
    run()
    benchmark.group = f"clamp M{M} P{bounds[-1]}"
    benchmark.pedantic(run, rounds=ROUNDS * 4, warmup_rounds=1, iterations=1)
    nbytes = 3 * M * (bounds[-1] - bounds[0]) * flat.element_size()
    _record(benchmark, "clamp_flat", provider, (M, bounds[-1] - bounds[0], len(bounds) - 1), flat.dtype, nbytes)
