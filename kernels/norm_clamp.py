"""Per-model, per-segment weight-norm clamp on a flat (M, P) parameter buffer, in place.

Math, per model m and segment k (columns bounds[k] <= c < bounds[k+1]):
    norm_mk = sqrt(Σ_c flat[m, c]²)                    float32 accumulation
    flat[m, c] *= target_mk / (norm_mk + 1e-12)        only for active models; others untouched
Returns the norms before the clamp, (M, S) float32. Columns outside [bounds[0], bounds[-1]) are never
read or written (the flat buffer's vectors live there).

Two launches over the same one-axis grid of cdiv(L, BLOCK) · M programs (model-major; one axis, so M is
not held to CUDA's 65,535 limit on the others), L = bounds[-1] − bounds[0], BLOCK columns each:
    launch 1 (_sumsq_kernel): 1. load the chunk, square in float32;
                              2. for each segment the chunk overlaps (usually one), atomic_add its
                                 partial sum into sumsq (M, S), zeroed by the launcher.
    launch 2 (_rescale_kernel): 1. program 0 of each model writes norms = sqrt(sumsq) (M, S);
                                2. active models: for each segment the chunk overlaps, scale =
                                   target/(norm+ε), multiply its columns in place (float32 product,
                                   rounded once to flat's dtype).
The bounds travel as a small int32 tensor cached per (bounds, device): the first call copies it to
the device, later calls reuse it, so a captured CUDA graph or compiled step issues no host copy
(warm up once outside capture). No host synchronisation. Atomic accumulation makes the last bit of a
norm depend on the order chunks finish in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk(bounds_ptr, S, pid, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """Chunk `pid`'s columns, which of them are in range, and the first and last segment it overlaps
    (first = the number of interior bounds <= its first column)."""
    ks = tl.arange(0, BLOCK_S)
    b = tl.load(bounds_ptr + ks, mask=ks <= S, other=0)              # (BLOCK_S,) bounds, padded
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + S)
    c0 = lo + pid * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    inner = (ks >= 1) & (ks < S)
    k_first = tl.sum((inner & (b <= c0)).to(tl.int32), 0)
    k_last = tl.sum((inner & (b <= tl.minimum(c0 + BLOCK, hi) - 1)).to(tl.int32), 0)
    return cols, cols < hi, k_first, k_last


@triton.jit
def _sumsq_kernel(flat_ptr, bounds_ptr, sumsq_ptr, stride_m, S, n_chunks,
                  BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    m = tl.program_id(0) // n_chunks
    pid = tl.program_id(0) % n_chunks
    cols, ok, k_first, k_last = _chunk(bounds_ptr, S, pid, BLOCK, BLOCK_S)
    # 1. the chunk, squared in float32
    x = tl.load(flat_ptr + m.to(tl.int64) * stride_m + cols, mask=ok, other=0.0).to(tl.float32)
    sq = x * x
    # 2. one atomic per overlapped segment
    for k in range(k_first, k_last + 1):
        seg_lo = tl.load(bounds_ptr + k)
        seg_hi = tl.load(bounds_ptr + k + 1)
        part = tl.sum(tl.where((cols >= seg_lo) & (cols < seg_hi), sq, 0.0), 0)
        tl.atomic_add(sumsq_ptr + m * S + k, part)


@triton.jit
def _rescale_kernel(flat_ptr, bounds_ptr, sumsq_ptr, target_ptr, active_ptr, norms_ptr, stride_m, S, n_chunks,
                    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    m = tl.program_id(0) // n_chunks
    pid = tl.program_id(0) % n_chunks
    ks = tl.arange(0, BLOCK_S)
    # 1. the norms before the clamp, written once per model
    if pid == 0:
        tl.store(norms_ptr + m * S + ks, tl.sqrt_rn(tl.load(sumsq_ptr + m * S + ks, mask=ks < S, other=0.0)),
                 mask=ks < S)
    # 2. active models: scale each column by its segment's target / (norm + 1e-12), segment by segment
    #    over the (usually one) segments the chunk overlaps
    if tl.load(active_ptr + m) != 0:
        cols, ok, k_first, k_last = _chunk(bounds_ptr, S, pid, BLOCK, BLOCK_S)
        ptrs = flat_ptr + m.to(tl.int64) * stride_m + cols
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        out = x
        for k in range(k_first, k_last + 1):
            seg_lo = tl.load(bounds_ptr + k)
            seg_hi = tl.load(bounds_ptr + k + 1)
            scale = tl.div_rn(tl.load(target_ptr + m * S + k), tl.sqrt_rn(tl.load(sumsq_ptr + m * S + k)) + 1e-12)
            out = tl.where((cols >= seg_lo) & (cols < seg_hi), x * scale, out)
        tl.store(ptrs, out.to(flat_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

_BOUNDS_CACHE: dict[tuple, torch.Tensor] = {}


def _bounds_tensor(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (bounds, str(device))
    t = _BOUNDS_CACHE.get(key)
    if t is None:
        t = _BOUNDS_CACHE[key] = torch.tensor(bounds, dtype=torch.int32, device=device)
    return t


def clamp_config(L: int, S: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): columns per program; larger tiles under the CPU interpreter."""
    if device.type == "cuda":
        return 2048, 4
    return min(65536, triton.next_power_of_2(max(L, 1))), 4


