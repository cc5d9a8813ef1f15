"""AdamW on a flat (M, P) parameter buffer, exactly as the study writes it out by hand.

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    P <- P - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    P[:, :n_mat] <- P[:, :n_mat] - lr * wd * P[:, :n_mat]     (decoupled decay, after the Adam update,
                                                               on the matrices only)
`t` is each model's own step count (M,), so models forked at different steps share a batch.
The update is returned, not applied: the caller decides per model whether to keep it (divergence).
"""
from __future__ import annotations

import torch


def adamw(flat, grad, m, v, t, *, lr: float, beta1: float, beta2: float, eps: float, wd: float, n_mat: int):
    """Returns (new_flat, new_m, new_v) for step count t (M,) (already incremented, >= 1)."""
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * (grad * grad)
    tt = t.to(flat.dtype)[:, None]                                  # (M, 1)
    # (2, M, 1); the max over a size-1 axis changes nothing but makes torch.compile compute the two
    # pows once per model instead of inlining them into every element's update (~2x the cost of the
    # whole update on a CPU)
    bc = torch.stack([1.0 - torch.pow(beta1, tt), 1.0 - torch.pow(beta2, tt)]).amax(-1, keepdim=True)
    bc1, bc2 = bc[0], bc[1]                                         # (M, 1) each
    new = flat - lr * (m_new / bc1) / (torch.sqrt(v_new / bc2) + eps)
    if wd:
        new = torch.cat([new[:, :n_mat] - (lr * wd) * new[:, :n_mat], new[:, n_mat:]], 1)
    return new, m_new, v_new
