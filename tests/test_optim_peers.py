"""The peers' optimizers and schedule (core/optim.py) against torch.optim's own, per model, over many steps.

A batch of M = 3 models, each with its own hyperparameters, runs 12 steps of a gradient that depends on
the parameters; each model is also run alone through torch.optim (or, for Muon's matrices, a float64
reference written from Keller Jordan's code) and the trajectories compared at float64. Odd sizes, random
parameters and gradients; a matrix wider than tall and one taller than wide.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastgrok.core.optim import NS_COEFFS, adam, adamw, muon, newton_schulz5, sgd, warmup

SHAPES = [(5, 11), (13, 6), (4, 3), (7,), (9,)]   # three matrices (stored in, out), two vectors
SIZES = [math.prod(s) for s in SHAPES]
OFF = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
N_MAT, P = OFF[3], OFF[-1]
MUON_MATS = [(OFF[0], 5, 11), (OFF[1], 13, 6)]      # the third matrix goes to AdamW
STEPS = 12
F64 = torch.float64

# per-model hyperparameters, (M,) float64, no two models alike
HP = {
    "lr": torch.tensor([1e-2, 3e-3, 2.5e-2], dtype=F64),
    "beta1": torch.tensor([0.9, 0.8, 0.95], dtype=F64),
    "beta2": torch.tensor([0.999, 0.98, 0.95], dtype=F64),
    "eps": torch.tensor([1e-8, 1e-25, 1e-3], dtype=F64),
    "wd": torch.tensor([0.5, 5e-3, 1.3], dtype=F64),
    "momentum": torch.tensor([0.9, 0.5, 0.95], dtype=F64),
    "muon_lr": torch.tensor([0.02, 0.05, 7e-3], dtype=F64),
}


def _start(M=3, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(M, P, generator=gen, dtype=F64).to(dtype)
    noise = [torch.randn(M, P, generator=gen, dtype=F64).to(dtype) for _ in range(STEPS)]
    return flat, noise


def _grad(flat, noise):
    """A gradient that feeds back on the parameters (so decay and momentum change what comes next)."""
    return noise + 0.3 * torch.tanh(flat)


def _run_batched(fn, flat, noise, **hp):
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    t = torch.zeros(flat.shape[0], dtype=torch.int64)
    for k in range(STEPS):
        t = t + 1
        flat, m, v = fn(flat, _grad(flat, noise[k]), m, v, t, **hp)
    return flat, m, v


def _torch_params(flat_row):
    return [torch.nn.Parameter(flat_row[lo:hi].clone().view(s)) for lo, hi, s in zip(OFF[:-1], OFF[1:], SHAPES)]


def _run_torch(opt, params, noise, mm, sched=None):
    for k in range(STEPS):
        for p, lo, hi in zip(params, OFF[:-1], OFF[1:]):
            p.grad = _grad(p.detach().reshape(-1), noise[k][mm, lo:hi]).view(p.shape).clone()
        opt.step()
        if sched is not None:
            sched.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def _hp(m, *names):
    return {n: float(HP[n][m]) for n in names}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("all_decay", [True, False])
def test_adam_with_l2_decay_matches_torch_adam(all_decay):
    """torch.optim.Adam(weight_decay=wd): the L2 term on every parameter (n_decay = P, Lee et al.'s), or on
    the matrices only (n_decay = n_mat: torch with the vectors in a group of weight_decay 0)."""
    flat, noise = _start()
    n_decay = P if all_decay else N_MAT
    got, _, _ = _run_batched(adam, flat, noise, lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"],
                             wd=HP["wd"], n_decay=n_decay)
    for mm in range(3):
        params = _torch_params(flat[mm])
        h = _hp(mm, "lr", "beta1", "beta2", "eps", "wd")
        groups = [{"params": params, "weight_decay": h["wd"]}] if all_decay else [
            {"params": params[:3], "weight_decay": h["wd"]}, {"params": params[3:], "weight_decay": 0.0}]
        opt = torch.optim.Adam(groups, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], foreach=False)
        _close(got[mm], _run_torch(opt, params, noise, mm))


def test_sgd_with_momentum_matches_torch_sgd():
    flat, noise = _start(seed=1)
    got, _, v = _run_batched(sgd, flat, noise, lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"], n_decay=N_MAT)
    assert torch.equal(v, torch.zeros_like(v))                          # SGD leaves v alone
    for mm in range(3):
        params = _torch_params(flat[mm])
        h = _hp(mm, "lr", "momentum", "wd")
        opt = torch.optim.SGD([{"params": params[:3], "weight_decay": h["wd"]}, {"params": params[3:]}],
                              lr=h["lr"], momentum=h["momentum"], dampening=0, nesterov=False, foreach=False)
        _close(got[mm], _run_torch(opt, params, noise, mm))


def test_warmup_is_the_hand_computed_schedule():
    """lr * min((t - 1) / W, 1): W = 4 at lr 0.02, W = 0 (off) at lr 0.003, W = 1 at lr 0.5."""
    lr = torch.tensor([0.02, 0.003, 0.5], dtype=F64)
    W = torch.tensor([4, 0, 1])
    want = {1: [0.0, 0.003, 0.0], 2: [0.005, 0.003, 0.5], 3: [0.01, 0.003, 0.5], 4: [0.015, 0.003, 0.5],
            5: [0.02, 0.003, 0.5], 6: [0.02, 0.003, 0.5], 50: [0.02, 0.003, 0.5]}
    for t, w in want.items():
        got = warmup(lr, torch.full((3,), t), W)
        torch.testing.assert_close(got, torch.tensor(w, dtype=F64), rtol=1e-15, atol=0)
    assert warmup(lr.float(), torch.full((3,), 2), W).dtype == torch.float32


def test_adam_with_warmup_matches_lee_et_als_optimizer_and_scheduler():
    """Lee et al.'s regime: torch.optim.Adam(weight_decay) on every parameter with LambdaLR(lambda u: 1 if
    u > W else u / W) stepped after each step; per model W (10, 3, 0). The lr is the scheduler's, bit for
    bit, and the trajectory agrees at float64."""
    flat, noise = _start(seed=2)
    W = torch.tensor([10, 3, 0])
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    t = torch.zeros(3, dtype=torch.int64)
    lrs, got = [], flat
    for k in range(STEPS):
        t = t + 1
        lr_t = warmup(HP["lr"], t, W)
        lrs.append(lr_t)
        got, m, v = adam(got, _grad(got, noise[k]), m, v, t, lr=lr_t, beta1=HP["beta1"], beta2=HP["beta2"],
                         eps=HP["eps"], wd=HP["wd"], n_decay=P)
    for mm in range(3):
        params = _torch_params(flat[mm])
        h = _hp(mm, "lr", "beta1", "beta2", "eps", "wd")
        opt = torch.optim.Adam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                               weight_decay=h["wd"], foreach=False)
        w = int(W[mm])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda u: 1 if u > w else u / w) if w else (lambda u: 1))
        seen = []
        for k in range(STEPS):
            seen.append(opt.param_groups[0]["lr"])
            for p, lo, hi in zip(params, OFF[:-1], OFF[1:]):
                p.grad = _grad(p.detach().reshape(-1), noise[k][mm, lo:hi]).view(p.shape).clone()
            opt.step()
            sched.step()
        assert [float(x[mm]) for x in lrs] == seen                      # the scheduler's lr, exactly
        _close(got[mm], torch.cat([p.detach().reshape(-1) for p in params]))
    assert float(lrs[0][0]) == 0.0 and float(lrs[0][2]) == float(HP["lr"][2])


def _muon_reference(W_in_out, grad_seq, lr, wd, mu, ns_steps=5):
    """Keller Jordan's SingleDeviceMuon on one matrix, float64, written plainly from muon.py with torch's
    (out, in) weight: momentum.lerp_(g, 1 - mu); update = g.lerp(momentum, mu); zeropower; times
    max(1, out / in) ** 0.5; p *= 1 - lr wd; p -= lr update. grad_seq(k, W) gives the (in, out) gradient."""
    Wt = W_in_out.T.clone()                                             # (out, in), torch's Linear layout
    buf = torch.zeros_like(Wt)
    a, b, c = 3.4445, -4.7750, 2.0315
    for k in range(STEPS):
        g = grad_seq(k, Wt.T).T.clone()
        buf = buf.lerp(g, 1 - mu)
        u = g.lerp(buf, mu)
        X = u.T if u.size(0) > u.size(1) else u
        X = X / (X.norm() + 1e-7)
        for _ in range(ns_steps):
            A = X @ X.T
            B = b * A + c * A @ A
            X = a * X + B @ X
        X = X.T if u.size(0) > u.size(1) else X
        X = X * max(1, u.size(0) / u.size(1)) ** 0.5
        Wt = Wt * (1 - lr * wd)
        Wt = Wt - lr * X
    return Wt.T


def test_muon_matches_keller_jordans_muon_and_torch_adamw_on_the_rest():
    """Muon on the (5, 11) and (13, 6) matrices against the plain float64 reference above; the (4, 3)
    matrix (decayed) and the vectors (not) against torch.optim.AdamW, each model its own values."""
    assert NS_COEFFS == (3.4445, -4.7750, 2.0315)
    flat, noise = _start(seed=3)
    got, _, v = _run_batched(muon, flat, noise, lr=HP["lr"], muon_lr=HP["muon_lr"], momentum=HP["momentum"],
                             beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"], wd=HP["wd"], mats=MUON_MATS,
                             n_decay=N_MAT)
    for lo, r, c in MUON_MATS:                                          # Muon's columns keep v = 0
        assert torch.equal(v[:, lo:lo + r * c], torch.zeros(3, r * c, dtype=F64))
    for mm in range(3):
        h = _hp(mm, "lr", "muon_lr", "momentum", "beta1", "beta2", "eps", "wd")
        for i, (lo, r, c) in enumerate(MUON_MATS):
            seq = lambda k, W, lo=lo: _grad(W.reshape(-1), noise[k][mm, lo:lo + W.numel()]).view(W.shape)  # noqa: E731
            want = _muon_reference(flat[mm, lo:lo + r * c].view(r, c), seq, h["muon_lr"], h["wd"], h["momentum"])
            _close(got[mm, lo:lo + r * c].view(r, c), want)
        params = _torch_params(flat[mm])[2:]
        opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": h["wd"]},
                                 {"params": params[1:], "weight_decay": 0.0}],
                                lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], foreach=False)
        for k in range(STEPS):
            for p, lo, hi in zip(params, OFF[2:-1], OFF[3:]):
                p.grad = _grad(p.detach().reshape(-1), noise[k][mm, lo:hi]).view(p.shape).clone()
            opt.step()
        _close(got[mm, OFF[2]:], torch.cat([p.detach().reshape(-1) for p in params]))


@pytest.mark.parametrize("shape", [(3, 7, 19), (3, 23, 9)])
def test_newton_schulz_orthogonalizes(shape):
    """Independent of any code: the 5-step iteration leaves every singular value of G within (0.5, 1.5)
    (the reference's S'), with G's singular vectors (the result is U S' V^T, so U^T X V is diagonal)."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    X = newton_schulz5(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.mT @ X @ Vh.mT                                                # (M, k, k)
    d = torch.diagonal(D, dim1=-2, dim2=-1)
    assert (d > 0.5).all() and (d < 1.5).all(), d
    assert float((D - torch.diag_embed(d)).abs().max()) < 1e-10
    Xs = torch.linalg.svdvals(X)
    assert (Xs > 0.5).all() and (Xs < 1.5).all()


