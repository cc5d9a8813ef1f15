"""AdamW on a flat (M, P) parameter buffer, exactly as the study writes it out by hand.

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    P <- P - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    P[:, :n_mat] <- P[:, :n_mat] - lr * wd * P[:, :n_mat]     (decoupled decay, after the Adam update,
                                                               on the matrices only)
`t` is each model's own step count (M,), so models forked at different steps share a batch; `lr` and
`lr_wd` (lr * wd, formed in float64 on the host) are (M, 1) tensors, one value per model, or floats.
The update is returned, not applied: the caller decides per model whether to keep it (divergence).
"""
from __future__ import annotations

import torch


def adamw(flat, grad, m, v, t, *, lr, beta1: float, beta2: float, eps: float, lr_wd, n_mat: int):
    """Returns (new_flat, new_m, new_v) for step count t (M,) (already incremented, >= 1). lr_wd None: no
    model decays."""
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * (grad * grad)
    tt = t.to(flat.dtype)[:, None]                                  # (M, 1)
    # (2, M, 1); the max over a size-1 axis changes nothing but makes torch.compile compute the two
    # pows once per model instead of inlining them into every element's update (~2x the cost of the
    # whole update on a CPU)
    bc = torch.stack([1.0 - torch.pow(beta1, tt), 1.0 - torch.pow(beta2, tt)]).amax(-1, keepdim=True)
    bc1, bc2 = bc[0], bc[1]                                         # (M, 1) each
    new = flat - lr * (m_new / bc1) / (torch.sqrt(v_new / bc2) + eps)
    if lr_wd is not None:
        new = torch.cat([new[:, :n_mat] - lr_wd * new[:, :n_mat], new[:, n_mat:]], 1)
    return new, m_new, v_new


def orthograd(flat, grad, segments: list[tuple[int, int]], on):
    """Prieto et al. 2025's ⊥Grad, per model and per parameter tensor (a segment of the flat buffer):
    g_perp = g - (<w, g> / <w, w>) w, rescaled to ||g||. on (M,) bool: the models it applies to (the
    others keep g). A tensor with w = 0 (biases at init) keeps g, as the paper's code (eps 1e-30) does."""
    out = []
    for lo, hi in segments:
        w, g = flat[:, lo:hi], grad[:, lo:hi]                            # (M, n)
        proj = (w * g).sum(1, keepdim=True) / ((w * w).sum(1, keepdim=True) + 1e-30)
        perp = g - proj * w
        scale = torch.linalg.vector_norm(g, dim=1, keepdim=True) / (torch.linalg.vector_norm(perp, dim=1, keepdim=True) + 1e-30)
        out.append(perp * scale)
    return torch.where(on[:, None], torch.cat(out, 1), grad)


def grokfast_ema(grad, h, t, alpha, lamb):
    """Lee et al. 2024's Grokfast-EMA, per model: h <- alpha h + (1 - alpha) g (h starts as the first
    gradient, as their `gradfilter_ema` does), g <- g + lamb h. alpha, lamb (M, 1); t (M,) steps taken
    before this one. Returns (new g, new h); lamb = 0 leaves g as it is."""
    h_new = torch.where((t == 0)[:, None], grad, alpha * h + (1.0 - alpha) * grad)
    return grad + lamb * h_new, h_new