def clamp_flat_triton_(flat: torch.Tensor, bounds, target: torch.Tensor, active: torch.Tensor,
                       *, block: int | None = None) -> torch.Tensor:
    """Clamp segments of flat (M, P) in place for the active models; returns norms before, (M, S)."""
    if flat.dim() != 2:
        raise ValueError(f"flat must be (M, P), got shape {tuple(flat.shape)}")
    if flat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"flat must be float32/bfloat16/float16, got {flat.dtype}")
    if flat.stride(1) != 1:
        raise ValueError(f"flat must have unit column stride (it is clamped in place), got strides {flat.stride()}")
    M, P = flat.shape
    bounds = tuple(int(b) for b in bounds)
    S = len(bounds) - 1
    if S < 1 or bounds[0] < 0 or bounds[-1] > P or any(a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"bounds must be >= 2 non-decreasing offsets within [0, {P}], got {list(bounds)}")
    if bounds[-1] >= 2**31 - 2**17:                                    # column offsets (+ a block) in int32
        raise ValueError(f"bounds beyond int32 are not supported, got {bounds[-1]}")
    if tuple(target.shape) != (M, S):
        raise ValueError(f"target must be (M, S) = ({M}, {S}), got {tuple(target.shape)}")
    if tuple(active.shape) != (M,) or active.dtype != torch.bool:
        raise ValueError(f"active must be bool (M,) = ({M},), got {active.dtype} {tuple(active.shape)}")
    dev = flat.device
    for name, t in (("target", target), ("active", active)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but flat is on {dev}")

    L = bounds[-1] - bounds[0]
    blk, num_warps = clamp_config(L, S, dev)
    blk = block or blk
    if blk & (blk - 1) or blk > 2**17:
        raise ValueError(f"block must be a power of two <= 2**17, got {blk}")
    b = _bounds_tensor(bounds, dev)                                    # (S + 1,) int32
    tgt = target.to(torch.float32).contiguous()                        # (M, S)
    act = active.contiguous()
    sumsq = torch.zeros((M, S), dtype=torch.float32, device=dev)      # accumulated by atomics
    norms = torch.empty((M, S), dtype=torch.float32, device=dev)
    if M == 0:
        return norms
    n_chunks = triton.cdiv(max(L, 1), blk)
    grid = (n_chunks * M,)
    block_s = triton.next_power_of_2(S + 1)
    _sumsq_kernel[grid](flat, b, sumsq, flat.stride(0), S, n_chunks, BLOCK=blk, BLOCK_S=block_s,
                        num_warps=num_warps)
    _rescale_kernel[grid](flat, b, sumsq, tgt, act, norms, flat.stride(0), S, n_chunks,
                          BLOCK=blk, BLOCK_S=block_s, num_warps=num_warps)
    return norms
