"""Measures of a model's progress toward generalizing, computed inside the evaluation pass: columns of `evaluate`'s one
(M, n) tensor, after the base metrics, so they cost no host synchronisation of their own.

Per model, with E the (p, d) token embedding (the MLP's E; the transformer's first p rows of W_E, its
tokens without "="):

  F[k, j]   = sum_t E[t, j] exp(-2 pi i k t / p)           the DFT over the p tokens of column j
  power(k)  = sum_j |F[k, j]|^2 + |F[p - k, j]|^2           k = 1 .. p//2: a conjugate pair merged (for
              even p, k = p/2 is its own conjugate and counts once). The DC term k = 0 (the mean over
              tokens) is left out of numerator and denominator alike.
  key_freq_1 .. key_freq_K   the K = 5 frequencies of largest power, strongest first (integers in
              1 .. p//2 stored as floats; NaN beyond p//2 when p//2 < K)
  fourier_sparsity = sum_i power(key_freq_i) / sum_{k=1..p//2} power(k)
              1 when E's centred power sits in K frequencies; about K / (p//2) for a random E (every
              frequency the same expected power); NaN for an E constant over tokens.
  norm_<X>  = ||X||_F for every matrix X of the layout (MLP: E, W1, W2; transformer: W_E, W_pos, W_Q0, ...)

Opt-in (`TrainConfig.restricted_loss`), the MLP on a + b mod p: Nanda et al. 2023's restricted and excluded
losses on the key frequencies above. Over the p^2 pairs (a, b), let S = span{1, cos(2 pi w (a+b) / p),
sin(2 pi w (a+b) / p) : w a key frequency} and S_key the same without the constant; each logit column
z[:, c] (a function of (a, b)) is projected:

  restricted_loss = the loss (the run's: CE or MSE on z / tau) of P_S z over all the model's pairs
  excluded_loss   = the loss of z - P_{S_key} z over the model's train rows

Nanda et al. project the MLP's neuron activations and map them through the output weights (adding the
logits' mean back for the restricted loss); the MLP's logits z = h W2 + b2 are linear in h with a
constant b2, so projecting z is the same thing. Their excluded loss is on the train pairs; their
restricted loss here on all pairs (a reimplementation, TransformerLens' grokking demo, uses the test
pairs: the two weigh the residues a + b by their counts among those pairs, so they differ only by the
split's sampling). The cos/sin of a + b are orthogonal over the p^2 grid, and each residue s = a + b
holds p pairs, so P_S z at (a, b) is the projection onto S, over the p residues, of the mean of z over
the pairs of residue a + b: computed on that (M, p, V) mean, by a gather (deterministic: the same bits in
any batch) rather than a scatter. A model whose labels are not a + b mod p on every pair (another op;
mixed-op batches included), and the transformer, read NaN for both.
"""
from __future__ import annotations

import math

import torch

import fastgrok.kernels as K

K_FREQ = 5
"""How many key frequencies the sparsity counts and the metrics report."""
FOURIER_METRICS = ("fourier_sparsity",) + tuple(f"key_freq_{i + 1}" for i in range(K_FREQ))
RESTRICTED_METRICS = ("restricted_loss", "excluded_loss")


def metric_names(model, restricted: bool) -> tuple[str, ...]:
    """The progress measures' names for this model, in their column order."""
    lay = model.layout
    norms = tuple(f"norm_{n}" for n in lay.names[: lay.n_matrices])
    return FOURIER_METRICS + norms + (RESTRICTED_METRICS if restricted else ())


def embedding(model, P: dict) -> torch.Tensor:
    """(M, p, d) the token embedding: E (MLP), the first p rows of W_E (transformer), or on one-hot inputs
    the first p rows of W1 (the rows the one-hot of a picks; d = its hidden width)."""
    return (P["E"] if "E" in P else P["W_E"] if "W_E" in P else P["W1"])[:, : model.p]


