"""PyTorch reference twins of the Triton kernels (same signatures, written plainly, torch only).

tempered_ce_reference(logits, labels, tau, mask) -> (loss, grad, correct, collapsed, logit_norm)
    logits (M, N, V) float; labels (N,) or (M, N) int; tau (M,); mask (M, N) bool or None.
    s = z / tau (working precision: float32, float64 for float64 input)
    loss_m   = mean over masked rows of  lse(s) - s_y           (0 for a model with no masked row)
    grad     = (softmax(s) - onehot(y)) / tau / count_m on masked rows, 0 elsewhere; logits' dtype
    correct  = argmax(s) == y            (first maximum wins, as torch.argmax)
    collapsed= softmax(s)_y == 1.0 exactly in the working precision
    logit_norm = ||s||_2 per row (float32, float64 for float64 input)

clamp_flat_reference_(flat, bounds, target, active) -> norms
    flat (M, P); bounds: S + 1 increasing offsets, segment k is flat[:, bounds[k]:bounds[k+1]];
    target (M, S); active (M,) bool. Returns the segment norms before the clamp (M, S) and, for the
    active models, multiplies segment k by target / (norm + 1e-12) in place.
"""
from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _labels_2d(labels: torch.Tensor, M: int, N: int) -> torch.Tensor:
    return labels.expand(M, N) if labels.dim() == 1 else labels


def _row_weights(mask: torch.Tensor | None, M: int, N: int, wdt, device) -> torch.Tensor:
    """(M, N) weight of each row in its model's mean: 1/count on masked rows, 0 elsewhere."""
    if mask is None:
        return torch.full((M, N), 1.0 / N, dtype=wdt, device=device)
    m = mask.to(wdt)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def tempered_ce_reference(logits, labels, tau, mask=None):
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    y = _labels_2d(labels, M, N).long()
    t = tau.to(wdt)[:, None, None]                                 # (M, 1, 1)
    s = logits.to(wdt) / t                                          # (M, N, V)
    lse = torch.logsumexp(s, -1)                                    # (M, N)
    s_y = s.gather(-1, y[..., None])[..., 0]                        # (M, N)
    w = _row_weights(mask, M, N, wdt, logits.device)                # (M, N)
    loss = ((lse - s_y) * w).sum(1)                                 # (M,)
    prob = torch.softmax(s, -1)                                     # (M, N, V)
    onehot = torch.nn.functional.one_hot(y, V).to(wdt)
    grad = ((prob - onehot) * (w[..., None] / t)).to(logits.dtype)  # (M, N, V)
    correct = s.argmax(-1) == y
    collapsed = prob.gather(-1, y[..., None])[..., 0] == 1.0
    logit_norm = torch.linalg.vector_norm(s, dim=-1)
    return loss, grad, correct, collapsed, logit_norm


def tempered_mse_reference(logits, labels, tau, mask=None):
    """The study's MSE control: per row sum_v (z/tau - onehot)^2, averaged over masked rows.
    Same outputs as the CE twin (readouts from softmax(z/tau), so SC rate stays comparable)."""
    M, N, V = logits.shape
    wdt = working_dtype(logits.dtype)
    y = _labels_2d(labels, M, N).long()
    t = tau.to(wdt)[:, None, None]
    s = logits.to(wdt) / t
    onehot = torch.nn.functional.one_hot(y, V).to(wdt)
    diff = s - onehot
    w = _row_weights(mask, M, N, wdt, logits.device)
    loss = ((diff * diff).sum(-1) * w).sum(1)
    grad = (2.0 * diff * (w[..., None] / t)).to(logits.dtype)
    prob = torch.softmax(s, -1)
    correct = s.argmax(-1) == y
    collapsed = prob.gather(-1, y[..., None])[..., 0] == 1.0
    logit_norm = torch.linalg.vector_norm(s, dim=-1)
    return loss, grad, correct, collapsed, logit_norm


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


def check_ce_inputs(logits, labels, tau, mask) -> None:
    """Shapes and dtypes of the CE inputs, shared by both backends; raises ValueError."""
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
