"""Per-model, per-segment weight-norm clamp on a flat (M, P) parameter buffer, in place.

Math, per model m and segment k (columns bounds[k] <= c < bounds[k+1]):
    norm_mk = sqrt(Σ_c flat[m, c]²)                    float32 accumulation
    flat[m, c] *= target_mk / (norm_mk + 1e-12)        only for active models; others untouched
Returns the norms before the clamp, (M, S) float32. Columns outside [bounds[0], bounds[-1]) are never
read or written (the flat buffer's vectors live there).

Each segment is cut into chunks of BLOCK columns (its last chunk shorter); C chunks in all, numbered segment
by segment. Two launches over the same one-axis grid of C · M programs (model-major; one axis, so M is not
held to CUDA's 65,535 limit on the others), one program per (model, chunk):
    launch 1 (_sumsq_kernel): the chunk's sum of squares in float32, stored to partial (M, C);
    launch 2 (_rescale_kernel): 1. the chunk's segment's sum of squares: its chunks' partials, loaded as one
                                   zero-padded vector of BLOCK_C and summed by tl.sum; norm = sqrt of it;
                                2. the segment's first chunk writes norms (M, S);
                                3. active models: scale = target / (norm + ε), the chunk's columns
                                   multiplied in place (float32 product, rounded once to flat's dtype).
Deterministic: no atomics, so every sum is added in one fixed order, the same in every run, and the same
for a model whatever the batch (the order depends on bounds and BLOCK alone; every program of a segment sums
the same partials the same way, so they agree on its norm bit for bit). An earlier version added the
partials with atomic_add, whose order, and so the last bit of a norm, followed the order chunks finished in.
The layout (chunk -> segment, first column; segment -> first chunk, chunk count) travels as small int32
tensors cached per (bounds, BLOCK, device): the first call copies them to the device, later calls reuse
them, so a captured CUDA graph or compiled step issues no host copy (warm up once outside capture). No
host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sumsq_kernel(flat_ptr, chunk_seg_ptr, chunk_col_ptr, bounds_ptr, partial_ptr, stride_m, C,
                  BLOCK: tl.constexpr):
    m = tl.program_id(0) // C
    c = tl.program_id(0) % C
    k = tl.load(chunk_seg_ptr + c)
    cols = tl.load(chunk_col_ptr + c) + tl.arange(0, BLOCK)
    ok = cols < tl.load(bounds_ptr + k + 1)
    x = tl.load(flat_ptr + m.to(tl.int64) * stride_m + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(partial_ptr + m.to(tl.int64) * C + c, tl.sum(x * x, 0))


@triton.jit
def _rescale_kernel(flat_ptr, chunk_seg_ptr, chunk_col_ptr, bounds_ptr, seg_first_ptr, seg_count_ptr,
                    partial_ptr, target_ptr, active_ptr, norms_ptr, stride_m, S, C,
                    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    m = tl.program_id(0) // C
    c = tl.program_id(0) % C
    k = tl.load(chunk_seg_ptr + c)
    # 1. the segment's sum of squares from its chunks' partials, in one fixed order
    first = tl.load(seg_first_ptr + k)
    j = tl.arange(0, BLOCK_C)
    parts = tl.load(partial_ptr + m.to(tl.int64) * C + first + j, mask=j < tl.load(seg_count_ptr + k), other=0.0)
    norm = tl.sqrt_rn(tl.sum(parts, 0))
    # 2. the norm before the clamp, written once per (model, segment)
    if c == first:
        tl.store(norms_ptr + m * S + k, norm)
    # 3. active models: the chunk's columns scaled to the segment's target
    if tl.load(active_ptr + m) != 0:
        cols = tl.load(chunk_col_ptr + c) + tl.arange(0, BLOCK)
        ok = cols < tl.load(bounds_ptr + k + 1)
        ptrs = flat_ptr + m.to(tl.int64) * stride_m + cols
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        scale = tl.div_rn(tl.load(target_ptr + m * S + k), norm + 1e-12)
        tl.store(ptrs, (x * scale).to(flat_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

_LAYOUT_CACHE: dict[tuple, tuple] = {}


def chunk_layout(bounds: tuple[int, ...], block: int, device: torch.device) -> tuple:
    """(bounds, chunk_seg, chunk_col, seg_first, seg_count) as int32 tensors on device, and C, BLOCK_C:
    each segment cut into chunks of `block` columns (an empty segment has none), numbered segment by
    segment; BLOCK_C, the most chunks of one segment rounded up to a power of two (>= 2). Cached per
    (bounds, block, device)."""
    key = (bounds, block, str(device))
    hit = _LAYOUT_CACHE.get(key)
    if hit is None:
        seg, col, first, count = [], [], [], []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            first.append(len(seg))
            count.append(triton.cdiv(hi - lo, block))
            seg += [k] * count[-1]
            col += range(lo, hi, block)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        hit = _LAYOUT_CACHE[key] = (as_t(bounds), as_t(seg or [0]), as_t(col or [0]), as_t(first), as_t(count),
                                    len(seg), max(2, triton.next_power_of_2(max(count))))
    return hit


MAX_CHUNKS = 1024
"""The most chunks a segment is cut into by default (a longer segment gets a larger BLOCK): every program of
launch 2 loads all its segment's partial sums."""


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
    if block is None:                   # at most MAX_CHUNKS chunks a segment: launch 2 loads them all
        longest = max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))
        blk = min(2**17, max(blk, triton.next_power_of_2(triton.cdiv(longest, MAX_CHUNKS))))
    blk = block or blk
    if blk & (blk - 1) or blk > 2**17:
        raise ValueError(f"block must be a power of two <= 2**17, got {blk}")
    if block is not None and triton.cdiv(max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])), blk) > MAX_CHUNKS:
        raise ValueError(f"block {blk}: a segment would be cut into more than MAX_CHUNKS ({MAX_CHUNKS}) chunks")
    tgt = target.to(torch.float32).contiguous()                        # (M, S)
    act = active.contiguous()
    norms = torch.zeros((M, S), dtype=torch.float32, device=dev)      # an empty segment's norm stays 0
    b, seg, col, first, count, C, block_c = chunk_layout(bounds, blk, dev)
    if M == 0 or C == 0:
        return norms
    partial = torch.empty((M, C), dtype=torch.float32, device=dev)
    grid = (C * M,)
    _sumsq_kernel[grid](flat, seg, col, b, partial, flat.stride(0), C, BLOCK=blk, num_warps=num_warps)
    _rescale_kernel[grid](flat, seg, col, b, first, count, partial, tgt, act, norms, flat.stride(0), S, C,
                          BLOCK=blk, BLOCK_C=block_c, num_warps=num_warps)
    return norms
