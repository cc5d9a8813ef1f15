"""The PyTorch reference twins (kernels/reference.py) against hand-computed float64 values.

CE: loss and gradient vs torch.autograd through float64 torch.nn.functional.cross_entropy(z/τ), model
by model (mean over masked rows, 0 for a model with none). MSE: vs autograd of Σ_v (z/τ − onehot)²
averaged over masked rows. Per-model kinds (0 CE, 1 StableMax CE, 2 MSE): vs autograd of each model's
own float64 formula, StableMax written from the paper (S(x) = x + 1 for x >= 0, 1/(1 − x) below; −log p_y);
row_loss vs the per-row formula on every row. kind=None is the code from before kinds, bit for bit (a
verbatim copy below). Readouts on hand-made rows. Clamp: hand-made segments. Tolerances: 1e-12 relative
for float64 input (the same math in another order); 1e-5 for float32 input.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastgrok.kernels as K
from fastgrok.kernels.reference import (clamp_flat_reference_, clamp_list_reference_, tempered_ce_reference,
                                        tempered_mse_reference)

from loss_formulas import (ROWS_BY_KIND, autograd_per_model, ce_rows, mse_rows, stablemax_rows,
                           stablemax_saturated_inputs)

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
    want_loss, want_grad = autograd_per_model(z, y, tau, mask, ce_rows)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 / min(TAUS))
    if mask is not None:
        assert bool((grad[~mask] == 0).all()), "rows outside the mask get no gradient"


@pytest.mark.parametrize("M, N, V, kw", CASES)
def test_mse_reference_matches_autograd(M, N, V, kw):
    z, y, tau, mask = _inputs(M, N, V, seed=2, **kw)
    loss, grad, correct, collapsed, norm, _ = tempered_mse_reference(z, y, tau, mask)
    want_loss, want_grad = autograd_per_model(z, y, tau, mask, mse_rows)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 / min(TAUS))
    ce = tempered_ce_reference(z, y, tau, mask)                 # readouts are the CE twin's
    assert torch.equal(correct, ce[2]) and torch.equal(collapsed, ce[3]) and torch.equal(norm, ce[4])


KIND_CASES = [
    pytest.param(3, 7, 2, dict(mask_kind=None), [1, 0, 2], torch.int64, id="V2-nomask"),
    pytest.param(5, 23, 59, dict(labels_2d=True), [0, 1, 2, 1, 1], torch.int32, id="V59-all-taus-y2d"),
    pytest.param(5, 13, 97, dict(scale=1e4), [1, 1, 1, 1, 1], torch.int64, id="V97-stablemax-1e4-all-taus"),
    pytest.param(3, 17, 113, dict(mask_kind="empty_model", scale=30.0), [2, 0, 1], torch.int32, id="V113-emptymodel"),
    pytest.param(5, 9, 1000, dict(labels_2d=True, scale=1e4), [1, 2, 0, 1, 2], torch.int64, id="V1000-1e4"),
]


@pytest.mark.parametrize("M, N, V, kw, kinds, kdt", KIND_CASES)
def test_kinds_reference_matches_autograd(M, N, V, kw, kinds, kdt):
    """Loss, gradient and row_loss of each model's kind against autograd of its float64 formula."""
    z, y, tau, mask = _inputs(M, N, V, seed=6, **kw)
    kind = torch.tensor(kinds, dtype=kdt)
    loss, grad, correct, collapsed, norm, row = tempered_ce_reference(z, y, tau, mask, kind)
    want_loss, want_grad, want_row = autograd_per_model(z, y, tau, mask, [ROWS_BY_KIND[k] for k in kinds],
                                                         with_rows=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12 / min(TAUS))
    torch.testing.assert_close(row, want_row, rtol=1e-12, atol=1e-12)       # every row, masked-out too
    if mask is not None:
        assert bool((grad[~mask] == 0).all()), "rows outside the mask get no gradient"
    ce = tempered_ce_reference(z, y, tau, mask)                 # readouts are softmax's whatever the kind
    assert torch.equal(correct, ce[2]) and torch.equal(collapsed, ce[3]) and torch.equal(norm, ce[4])


