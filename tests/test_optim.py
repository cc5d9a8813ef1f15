"""⊥Grad and Grokfast-EMA on the flat (M, P) buffer against the papers' per-tensor formulas in float64."""
from __future__ import annotations

import pytest
import torch

from fastgrok.config import TrainConfig
from fastgrok.core.models import MLP
from fastgrok.core.optim import adamw, grokfast_ema, orthograd


def _layout():
    return MLP(TrainConfig(p=7, d_embed=4, hidden=6)).layout


def _orthograd_reference(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Prieto et al. 2025, one tensor: g_perp = g - (<w,g>/<w,w>) w, rescaled to ||g|| (eps 1e-30)."""
    w, g = w.reshape(-1), g.reshape(-1)
    perp = g - (w @ g) / (w @ w + 1e-30) * w
    return perp * (g.norm() / (perp.norm() + 1e-30))


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_orthograd_matches_the_per_tensor_formula(dtype, rtol):
    lay = _layout()
    gen = torch.Generator().manual_seed(3)
    M = 4
    flat = torch.randn(M, lay.n_params, generator=gen, dtype=torch.float64)
    flat[2, lay.offsets[3]:lay.offsets[4]] = 0.0                       # a bias at its init: w = 0
    grad = torch.randn(M, lay.n_params, generator=gen, dtype=torch.float64) * 1e-3
    on = torch.tensor([True, False, True, True])
    segs = list(zip(lay.offsets[:-1], lay.offsets[1:]))
    got = orthograd(flat.to(dtype), grad.to(dtype), segs, on).double()
    for m in range(M):
        for lo, hi in segs:
            want = _orthograd_reference(flat[m, lo:hi], grad[m, lo:hi]) if on[m] else grad[m, lo:hi]
            err = float((got[m, lo:hi] - want).norm() / want.norm())
            assert err < rtol, (m, lo, err)
            if on[m]:                                                   # orthogonal to w, same norm as g
                w = flat[m, lo:hi]
                assert abs(float(got[m, lo:hi] @ w)) <= 1e-5 * float(w.norm() * want.norm()) + 1e-12
                assert float(got[m, lo:hi].norm()) == pytest.approx(float(grad[m, lo:hi].norm()), rel=1e-5)
    assert torch.equal(got[1], grad[1].to(dtype).double())              # off: g untouched, bit for bit


def test_grokfast_ema_matches_the_papers_filter_over_steps():
    """Lee et al. 2024's gradfilter_ema, per model with its own alpha and lambda, over several steps:
    h starts as the first gradient, h <- alpha h + (1 - alpha) g, g <- g + lambda h; lambda 0 is off."""
    gen = torch.Generator().manual_seed(5)
    M, P = 3, 17
    alpha = torch.tensor([0.98, 0.8, 0.9], dtype=torch.float64)[:, None]
    lamb = torch.tensor([2.0, 5.0, 0.0], dtype=torch.float64)[:, None]
    h = torch.zeros(M, P, dtype=torch.float64)
    t = torch.tensor([0, 0, 0])
    ref_h = [None] * M
    for step in range(6):
        g = torch.randn(M, P, generator=gen, dtype=torch.float64)
        got, h = grokfast_ema(g, h, t, alpha, lamb)
        t = t + 1
        for m in range(M):
            a, lam = float(alpha[m]), float(lamb[m])
            ref_h[m] = g[m].clone() if ref_h[m] is None else ref_h[m]   # their `grads is None` branch
            ref_h[m] = ref_h[m] * a + g[m] * (1 - a)
            want = g[m] + ref_h[m] * lam
            torch.testing.assert_close(got[m], want, rtol=1e-13, atol=0)
            torch.testing.assert_close(h[m], ref_h[m], rtol=1e-13, atol=0)
        assert torch.equal(got[2], g[2])                                 # lambda 0: the plain gradient


def test_a_run_with_grokfast_and_orthograd_resumes_exactly(tmp_path):
    """The EMA filter h is state: checkpointed and restored, so a run stopped at 150 steps and continued
    to 300 ends exactly as one run of 300 (models and curves, bit for bit)."""
    import dataclasses

    import pandas as pd

    from fastgrok.config import quick_cpu
    from fastgrok.train.trainer import train
    torch.set_num_threads(1)
    cfg = dataclasses.replace(quick_cpu(), seeds=1, steps=300, orthograd=(False, True), grokfast_lambda=(0.0, 2.0))
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(dataclasses.replace(cfg, steps=150), tmp_path / "parts", progress=False)
    ck = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert "ema" in ck["state"] and ck["state"]["ema"].abs().sum() > 0
    parts = train(cfg, tmp_path / "parts", resume=True, progress=False)
    pd.testing.assert_frame_equal(parts, whole, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "parts" / "curves.parquet"),
                                  pd.read_parquet(tmp_path / "whole" / "curves.parquet"), check_exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_rows_is_isfinite_all(dtype):
    """The step's divergence mask (step.finite_rows: row max and min finite) is isfinite(x).all(1) exactly:
    a NaN, +inf or -inf anywhere in a row, alone or together, at the edges too; huge finite values pass."""
    from fastgrok.core.step import finite_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 97, generator=g, dtype=dtype) * 1e3
    x[1, 0], x[2, 96], x[3, 50] = float("nan"), float("inf"), -float("inf")
    x[4, 10], x[4, 11] = float("inf"), -float("inf")
    x[5, 3], x[5, 4] = float("nan"), float("inf")
    x[6] = torch.finfo(dtype).max
    x[7, 5] = -torch.finfo(dtype).max
    x[8] = float("nan")
    assert torch.equal(finite_rows(x), torch.isfinite(x).all(1))
    assert finite_rows(x).tolist() == [True, False, False, False, False, False, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_correction_table_is_the_power_of_one_model_alone(dtype):
    """Every value of the table is the 1 - beta^t `_adam_step`'s power gives one model alone (M = 1: the
    scalar loop), at every step t from 0 past the table's end (where it stays exactly 1)."""
    from fastgrok.core.optim import bias_correction_table
    betas = [0.0, 0.9, 0.98, 0.999]
    table = bias_correction_table(betas, dtype)
    T = table.shape[1]
    assert T > 17_000 and bool((table[:, -1] == 1.0).all()) and bool((table[:, 1] < 1.0)[1:].all())
    for i, beta in enumerate(betas):
        ts = list(range(0, T, 7 if beta == 0.999 else 1)) + [T - 2, T - 1, T, T + 5, 10 * T]  # every 7th for 0.999
        alone = torch.cat([1.0 - torch.pow(beta, torch.tensor([[float(t)]], dtype=dtype))[0] for t in ts])
        got = table[i, torch.tensor(ts).clamp(max=T - 1)]
        assert torch.equal(got, alone), (beta, [t for t, a, b in zip(ts, alone, got) if a != b][:5])


