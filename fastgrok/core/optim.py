"""The optimizers and the lr schedule on a flat (M, P) parameter buffer, one batch of M models at once.

Every function takes the state (flat, grad, m, v: (M, P); t (M,) int, each model's step count, already
incremented, >= 1) and returns (new_flat, new_m, new_v), so the optimizers share one state and one
checkpoint layout; the update is returned, not applied: the caller decides per model whether to keep it
(divergence). Per-model hyperparameters are floats (every model alike) or tensors of shape (M,) (also
(M, 1)), best formed in float64 on the host: a value derived from them (1 - beta, lr * wd) is computed in
their own dtype and only then rounded to the parameters' dtype, so a float64 (M,) tensor gives the same
bits as the same Python float (the scalar code's arithmetic). Nothing here syncs with the host.

    adamw    the study's AdamW (its hand-written code; decay after the Adam update, on the matrices)
             m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
             P <- P - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) ;  P[:, :n_mat] -= lr wd P[:, :n_mat]
    adam     torch.optim.Adam(weight_decay=wd): coupled L2, g <- g + wd P on P[:, :n_decay], then Adam
    sgd      torch.optim.SGD(momentum=mu, dampening=0, nesterov=False, weight_decay=wd):
             g <- g + wd P (on P[:, :n_decay]) ;  m <- mu m + g ;  P <- P - lr m   (m starts at 0, so step 1 is
             torch's buffer = g);  v is returned unchanged
    muon     Keller Jordan's Muon on the given matrices (`muon`'s docstring), torch.optim.AdamW on the rest
    warmup   the linear warm-up of torch's LambdaLR(lambda u: 1 if u > W else u / W) (Lee et al.'s, W = 10)

`adamw` takes lr and lr_wd (lr * wd formed in float64 on the host, as the study's scalar code does) as
before; the others take lr and wd.
"""
from __future__ import annotations

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton-Schulz coefficients (a, b, c): X <- a X + (b A + c A^2) X, A = X X^T."""


def _col(x, like: torch.Tensor):
    """A per-model value as a (M, 1) column in like's dtype and device; a float stays a float."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1, 1).to(device=like.device, dtype=like.dtype)
    return x


def _one_minus(x, like: torch.Tensor):
    """1 - x, formed in x's own precision (a Python float or a float64 tensor: double), then rounded."""
    if isinstance(x, torch.Tensor):
        return _col(1.0 - x, like)
    return 1.0 - x


def _moments(grad, m, v, beta1, beta2):
    """Adam's moments: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2."""
    m_new = _col(beta1, grad) * m + _one_minus(beta1, grad) * grad
    v_new = _col(beta2, grad) * v + _one_minus(beta2, grad) * (grad * grad)
    return m_new, v_new


BIAS_TABLE_MAX = 1 << 19
"""The longest table of bias corrections `bias_correction_table` builds (~1 s on a CPU at this length): a beta
above ~0.99993 needs more (0.9999: 173,251 values in float32, 374,282 in float64; the default 0.999: 17,322
and 37,413, 0.15 and 0.3 s), and a batch with one keeps the power per step for all its models, whose bits can
then follow M."""
_BIAS_TABLES: dict[tuple, torch.Tensor | None] = {}


def bias_correction_table(betas: list[float], dtype: torch.dtype) -> torch.Tensor | None:
    """(len(betas), T) on the CPU, row i: 1 - beta_i^t at t = 0 .. T - 1 in dtype, each value exactly the one
    `_adam_step`'s power gives a model alone: torch.pow over at most 3 elements at a time, which every
    CPU vector loop (it starts at twice its vector width: 4 doubles on 128-bit NEON, more elsewhere) leaves
    to its scalar loop (std::pow). T: from t = T - 1 on, beta^t is below half an ulp of 1 and every value is
    exactly 1. None when a beta needs more than BIAS_TABLE_MAX.

    Why a table: torch.pow's vectorised loop (a long tensor, or any compiled one) and its scalar loop (a
    short one) round 1 - beta^t differently at some t (0.9: 28 of the first 20,000 steps; 0.999: 435),
    so with the power taken per step a model's bits depended on the number of models beside it: eager
    from twice the vector width on (on AVX-512 M >= 32 in float32, M >= 16 in float64), compiled from M >= 2.
    A gather from the table is the same for every M, on every device (on CUDA these are a CPU's values).
    Cached per (betas, dtype): do not write into the result."""
    key = (tuple(betas), dtype)
    if key not in _BIAS_TABLES:
        _BIAS_TABLES[key] = _bias_table(betas, dtype)
    return _BIAS_TABLES[key]