def test_stablemax_hand_computed():
    """s = (0.5, −1), y = 0: S = (1.5, 0.5), p_y = 3/4, loss = log(4/3); S' = (1, 1/4), Σ S = 2:
    dL/ds = (1/2 − 1/1.5, (1/4)/2) = (−1/6, 1/8); τ = 2 halves it (z = 2 s)."""
    z = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    loss, grad, *_, row = tempered_ce_reference(z, torch.tensor([0]), torch.tensor([2.0], dtype=torch.float64),
                                                None, torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(4 / 3), rel=1e-14) and row.item() == loss.item()
    assert grad[0, 0].tolist() == pytest.approx([-1 / 12, 1 / 16], rel=1e-14)


def test_stablemax_float32_keeps_the_correct_class_gradient_when_saturated():
    """Where p_y rounds to 1 in float32, the float32 twin's StableMax loss, rows and gradient (the correct
    class's included) still equal float64 autograd of the paper's formula to float32 rounding; the naive
    float32 form 1/Σ − 1/S(s_y) would give that gradient as exactly 0 (checked: the test can fail)."""
    z, y = stablemax_saturated_inputs()
    M, N, V = z.shape
    tau = torch.ones(M, dtype=torch.float64)
    kind = torch.ones(M, dtype=torch.int64)
    want_loss, want_grad, want_row = autograd_per_model(z, y, tau, None, [stablemax_rows] * M, with_rows=True)
    s32 = z.float()
    S = torch.where(s32 >= 0, s32 + 1, 1 / (1 - s32.clamp(max=0)))
    naive = 1 / S.sum(-1) - 1 / S.gather(-1, y.expand(M, N)[..., None])[..., 0]
    assert bool((naive == 0).all()), "inputs not saturated in float32"
    loss, grad, *_, row = tempered_ce_reference(z.float(), y, tau.float(), None, kind)
    on_y = F.one_hot(y, V).bool().expand(M, N, V)
    assert bool((want_grad[on_y] < 0).all()) and bool((grad[on_y] < 0).all())
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(row.double(), want_row, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kind_none_is_the_code_before_kinds(dtype):
    """kind=None: bit for bit the twins as they were before kinds (copied below), but the loss, summed over
    the rows since 2026-12-07 in `row_sum`'s fixed order (equal to the old sum to rounding); a kind tensor
    of all 0 (all 2) gives the CE (MSE) twin's outputs bit for bit too."""
    from fastgrok.kernels.reference import _row_weights, row_sum
    z, y, tau, mask = _inputs(3, 21, 59, seed=7, labels_2d=True, scale=30.0)
    z, tau = z.to(dtype), tau.to(dtype)
    for fn, before, code in ((tempered_ce_reference, _ce_before_kinds, 0),
                             (tempered_mse_reference, _mse_before_kinds, 2)):
        out, old = fn(z, y, tau, mask), before(z, y, tau, mask)
        for a, b in zip(out[1:], old[1:]):
            assert torch.equal(a, b)
        w = _row_weights(mask, 3, 21, out[5].dtype, z.device)
        assert torch.equal(out[0], row_sum(out[5] * w))             # the rows' losses, weighted, in one order
        torch.testing.assert_close(out[0], old[0], rtol=1e-13 if dtype == torch.float64 else 1e-6, atol=0)
        same = tempered_ce_reference(z, y, tau, mask, torch.full((3,), code))
        for a, b in zip(out, same):
            assert torch.equal(a, b)
    ce = tempered_ce_reference(z, y, tau, mask)                 # row_loss: the per-row formula
    mse = tempered_mse_reference(z, y, tau, mask)
    s = z.double() / tau.double()[:, None, None]
    want_ce = torch.stack([ce_rows(s[m], y[m]) for m in range(3)])
    want_mse = torch.stack([mse_rows(s[m], y[m]) for m in range(3)])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert ce[5].dtype == mse[5].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ce[5].double(), want_ce, **tol)
    torch.testing.assert_close(mse[5].double(), want_mse, **tol)


def _ce_before_kinds(logits, labels, tau, mask=None):
    """tempered_ce_reference as it was before loss kinds (commit 35d9d83), verbatim but for the name."""
    from fastgrok.kernels.reference import _labels_2d, _row_weights, working_dtype
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


