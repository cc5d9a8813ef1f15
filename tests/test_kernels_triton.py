"""The Triton kernels (kernels/cross_entropy.py, kernels/norm_clamp.py) against float64 references.

On a machine without CUDA these run real kernels under the Triton interpreter (TRITON_INTERPRET=1, set
in conftest.py), on CPU tensors. Every output buffer the launchers allocate with torch.empty /
torch.empty_like is poisoned (NaN for floats, byte 2 for bools, -1 for ints), so an element a kernel
forgets to write fails the comparison; `test_poison_detects_unwritten_rows` proves it does.

Reference: s = z / τ is the spec's working quantity in float32 (the kernel divides exactly as torch
does, correctly rounded), so the reference starts from s32 = (z.float() / τ.float()) and computes
everything after it (lse, softmax, loss, gradient, norm, readouts) in float64.

Tolerances (float32 output):
    loss      |Δ| <= 1e-5 · (|ref| + max(1, max|s| of the model))   (lse in float32 is exact to ulp(max s))
    grad      |Δ| <= 1e-5 · w/τ of the row (the gradient's scale; rows outside the mask must be exactly 0)
    logit_norm rtol 1e-5
    bf16/fp16 grad: + 2^-7 · |ref| for bf16 (one ulp: the interpreter's fp32->bf16 cast truncates, a GPU
    rounds to nearest), + 2^-11 · |ref| + 2^-24 for fp16 (half an ulp; 2^-24 covers subnormals);
    loss and norm keep the float32 tolerance (the kernel upcasts the exact bf16/fp16 inputs).
Readouts are exact: `correct` on every row (argmax of the same float32 s); `collapsed` on every row
whose r = Σ_{v≠y} exp(s_v − s_y) is outside [2^-27, 2^-20], where any float32 summation order gives the
same answer (r < 2^-27: the sum rounds to 1, p_y == 1; r > 2^-20: p_y < 1). Planted rows (z_y well
above the rest) give clear collapsed cases; few random rows fall in the band (asserted).
row_loss (every row, masked-out ones too) has the loss's tolerance, row by row.
Per-model loss kinds (0 softmax CE, 1 StableMax CE, 2 MSE mixed in one launch): against the float64 twin
run on s32 itself (tau = 1, then dz = dL/ds · w/τ), with the same tolerances but for two: the loss of
kinds 1 and 2 within 1e-5 · (|ref| + 1) (no lse, so no ulp(max s) term), the gradient's scaled by
max(1, |dL/ds|) (MSE's dL/ds = 2(s − onehot) grows with s). kind=None is bit for bit kind = all 0.
Clamp: norms rtol 1e-6 vs float64; after the clamp each active segment's float64 norm equals its target
within 1e-6 relative (bf16: 2^-8); inactive models and columns outside the segments bit-for-bit equal.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fastgrok.kernels as K  # noqa: E402
from fastgrok.kernels import cross_entropy as ce_mod  # noqa: E402
from fastgrok.kernels import norm_clamp as nc_mod  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_runs_runtime_loops() -> bool:
    """Whether the Triton interpreter runs `for i in range(0, n, step)` over a runtime `n` (both kernels do).

    triton 3.6's interpreter makes `n` a Python int by int() of a 1-element array, which numpy >= 2.3
    refuses (TypeError); triton 3.9's does not. Kernels compiled for a GPU are unaffected.
    """
    if DEV == "cuda":
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, 0))
    x, out = torch.arange(1.0, 11.0), torch.empty(1)
    try:
        _loop_sum[(1,)](x, out, 10, BLOCK=4)
    except Exception:       # the interpreter's InterpreterError around numpy's TypeError
        return False
    return float(out) == 55.0


pytestmark = pytest.mark.skipif(
    not _interpreter_runs_runtime_loops(),
    reason="this triton's interpreter cannot run the kernels' loops with this numpy "
           "(triton 3.6 needs numpy < 2.3: pip install 'numpy<2.3'); a GPU compiles them fine")
TAUS = (1e-3, 0.5, 1.0, 1.7, 1e3)
RTOL = 1e-5
# one output rounding: bf16 gets a whole ulp (2^-7) because the interpreter's fp32->bf16 cast truncates
# (a GPU rounds to nearest, half an ulp); fp16 half an ulp (numpy rounds to nearest)
LOW_PRECISION_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -11}


# --------------------------------------------------------------------------------------------------
# Poisoned allocation
# --------------------------------------------------------------------------------------------------

def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        t.view(torch.uint8).fill_(2)          # neither False (0) nor True (1)
        return t
    return t.fill_(-1)


class _PoisonTorch:
    """Stands in for `torch` inside a kernel module: empty/empty_like hand out poisoned buffers."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, *a, **k):
        return _poison(self._real.empty(*a, **k))

    def empty_like(self, *a, **k):
        return _poison(self._real.empty_like(*a, **k))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(ce_mod, "torch", _PoisonTorch(torch))
    monkeypatch.setattr(nc_mod, "torch", _PoisonTorch(torch))


def _assert_bool_written(t: torch.Tensor, name: str):
    assert t.dtype == torch.bool
    raw = t.view(torch.uint8)
    assert int(raw.max()) <= 1, f"{name}: {int((raw > 1).sum())} elements never written"


# --------------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------------

