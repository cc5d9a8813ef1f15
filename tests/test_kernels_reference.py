"""The PyTorch reference twins (kernels/reference.py) against hand-computed float64 values.

CE: loss and gradient vs torch.autograd through float64 torch.nn.functional.cross_entropy(z/τ), model
by model (mean over masked rows, 0 for a model with none). MSE: vs autograd of Σ_v (z/τ − onehot)²
averaged over masked rows. Readouts on hand-made rows. Clamp: hand-made segments. Tolerances: 1e-12
relative for float64 input (the same math in another order); 1e-5 for float32 input.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastgrok.kernels as K
from fastgrok.kernels.reference import (clamp_flat_reference_, clamp_list_reference_, tempered_ce_reference,
                                        tempered_mse_reference)

TAUS = (1e-3, 0.5, 1.0, 1.7, 1e3)


def _inputs(M, N, V, seed, scale=3.0, labels_2d=False, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, N, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (M, N) if labels_2d else (N,), generator=g)
    tau = torch.tensor([TAUS[m % len(TAUS)] for m in range(M)], dtype=torch.float64)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(M, N, generator=g) < 0.6
        if mask_kind == "empty_model":
            mask[-1] = False
    return z, y, tau, mask


def _autograd_per_model(z, y, tau, mask, row_loss):
    """Loss (M,) and d(Σ loss)/dz by autograd; row_loss(s, y) -> per-row losses for one model."""
    M, N, V = z.shape
    zz = z.detach().clone().requires_grad_(True)
    y2 = y.expand(M, N) if y.dim() == 1 else y
    losses = []
    for m in range(M):
        rows = torch.ones(N, dtype=torch.bool) if mask is None else mask[m]
        per_row = row_loss(zz[m] / tau[m], y2[m])                            # (N,)
        losses.append((per_row * rows).sum() / max(int(rows.sum()), 1))
    loss = torch.stack(losses)
    (grad,) = torch.autograd.grad(loss.sum(), zz)
    return loss.detach(), grad


def _ce_rows(s, y):
    return F.cross_entropy(s, y, reduction="none")


def _mse_rows(s, y):
    return ((s - F.one_hot(y, s.shape[-1]).to(s.dtype)) ** 2).sum(-1)


CASES = [
    pytest.param(1, 7, 2, dict(mask_kind=None), id="V2-M1-nomask"),
    pytest.param(5, 23, 59, dict(labels_2d=True), id="V59-M5-all-taus"),
    pytest.param(3, 17, 113, dict(mask_kind="empty_model", scale=30.0), id="V113-emptymodel"),
    pytest.param(2, 9, 1000, dict(labels_2d=True, scale=1e4), id="V1000-1e4"),
]


@pytest.mark.parametrize("M, N, V, kw", CASES)
def test_ce_reference_matches_autograd(M, N, V, kw):
    z, y, tau, mask = _inputs(M, N, V, seed=1, **kw)
    loss, grad, *_ = tempered_ce_reference(z, y, tau, mask)
    want_loss, want_grad = _autograd_per_model(z, y, tau, mask, _ce_rows)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 / min(TAUS))
    if mask is not None:
        assert bool((grad[~mask] == 0).all()), "rows outside the mask get no gradient"


@pytest.mark.parametrize("M, N, V, kw", CASES)
def test_mse_reference_matches_autograd(M, N, V, kw):
    z, y, tau, mask = _inputs(M, N, V, seed=2, **kw)
    loss, grad, correct, collapsed, norm = tempered_mse_reference(z, y, tau, mask)
    want_loss, want_grad = _autograd_per_model(z, y, tau, mask, _mse_rows)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 / min(TAUS))
    ce = tempered_ce_reference(z, y, tau, mask)                 # readouts are the CE twin's
    assert torch.equal(correct, ce[2]) and torch.equal(collapsed, ce[3]) and torch.equal(norm, ce[4])


def test_ce_reference_float32_close_to_float64():
    z, y, tau, mask = _inputs(3, 31, 97, seed=3, labels_2d=True, scale=5.0)
    tau = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64)
    l32, g32, c32, _, n32 = tempered_ce_reference(z.float(), y, tau.float(), mask)
    l64, g64, c64, _, n64 = tempered_ce_reference(z.float().double(), y, tau.float().double(), mask)
    assert l32.dtype == torch.float32 and g32.dtype == torch.float32 and n32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(n32.double(), n64, rtol=1e-5, atol=0)
    assert torch.equal(c32, c64)


def test_readouts_hand_made():
    # rows: [1, 3, 3, 0] -- a tie, first maximum (index 1) wins
    z = torch.tensor([[[1.0, 3.0, 3.0, 0.0],      # y = 1: correct (first max)
                       [1.0, 3.0, 3.0, 0.0],      # y = 2: not correct (tie, later index)
                       [100.0, 0.0, 0.0, 0.0],    # y = 0: p_y = 1 exactly in float32 (exp(-100) ~ 4e-44)
                       [4.0, 0.0, 0.0, 0.0],      # y = 0: s = (8, 0, 0, 0), p_y = 1/(1 + 3e^-8) < 1
                       [3.0, 4.0, 0.0, 0.0]]])    # y = 0: not correct; ||s|| = 5 / τ
    y = torch.tensor([1, 2, 0, 0, 0])
    tau = torch.tensor([0.5])
    _, _, correct, collapsed, norm = tempered_ce_reference(z, y, tau, None)
    assert correct.tolist() == [[True, False, True, True, False]]
    assert collapsed.tolist() == [[False, False, True, False, False]]
    assert norm[0, 4].item() == pytest.approx(10.0, rel=1e-7)
    want = torch.linalg.vector_norm(z[0].double() / 0.5, dim=-1)
    torch.testing.assert_close(norm[0].double(), want, rtol=1e-6, atol=0)


def test_collapsed_depends_on_working_precision():
    """exp(-30) ~ 9e-14: below float32's half-ulp of 1 (6e-8), above float64's (1.1e-16)."""
    z = torch.tensor([[[30.0, 0.0], [40.0, 0.0]]])
    y = torch.tensor([0, 0])
    tau = torch.tensor([1.0])
    c32 = tempered_ce_reference(z, y, tau, None)[3]
    c64 = tempered_ce_reference(z.double(), y, tau.double(), None)[3]
    assert c32.tolist() == [[True, True]]
    assert c64.tolist() == [[False, True]]


def test_loss_hand_computed():
    """One row, V = 2, τ = 2: loss = log(1 + e^{(z1 - z0)/τ}), dz0 = (σ − 1)/τ, dz1 = (1 − σ)/τ."""
    z = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)
    loss, grad, *_ = tempered_ce_reference(z, torch.tensor([0]), torch.tensor([2.0], dtype=torch.float64))
    sig = 1 / (1 + math.exp(1.0))                                 # softmax(s)_0 with s = (0.5, 1.5)
    assert loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-14)
    assert grad[0, 0].tolist() == pytest.approx([(sig - 1) / 2, (1 - sig) / 2], rel=1e-14)


def test_clamp_reference_hand_made():
    flat = torch.tensor([[3.0, 4.0, 0.0, 1.0, 2.0, 2.0, 7.0],
                         [3.0, 4.0, 0.0, 1.0, 2.0, 2.0, 7.0]])
    target = torch.tensor([[10.0, 6.0], [10.0, 6.0]])
    active = torch.tensor([True, False])
    norms = clamp_flat_reference_(flat, [0, 2, 6], target, active)
    assert norms.tolist() == [[5.0, 3.0], [5.0, 3.0]]
    torch.testing.assert_close(flat[0], torch.tensor([6.0, 8.0, 0.0, 2.0, 4.0, 4.0, 7.0]))
    assert flat[1].tolist() == [3.0, 4.0, 0.0, 1.0, 2.0, 2.0, 7.0]     # inactive model untouched


def test_clamp_list_reference_hand_made():
    a = torch.tensor([[[3.0]], [[1.0]]])                 # (M=2, 1, 1)
    b = torch.tensor([[4.0, 0.0], [0.0, 0.0]])           # (M=2, 2)
    norms = clamp_list_reference_([a, b], torch.tensor([1.0, 2.0]))
    assert norms.tolist() == [5.0, 1.0]
    torch.testing.assert_close(a.flatten(), torch.tensor([0.6, 2.0]))
    torch.testing.assert_close(b, torch.tensor([[0.8, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tempered_cross_entropy_torch_autograd(dtype):
    z, y, tau, mask = _inputs(3, 19, 59, seed=4, labels_2d=True)
    z, tau = z.to(dtype), torch.tensor([0.5, 1.0, 1.7], dtype=dtype)
    c = torch.tensor([0.3, 1.0, 2.0], dtype=dtype)
    zz = z.clone().requires_grad_(True)
    loss, st = K.tempered_cross_entropy(zz, y, tau, mask, backend="torch")
    ((loss * c).sum() + (zz * 2).sum()).backward()
    ref_loss, ref_grad, ref_correct, ref_coll, ref_norm = tempered_ce_reference(z, y, tau, mask)
    want_loss, want_grad = _autograd_per_model(z.double(), y, tau.double(), mask, _ce_rows)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(zz.grad, ref_grad * c[:, None, None] + 2, rtol=0, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    torch.testing.assert_close(zz.grad.double(), want_grad * c.double()[:, None, None] + 2, **tol)
    assert torch.equal(zz.detach(), z)
    assert torch.equal(st.correct, ref_correct) and torch.equal(st.collapsed, ref_coll)
    assert not st.logit_norm.requires_grad


def test_loss_and_grad_torch_backend_is_the_twin():
    z, y, tau, mask = _inputs(2, 11, 97, seed=5)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="torch")
    ref = tempered_ce_reference(z, y, tau, mask)
    assert torch.equal(loss, ref[0]) and torch.equal(dz, ref[1]) and torch.equal(st.correct, ref[2])
    loss, dz, _ = K.loss_and_grad(z, y, tau, mask, backend="torch", loss="mse")
    ref = tempered_mse_reference(z, y, tau, mask)
    assert torch.equal(loss, ref[0]) and torch.equal(dz, ref[1])