def _mse_before_kinds(logits, labels, tau, mask=None):
    """tempered_mse_reference as it was before loss kinds (commit 35d9d83), verbatim but for the name."""
    from fastgrok.kernels.reference import _labels_2d, _row_weights, working_dtype
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


def test_kinds_float32_close_to_float64():
    z, y, tau, mask = _inputs(3, 31, 97, seed=8, labels_2d=True, scale=5.0)
    tau = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64)
    kind = torch.tensor([1, 2, 1], dtype=torch.int32)
    l32, g32, c32, _, n32, r32 = tempered_ce_reference(z.float(), y, tau.float(), mask, kind)
    l64, g64, c64, _, n64, r64 = tempered_ce_reference(z.float().double(), y, tau.float().double(), mask, kind)
    assert l32.dtype == g32.dtype == r32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r32.double(), r64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-7)
    assert torch.equal(c32, c64)


def test_ce_reference_float32_close_to_float64():
    z, y, tau, mask = _inputs(3, 31, 97, seed=3, labels_2d=True, scale=5.0)
    tau = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64)
    l32, g32, c32, _, n32, _ = tempered_ce_reference(z.float(), y, tau.float(), mask)
    l64, g64, c64, _, n64, _ = tempered_ce_reference(z.float().double(), y, tau.float().double(), mask)
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
    _, _, correct, collapsed, norm, _ = tempered_ce_reference(z, y, tau, None)
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
    ref_loss, ref_grad, ref_correct, ref_coll, ref_norm, ref_row = tempered_ce_reference(z, y, tau, mask)
    want_loss, want_grad = autograd_per_model(z.double(), y, tau.double(), mask, ce_rows)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(zz.grad, ref_grad * c[:, None, None] + 2, rtol=0, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    torch.testing.assert_close(zz.grad.double(), want_grad * c.double()[:, None, None] + 2, **tol)
    assert torch.equal(zz.detach(), z)
    assert torch.equal(st.correct, ref_correct) and torch.equal(st.collapsed, ref_coll)
    assert torch.equal(st.row_loss, ref_row)
    assert not st.logit_norm.requires_grad and not st.row_loss.requires_grad


def test_loss_and_grad_torch_backend_is_the_twin():
    z, y, tau, mask = _inputs(2, 11, 97, seed=5)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="torch")
    ref = tempered_ce_reference(z, y, tau, mask)
    assert torch.equal(loss, ref[0]) and torch.equal(dz, ref[1]) and torch.equal(st.correct, ref[2])
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="torch", loss="mse")
    ref = tempered_mse_reference(z, y, tau, mask)
    assert torch.equal(loss, ref[0]) and torch.equal(dz, ref[1]) and torch.equal(st.row_loss, ref[5])
    kind = torch.tensor([1, 2], dtype=torch.int32)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="torch", kind=kind)
    ref = tempered_ce_reference(z, y, tau, mask, kind)
    assert torch.equal(loss, ref[0]) and torch.equal(dz, ref[1]) and torch.equal(st.row_loss, ref[5])


def test_tempered_cross_entropy_torch_autograd_with_kinds():
    z, y, tau, mask = _inputs(3, 19, 59, seed=9, labels_2d=True)
    kind = torch.tensor([2, 1, 0])
    c = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    loss, st = K.tempered_cross_entropy(zz, y, tau, mask, backend="torch", kind=kind)
    (loss * c).sum().backward()
    ref = tempered_ce_reference(z, y, tau, mask, kind)
    assert torch.equal(loss.detach(), ref[0]) and torch.equal(st.row_loss, ref[5])
    torch.testing.assert_close(zz.grad, ref[1] * c[:, None, None], rtol=0, atol=0)


def test_loss_and_stats_row_loss_gives_the_loss_over_other_rows():
    """One pass, two splits: the masked mean of row_loss over ~mask is loss_and_stats over ~mask."""
    z, y, tau, mask = _inputs(4, 25, 59, seed=10, labels_2d=True)
    kind = torch.tensor([0, 1, 2, 1])
    for kw in (dict(kind=kind), dict(loss="mse"), dict()):
        train, st = K.loss_and_stats(z, y, tau, mask, backend="torch", **kw)
        test, _ = K.loss_and_stats(z, y, tau, ~mask, backend="torch", **kw)
        rows = (~mask).double()
        torch.testing.assert_close((st.row_loss * rows).sum(1) / rows.sum(1), test, rtol=1e-12, atol=0)
        rows = mask.double()
        torch.testing.assert_close((st.row_loss * rows).sum(1) / rows.sum(1), train, rtol=1e-12, atol=0)