def _bias_table(betas, dtype):
    half_ulp = 2.0 ** (-25 if dtype != torch.float64 else -54)
    rows, width = [], 1
    for beta in betas:
        n = 64 + (0 if beta == 0.0 else int(math.log(half_ulp) / math.log(beta)))    # past the last value < 1
        if n > BIAS_TABLE_MAX:
            return None
        b = torch.tensor([beta], dtype=torch.float64).to(dtype)
        vals = torch.cat([1.0 - torch.pow(b.repeat(min(3, n - lo)), torch.arange(lo, min(lo + 3, n), dtype=torch.float64)
                                          .to(dtype)) for lo in range(0, n, 3)])
        below = torch.nonzero(vals != 1.0)
        last = int(below.max()) if len(below) else -1
        if last >= n - 8:                                                   # not yet settled at 1: refuse
            return None
        rows.append(vals[:last + 2])
        width = max(width, last + 2)
    return torch.stack([torch.cat([r, r.new_ones(width - len(r))]) for r in rows])


def _adam_step(flat, lr, m_new, v_new, t, beta1, beta2, eps, bias=None):
    """flat - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), per model, in the study's order of
    operations (lr times the corrected m, then divided). bias: (table (R, T), rows (M, 2)) of
    `bias_correction_table` and each model's rows of its beta1 and beta2: the corrections gathered (the
    same bits for a model whatever the batch); None: the power taken here (bits that can follow M)."""
    if bias is not None:
        table, rows = bias
        at = t.clamp(max=table.shape[1] - 1)[:, None].expand(-1, 2)    # (M, 2) each model's step
        bc = table[rows, at]                                            # (M, 2)
        bc1, bc2 = bc[:, :1], bc[:, 1:]                                 # (M, 1) each
    else:
        tt = t.to(m_new.dtype)[:, None]                                 # (M, 1)
        # (2, M, 1); the max over a size-1 axis changes nothing but makes torch.compile compute the two
        # pows once per model instead of inlining them into every element's update (~2x the cost of the
        # whole update on a CPU)
        bc = torch.stack([1.0 - torch.pow(_col(beta1, m_new), tt),
                          1.0 - torch.pow(_col(beta2, m_new), tt)]).amax(-1, keepdim=True)
        bc1, bc2 = bc[0], bc[1]                                         # (M, 1) each
    return flat - lr * (m_new / bc1) / (torch.sqrt(v_new / bc2) + _col(eps, m_new))


def _decay_rows(x: torch.Tensor, n_decay: int, fn):
    """x with fn applied to its first n_decay columns (the decayed parameters), the rest as they are."""
    return torch.cat([fn(x[:, :n_decay]), x[:, n_decay:]], 1)


def adamw(flat, grad, m, v, t, *, lr, beta1, beta2, eps, lr_wd, n_mat: int, bias=None):
    """The study's AdamW. lr, lr_wd (M, 1) or floats; beta1, beta2, eps floats or (M,). lr_wd None: no
    model decays. bias: the bias corrections' table and rows (`_adam_step`)."""
    m_new, v_new = _moments(grad, m, v, beta1, beta2)
    new = _adam_step(flat, _col(lr, flat), m_new, v_new, t, beta1, beta2, eps, bias)
    if lr_wd is not None:
        new = _decay_rows(new, n_mat, lambda w: w - lr_wd * w)
    return new, m_new, v_new


def adam(flat, grad, m, v, t, *, lr, beta1, beta2, eps, wd, n_decay: int, bias=None):
    """torch.optim.Adam(lr, betas, eps, weight_decay=wd) per model: the L2 term wd P is added to the
    gradient of the first n_decay columns (torch decays every parameter of its group: n_decay = P;
    fastgrok's matrices only: n_mat) before the moments see it. wd None: no model decays."""
    if wd is not None:
        grad = torch.cat([grad[:, :n_decay] + _col(wd, flat) * flat[:, :n_decay], grad[:, n_decay:]], 1)
    m_new, v_new = _moments(grad, m, v, beta1, beta2)
    return _adam_step(flat, _col(lr, flat), m_new, v_new, t, beta1, beta2, eps, bias), m_new, v_new


def sgd(flat, grad, m, v, t, *, lr, momentum, wd, n_decay: int):
    """torch.optim.SGD(lr, momentum, dampening=0, nesterov=False, weight_decay=wd) per model; m is the
    momentum buffer (0 before the first step), v and t are not used (v is returned as it is)."""
    if wd is not None:
        grad = torch.cat([grad[:, :n_decay] + _col(wd, flat) * flat[:, :n_decay], grad[:, n_decay:]], 1)
    m_new = _col(momentum, flat) * m + grad
    return flat - _col(lr, flat) * m_new, m_new, v