def _make_ce_inputs(M, N, V, scale, dtype, labels_2d, mask_kind, seed, tau_shift=0):
    g = torch.Generator().manual_seed(seed)
    tau = torch.tensor([TAUS[(m + tau_shift) % len(TAUS)] for m in range(M)], dtype=torch.float32)
    z = torch.randn(M, N, V, generator=g).clamp(-3, 3) * (scale / 3)          # |z| <= scale
    y2 = torch.randint(0, V, (M, N), generator=g)
    y = y2 if labels_2d else y2[0]
    y2 = y.expand(M, N)
    # plant clear collapsed rows: z_y well above the row max (>= 30 in s even after bf16 rounding)
    rows = torch.arange(N) % 4 == 0
    zmax = z.amax(-1)                                                           # (M, N)
    lift = torch.maximum(60 * tau[:, None], 0.05 * zmax.abs())
    zy = z.gather(-1, y2[..., None])[..., 0]
    z.scatter_(-1, y2[..., None], torch.where(rows, zmax + lift, zy)[..., None])
    # plant exact ties with the label: first max wins (a tie before y -> not correct, after -> correct)
    if V > 2 and N > 2:
        for n in (1, 2):
            for m in range(M):
                yy = int(y2[m, n])
                other = (yy + V // 2) % V if n == 1 else (yy + 1) % V    # far (another V block) / next
                top = z[m, n].max() + 1.0
                z[m, n, yy] = top
                z[m, n, other] = top
    z = z.to(dtype)
    if mask_kind is None:
        mask = None
    else:
        mask = torch.rand(M, N, generator=g) < 0.7
        if mask_kind == "empty_model":
            mask[M // 2] = False                    # a whole model with no masked row
        mask[:, N - 1] = False                      # a row masked out in every model
    if labels_2d:
        y = y.to(torch.int32)
    return z, y, tau, mask


def _ce_reference64(z, y, tau, mask):
    """float64 from s32 = fl32(z / τ): (loss, grad, correct, collapsed, norm, ambiguous, scale, coef)."""
    M, N, V = z.shape
    t32 = tau.float()
    s = (z.float() / t32[:, None, None]).double()                             # (M, N, V)
    y2 = (y if y.dim() == 2 else y.expand(M, N)).long()
    if mask is None:
        w = torch.full((M, N), 1.0 / N, dtype=torch.float64)
    else:
        mk = mask.double()
        w = mk / mk.sum(1, keepdim=True).clamp_min(1.0)
    lse = torch.logsumexp(s, -1)
    s_y = s.gather(-1, y2[..., None])[..., 0]
    row = lse - s_y
    loss = (row * w).sum(1)
    onehot = torch.nn.functional.one_hot(y2, V).double()
    coef = w / t32.double()[:, None]                                            # (M, N)
    grad = (torch.softmax(s, -1) - onehot) * coef[..., None]
    correct = s.argmax(-1) == y2
    r = torch.where(onehot.bool(), 0.0, torch.exp(s - s_y[..., None])).sum(-1)
    collapsed = r < 2.0 ** -27
    ambiguous = (r >= 2.0 ** -27) & (r <= 2.0 ** -20)
    norm = s.norm(dim=-1)
    scale = s.abs().amax((1, 2)).clamp_min(1.0)                                 # (M,)
    return loss, grad, correct, collapsed, norm, ambiguous, scale, coef, row


def _check_once(M, N, V, *, scale=30.0, dtype=torch.float32, labels_2d=False, mask_kind="random",
                block_n=None, block_v=None, seed=0, tau_shift=0, noncontiguous=False):
    z, y, tau, mask = _make_ce_inputs(M, N, V, scale, dtype, labels_2d, mask_kind, seed, tau_shift)
    if noncontiguous:
        z = z.transpose(0, 1).contiguous().transpose(0, 1)                      # same values, (N, M, V) memory
    z, y, tau = z.to(DEV), y.to(DEV), tau.to(DEV)
    mask = None if mask is None else mask.to(DEV)
    z_before = z.clone()
    loss, grad, correct, collapsed, norm, row = ce_mod.tempered_ce_triton(z, y, tau, mask, block_n=block_n,
                                                                          block_v=block_v)
    assert torch.equal(z, z_before), "the kernel wrote into the logits"
    assert grad.data_ptr() != z.data_ptr()
    assert loss.shape == (M,) and loss.dtype == torch.float32
    assert row.shape == (M, N) and row.dtype == torch.float32
    assert grad.shape == (M, N, V) and grad.dtype == dtype and grad.is_contiguous()
    _assert_bool_written(correct, "correct")
    _assert_bool_written(collapsed, "collapsed")
    loss, grad, correct, collapsed, norm, row = (t.cpu() for t in (loss, grad, correct, collapsed, norm, row))
    r_loss, r_grad, r_correct, r_coll, r_norm, ambiguous, s_scale, coef, r_row = _ce_reference64(
        z.cpu(), y.cpu(), tau.cpu(), None if mask is None else mask.cpu())

    # loss: float32 tolerance relative to the scale of s
    err = (loss.double() - r_loss).abs()
    tol = RTOL * (r_loss.abs() + s_scale)
    assert bool((err <= tol).all()), f"loss err {err.tolist()} > tol {tol.tolist()}"
    # row_loss: every row (masked-out ones too), the same tolerance row by row
    err = (row.double() - r_row).abs()
    assert bool((err <= RTOL * (r_row.abs() + s_scale[:, None])).all()), f"row_loss err up to {float(err.max()):.3g}"
    if mask is not None:
        empty = ~mask.cpu().any(1)
        assert bool((loss[empty] == 0).all()), "a model with no masked row must have loss 0"
    # gradient: relative to its row scale w/τ, plus one rounding of a low-precision output
    g = grad.double()
    assert bool(torch.isfinite(g).all()), "gradient has NaN/inf (unwritten or overflow)"
    tol = RTOL * coef[..., None] + LOW_PRECISION_RTOL[dtype] * r_grad.abs()
    if dtype == torch.float16:
        tol = tol + 2.0 ** -24
    err = (g - r_grad).abs()
    bad = err > tol
    assert not bool(bad.any()), f"{int(bad.sum())} grad elements off, worst excess {float((err - tol).max()):.3g}"
    # readouts
    assert torch.equal(correct, r_correct), f"correct differs on {int((correct != r_correct).sum())} rows"
    clear = ~ambiguous
    assert int(ambiguous.sum()) <= max(1, M * N // 10), f"{int(ambiguous.sum())} rows near the collapse boundary"
    assert torch.equal(collapsed[clear], r_coll[clear]), \
        f"collapsed differs on {int((collapsed[clear] != r_coll[clear]).sum())} rows"
    assert bool(r_coll.any()) and bool((~r_coll).any()), "the case should hold collapsed and non-collapsed rows"
    torch.testing.assert_close(norm.double(), r_norm, rtol=RTOL, atol=0)


CE_CASES = [
    # (M, N, V, kwargs) -- each V, M, τ, dtype, label form and mask kind appears somewhere
    pytest.param(1, 5, 2, dict(scale=3.0, mask_kind=None, tau_shift=2), id="V2-M1-nomask"),
    pytest.param(3, 37, 59, dict(scale=30.0, labels_2d=True, mask_kind="empty_model"), id="V59-M3-y2d-emptymodel"),
    pytest.param(16, 19, 97, dict(scale=1e4, mask_kind="random"), id="V97-M16-all-taus-1e4"),
    pytest.param(3, 50, 113, dict(scale=30.0, dtype=torch.bfloat16, labels_2d=True, tau_shift=1), id="V113-bf16"),
    pytest.param(3, 33, 113, dict(scale=20.0, dtype=torch.float16, block_n=8, tau_shift=1), id="V113-fp16-8rows"),
    pytest.param(3, 23, 1000, dict(scale=1e4, labels_2d=True, mask_kind="empty_model", tau_shift=3),
                 id="V1000-1e4-emptymodel"),
    pytest.param(3, 21, 4099, dict(scale=100.0, tau_shift=1), id="V4099-cpu-tile-looped"),
    pytest.param(2, 13, 4099, dict(scale=1e4, dtype=torch.bfloat16, block_n=4, block_v=1024, tau_shift=0),
                 id="V4099-bf16-looped-1024"),
    pytest.param(2, 7, 4099, dict(scale=30.0, block_n=1, block_v=8192, labels_2d=True, tau_shift=3),
                 id="V4099-gpu-tile-single"),
    pytest.param(3, 300, 59, dict(scale=5.0, block_n=64, block_v=64, mask_kind=None, tau_shift=1),
                 id="V59-gpu-tile-nomask"),
    pytest.param(3, 29, 97, dict(scale=1e4, block_n=8, block_v=32, labels_2d=True, tau_shift=0),
                 id="V97-looped-tail-1e4"),
    pytest.param(3, 11, 59, dict(scale=30.0, noncontiguous=True, tau_shift=2), id="V59-noncontiguous"),
]


@pytest.mark.parametrize("M, N, V, kw", CE_CASES)
def test_tempered_ce_matches_float64(M, N, V, kw):
    _check_once(M, N, V, **kw)


def test_poison_detects_unwritten_rows(monkeypatch):
    """With the grid one program short, the last model's last rows stay poisoned and the check must fail."""
    real = ce_mod._tempered_ce_kernel

    class _Short:
        def __getitem__(self, grid):
            return real[(grid[0] - 1,)]

    monkeypatch.setattr(ce_mod, "_tempered_ce_kernel", _Short())
    with pytest.raises(AssertionError):
        _check_once(2, 20, 59, block_n=8)


def _model_weights(M, seed):
    return torch.rand(M, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_autograd_gradient_and_logits_untouched():
    """tempered_cross_entropy(backend="triton"): d/dz of Σ c_m loss_m + Σ 2z equals c·ref + 2."""
    z, y, tau, mask = _make_ce_inputs(3, 31, 97, 30.0, torch.float32, True, "random", seed=5)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    c = _model_weights(3, 6).to(DEV)
    z0 = z.clone()
    zz = z.clone().requires_grad_(True)
    loss, st = K.tempered_cross_entropy(zz, y, tau, mask, backend="triton")
    total = (loss * c).sum() + (zz * 2).sum()             # a second consumer of the logits
    total.backward()
    assert torch.equal(zz.detach(), z0), "logits changed by forward + backward"
    r_loss, r_grad, r_correct, *_, r_row = _ce_reference64(z.cpu(), y.cpu(), tau.cpu(), mask.cpu())
    torch.testing.assert_close(loss.detach().cpu().double(), r_loss, rtol=RTOL, atol=RTOL)
    expected = r_grad * c.cpu().double()[:, None, None] + 2.0
    torch.testing.assert_close(zz.grad.cpu().double(), expected, rtol=RTOL, atol=RTOL)
    assert torch.equal(st.correct.cpu(), r_correct)
    torch.testing.assert_close(st.row_loss.cpu().double(), r_row, rtol=RTOL, atol=RTOL * 1e3)
    assert not st.logit_norm.requires_grad and not st.row_loss.requires_grad


def test_loss_and_grad_dispatch_matches_reference_twin():
    z, y, tau, mask = _make_ce_inputs(2, 17, 59, 10.0, torch.float32, False, "random", seed=8)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="triton")
    r_loss, r_dz, r_st = K.loss_and_grad(z, y, tau, mask, backend="torch")
    torch.testing.assert_close(loss, r_loss, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(dz, r_dz, rtol=RTOL, atol=RTOL * float((1 / tau).max()))
    assert torch.equal(st.correct, r_st.correct) and torch.equal(st.collapsed, r_st.collapsed)


@pytest.mark.parametrize("V, kw", [(59, {}), (97, dict(block_n=4, block_v=32))], ids=["single", "looped"])
def test_readouts_only_equal_the_full_kernel(V, kw):
    """write_grad=False (evaluations): the same loss and readouts, bit for bit, and no gradient buffer;
    loss_and_stats dispatches to it and agrees with the reference twin."""
    z, y, tau, mask = _make_ce_inputs(3, 29, V, 1e3, torch.float32, True, "random", seed=9)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    full = ce_mod.tempered_ce_triton(z, y, tau, mask, **kw)
    part = ce_mod.tempered_ce_triton(z, y, tau, mask, write_grad=False, **kw)
    assert tuple(part[1].shape) == (3, 0, V)
    for i in (0, 2, 3, 4, 5):
        assert torch.equal(full[i], part[i]), i
    loss, st = K.loss_and_stats(z, y, tau, mask, backend="triton")
    r_loss, _, r_st = K.loss_and_grad(z, y, tau, mask, backend="torch")
    torch.testing.assert_close(loss, r_loss, rtol=RTOL, atol=RTOL)
    assert torch.equal(st.correct, r_st.correct) and torch.equal(st.collapsed, r_st.collapsed)
    torch.testing.assert_close(st.logit_norm, r_st.logit_norm, rtol=RTOL, atol=0)
    torch.testing.assert_close(st.row_loss, r_st.row_loss, rtol=RTOL, atol=RTOL * 1e3)


# --------------------------------------------------------------------------------------------------
# Per-model loss kinds
# --------------------------------------------------------------------------------------------------

def _kinds_reference64(z, y, tau, mask, kind):
    """The float64 twin on s32 = fl32(z / τ) itself: (loss, dz, row_loss, dL/ds · w) with dz = that / τ."""
    from fastgrok.kernels.reference import tempered_ce_reference
    s32 = (z.float() / tau.float()[:, None, None]).double()
    loss, dlds_w, *_, row = tempered_ce_reference(s32, y, torch.ones_like(tau, dtype=torch.float64), mask, kind)
    return loss, dlds_w / tau.float().double()[:, None, None], row, dlds_w


def _check_kinds_once(M, N, V, kinds, *, scale=30.0, dtype=torch.float32, labels_2d=False, mask_kind="random",
                      block_n=None, block_v=None, seed=0, tau_shift=0, write_grad=True):
    z, y, tau, mask = _make_ce_inputs(M, N, V, scale, dtype, labels_2d, mask_kind, seed, tau_shift)
    kind = torch.tensor(kinds, dtype=torch.int32 if seed % 2 else torch.int64)
    dz, yd, td, kd = z.to(DEV), y.to(DEV), tau.to(DEV), kind.to(DEV)
    md = None if mask is None else mask.to(DEV)
    out = ce_mod.tempered_ce_triton(dz, yd, td, md, kd, block_n=block_n, block_v=block_v, write_grad=write_grad)
    _assert_bool_written(out[2], "correct")
    _assert_bool_written(out[3], "collapsed")
    loss, grad, correct, collapsed, norm, row = (t.cpu() for t in out)
    r_loss, r_grad, r_row, r_dlds_w = _kinds_reference64(z, y, tau, mask, kind)
    _, _, r_correct, r_coll, r_norm, ambiguous, s_scale, coef, _ = _ce_reference64(z, y, tau, mask)
    # loss and row_loss: float32 tolerance relative to the row and, for softmax CE, to the scale of s (its
    # lse is exact to ulp(max s)); StableMax's log Σ − log S(s_y) and MSE's sum are exact relative to the row
    s_scale = torch.where(kind == 0, s_scale, 1.0)
    err = (loss.double() - r_loss).abs()
    tol = RTOL * (r_loss.abs() + s_scale)
    assert bool((err <= tol).all()), f"loss err {err.tolist()} > tol {tol.tolist()}"
    err = (row.double() - r_row).abs()
    bad = err > RTOL * (r_row.abs() + s_scale[:, None])
    assert not bool(bad.any()), f"row_loss off on {int(bad.sum())} rows (models {bad.any(1).nonzero()[:, 0].tolist()})"
    if mask is not None:
        assert bool((loss[~mask.any(1)] == 0).all()), "a model with no masked row must have loss 0"
    if write_grad:
        g = grad.double()
        assert bool(torch.isfinite(g).all()), "gradient has NaN/inf (unwritten or overflow)"
        dlds = (r_dlds_w / torch.where(coef > 0, coef * tau.double()[:, None], 1.0)[..., None]).abs()
        tol = RTOL * coef[..., None] * dlds.clamp_min(1.0) + LOW_PRECISION_RTOL[dtype] * r_grad.abs()
        if dtype == torch.float16:
            tol = tol + 2.0 ** -24
        err = (g - r_grad).abs()
        bad = err > tol
        assert not bool(bad.any()), \
            f"{int(bad.sum())} grad elements off (models {bad.flatten(1).any(1).nonzero()[:, 0].tolist()})"
    else:
        assert tuple(grad.shape) == (M, 0, V)
    # readouts: softmax's, whatever the kind
    assert torch.equal(correct, r_correct)
    assert torch.equal(collapsed[~ambiguous], r_coll[~ambiguous])
    torch.testing.assert_close(norm.double(), r_norm, rtol=RTOL, atol=0)


KIND_CASES = [
    pytest.param(4, 13, 59, [0, 1, 2, 1], dict(labels_2d=True), id="V59-0121-y2d"),
    pytest.param(5, 11, 97, [1, 2, 0, 1, 2], dict(scale=1e4, block_n=4, block_v=32, seed=1),
                 id="V97-looped-1e4-all-taus"),
    pytest.param(4, 9, 113, [2, 1, 1, 0], dict(mask_kind="empty_model", tau_shift=1, seed=2), id="V113-emptymodel"),
    pytest.param(3, 10, 113, [1, 2, 0], dict(dtype=torch.bfloat16, tau_shift=1, seed=3), id="V113-bf16"),
    pytest.param(3, 7, 59, [2, 0, 1], dict(dtype=torch.float16, scale=20.0, mask_kind=None, tau_shift=2, seed=4),
                 id="V59-fp16-nomask"),
    pytest.param(4, 9, 59, [1, 0, 2, 1], dict(scale=1e4, write_grad=False, seed=5), id="V59-readouts-only"),
    pytest.param(3, 9, 97, [1, 2, 1], dict(scale=3.0, block_n=2, block_v=16, labels_2d=True, tau_shift=2, seed=6),
                 id="V97-looped-small-logits"),
]


@pytest.mark.parametrize("M, N, V, kinds, kw", KIND_CASES)
def test_kinds_match_the_float64_twin(M, N, V, kinds, kw):
    _check_kinds_once(M, N, V, kinds, **kw)


@pytest.mark.parametrize("V, kw", [(59, {}), (97, dict(block_n=4, block_v=32))], ids=["single", "looped"])
def test_kind_none_is_kind_zero_bitwise_and_mse_dispatch(V, kw):
    """kind=None (the softmax-only compile) equals kind = all 0 bit for bit, every output; loss="mse" runs
    the kernel with every model kind 2; one launch of mixed kinds gives each model what a launch of its
    kind alone gives it (models are independent)."""
    z, y, tau, mask = _make_ce_inputs(3, 17, V, 1e3, torch.float32, True, "random", seed=13)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    none = ce_mod.tempered_ce_triton(z, y, tau, mask, **kw)
    for kdt in (torch.int32, torch.int64):
        zero = ce_mod.tempered_ce_triton(z, y, tau, mask, torch.zeros(3, dtype=kdt, device=DEV), **kw)
        for i, (a, b) in enumerate(zip(none, zero)):
            assert torch.equal(a, b), i
    mixed_kind = torch.tensor([2, 0, 1], device=DEV)
    mixed = ce_mod.tempered_ce_triton(z, y, tau, mask, mixed_kind, **kw)
    for code in (0, 1, 2):
        alone = ce_mod.tempered_ce_triton(z, y, tau, mask, torch.full((3,), code, device=DEV), **kw)
        m = int((mixed_kind == code).nonzero()[0, 0])
        for i, (a, b) in enumerate(zip(mixed, alone)):
            assert torch.equal(a[m], b[m]), (code, i)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="triton", loss="mse")
    all2 = ce_mod.tempered_ce_triton(z, y, tau, mask, torch.full((3,), 2, device=DEV), **kw)
    if not kw:                                  # the dispatch uses the default tiles
        assert torch.equal(loss, all2[0]) and torch.equal(dz, all2[1]) and torch.equal(st.row_loss, all2[5])
    r_loss, r_dz, r_st = K.loss_and_grad(z, y, tau, mask, backend="torch", loss="mse")
    torch.testing.assert_close(loss, r_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(st.row_loss, r_st.row_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(dz, r_dz, rtol=RTOL, atol=RTOL * float(r_dz.abs().max()))
    assert torch.equal(st.correct, r_st.correct)


def test_kinds_dispatch_and_autograd():
    """loss_and_grad / loss_and_stats / tempered_cross_entropy with a kind tensor on backend="triton"
    against the twin; bad codes raise before the launch."""
    z, y, tau, mask = _make_ce_inputs(4, 15, 59, 10.0, torch.float32, False, "random", seed=14)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    kind = torch.tensor([1, 0, 2, 1], dtype=torch.int32, device=DEV)
    loss, dz, st = K.loss_and_grad(z, y, tau, mask, backend="triton", kind=kind)
    r_loss, r_dz, r_st = K.loss_and_grad(z, y, tau, mask, backend="torch", kind=kind)
    torch.testing.assert_close(loss, r_loss, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(dz, r_dz, rtol=RTOL, atol=RTOL * float(r_dz.abs().max()))
    torch.testing.assert_close(st.row_loss, r_st.row_loss, rtol=RTOL, atol=RTOL)
    ev_loss, ev = K.loss_and_stats(z, y, tau, mask, backend="triton", kind=kind)
    assert torch.equal(ev_loss, loss) and torch.equal(ev.row_loss, st.row_loss)
    assert torch.equal(ev.collapsed, st.collapsed) and torch.equal(ev.correct, st.correct)
    c = _model_weights(4, 15).to(DEV)
    zz = z.clone().requires_grad_(True)
    loss2, st2 = K.tempered_cross_entropy(zz, y, tau, mask, backend="triton", kind=kind)
    (loss2 * c).sum().backward()
    assert torch.equal(loss2.detach(), loss) and not st2.row_loss.requires_grad
    torch.testing.assert_close(zz.grad, dz * c[:, None, None], rtol=1e-6, atol=0)
    for bad in (torch.tensor([0, 1, 3, 0], device=DEV), torch.tensor([0.0, 1, 2, 0], device=DEV)):
        with pytest.raises(ValueError, match="kind"):
            K.loss_and_grad(z, y, tau, mask, backend="triton", kind=bad)


def test_stablemax_saturated_rows_keep_their_gradient():
    """Rows whose p_y is within float32 rounding of 1 (R / S(s_y) ~ 4e-8): the kernel's StableMax loss,
    rows and gradient, the correct class's included, equal float64 autograd of the paper's formula to
    float32 rounding (the naive 1/Σ − 1/S(s_y) is 0 there), single tile and looped over V."""
    from loss_formulas import autograd_per_model, stablemax_rows, stablemax_saturated_inputs
    z, y = stablemax_saturated_inputs(M=2, N=6, V=97, seed=3)
    M, N, V = z.shape
    tau = torch.ones(M, dtype=torch.float64)
    want_loss, want_grad, want_row = autograd_per_model(z, y, tau, None, [stablemax_rows] * M, with_rows=True)
    kind = torch.ones(M, dtype=torch.int32, device=DEV)
    for kw in ({}, dict(block_n=2, block_v=32)):
        loss, grad, *_, row = ce_mod.tempered_ce_triton(z.float().to(DEV), y.to(DEV), tau.float().to(DEV),
                                                        None, kind, **kw)
        assert bool((grad.cpu().double()[F.one_hot(y, V).bool().expand(M, N, V)] < 0).all())
        torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-5, atol=0)
        torch.testing.assert_close(row.cpu().double(), want_row, rtol=1e-5, atol=0)
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-5, atol=0)


def test_unknown_kind_code_gives_that_model_nan():
    """The launcher does not read kind on the host (no sync): a code outside {0, 1, 2} poisons its model only."""
    z, y, tau, mask = _make_ce_inputs(3, 9, 59, 10.0, torch.float32, False, "random", seed=15)
    z, y, tau, mask = z.to(DEV), y.to(DEV), tau.to(DEV), mask.to(DEV)
    loss, grad, *_, row = ce_mod.tempered_ce_triton(z, y, tau, mask, torch.tensor([0, 7, 1], device=DEV))
    assert bool(loss[1].isnan()) and bool(row[1].isnan().all()) and bool(grad[1].isnan().all())
    assert bool(torch.isfinite(loss[[0, 2]]).all()) and bool(torch.isfinite(grad[[0, 2]]).all())


def test_launcher_validates_inputs():
    z = torch.randn(2, 3, 5, device=DEV)
    y = torch.zeros(3, dtype=torch.int64, device=DEV)
    tau = torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match="logits must be"):
        ce_mod.tempered_ce_triton(z[0], y, tau, None)
    with pytest.raises(ValueError, match="labels must be"):
        ce_mod.tempered_ce_triton(z, y.float(), tau, None)
    with pytest.raises(ValueError, match="tau must be"):
        ce_mod.tempered_ce_triton(z, y, tau[:1], None)
    with pytest.raises(ValueError, match="mask must be"):
        ce_mod.tempered_ce_triton(z, y, tau, torch.ones(2, 3, device=DEV))
    with pytest.raises(ValueError, match="kind must be \\(M,\\)"):
        ce_mod.tempered_ce_triton(z, y, tau, None, torch.zeros(3, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="kind must be int32/int64"):
        ce_mod.tempered_ce_triton(z, y, tau, None, torch.zeros(2, device=DEV))
    if DEV == "cuda":
        with pytest.raises(ValueError, match="kind is on cpu"):
            ce_mod.tempered_ce_triton(z, y, tau, None, torch.zeros(2, dtype=torch.int64))
    flat = torch.randn(2, 10, device=DEV)
    act = torch.ones(2, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="bounds must be"):
        nc_mod.clamp_flat_triton_(flat, [0, 11], torch.ones(2, 1, device=DEV), act)
    with pytest.raises(ValueError, match="target must be"):
        nc_mod.clamp_flat_triton_(flat, [0, 5, 10], torch.ones(2, 1, device=DEV), act)
    with pytest.raises(ValueError, match="unit column stride"):
        nc_mod.clamp_flat_triton_(flat.t(), [0, 2], torch.ones(10, 1, device=DEV),
                                  torch.ones(10, dtype=torch.bool, device=DEV))


# --------------------------------------------------------------------------------------------------
# Norm clamp
# --------------------------------------------------------------------------------------------------

def _check_clamp_once(M, P, bounds, *, dtype=torch.float32, block=None, active="mixed", seed=0):
    g = torch.Generator().manual_seed(seed)
    S = len(bounds) - 1
    flat = (torch.randn(M, P, generator=g) * 0.3).to(dtype)
    target = torch.rand(M, S, generator=g) * 4 + 0.5
    if active == "mixed":
        act = torch.arange(M) % 3 != 1
    else:
        act = torch.full((M,), active == "all")
    flat0 = flat.clone()
    flat, target, act = flat.to(DEV), target.to(DEV), act.to(DEV)
    norms = nc_mod.clamp_flat_triton_(flat, bounds, target, act, block=block)
    flat, norms, target, act = flat.cpu(), norms.cpu(), target.cpu(), act.cpu()
    ref = torch.stack([flat0[:, lo:hi].double().norm(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], 1)
    assert norms.shape == (M, S) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), ref, rtol=1e-6, atol=1e-30)
    # inactive models and columns outside the segments: bit-for-bit unchanged
    assert torch.equal(flat[~act], flat0[~act])
    assert torch.equal(flat[:, :bounds[0]], flat0[:, :bounds[0]])
    assert torch.equal(flat[:, bounds[-1]:], flat0[:, bounds[-1]:])
    # active models: each non-empty segment's norm is its target
    after = torch.stack([flat[:, lo:hi].double().norm(dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], 1)
    nonempty = torch.tensor([hi > lo for lo, hi in zip(bounds[:-1], bounds[1:])])
    sel = act[:, None] & nonempty[None, :]
    rtol = 1e-6 if dtype == torch.float32 else 2.0 ** -8
    rel = ((after - target.double()).abs() / target.double())[sel]
    assert bool((rel <= rtol).all()), f"clamped norms off target by up to {float(rel.max()):.3g}"


CLAMP_CASES = [
    pytest.param(3, 3000, [0, 3000], {}, id="total-M3"),
    pytest.param(4, 1300, [10, 300, 300, 310, 1200], dict(block=128), id="layers-empty-seg-straddling"),
    pytest.param(16, 500, [0, 64, 192, 500], dict(active="all", block=64), id="layers-M16-all-active"),
    pytest.param(2, 777, [0, 500, 777], dict(dtype=torch.bfloat16, block=256), id="layers-bf16"),
    pytest.param(3, 900, [100, 800], dict(active="none"), id="none-active"),
    pytest.param(1, 5000, [0, 2000, 4100], dict(block=1024, active="all"), id="M1-chunks"),
    # the transformer's per-layer clamp: 9 segments (1 layer), 27 (4 layers), chunks straddling several
    pytest.param(3, 1100, [0, 65, 68, 132, 196, 260, 324, 580, 836, 900], dict(block=128), id="layers-S9"),
    pytest.param(2, 2800, list(range(0, 2701, 100)), dict(block=256), id="layers-S27-straddling"),
]


@pytest.mark.parametrize("M, P, bounds, kw", CLAMP_CASES)
def test_clamp_flat_matches_float64(M, P, bounds, kw):
    _check_clamp_once(M, P, bounds, **kw)


def test_clamp_chunk_layout_by_hand():
    """Segments [10, 300), [300, 300) (empty), [300, 310), [310, 1200) in chunks of 128 columns: 3, 0, 1 and 7
    chunks, numbered segment by segment, each starting BLOCK columns after the last within its segment."""
    b, seg, col, first, count, C, block_c = nc_mod.chunk_layout((10, 300, 300, 310, 1200), 128, torch.device("cpu"))
    assert b.tolist() == [10, 300, 300, 310, 1200]
    assert seg.tolist() == [0, 0, 0, 2] + [3] * 7
    assert col.tolist() == [10, 138, 266, 300, 310, 438, 566, 694, 822, 950, 1078]
    assert first.tolist() == [0, 3, 3, 4] and count.tolist() == [3, 0, 1, 7]
    assert (C, block_c) == (11, 8)


def test_clamp_kernels_add_without_atomics():
    """Every sum of the Triton kernels is added in a fixed order: no atomic operation in any kernel (an
    atomic_add's order, and so a sum's last bit, follows the order programs finish in on a GPU)."""
    import ast
    import inspect
    for mod in (nc_mod, ce_mod):
        calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(ast.parse(inspect.getsource(mod)))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
        assert not {c for c in calls if c.startswith("tl.atomic")}, (mod.__name__, calls)
        assert any(c.startswith("tl.") for c in calls)                  # the scan sees the kernels' calls


@pytest.mark.parametrize("block", [64, None])
def test_clamp_a_model_alone_and_in_a_batch_bitwise(block):
    """A model's clamped parameters and norms are bit for bit the same clamped alone and in a batch of 5
    (the sums' order depends on the segments and BLOCK alone)."""
    g = torch.Generator().manual_seed(5)
    bounds = [3, 200, 200, 451, 700]
    flat = torch.randn(5, 710, generator=g)
    target = torch.rand(5, 4, generator=g) + 0.5
    act = torch.tensor([True, False, True, True, True])
    batch = flat.clone().to(DEV)
    norms = nc_mod.clamp_flat_triton_(batch, bounds, target.to(DEV), act.to(DEV), block=block)
    for i in range(5):
        one = flat[i:i + 1].clone().to(DEV)
        n1 = nc_mod.clamp_flat_triton_(one, bounds, target[i:i + 1].to(DEV), act[i:i + 1].to(DEV), block=block)
        assert torch.equal(one.cpu(), batch[i:i + 1].cpu()) and torch.equal(n1.cpu(), norms[i:i + 1].cpu())


def test_clamp_a_long_segment_gets_a_larger_block(monkeypatch):
    """By default a segment is cut into at most MAX_CHUNKS chunks (launch 2 loads all of its partial sums):
    a longer one gets a larger BLOCK, and the clamp is still right."""
    monkeypatch.setattr(nc_mod, "MAX_CHUNKS", 2)
    monkeypatch.setattr(nc_mod, "clamp_config", lambda L, S, device: (64, 4))
    g = torch.Generator().manual_seed(6)
    flat = torch.randn(2, 1000, generator=g).to(DEV)
    before = flat.double().cpu()
    target = torch.tensor([[2.0], [3.0]], device=DEV)
    norms = nc_mod.clamp_flat_triton_(flat, [0, 1000], target, torch.tensor([True, True], device=DEV))
    assert (tuple([0, 1000]), 512, str(flat.device)) in nc_mod._LAYOUT_CACHE     # 1000 / 2 -> 512 columns a chunk
    torch.testing.assert_close(norms.cpu().double(), before.norm(dim=1, keepdim=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(flat.cpu().double().norm(dim=1, keepdim=True), target.cpu().double(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="MAX_CHUNKS"):                 # a block given that cuts finer: refused
        nc_mod.clamp_flat_triton_(flat, [0, 1000], target, torch.tensor([True, True], device=DEV), block=256)


def test_clamp_norm_list_dispatch():
    g = torch.Generator().manual_seed(3)
    M = 4
    params = [torch.randn(M, 3, 4, generator=g).to(DEV), torch.randn(M, 7, generator=g).to(DEV)]
    before = [p.clone() for p in params]
    target = (torch.rand(M, generator=g) + 1.0).to(DEV)
    norms = K.clamp_norm_(params, target, backend="triton")
    ref = torch.sqrt(sum(p.double().reshape(M, -1).square().sum(1) for p in before)).cpu()
    torch.testing.assert_close(norms.cpu().double(), ref, rtol=1e-6, atol=0)
    after = torch.sqrt(sum(p.double().reshape(M, -1).square().sum(1) for p in params)).cpu()
    torch.testing.assert_close(after, target.cpu().double(), rtol=1e-6, atol=0)
    for p, b in zip(params, before):                       # direction kept: p = b * target/norm
        torch.testing.assert_close(p.double(), b.double() * (target.double() / ref.to(DEV))
                                   .reshape(M, *[1] * (p.dim() - 1)), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# torch.compile traces both custom ops whole
# --------------------------------------------------------------------------------------------------

def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    z, y, tau, mask = _make_ce_inputs(2, 21, 59, 10.0, torch.float32, True, "random", seed=11)
    bounds = [0, 40, 100]
    g = torch.Generator().manual_seed(12)
    flat = torch.randn(2, 120, generator=g)
    target = torch.rand(2, 2, generator=g) + 1.0
    active = torch.tensor([True, False])
    args = [t.to(DEV) for t in (z, y, tau, mask, flat, target, active)]

    kind = torch.tensor([1, 2], device=DEV)

    def step(z, y, tau, mask, flat, target, active):
        loss, dz, st = K.loss_and_grad(z * 1.5, y, tau, mask, backend="triton")
        ev_loss, ev = K.loss_and_stats(z, y, tau, None, backend="triton", kind=kind)   # an evaluation's call
        norms = K.clamp_flat_(flat, bounds, target, active, backend="triton")
        return (loss.sum() * 2, dz.sum(-1), st.correct, st.logit_norm, norms + 1, flat * 3, ev_loss + 1,
                ev.collapsed, ev.logit_norm * 2, ev.row_loss * 2)

    eager_args = [a.clone() for a in args]
    compiled_args = [a.clone() for a in args]
    want = step(*eager_args)
    got = torch.compile(step, fullgraph=True)(*compiled_args)
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_args[4], eager_args[4], rtol=1e-6, atol=1e-7)   # flat clamped in place
    assert not torch.equal(compiled_args[4], args[4])


@pytest.mark.skipif(not K.interpreting(), reason="the interpreter's CPU run; on a GPU gpu_check and the "
                    "CUDA tests above hold the kernels against float64")
def test_trainer_with_triton_kernels_matches_torch_kernels(tmp_path):
    """The whole trainer through the Triton kernels (interpreted) and through the PyTorch twins: a tiny
    configuration that memorises and groks, two temperatures, clamped from step 100, gives the same
    per-model T_mem and T_grok, and each model held at its clamp target. (Parameters themselves drift
    apart at float32 rounding over hundreds of steps; the kernels' own tests bound one call.)"""
    from dataclasses import replace

    import numpy as np

    from fastgrok.config import TrainConfig
    from fastgrok.train.trainer import Trainer
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = TrainConfig(p=17, train_frac=0.8, lr=0.03, wd=2.0, d_embed=16, hidden=32, seeds=2,
                           taus=(1.0, 1.5), norm_targets=(19.0,), clamp_from=100, steps=400, eval_every=10,
                           logit_every=50, device="cpu", compile="off")
        runs = {}
        for kernels in ("torch", "triton"):
            tr = Trainer(replace(base, kernels=kernels), tmp_path / kernels, progress=False)
            assert tr.backend == kernels
            tr.run()
            runs[kernels] = tr.results()
    finally:
        torch.set_num_threads(n)
    ref, got = runs["torch"], runs["triton"]
    assert ref["t_grok"].notna().sum() >= 2                     # the configuration does grok (tau 1)
    for col in ("t_mem", "t_grok", "diverged"):
        np.testing.assert_array_equal(got[col].to_numpy(), ref[col].to_numpy(), err_msg=col)
    np.testing.assert_allclose(got["weight_norm"], 19.0, rtol=1e-5)
