"""Tempered loss for M stacked models, each model its own loss kind: loss, dL/dz and the readouts in one kernel.

Math, per model m and row n (τ = tau[m], y = label, s = z / τ in float32, k = kind[m]):
    k = 0, softmax CE:    row = lse − s_y,   lse = max(s) + log Σ_v exp(s_v − max(s))   (online over V blocks)
    k = 1, StableMax CE:  row = log1p(R / S(s_y)),   R = Σ_{v≠y} S(s_v),   S(x) = x + 1 (x ≥ 0), 1/(1 − x) (x < 0)
    k = 2, MSE:           row = Σ_v (s_v − onehot_v)²
    loss_m   = Σ_n w_mn · row                               w_mn = 1/count_m on masked rows, 0 elsewhere
    dz       = dL/ds · w_mn / τ                             written in the logits' dtype, new buffer
        k = 0:  dL/ds = softmax(s) − onehot(y)
        k = 1:  dL/ds_j = S'(s_j)/Σ (j ≠ y),   dL/ds_y = −(R/Σ) / (1 + |s_y|),   Σ = S(s_y) + R
        k = 2:  dL/ds = 2 (s − onehot(y))
    row_loss = row (unweighted, every row: masked-out rows too)                float32
    correct  = argmax(s) == y                               first maximum wins (as torch.argmax)
    collapsed= exp(s_y − max) / Σ exp(s − max) == 1.0       exactly, in float32 (as torch.softmax)
    logit_norm = ||s||_2                                    float32
The readouts are the same for every kind: `collapsed` is the study's softmax-collapse measure, computed
from softmax(s) whatever the loss, so it stays comparable across losses. count_m = number of masked rows
of model m (clamped to >= 1); without a mask every row has w = 1/N. A kind code outside {0, 1, 2} gives
the model NaN (rows, loss, gradient): the public functions reject it on the host, the kernel cannot.

StableMax gradient (Prieto et al. 2025, "Grokking at the edge of numerical stability"), p_j = S(s_j)/Σ:
    a. L = −log p_y = log Σ − log S(s_y).
    b. ∂Σ/∂s_j = S'(s_j), so ∂ log Σ / ∂s_j = S'(s_j)/Σ;  S'(x) = 1 (x ≥ 0), 1/(1 − x)² = S(x)² (x < 0).
    c. ∂ log S(s_y) / ∂s_j = [j = y] · S'(s_y)/S(s_y), and S'(x)/S(x) = 1/(1 + |x|) on both sides
       (x ≥ 0: 1/(x + 1); x < 0: S(x)²/S(x) = 1/(1 − x)).
    d. dL/ds_j = S'(s_j)/Σ − [j = y] · 1/(1 + |s_y|); S and S' are continuous at 0 (both 1 there).
    e. dL/dz = dL/ds / τ (s = z/τ).
    f. Without cancellation: with R = Σ_{v≠y} S(s_v) summed apart from S(s_y), L = log1p(R/S(s_y)) and
       dL/ds_y = S'(s_y)(1/Σ − 1/S(s_y)) = −(R/Σ) / (1 + |s_y|). As p_y → 1 (R/S(s_y) below float32's
       6e-8, at logits ~1e4 for V ~ 100) 1/Σ − 1/S(s_y) rounds to 0 and the correct class would stop
       learning, a float32 artefact Prieto et al. avoid by computing the loss in float64; this form keeps
       float32 at the float64 loss's values (to rounding) at no extra cost.
S is not shift invariant, so it runs on s itself (no max subtracted): 0 < S(x) <= 1 + max(x, 0), and Σ
stays finite in float32 for any finite s. Outside the row (s = −inf) S = S' = 0.

Passes over a row (the kernel reads z, writes dz once):
    1. statistics: running max, Σ exp(s − max) rescaled when the max grows, first argmax, Σ s²;
       and for the model's own kind only: Σ S(s) (k = 1) or Σ (s − onehot)² (k = 2).
    2. readouts and the row's loss (s_y from the register tile when SINGLE, else one gathered load).
    3. gradient: dL/ds of the model's kind, times w/τ, stored in the logits' dtype.
When V fits one block (SINGLE) the row tile stays in registers and z is read once; otherwise passes 1
and 3 each loop over V in blocks of BLOCK_V (the second read mostly hits L2). The kind is one scalar per
program (all of a program's rows belong to one model), so its branches are uniform `if`s, not masks;
without a kind tensor (HAS_KIND=False) the kernel is compiled with the softmax CE code alone.

Grid: one axis of cdiv(N, BLOCK_N) · M programs (model-major; one axis, so M is not held to CUDA's
65,535 limit on the second and third); each program owns BLOCK_N rows of one model. Rows go to two (M, N)
float32 buffers, row_loss and w · row (which the launcher sums by reference.row_sum: no atomics, one order). Layout: logits
(M, N, V) contiguous, labels (N,) or (M, N), tau (M,), mask (M, N) bool, kind (M,) int32/int64. No host
synchronisation anywhere: the launcher is CUDA-graph capturable. Labels must lie in [0, V); they are not
checked (a check would need a sync), an out-of-range label is clamped for the one load of s_y and then
counts as never correct.

s = z / τ uses the correctly rounded division (div_rn), so s is bitwise the reference's s and the
argmax readout agrees exactly; exp/log are the hardware's fast versions on GPU (float32 accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_ce_inputs, row_sum


@triton.jit
def _load_s(z_ptr, row_base, cols, V, tau):
    """Load a (BLOCK_N, BLOCK_V) tile of z and return s = z / τ in float32 (−inf outside the row)."""
    z = tl.load(z_ptr + row_base[:, None] + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
    return tl.div_rn(z.to(tl.float32), tau)


@triton.jit
def _stablemax(s):
    """S(s) = s + 1 for s >= 0, 1/(1 − s) for s < 0; 0 at s = −inf (outside the row)."""
    return tl.where(s >= 0, s + 1.0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), 1.0 - tl.minimum(s, 0.0)))


@triton.jit
def _dlds(s, c, y, m_i, inv_d, inv_sum_S, g_y, kind, HAS_KIND: tl.constexpr):
    """dL/ds on a (BLOCK_N, BLOCK_V) tile of columns c, by the model's kind (header, pass 3)."""
    onehot = tl.where(c[None, :] == y[:, None], 1.0, 0.0)
    if HAS_KIND:
        if kind == 0:
            d = tl.exp(s - m_i[:, None]) * inv_d[:, None] - onehot
        elif kind == 1:
            S = _stablemax(s)
            d = tl.where(c[None, :] == y[:, None], g_y[:, None], tl.where(s >= 0, 1.0, S * S) * inv_sum_S[:, None])
        elif kind == 2:
            d = 2.0 * (s - onehot)
        else:
            d = s * float("nan")
    else:
        d = tl.exp(s - m_i[:, None]) * inv_d[:, None] - onehot
    return d