def newton_schulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's `zeropower_via_newtonschulz5` over a batch of matrices G (M, r, c), in G's dtype:
    X = G / (||G||_F + 1e-7) (taken as (M, c, r) when r > c, so A = X X^T is the smaller Gram matrix),
    then `steps` times X <- a X + (b A + c A A) X with NS_COEFFS. The result is about U S' V^T with
    G = U S V^T and S' in roughly (0.5, 1.5): an orthogonalized G, not exactly U V^T."""
    a, b, c = NS_COEFFS
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)     # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT                                                # (M, r, r), r the smaller side
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def muon(flat, grad, m, v, t, *, lr, muon_lr, momentum, beta1, beta2, eps, wd, mats, n_decay: int,
         ns_steps: int = 5, bias=None):
    """Muon (Keller Jordan, github.com/KellerJordan/Muon, `SingleDeviceMuonWithAuxAdam`) per model: the
    matrices in `mats` take Muon's update, every other column torch.optim.AdamW's.

    mats: (lo, rows, cols) per matrix, the (M, rows * cols) columns flat[:, lo:lo + rows * cols] viewed as
    (M, rows, cols), stored as fastgrok multiplies them (x @ W: rows = fan-in, cols = fan-out). For each:
        m <- lerp(m, g, 1 - mu)                 (m <- mu m + (1 - mu) g; m starts at 0)
        u <- lerp(g, m, mu)                     (Nesterov: (1 - mu) g + mu m)
        O <- newton_schulz5(u, ns_steps) * sqrt(max(1, fan-out / fan-in))
        P <- P (1 - muon_lr wd) - muon_lr O     (decoupled decay first, as the reference)
    The rest (AdamW, torch's order): P <- P (1 - lr wd) on the decayed columns [:n_decay], then the Adam
    step with (beta1, beta2, eps); v of the Muon columns stays as it is.

    Conventions taken, and why:
    - the shape scale sqrt(max(1, rows / cols)) of the reference is written for torch's (out, in) Linear
      weight; fastgrok stores (in, out), so the same scale is sqrt(max(1, cols / rows)) here (the
      orthogonalization itself is the same for a matrix and its transpose);
    - Newton-Schulz runs in the parameters' dtype, not bfloat16: the reference casts to bfloat16 for GPU
      speed; fastgrok keeps precision fixed (float32 without TF32, or float64), so float64 can be checked;
    - one wd per model for both parts (the reference allows one per group); Muon's matrices decay only if
      they lie in [:n_decay], which they do with fastgrok's n_mat. Which matrices take Muon is the
      caller's: the reference gives it the hidden matrices only, the embedding and the output layer to
      AdamW.
    """
    M = flat.shape[0]
    lr_c, mlr = _col(lr, flat), _col(muon_lr, flat)
    m_a, v_a = _moments(grad, m, v, beta1, beta2)
    base = flat if wd is None else _decay_rows(flat, n_decay, lambda w: w * _one_minus(lr * wd, flat))
    adam_new = _adam_step(base, lr_c, m_a, v_a, t, beta1, beta2, eps, bias)
    news, ms, vs, pos = [], [], [], 0
    for lo, rows, cols in sorted(mats):
        hi = lo + rows * cols
        if lo < pos or (lo < n_decay < hi):
            raise ValueError(f"muon: matrix columns [{lo}, {hi}) overlap another or straddle n_decay {n_decay}")
        news.append(adam_new[:, pos:lo]), ms.append(m_a[:, pos:lo]), vs.append(v_a[:, pos:lo])
        g, w = grad[:, lo:hi], flat[:, lo:hi]                       # (M, rows * cols)
        mom = torch.lerp(m[:, lo:hi], g, _one_minus(momentum, flat))
        u = torch.lerp(g, mom, _col(momentum, flat))
        O = newton_schulz5(u.view(M, rows, cols), ns_steps).reshape(M, -1) * max(1.0, cols / rows) ** 0.5
        if wd is not None and hi <= n_decay:
            w = w * _one_minus(muon_lr * wd, flat)
        news.append(w - mlr * O), ms.append(mom), vs.append(v[:, lo:hi])
        pos = hi
    news.append(adam_new[:, pos:]), ms.append(m_a[:, pos:]), vs.append(v_a[:, pos:])
    return torch.cat(news, 1), torch.cat(ms, 1), torch.cat(vs, 1)


def warmup(lr: torch.Tensor, t: torch.Tensor, steps) -> torch.Tensor:
    """Each model's lr (M,) at its step t (M,) (this step's count, >= 1, as the optimizers take it) under
    a linear warm-up over `steps` (M,) steps: lr * min((t - 1) / steps, 1), lr itself where steps is 0.
    This is torch's LambdaLR(lambda u: 1 if u > W else u / W) stepped after every optimizer step, as Lee
    et al.'s Grokfast code does (W = 10): the first step runs at lr 0 (Adam's moments still move) and step
    W + 1 at the full lr. Computed in lr's dtype (float64: the scheduler's own bits)."""
    w = (steps if isinstance(steps, torch.Tensor) else torch.tensor(steps)).to(device=lr.device, dtype=lr.dtype)
    frac = ((t.to(lr.dtype) - 1.0) / w).clamp(max=1.0)
    return torch.where(w > 0, lr * frac, lr)


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