def fourier_power(E: torch.Tensor) -> torch.Tensor:
    """(M, p, d) -> (M, p//2) float64: power(k) for k = 1 .. p//2 (see the module docstring)."""
    p = E.shape[1]
    k = torch.arange(1, p // 2 + 1, device=E.device)
    t = torch.arange(p, device=E.device)
    ang = (2 * math.pi / p) * ((k[:, None] * t[None, :]) % p).to(torch.float64)   # (F, p), exact angles
    basis = torch.cat([ang.cos(), ang.sin()], 0)                                   # (2F, p)
    coef = torch.matmul(basis, E.to(torch.float64)).square().sum(2)                # (M, 2F)
    F = p // 2
    pair = torch.where(2 * k == p, 1.0, 2.0).to(torch.float64)                     # |F[k]|^2 + |F[p-k]|^2
    return (coef[:, :F] + coef[:, F:]) * pair


def fourier_stats(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 1 + K_FREQ) float64 [fourier_sparsity, key_freq_1..K] and the key frequencies (M, k) int64
    (k = min(K_FREQ, p//2), strongest first)."""
    power = fourier_power(E)                                                       # (M, F)
    k = min(K_FREQ, power.shape[1])
    top, idx = power.topk(k, dim=1)                                                # sorted, strongest first
    sparsity = top.sum(1) / power.sum(1)
    freqs = idx + 1
    cols = [sparsity[:, None], freqs.to(torch.float64)]
    if k < K_FREQ:
        cols.append(torch.full((E.shape[0], K_FREQ - k), float("nan"), dtype=torch.float64, device=E.device))
    return torch.cat(cols, 1), freqs


def matrix_norms(model, flat: torch.Tensor) -> torch.Tensor:
    """(M, n_matrices) float64: the Frobenius norm of each matrix of the layout."""
    b = model.layout.bounds
    return torch.stack([flat[:, lo:hi].to(torch.float64).square().sum(1).sqrt() for lo, hi in zip(b[:-1], b[1:])], 1)


def residue_table(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """(p, p) int64: row s lists the batch rows of the pairs (x, s - x mod p), x = 0 .. p-1 (pairs absent
    from the batch, as b = 0 of an all-div batch, point at row 0: no add model is in such a batch)."""
    pos = torch.zeros(p, p, dtype=torch.int64, device=a.device)
    pos[a, b] = torch.arange(a.shape[0], device=a.device)
    x = torch.arange(p, device=a.device)
    return pos[x[None, :], (x[:, None] - x[None, :]) % p]                          # (p, p): [s, x]


def restricted_excluded(z, a, b, y, key_freqs, tau, train_mask, valid, *, backend: str, loss: str, kind=None):
    """(restricted_loss, excluded_loss), each (M,) float64, NaN for a model not on a + b mod p.

    z (M, N, V) logits over all pairs (V = p); a, b (N,); y (N,) or (M, N); key_freqs (M, k) int64."""
    M, N, V = z.shape
    p = V
    s = (a + b) % p                                                                # (N,) residue of each pair
    is_add = (y == s).all(-1) if y.dim() == 2 else (y == s).all().expand(M)        # (M,) labels are a + b
    if valid is not None:
        is_add = is_add & valid.all(1)
    rows = residue_table(a, b, p)                                                  # (p, p)
    zbar = z[:, rows.reshape(-1)].view(M, p, p, V).mean(2)                         # (M, p, V) mean per residue
    ang = (2 * math.pi / p) * ((key_freqs[:, :, None] * torch.arange(p, device=z.device)) % p).to(torch.float64)
    basis = torch.cat([ang.cos(), ang.sin()], 1)                                   # (M, 2k, p) over residues
    basis = basis / basis.norm(dim=2, keepdim=True).clamp_min(1e-12)               # sin of w = p/2 is 0: stays 0
    basis = basis.to(z.dtype)
    key = torch.bmm(basis.transpose(1, 2), torch.bmm(basis, zbar))                 # (M, p, V) P_{S_key}, per residue
    restricted = zbar.mean(1, keepdim=True) + key                                  # (M, p, V) P_S, per residue
    labels = torch.arange(p, device=z.device)                                      # residue s's answer is s
    _, st = K.loss_and_stats(restricted, labels, tau, None, backend=backend, loss=loss, kind=kind, check_kind=False)
    count = torch.ones(M, N, dtype=torch.float64, device=z.device) if valid is None else valid.to(torch.float64)
    count = count.new_zeros(M, p).index_add_(1, s, count)                          # (M, p) each residue's pairs
    r_loss = (st.row_loss.to(torch.float64) * count).sum(1) / count.sum(1)
    e_loss, _ = K.loss_and_stats(z - key[:, s], y, tau, train_mask, backend=backend, loss=loss, kind=kind,
                                 check_kind=False)
    nan = torch.full_like(r_loss, float("nan"))
    return torch.where(is_add, r_loss, nan), torch.where(is_add, e_loss.to(torch.float64), nan)
