"""PyTorch reference twins of the Triton kernels (same signatures, written plainly, torch only).

tempered_ce_reference(logits, labels, tau, mask, kind) -> (loss, grad, correct, collapsed, logit_norm, row_loss)
    logits (M, N, V) float; labels (N,) or (M, N) int; tau (M,); mask (M, N) bool or None;
    kind (M,) int32/int64 or None: each model's loss (None: every model 0, the softmax-only code).
    s = z / tau (working precision: float32, float64 for float64 input); per row, by the model's kind:
      0 softmax CE    row = lse(s) - s_y                          dL/ds = softmax(s) - onehot(y)
      1 StableMax CE  S(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0)  (Prieto et al. 2025)
                      p = S(s) / sum_v S(s_v), row = -log p_y = log1p(R / S(s_y)),
                      R = sum_{v != y} S(s_v) (summed without s_y: no cancellation as p_y -> 1)
                      dL/ds_j = S'(s_j) / sum_v S(s_v) (j != y),  dL/ds_y = -(R / sum_v S(s_v)) / (1 + |s_y|)
                      S'(x) = 1 (x >= 0), 1 / (1 - x)^2 (x < 0)
      2 MSE           row = sum_v (s_v - onehot_v)^2              dL/ds = 2 (s - onehot)
      any other code: row and dL/ds NaN (the public functions reject such codes before they get here)
    row_loss = row, unweighted, for every row (masked-out rows too); working precision
    loss_m   = mean over masked rows of row                 (0 for a model with no masked row)
    grad     = dL/ds / tau / count_m on masked rows, 0 elsewhere; logits' dtype
    readouts, the same for every kind (the study's softmax-collapse measure, comparable across losses):
    correct  = argmax(s) == y            (first maximum wins, as torch.argmax)
    collapsed= softmax(s)_y == 1.0 exactly in the working precision
    logit_norm = ||s||_2 per row (float32, float64 for float64 input)

tempered_mse_reference: the same for every model of kind 2, without the other kinds' work (loss="mse").

clamp_flat_reference_(flat, bounds, target, active) -> norms
    flat (M, P); bounds: S + 1 increasing offsets, segment k is flat[:, bounds[k]:bounds[k+1]];
    target (M, S); active (M,) bool. Returns the segment norms before the clamp (M, S) and, for the
    active models, multiplies segment k by target / (norm + 1e-12) in place.
"""
from __future__ import annotations

import functools
import math

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


ROW_BLOCK = 256
"""Rows per block of the sums over rows (`row_sum`; fastgrok.core.models' blocked products too)."""