def test_adamw_gives_a_model_its_solo_bits_in_a_batch_wider_than_a_vector():
    """40 models (wider than any CPU vector loop of torch.pow, 16 or 32 floats): with the batch's table of
    bias corrections each model's 60 AdamW steps are bit for bit its steps alone (the power per step
    rounded 1 - 0.999^t differently for the models in the vectorised part)."""
    from fastgrok.core.optim import bias_correction_table
    M, P = 40, 37
    g = torch.Generator().manual_seed(4)
    flat = torch.randn(M, P, generator=g)
    grads = [torch.randn(M, P, generator=g) for _ in range(60)]
    table = bias_correction_table([0.9, 0.999], torch.float32)
    rows = torch.tensor([[0, 1]] * M)

    def run(x, gs, rows):
        m, v, t = torch.zeros_like(x), torch.zeros_like(x), torch.zeros(x.shape[0], dtype=torch.int64)
        for gr in gs:
            t = t + 1
            x, m, v = adamw(x, gr, m, v, t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, lr_wd=1e-2, n_mat=20,
                            bias=(table, rows))
        return x
    batched = run(flat, grads, rows)
    for i in range(M):
        assert torch.equal(run(flat[i:i + 1], [gr[i:i + 1] for gr in grads], rows[i:i + 1]), batched[i:i + 1]), i