BAD_KINDS = [
    pytest.param(lambda M: torch.zeros(M + 1, dtype=torch.int64), "kind must be \\(M,\\)", id="too-long"),
    pytest.param(lambda M: torch.zeros(M, 1, dtype=torch.int64), "kind must be \\(M,\\)", id="2d"),
    pytest.param(lambda M: torch.zeros(M), "kind must be int32/int64", id="float"),
    pytest.param(lambda M: torch.zeros(M, dtype=torch.bool), "kind must be int32/int64", id="bool"),
    pytest.param(lambda M: torch.zeros(M, dtype=torch.int16), "kind must be int32/int64", id="int16"),
    pytest.param(lambda M: torch.tensor([0, 3, 1][:M]), "kind codes must be 0", id="code-3"),
    pytest.param(lambda M: torch.tensor([-1, 0, 2][:M], dtype=torch.int32), "kind codes must be 0", id="code-neg"),
]


@pytest.mark.parametrize("make, match", BAD_KINDS)
def test_bad_kind_raises(make, match):
    z, y, tau, mask = _inputs(3, 5, 7, seed=11)
    kind = make(3)
    with pytest.raises(ValueError, match=match):
        K.loss_and_grad(z, y, tau, mask, backend="torch", kind=kind)
    with pytest.raises(ValueError, match=match):
        K.loss_and_stats(z, y, tau, mask, backend="torch", kind=kind)
    with pytest.raises(ValueError, match=match):
        K.tempered_cross_entropy(z, y, tau, mask, backend="torch", kind=kind)


def test_loss_string_and_kind_checked():
    z, y, tau, mask = _inputs(2, 5, 7, seed=12)
    with pytest.raises(ValueError, match="not both"):
        K.loss_and_grad(z, y, tau, mask, backend="torch", loss="mse", kind=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="loss must be one of"):
        K.loss_and_stats(z, y, tau, mask, backend="torch", loss="stablemax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lse_and_softmax_compiled_is_the_two_calls(dtype):
    """The compiled twin's logsumexp and softmax from one exp pass (`_lse_and_softmax`) have the bits of
    torch.logsumexp and torch.softmax compiled, for odd V, huge logits, a row with -inf and one at +inf."""
    from fastgrok.kernels.reference import _lse_and_softmax
    g = torch.Generator().manual_seed(5)
    two = torch.compile(lambda s: (torch.logsumexp(s, -1), torch.softmax(s, -1)), fullgraph=True)
    one = torch.compile(_lse_and_softmax, fullgraph=True)
    for shape, scale in [((3, 50, 97), 1.0), ((2, 31, 113), 1e3), ((4, 10, 7), 30.0), ((2, 9, 59), 1e30)]:
        s = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        s[0, 0, 3] = -math.inf
        s[1, 1, :] = -math.inf
        s[1, 2, 0] = math.inf
        for a, b in zip(two(s), one(s)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def test_row_sum_compiled_is_the_eager_sum_for_any_batch():
    """row_sum: compiled (the fastgrok::row_sum operator) bit for bit eager; a model's sum the same alone
    and in a batch; zero rows appended change no bit; the sum to float64 rounding; its gradient all ones."""
    from fastgrok.kernels.reference import row_sum
    g = torch.Generator().manual_seed(8)
    for shape in ((3, 700), (4, 3481, 5), (2, 17)):
        x = torch.randn(*shape, generator=g) * 10
        eager = row_sum(x)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(row_sum, fullgraph=True)(x), eager)
        assert torch.equal(row_sum(x[1:2]), eager[1:2])
        assert torch.equal(row_sum(torch.cat([x, torch.zeros_like(x[:, :300])], 1)), eager)
        torch.testing.assert_close(eager.double(), x.double().sum(1), rtol=1e-5, atol=1e-3)
    x = torch.randn(2, 300, 3, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.ops.fastgrok.row_sum(x).sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