def operator_under_compile(name: str, fake):
    """Decorator: fn runs as itself in eager code, and as the operator fastgrok::<name> (torch.library.custom_op,
    `fake` its output's shape for tracing) under torch.compile, whose graph then calls fn's own eager kernels
    instead of tracing and lowering them (each use says why it pays). An eager call skips the operator: a
    process's first call of a Python-defined operator costs ~1.1 s and ~140 MiB (the machinery it loads,
    paid anyway once torch.compile has run). fn must return a new tensor, not a view of an input; the
    result's `.op` is the operator (for register_autograd)."""
    def wrap(fn):
        op = torch.library.custom_op(f"fastgrok::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)
        call.op = op
        return call
    return wrap


@operator_under_compile("row_sum", lambda x: x.new_empty(x.shape[:1] + x.shape[2:]))
def row_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the rows, axis 1: (M, N, ...) -> (M, ...), in one order fixed by N alone: blocks of exactly
    ROW_BLOCK rows (the last padded with zero rows), each summed as a halving tree of elementwise adds, the
    block sums added in order. So a model's sum has the same bits whatever the number of models beside it
    (a reduction's order can follow M: torch.compile's kernels, a GPU's launch configuration) and whatever
    zero rows follow its own (a padded model's), eager or compiled, on any device. An operator under
    compile (`operator_under_compile`): traced, its unrolled adds cost ~4 s more compilation of the p = 59
    evaluation."""
    M, N = x.shape[:2]
    n_blocks = max(1, -(-N // ROW_BLOCK))
    pad = [0, 0] * (x.dim() - 2) + [0, n_blocks * ROW_BLOCK - N]
    x = torch.nn.functional.pad(x, pad).view(M, n_blocks, ROW_BLOCK, *x.shape[2:])
    w = ROW_BLOCK
    while w > 1:
        w //= 2
        x = x[:, :, :w] + x[:, :, w:2 * w]
    out = x[:, 0, 0].clone()                    # a tensor of its own (an operator's output may not be a view)
    for j in range(1, n_blocks):
        out = out + x[:, j, 0]
    return out


def _row_sum_backward(ctx, g):
    return g.unsqueeze(1).expand(ctx.shape).contiguous()


def _row_sum_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


row_sum.op.register_autograd(_row_sum_backward, setup_context=_row_sum_setup)


def _labels_2d(labels: torch.Tensor, M: int, N: int) -> torch.Tensor:
    return labels.expand(M, N) if labels.dim() == 1 else labels


def _onehot(y: torch.Tensor, V: int, wdt) -> torch.Tensor:
    """(..., V) in wdt: 1 at each label, 0 elsewhere. A compare, not F.one_hot, whose range checks sync the
    host on CUDA and add a kernel (and its C++ build) to a compiled step. The tasks' labels are in [0, V)
    by construction (fastgrok.core.data)."""
    return (y[..., None] == torch.arange(V, device=y.device)).to(wdt)


def _lse_and_softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp(s, -1) and softmax(s, -1). Under torch.compile from one exp(s - max) and one sum: softmax's
    decomposition written out, and logsumexp as log(sum) + max where the row max is finite (its own
    decomposition's exps then are the same), the max itself where it is infinite (what logsumexp gives
    there), so the compiler does not compute every exp twice in two passes. Bitwise equal to the two
    calls compiled, float32 and float64, V = 7 .. 113, infinite logits included
    (tests/test_kernels_reference.py); eager, ATen's two kernels."""
    if not torch.compiler.is_compiling():
        return torch.logsumexp(s, -1), torch.softmax(s, -1)
    mx = s.amax(-1, keepdim=True)
    e = torch.exp(s - mx)
    se = e.sum(-1, keepdim=True)
    lse = torch.where(mx.abs() == math.inf, mx, torch.log(se) + mx)
    return lse[..., 0], e / se


def _row_weights(mask: torch.Tensor | None, M: int, N: int, wdt, device) -> torch.Tensor:
    """(M, N) weight of each row in its model's mean: 1/count on masked rows, 0 elsewhere."""
    if mask is None:
        return torch.full((M, N), 1.0 / N, dtype=wdt, device=device)
    m = mask.to(wdt)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def tempered_ce_reference(logits, labels, tau, mask=None, kind=None):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    y = _labels_2d(labels, M, N).long()
    t = tau.to(wdt)[:, None, None]                                 # (M, 1, 1)
    s = logits.to(wdt) / t                                          # (M, N, V)
    lse, prob = _lse_and_softmax(s)                                 # (M, N), (M, N, V)
    s_y = s.gather(-1, y[..., None])[..., 0]                        # (M, N)
    w = _row_weights(mask, M, N, wdt, logits.device)                # (M, N)
    onehot = _onehot(y, V, wdt)
    if kind is None:                                                # every model softmax CE
        row = lse - s_y                                             # (M, N)
        dlds = prob - onehot                                        # (M, N, V)
    else:
        row, dlds = _rows_by_kind(s, y, onehot, lse - s_y, prob - onehot, kind)
    loss = row_sum(row * w)                                         # (M,)
    grad = (dlds * (w[..., None] / t)).to(logits.dtype)             # (M, N, V)
    correct = s.argmax(-1) == y
    collapsed = prob.gather(-1, y[..., None])[..., 0] == 1.0
    logit_norm = torch.linalg.vector_norm(s, dim=-1)
    return loss, grad, correct, collapsed, logit_norm, row


def _rows_by_kind(s, y, onehot, ce_row, ce_dlds, kind):
    """(row (M, N), dL/ds (M, N, V)) of each model's kind: every kind computed, each model's selected."""
    # kind 1, StableMax CE: S has no shift invariance, so it runs on s itself (S > 0, finite for finite s)
    neg = s.clamp(max=0.0)                                          # keeps 1/(1 - x) finite where x >= 0
    S = torch.where(s >= 0, s + 1.0, 1.0 / (1.0 - neg))             # (M, N, V)
    dS = torch.where(s >= 0, torch.ones_like(s), 1.0 / (1.0 - neg) ** 2)
    # Free of cancellation: R = sum over j != y of S(s_j) is summed without S(s_y), so p_y = S_y/(S_y + R)
    # close to 1 keeps its distance from 1 (R / S_y), where 1/sum - 1/S_y would round to 0 in float32
    is_y = onehot != 0
    S_y = S.gather(-1, y[..., None])[..., 0]                        # (M, N)
    R = S.masked_fill(is_y, 0.0).sum(-1)                            # (M, N)
    sum_S = S_y + R
    sm_row = torch.log1p(R / S_y)                                   # -log p_y = log(1 + R/S_y)
    # dL/ds_y = S'(s_y)/sum - S'(s_y)/S_y = -(R/sum) S'(s_y)/S_y, and S'(x)/S(x) = 1/(1 + |x|)
    g_y = -(R / sum_S) / (1.0 + s.gather(-1, y[..., None])[..., 0].abs())
    sm_dlds = torch.where(is_y, g_y[..., None], dS / sum_S[..., None])
    # kind 2, MSE (the same expressions as tempered_mse_reference)
    diff = s - onehot
    mse_row = (diff * diff).sum(-1)
    mse_dlds = 2.0 * diff
    k = kind.to(s.device)[:, None]                                  # (M, 1)
    nan = torch.full_like(ce_row, float("nan"))
    row = torch.where(k == 0, ce_row, torch.where(k == 1, sm_row, torch.where(k == 2, mse_row, nan)))
    k = k[..., None]                                                # (M, 1, 1)
    dlds = torch.where(k == 0, ce_dlds, torch.where(k == 1, sm_dlds, torch.where(k == 2, mse_dlds, nan[..., None])))
    return row, dlds


def tempered_mse_reference(logits, labels, tau, mask=None):
    """The study's MSE control: per row sum_v (z/tau - onehot)^2, averaged over masked rows.
    Same outputs as the CE twin (readouts from softmax(z/tau), so SC rate stays comparable)."""
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    y = _labels_2d(labels, M, N).long()
    t = tau.to(wdt)[:, None, None]
    s = logits.to(wdt) / t
    onehot = _onehot(y, V, wdt)
    diff = s - onehot
    w = _row_weights(mask, M, N, wdt, logits.device)
    row = (diff * diff).sum(-1)
    loss = row_sum(row * w)
    grad = (2.0 * diff * (w[..., None] / t)).to(logits.dtype)
    prob = torch.softmax(s, -1)
    correct = s.argmax(-1) == y
    collapsed = prob.gather(-1, y[..., None])[..., 0] == 1.0
    logit_norm = torch.linalg.vector_norm(s, dim=-1)
    return loss, grad, correct, collapsed, logit_norm, row


def clamp_flat_reference_(flat, bounds, target, active):
    M = flat.shape[0]
    wdt = working_dtype(flat.dtype)
    norms = torch.stack([flat[:, lo:hi].to(wdt).square().sum(1) for lo, hi in zip(bounds[:-1], bounds[1:])],
                        1).sqrt()                                   # (M, S)
    scale = torch.where(active[:, None], target.to(wdt) / (norms + 1e-12), torch.ones_like(norms))
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        flat[:, lo:hi].mul_(scale[:, k:k + 1].to(flat.dtype))
    return norms.reshape(M, -1)


def clamp_list_reference_(params, target):
    """Total norm over a list of (M, ...) tensors set to target (M,) in place; returns norms before."""
    wdt = working_dtype(params[0].dtype)
    sq = sum(p.reshape(p.shape[0], -1).to(wdt).square().sum(1) for p in params)
    norms = sq.sqrt()
    scale = target.to(wdt) / (norms + 1e-12)
    for p in params:
        p.mul_(scale.reshape(-1, *([1] * (p.dim() - 1))).to(p.dtype))
    return norms


LOSS_KINDS = {"ce": 0, "stablemax": 1, "mse": 2}
"""The loss codes of a `kind` tensor: 0 softmax CE, 1 StableMax CE, 2 MSE (all on s = z / tau)."""


def check_ce_inputs(logits, labels, tau, mask, kind=None, *, kind_values: bool = True) -> None:
    """Shapes and dtypes of the CE inputs, shared by both backends; raises ValueError.

    kind_values: also check that every code of `kind` is a known one. That reads the tensor on the host
    (a synchronisation on a GPU), so it is skipped while torch.compile traces and while a CUDA graph is
    captured; the launcher never does it (as for labels: an unknown code gives that model NaN).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (M, N, V), got shape {tuple(logits.shape)}")
    M, N, V = logits.shape
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64, got {labels.dtype}")
    if tuple(labels.shape) not in ((N,), (M, N)):
        raise ValueError(f"labels must be (N,) or (M, N) = ({N},) or ({M}, {N}), got {tuple(labels.shape)}")
    if tuple(tau.shape) != (M,):
        raise ValueError(f"tau must be (M,) = ({M},), got {tuple(tau.shape)}")
    if mask is not None and (tuple(mask.shape) != (M, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool (M, N) = ({M}, {N}), got {mask.dtype} {tuple(mask.shape)}")
    if kind is None:
        return
    if kind.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kind must be int32/int64 (0 softmax CE, 1 StableMax CE, 2 MSE), got {kind.dtype}")
    if tuple(kind.shape) != (M,):
        raise ValueError(f"kind must be (M,) = ({M},), got {tuple(kind.shape)}")
    if not kind_values or torch.compiler.is_compiling():
        return
    if kind.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (kind < 0) | (kind > 2)
    if bool(bad.any()):                                             # the one host read
        raise ValueError(f"kind codes must be 0 (softmax CE), 1 (StableMax CE) or 2 (MSE); got "
                         f"{sorted(set(kind[bad].tolist()))} at models {bad.nonzero()[:, 0].tolist()}")