@triton.jit
def _tempered_ce_kernel(
    z_ptr, y_ptr, tau_ptr, mask_ptr, inv_count_ptr, kind_ptr,          # inputs
    grad_ptr, row_loss_ptr, w_loss_ptr, correct_ptr, collapsed_ptr, norm_ptr,  # outputs
    N, V, stride_ym, n_blocks,
    HAS_MASK: tl.constexpr, HAS_KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    SINGLE: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid // n_blocks
    pid_n = pid % n_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BLOCK_N,)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1)           # rows past N recompute row N-1 and are never stored
    row_id = m.to(tl.int64) * N + rows_c                             # index into (M, N)
    row_base = row_id * V                                            # into (M, N, V)
    cols = tl.arange(0, BLOCK_V)

    tau = tl.load(tau_ptr + m)
    y = tl.load(y_ptr + m.to(tl.int64) * stride_ym + rows_c).to(tl.int32)
    inv_count = tl.load(inv_count_ptr + m)
    if HAS_MASK:
        w = tl.where(tl.load(mask_ptr + row_id) != 0, inv_count, 0.0)
    else:
        w = tl.zeros([BLOCK_N], tl.float32) + inv_count
    if HAS_KIND:
        kind = tl.load(kind_ptr + m)                                 # one scalar: uniform branches
    else:
        kind = 0

    # 1. statistics: running max m_i, d_i = Σ exp(s − m_i), first argmax, Σ s²; Σ S(s) or Σ (s − onehot)²
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_i = tl.zeros([BLOCK_N], tl.float32)
    arg = tl.zeros([BLOCK_N], tl.int32)
    sq = tl.zeros([BLOCK_N], tl.float32)
    sum_R = tl.zeros([BLOCK_N], tl.float32)                          # kind 1 only: Σ_{v≠y} S(s_v)
    sq_err = tl.zeros([BLOCK_N], tl.float32)                         # kind 2 only
    if SINGLE:
        s = _load_s(z_ptr, row_base, cols, V, tau)                   # (BLOCK_N, BLOCK_V), kept for 3.
        m_i = tl.max(s, 1)
        arg = tl.min(tl.where(s == m_i[:, None], cols[None, :], V), 1)
        d_i = tl.sum(tl.exp(s - m_i[:, None]), 1)
        sq = tl.sum(tl.where((cols < V)[None, :], s * s, 0.0), 1)
        if HAS_KIND:
            if kind == 1:
                sum_R = tl.sum(tl.where(cols[None, :] == y[:, None], 0.0, _stablemax(s)), 1)
            elif kind == 2:
                e = s - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
                sq_err = tl.sum(tl.where((cols < V)[None, :], e * e, 0.0), 1)
    else:
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            s = _load_s(z_ptr, row_base, c, V, tau)
            b_max = tl.max(s, 1)
            b_arg = tl.min(tl.where(s == b_max[:, None], c[None, :], V), 1)
            arg = tl.where(b_max > m_i, b_arg, arg)                  # strict: an earlier block wins ties
            m_new = tl.maximum(m_i, b_max)
            d_i = d_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
            sq += tl.sum(tl.where((c < V)[None, :], s * s, 0.0), 1)
            if HAS_KIND:
                if kind == 1:
                    sum_R += tl.sum(tl.where(c[None, :] == y[:, None], 0.0, _stablemax(s)), 1)
                elif kind == 2:
                    e = s - tl.where(c[None, :] == y[:, None], 1.0, 0.0)
                    sq_err += tl.sum(tl.where((c < V)[None, :], e * e, 0.0), 1)

    # 2. readouts and the row's loss: row_loss = row, w_loss = w · row
    y_c = tl.minimum(tl.maximum(y, 0), V - 1)
    if SINGLE:
        s_y = tl.sum(tl.where(cols[None, :] == y_c[:, None], s, 0.0), 1)   # from the tile in registers
    else:
        s_y = tl.div_rn(tl.load(z_ptr + row_base + y_c).to(tl.float32), tau)
    lse = m_i + tl.log(d_i)
    p_y = tl.div_rn(tl.exp(s_y - m_i), d_i)
    row = lse - s_y
    S_y = _stablemax(s_y)
    sum_S = S_y + sum_R                                              # kind 1
    if HAS_KIND:
        if kind == 1:
            r = tl.div_rn(sum_R, S_y)                                # row = log1p(r), r >= 0
            u = 1.0 + r
            row = tl.where(u == 1.0, r, tl.log(u) * tl.div_rn(r, tl.where(u == 1.0, 1.0, u - 1.0)))
        elif kind == 2:
            row = sq_err
        elif kind != 0:
            row = row * float("nan")
    tl.store(row_loss_ptr + row_id, row, mask=row_ok)
    tl.store(w_loss_ptr + row_id, w * row, mask=row_ok)
    tl.store(correct_ptr + row_id, arg == y, mask=row_ok)
    tl.store(collapsed_ptr + row_id, p_y == 1.0, mask=row_ok)
    tl.store(norm_ptr + row_id, tl.sqrt_rn(sq), mask=row_ok)

    # 3. gradient dL/ds · w/τ in the logits' dtype (skipped for readouts only)
    if WRITE_GRAD:
        coef = tl.div_rn(w, tau)
        one = tl.full([BLOCK_N], 1.0, tl.float32)
        inv_d = tl.div_rn(one, d_i)
        inv_sum_S = tl.div_rn(one, sum_S)                            # kind 1 (unused, compiled away, else)
        g_y = -tl.div_rn(tl.div_rn(sum_R, sum_S), 1.0 + tl.abs(s_y))  # kind 1: dL/ds_y, no cancellation
        if SINGLE:
            g = _dlds(s, cols, y, m_i, inv_d, inv_sum_S, g_y, kind, HAS_KIND) * coef[:, None]
            tl.store(grad_ptr + row_base[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < V)[None, :])
        else:
            for v0 in range(0, V, BLOCK_V):
                c = v0 + cols
                s = _load_s(z_ptr, row_base, c, V, tau)
                g = _dlds(s, c, y, m_i, inv_d, inv_sum_S, g_y, kind, HAS_KIND) * coef[:, None]
                tl.store(grad_ptr + row_base[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (c < V)[None, :])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

_GPU_TILE = 1024        # elements per program on a GPU for small V (see ce_config)
_GPU_MAX_SINGLE_V = 8192  # above this V, loop over V in blocks of _GPU_BLOCK_V
_GPU_BLOCK_V = 2048
_CPU_TILE = 32768       # the interpreter pays ~6 ms per program: fewer, larger tiles
_CPU_BLOCK_V = 4096


def ce_config(N: int, V: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) for an (N, V) problem on `device`."""
    v2 = triton.next_power_of_2(V)
    if device.type == "cuda":
        # Registers by ptxas -v (sm_90a, triton 3.6, float32, masked): tiles of 1024 elements take ~80 per
        # thread at 8 warps (16x64, 8x128), no spill; 2048-element tiles of small V take ~140 and 8192 ones
        # 255 with spills (one block per SM). One row of V <= 4096 at 8 warps takes <= 64, V = 8192 at 16
        # warps 64. With a kind tensor (HAS_KIND) ~97-115, no spill (benchmarks/sm90_registers.py). Timings on a GPU decide further (benchmarks/gpu_check.py sweeps the tile).
        block_v = v2 if v2 <= _GPU_MAX_SINGLE_V else _GPU_BLOCK_V
        block_n = max(1, min(128, _GPU_TILE // block_v))
        tile = block_n * block_v
        num_warps = 16 if tile >= 8192 else (8 if tile >= 1024 else 4)
    else:
        block_v = min(v2, _CPU_BLOCK_V)
        block_n = max(1, _CPU_TILE // block_v)
        num_warps = 4
    block_n = min(block_n, triton.next_power_of_2(max(N, 1)))
    return block_n, block_v, num_warps


def tempered_ce_triton(logits: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor,
                       mask: torch.Tensor | None = None, kind: torch.Tensor | None = None, *,
                       block_n: int | None = None, block_v: int | None = None, num_warps: int | None = None,
                       write_grad: bool = True):
    """(loss (M,), grad (M, N, V), correct (M, N), collapsed (M, N), logit_norm (M, N), row_loss (M, N)).

    kind (M,) int32/int64: each model's loss (0 softmax CE, 1 StableMax CE, 2 MSE); None: every model
    softmax CE, compiled without the other kinds. Its shape and dtype are checked here, its codes are not
    (that needs a host read; an unknown code gives the model NaN): the public functions check them.
    block_n / block_v / num_warps override the launch (powers of two); by default `ce_config` picks them.
    write_grad=False skips pass 3 (readouts only, as an evaluation needs): grad is then (M, 0, V).
    """
    check_ce_inputs(logits, labels, tau, mask, kind, kind_values=False)
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    M, N, V = logits.shape
    dev = logits.device
    for name, t in (("labels", labels), ("tau", tau), ("mask", mask), ("kind", kind)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but logits are on {dev}")
    bn, bv, nw = ce_config(N, V, dev)
    bn, bv, num_warps = block_n or bn, block_v or bv, num_warps or nw
    for name, b in (("block_n", bn), ("block_v", bv), ("num_warps", num_warps)):
        if b & (b - 1):
            raise ValueError(f"{name} must be a power of two, got {b}")

    z = logits.contiguous()                                          # (M, N, V)
    y = labels.contiguous()
    stride_ym = 0 if y.dim() == 1 else N
    t = tau.to(torch.float32).contiguous()                           # (M,)
    if mask is None:
        inv_count = torch.full((M,), 1.0 / max(N, 1), dtype=torch.float32, device=dev)
        mask_arg = inv_count                                         # unused (HAS_MASK=False)
    else:
        mask_arg = mask.contiguous()
        inv_count = 1.0 / mask_arg.sum(1, dtype=torch.float32).clamp_min(1.0)   # (M,), on device
    kind_arg = inv_count if kind is None else kind.contiguous()     # unused when HAS_KIND=False

    grad = torch.empty((M, N if write_grad else 0, V), dtype=logits.dtype, device=dev)  # never the logits
    row_loss = torch.empty((M, N), dtype=torch.float32, device=dev)
    w_loss = torch.empty((M, N), dtype=torch.float32, device=dev)
    correct = torch.empty((M, N), dtype=torch.bool, device=dev)
    collapsed = torch.empty((M, N), dtype=torch.bool, device=dev)
    norm = torch.empty((M, N), dtype=torch.float32, device=dev)
    if M * N == 0:
        return row_sum(w_loss), grad, correct, collapsed, norm, row_loss

    n_blocks = triton.cdiv(N, bn)
    _tempered_ce_kernel[(n_blocks * M,)](
        z, y, t, mask_arg, inv_count, kind_arg, grad, row_loss, w_loss, correct, collapsed, norm,
        N, V, stride_ym, n_blocks,
        HAS_MASK=mask is not None, HAS_KIND=kind is not None, BLOCK_N=bn, BLOCK_V=bv, SINGLE=bv >= V,
        WRITE_GRAD=write_grad, num_warps=num_warps)
    return row_sum(w_loss), grad, correct, collapsed, norm, row_loss
