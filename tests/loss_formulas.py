"""The losses written from the papers' formulas, per row, and their float64 autograd per model: the
independent reference the kernel twin and the Triton kernel are held against (shared by the kernel tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def autograd_per_model(z, y, tau, mask, row_loss, with_rows=False):
    """Loss (M,) and d(Σ loss)/dz by autograd; row_loss(s, y) -> per-row losses for one model, or a list
    of such functions, one per model. with_rows: also the per-row losses (M, N)."""
    M, N, V = z.shape
    zz = z.detach().clone().requires_grad_(True)
    y2 = y.expand(M, N) if y.dim() == 1 else y
    fns = row_loss if isinstance(row_loss, (list, tuple)) else [row_loss] * M
    losses, all_rows = [], []
    for m in range(M):
        rows = torch.ones(N, dtype=torch.bool) if mask is None else mask[m]
        per_row = fns[m](zz[m] / tau[m], y2[m])                              # (N,)
        all_rows.append(per_row.detach())
        losses.append((per_row * rows).sum() / max(int(rows.sum()), 1))
    loss = torch.stack(losses)
    (grad,) = torch.autograd.grad(loss.sum(), zz)
    if with_rows:
        return loss.detach(), grad, torch.stack(all_rows)
    return loss.detach(), grad


def ce_rows(s, y):
    return F.cross_entropy(s, y, reduction="none")


def mse_rows(s, y):
    return ((s - F.one_hot(y, s.shape[-1]).to(s.dtype)) ** 2).sum(-1)


def stablemax_rows(s, y):
    """StableMax CE from the paper: S(x) = x + 1 (x >= 0), 1/(1 − x) (x < 0); p = S / Σ S; −log p_y.
    (x clamped inside 1/(1 − x) so the branch torch.where drops has no infinite gradient to hide.)"""
    S = torch.where(s >= 0, s + 1, 1 / (1 - s.clamp(max=0)))
    p = S / S.sum(-1, keepdim=True)
    return -torch.log(p.gather(-1, y[:, None])[:, 0])


ROWS_BY_KIND = (ce_rows, stablemax_rows, mse_rows)


def stablemax_saturated_inputs(M=3, N=8, V=59, seed=9):
    """StableMax rows whose p_y is within float32 rounding of 1: wrong classes at -1e4..-2e4 (S ~ 7e-5),
    the correct class at 1e5..1.1e5, so R / S(s_y) ~ 4e-8 < 2^-24 and S(s_y) + R rounds to S(s_y) in
    float32. Values exactly representable in float32 (so float64 and float32 start from the same s)."""
    g = torch.Generator().manual_seed(seed)
    z = -(1.0 + torch.rand(M, N, V, generator=g, dtype=torch.float64)) * 1e4
    y = torch.randint(0, V, (N,), generator=g)
    z[:, torch.arange(N), y] = (1.0 + 0.1 * torch.rand(M, N, generator=g, dtype=torch.float64)) * 1e5
    return z.float().double(), y