def test_float32_follows_the_float64_trajectory():
    """Each optimizer in float32 (the hyperparameters still float64 (M,)) against its float64 run."""
    flat, noise = _start(seed=5)
    cases = {
        "adam": (adam, dict(lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"], wd=HP["wd"], n_decay=P)),
        "sgd": (sgd, dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"], n_decay=N_MAT)),
        "muon": (muon, dict(lr=HP["lr"], muon_lr=HP["muon_lr"], momentum=HP["momentum"], beta1=HP["beta1"],
                            beta2=HP["beta2"], eps=HP["eps"], wd=HP["wd"], mats=MUON_MATS, n_decay=N_MAT)),
    }
    for name, (fn, hp) in cases.items():
        want, _, _ = _run_batched(fn, flat, noise, **hp)
        got, m, v = _run_batched(fn, flat.float(), [n.float() for n in noise], **hp)
        assert got.dtype == m.dtype == v.dtype == torch.float32
        assert torch.isfinite(got).all()
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err < 5e-5, (name, err)


def _solo_equals_batched(fn, hp, dtype):
    flat, noise = _start(dtype=dtype, seed=6)
    batched = _run_batched(fn, flat, noise, **hp)
    for mm in range(3):
        one = {k: (x[mm:mm + 1] if isinstance(x, torch.Tensor) else x) for k, x in hp.items()}
        solo = _run_batched(fn, flat[mm:mm + 1], [n[mm:mm + 1] for n in noise], **one)
        for b, s in zip(batched, solo):
            assert torch.equal(b[mm:mm + 1], s), (fn.__name__, mm)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_models_trajectory_in_a_batch_of_3_equals_it_alone(dtype):
    """Bitwise: each optimizer (with a warm-up in front of Adam's lr) gives a model the same bits in a
    batch of 3 models with other hyperparameters as alone (M = 1)."""
    W = torch.tensor([4, 0, 7])

    def adam_warm(flat, grad, m, v, t, *, lr, warm, **hp):
        return adam(flat, grad, m, v, t, lr=warmup(lr, t, warm), **hp)
    adam_warm.__name__ = "adam_warm"
    _solo_equals_batched(adam_warm, dict(lr=HP["lr"], warm=W, beta1=HP["beta1"], beta2=HP["beta2"],
                                         eps=HP["eps"], wd=HP["wd"], n_decay=P), dtype)
    _solo_equals_batched(sgd, dict(lr=HP["lr"], momentum=HP["momentum"], wd=HP["wd"], n_decay=N_MAT), dtype)
    _solo_equals_batched(muon, dict(lr=HP["lr"], muon_lr=HP["muon_lr"], momentum=HP["momentum"], beta1=HP["beta1"],
                                    beta2=HP["beta2"], eps=HP["eps"], wd=HP["wd"], mats=MUON_MATS, n_decay=N_MAT),
                         dtype)
    lr_wd = (HP["lr"] * HP["wd"])[:, None].to(dtype)
    _solo_equals_batched(adamw, dict(lr=HP["lr"][:, None].to(dtype), beta1=HP["beta1"], beta2=HP["beta2"],
                                     eps=HP["eps"], lr_wd=lr_wd, n_mat=N_MAT), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_adamw_with_per_model_betas_and_eps_equals_the_scalar_code(dtype):
    """The study's AdamW with (M,) float64 beta1, beta2, eps gives each model the bits of the study's
    scalar path (Python floats) at that model's values, so per-model values leave the study's runs as they
    were."""
    flat, noise = _start(dtype=dtype, seed=7)
    lr = HP["lr"][:, None].to(dtype)
    lr_wd = (HP["lr"] * HP["wd"])[:, None].to(dtype)
    hp = dict(beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"])
    batched = _run_batched(adamw, flat, noise, lr=lr, lr_wd=lr_wd, n_mat=N_MAT, **hp)
    for mm in range(3):
        scalar = _run_batched(adamw, flat[mm:mm + 1], [n[mm:mm + 1] for n in noise], lr=lr[mm:mm + 1],
                              lr_wd=lr_wd[mm:mm + 1], n_mat=N_MAT, **{k: float(x[mm]) for k, x in hp.items()})
        for b, s in zip(batched, scalar):
            assert torch.equal(b[mm:mm + 1], s), mm


def test_muon_rejects_a_matrix_across_the_decay_boundary():
    flat, noise = _start()
    with pytest.raises(ValueError, match="straddle"):
        _run_batched(muon, flat, noise, lr=HP["lr"], muon_lr=HP["muon_lr"], momentum=HP["momentum"],
                     beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"], wd=HP["wd"], mats=[(OFF[1], 13, 6)],
                     n_decay=OFF[1] + 5)
