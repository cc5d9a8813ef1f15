"""The trainer's foundation (issue 2) against independent references, on the CPU.

- batch invariance: a model trained inside a batch of 8 (different seeds, taus and clamp targets) and the
  same model trained alone reach T_mem and T_grok at the same steps, parameters equal after 200 steps;
- the MLP's hand-written backward vs float64 autograd of the direct (non-table) MLP, CE with per-model
  tau and MSE;
- AdamW vs a per-tensor loop written from paper-notes (decay after the Adam update, matrices only);
- the clamp (total and per layer) after every step from t_clamp on, never before;
- data: every pair, the div inverse by brute force, splits that depend only on the seed;
- end to end: the `quick` preset groks, T_mem / T_grok read back from curves.parquet;
- float64 end to end; a NaN in one model leaves the others bit-identical.

Everything runs single-threaded (an autouse fixture): these models are tiny, and on a shared 2-core
machine two intra-op threads make a step ~10x slower, not faster.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fastgrok import store
from fastgrok.config import TrainConfig, quick_cpu
from fastgrok.core.data import all_pairs, make_task, split_indices
from fastgrok.core.models import MLP
from fastgrok.core.optim import adamw
from fastgrok.core.step import make_lossfn
from fastgrok.train.trainer import Trainer, train

TINY = dict(p=13, d_embed=16, hidden=32, device="cpu", compile="off")
"""A few steps of this take milliseconds (clamp, float64 tests)."""
SMALL = dict(p=23, train_frac=0.7, lr=1e-2, d_embed=32, hidden=64, device="cpu", compile="off")
"""Memorises by step ~75 and, unclamped or clamped at 26, groks within a few hundred steps."""


pytestmark = pytest.mark.usefixtures("one_thread")       # conftest.py


def _run_with_snapshot(cfg: TrainConfig, run_dir, at: int):
    """Trainer.run, plus a copy of the parameters right after optimizer step `at`."""
    tr = Trainer(cfg, run_dir, progress=False)
    snap = {}
    inner = tr.step_fn

    def step(state, batch):
        out = inner(state, batch)
        if tr.step_idx + 1 == at:           # step_idx counts the steps before this one
            snap["flat"] = state["flat"].clone()
        return out
    tr.step_fn = step
    df = tr.run()
    assert "flat" in snap, f"the run stopped before step {at}"
    return df, snap["flat"], tr


# ----------------------------------------------------------------------------- batch invariance

@pytest.mark.slow
def test_model_in_batch_of_8_matches_model_alone(tmp_path):
    """8 models: seeds {3, 4} x tau {1.0, 1.3} x clamp target {26, 32} (clamp from step 100)."""
    cfg = TrainConfig(**SMALL, seeds=2, seed0=3, taus=(1.0, 1.3), norm_targets=(26.0, 32.0), clamp_from=100,
                      steps=800)
    assert cfg.n_models == 8
    batch_df, batch_flat, _ = _run_with_snapshot(cfg, tmp_path / "batch", at=200)
    assert batch_df.t_mem.notna().all()                                 # T_mem compared on real values
    assert batch_df.t_grok.notna().sum() >= 3                           # and several T_grok
    assert batch_df.t_grok.isna().sum() >= 1                            # the high target does not grok
    for i, row in batch_df.iterrows():
        alone = dataclasses.replace(cfg, seeds=1, seed0=int(row.seed), taus=(float(row.tau),),
                                    norm_targets=(float(row.norm_target),))
        df, flat, _ = _run_with_snapshot(alone, tmp_path / f"alone{i}", at=200)
        assert len(df) == 1
        assert df.t_mem[0] == row.t_mem
        assert (pd.isna(df.t_grok[0]) and pd.isna(row.t_grok)) or df.t_grok[0] == row.t_grok, (i, df.t_grok[0], row.t_grok)
        torch.testing.assert_close(flat[0], batch_flat[i], rtol=1e-5, atol=1e-5 * float(batch_flat[i].abs().max()))
        # the batch's models really differ: model i is not close to any other model of the batch
        others = torch.cat([batch_flat[:i], batch_flat[i + 1:]])
        assert ((others - flat[0]).norm(dim=1) > 1e-2 * flat[0].norm()).all()


# ----------------------------------------------------------------------------- MLP backward

def _direct_mlp_loss(P: dict, a, b, y, tau, loss: str, d: int) -> torch.Tensor:
    """Per-model loss of the MLP in its direct form, x = [E[a], E[b]] (N, 2d) -> W1 -> GeLU -> W2."""
    M, N = a.shape
    Ea = torch.gather(P["E"], 1, a[..., None].expand(-1, -1, d))
    Eb = torch.gather(P["E"], 1, b[..., None].expand(-1, -1, d))
    x = torch.cat([Ea, Eb], -1)                                         # (M, N, 2d)
    h = F.gelu(x @ P["W1"] + P["b1"][:, None])                          # exact (erf) GeLU
    z = h @ P["W2"] + P["b2"][:, None]                                  # (M, N, p)
    s = z / tau[:, None, None]
    if loss == "ce":
        return F.cross_entropy(s.reshape(M * N, -1), y.reshape(-1), reduction="none").view(M, N).mean(1)
    onehot = F.one_hot(y, s.shape[-1]).to(s.dtype)
    return ((s - onehot) ** 2).sum(-1).mean(1)


@pytest.mark.parametrize("p", [13, 31])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mlp_backward_matches_float64_autograd_of_direct_form(p, loss):
    cfg = TrainConfig(p=p, d_embed=8, hidden=24, device="cpu")
    model = MLP(cfg)
    lay = model.layout
    M, N = 3, 57
    g = torch.Generator().manual_seed(p)
    flat64 = torch.randn(M, lay.n_params, generator=g, dtype=torch.float64) * 0.7   # biases non-zero too
    a = torch.randint(0, p, (M, N), generator=g)                        # per-model rows, with repeats
    b = torch.randint(0, p, (M, N), generator=g)
    y = torch.randint(0, p, (M, N), generator=g)
    tau = torch.tensor([0.6, 1.0, 1.7], dtype=torch.float64)

    leaf = {k: v.detach().clone().requires_grad_(True) for k, v in lay.views(flat64.clone()).items()}
    ref_loss = _direct_mlp_loss(leaf, a, b, y, tau, loss, cfg.d_embed)
    ref_loss.sum().backward()                                           # models are independent
    ref_grad = lay.pack({k: v.grad for k, v in leaf.items()})
    assert ref_grad.shape == flat64.shape and float(ref_grad.norm()) > 0

    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        lossfn = make_lossfn(loss, "torch", tau.to(dtype))
        l, grad, _ = model.loss_and_grads(flat64.to(dtype), a, b, y, lossfn)
        assert grad.dtype == dtype
        torch.testing.assert_close(l.double(), ref_loss.detach(), rtol=rtol, atol=0)
        for m in range(M):                                              # relative error per model and tensor
            for name, gv in lay.views(grad.double()).items():
                rv = lay.views(ref_grad)[name][m]
                err = float((gv[m] - rv).norm() / rv.norm())
                assert err < rtol, (dtype, m, name, err)


# ----------------------------------------------------------------------------- AdamW

def _adamw_reference(params, grads, m, v, t, *, lr, beta1, beta2, eps, wd, matrices):
    """paper-notes' AdamW, one model and one tensor at a time in float64 (params/m/v: dict name -> tensor)."""
    out = {}
    for name, p in params.items():
        g = grads[name]
        m[name] = beta1 * m[name] + (1 - beta1) * g
        v[name] = beta2 * v[name] + (1 - beta2) * g * g
        mhat = m[name] / (1 - beta1 ** t)
        vhat = v[name] / (1 - beta2 ** t)
        p = p - lr * mhat / (vhat.sqrt() + eps)
        if name in matrices:
            p = p - lr * wd * p                                         # decoupled decay, after the update
        out[name] = p
    return out


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adamw_matches_study_reference(dtype, rtol):
    """Per-model lr and wd (M, 1) against the study's per-model update, models at different steps."""
    cfg = TrainConfig(p=7, d_embed=4, hidden=6)
    lay = MLP(cfg).layout
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    lrs, wds = [0.05, 0.01, 0.2], [2.0, 0.0, 0.5]                      # large lr*wd: decay order matters
    M, steps = 3, 6
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(M, lay.n_params, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 4, 11])                                        # models at different step counts
    started = (t > 0).to(torch.float64)[:, None]                        # moments from earlier steps
    mm = torch.randn(M, lay.n_params, generator=g, dtype=torch.float64) * 0.1 * started
    vv = torch.rand(M, lay.n_params, generator=g, dtype=torch.float64) * 0.01 * started
    split = lambda x: [{k: v[i].clone() for k, v in lay.views(x).items()} for i in range(M)]
    join = lambda rows: torch.stack([lay.pack({k: v[None] for k, v in r.items()})[0] for r in rows])
    ref_p, ref_m, ref_v = split(flat), split(mm), split(vv)
    matrices = set(lay.names[: lay.n_matrices])
    assert matrices == {"E", "W1", "W2"}
    cur, cm, cv = flat.to(dtype), mm.to(dtype), vv.to(dtype)
    for step in range(steps):
        grad = torch.randn(M, lay.n_params, generator=g, dtype=torch.float64) * (1 + step)
        t = t + 1
        lr = torch.tensor(lrs, dtype=torch.float64)[:, None]
        cur, cm, cv = adamw(cur, grad.to(dtype), cm, cv, t, n_mat=lay.n_mat, lr=lr.to(dtype),
                            lr_wd=(lr * torch.tensor(wds, dtype=torch.float64)[:, None]).to(dtype), **hp)
        for i, gi in enumerate(split(grad)):
            ref_p[i] = _adamw_reference(ref_p[i], gi, ref_m[i], ref_v[i], int(t[i]), matrices=matrices,
                                        lr=lrs[i], wd=wds[i], **hp)
    for got, want in ((cur, join(ref_p)), (cm, join(ref_m)), (cv, join(ref_v))):
        assert got.dtype == dtype
        err = ((got.double() - want).norm(dim=1) / want.norm(dim=1)).max()
        assert err < rtol, float(err)


def test_adamw_decay_is_after_the_update_not_before():
    """One step from m = v = 0 with a known gradient: P' = (P - lr*u)(1 - lr*wd) on matrices, where
    u = g/(|g| + eps) elementwise (bias-corrected first step); torch.optim.AdamW's (1 - lr*wd)P - lr*u differs."""
    cfg = TrainConfig(p=5, d_embed=3, hidden=4)
    lay = MLP(cfg).layout
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(2, lay.n_params, generator=g, dtype=torch.float64)
    grad = torch.randn(2, lay.n_params, generator=g, dtype=torch.float64)
    lr, wd, eps = 0.1, 1.5, 1e-8
    new, _, _ = adamw(flat, grad, torch.zeros_like(flat), torch.zeros_like(flat), torch.tensor([1, 1]),
                      lr=lr, beta1=0.9, beta2=0.999, eps=eps, lr_wd=lr * wd, n_mat=lay.n_mat)
    u = grad / (grad.abs() + eps)
    after = flat - lr * u
    after[:, : lay.n_mat] *= 1 - lr * wd
    before = flat - lr * u
    before[:, : lay.n_mat] = flat[:, : lay.n_mat] * (1 - lr * wd) - lr * u[:, : lay.n_mat]
    torch.testing.assert_close(new, after, rtol=1e-12, atol=1e-12)
    assert (new - before).abs().max() > 1e-3


# ----------------------------------------------------------------------------- clamp

def _matrix_norms(tr: Trainer) -> torch.Tensor:
    """(M, S) float64 norms of each matrix of each model."""
    b = tr.model.layout.bounds
    f = tr.state["flat"].double()
    return torch.stack([f[:, lo:hi].square().sum(1).sqrt() for lo, hi in zip(b[:-1], b[1:])], 1)


def test_clamp_holds_each_models_own_target_from_t_clamp_on(tmp_path):
    t_clamp = 5
    cfg = TrainConfig(**TINY, seeds=2, taus=(1.0, 1.5), norm_targets=(4.0, 12.5), clamp_from=t_clamp, lr=3e-3)
    free = dataclasses.replace(cfg, clamp_from=10**9)                  # the same models, never clamped
    tr, tf = Trainer(cfg, tmp_path / "c", progress=False), Trainer(free, tmp_path / "f", progress=False)
    target = torch.tensor([r["norm_target"] for r in cfg.model_table()], dtype=torch.float64)
    assert sorted(set(target.tolist())) == [4.0, 12.5] and len(target) == 8
    for k in range(1, 16):
        tr.step_fn(tr.state, tr.batch)
        tf.step_fn(tf.state, tf.batch)
        assert (tr.state["t"] == k).all()
        total = _matrix_norms(tr).square().sum(1).sqrt()
        if k < t_clamp:                         # before t_clamp: untouched, exactly the free run
            assert torch.equal(tr.state["flat"], tf.state["flat"])
            assert ((total - target).abs() / target > 0.05).all()
        if k == t_clamp:                        # the first clamp: the free step's matrices, rescaled;
            n_mat = tr.model.layout.n_mat       # biases and Adam moments untouched
            ff = tf.state["flat"].double()
            scaled = ff[:, :n_mat] * (target / ff[:, :n_mat].norm(dim=1))[:, None]
            torch.testing.assert_close(tr.state["flat"][:, :n_mat].double(), scaled, rtol=1e-6, atol=1e-7)
            assert torch.equal(tr.state["flat"][:, n_mat:], tf.state["flat"][:, n_mat:])
            assert torch.equal(tr.state["m"], tf.state["m"]) and torch.equal(tr.state["v"], tf.state["v"])
        if k >= t_clamp:                        # every step from t_clamp on: each model at its own target
            torch.testing.assert_close(total, target, rtol=1e-5, atol=0)
            free_total = _matrix_norms(tf).square().sum(1).sqrt()
            assert ((free_total - target).abs() / target > 0.05).all()    # the clamp is doing the work


def test_clamp_per_layer_holds_each_matrix(tmp_path):
    fracs = (0.2, 0.5, 0.3)                                             # squared-norm shares of E, W1, W2
    cfg = TrainConfig(**TINY, seeds=3, norm_targets=(6.0, 9.0), clamp_from=3, clamp_mode="layer",
                      layer_fracs=fracs, lr=3e-3)
    tr = Trainer(cfg, tmp_path, progress=False)
    target = torch.tensor([r["norm_target"] for r in cfg.model_table()], dtype=torch.float64)
    want = target[:, None] * torch.tensor(fracs, dtype=torch.float64).sqrt()   # (M, 3)
    for k in range(1, 10):
        tr.step_fn(tr.state, tr.batch)
        norms = _matrix_norms(tr)
        if k < 3:
            assert ((norms - want).abs() / want > 0.02).any(1).all()
        else:
            torch.testing.assert_close(norms, want, rtol=1e-5, atol=0)
            torch.testing.assert_close(norms.square().sum(1).sqrt(), target, rtol=1e-5, atol=0)


def test_clamp_per_layer_default_keeps_shares_at_t_clamp(tmp_path):
    """No layer_fracs: each matrix keeps the share of ||W||^2 it had when the clamp began."""
    t_clamp = 6
    cfg = TrainConfig(**TINY, seeds=2, norm_targets=(7.0,), clamp_from=t_clamp, clamp_mode="layer", lr=3e-3,
                      steps=14, eval_every=5, logit_every=10)
    free = dataclasses.replace(cfg, norm_targets=(), steps=t_clamp - 1)
    tf = Trainer(free, tmp_path / "free", progress=False)
    tf.run()                                                            # the state the clamp starts from
    sq = _matrix_norms(tf).square()
    share = sq / sq.sum(1, keepdim=True)
    tr = Trainer(cfg, tmp_path / "clamped", progress=False)
    tr.run()
    assert tr.step_idx == 14
    torch.testing.assert_close(_matrix_norms(tr), 7.0 * share.sqrt(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- thresholds
def test_accuracy_exactly_at_the_threshold_counts(tmp_path):
    """At p = 43 the test split has 1,110 pairs: 999 right is an accuracy of exactly 0.90, which groks
    (T_grok = that step). A float32 ratio would read 0.89999998 and miss it; 998 right must not grok."""
    for n_right, groks in ((999, True), (998, False)):
        tr = Trainer(TrainConfig(p=43, seeds=1, d_embed=8, hidden=8, device="cpu", compile="off"),
                     tmp_path / str(n_right), progress=False)
        y, mask = tr.batch.y, tr.batch.train_mask[0]
        test_rows = torch.nonzero(~mask).flatten()
        assert len(test_rows) == 1110
        wrong_label = y.clone()
        wrong_label[test_rows[n_right:]] = (y[test_rows[n_right:]] + 1) % 43
        logits = 5.0 * F.one_hot(wrong_label, 43).float()[None]          # (1, N, V): argmax = wrong_label
        tr.model.logits = lambda flat, a, b: logits
        tr._evaluate()
        test_acc = tr.records.evals[-1][0, 2]
        assert test_acc == n_right / 1110                                 # the float64 ratio
        assert (tr.records.t_grok[0] == 0) == groks, (n_right, test_acc)
        assert tr.records.t_mem[0] == 0                                   # every train pair right


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("op,f", [("add", lambda a, b, p: (a + b) % p), ("sub", lambda a, b, p: (a - b) % p),
                                  ("mul", lambda a, b, p: (a * b) % p)])
@pytest.mark.parametrize("p", [2, 7, 12])
def test_all_pairs_every_pair_once(op, f, p):
    a, b, y = all_pairs(p, op)
    assert len(a) == p * p
    assert sorted(zip(a.tolist(), b.tolist())) == [(i, j) for i in range(p) for j in range(p)]
    assert y.tolist() == [f(i, j, p) for i, j in zip(a.tolist(), b.tolist())]


@pytest.mark.parametrize("p", [5, 13, 31])
def test_div_uses_the_modular_inverse_and_leaves_out_zero(p):
    a, b, y = all_pairs(p, "div")
    assert len(a) == p * (p - 1) and (b != 0).all()
    assert sorted(zip(a.tolist(), b.tolist())) == [(i, j) for i in range(p) for j in range(1, p)]
    for i, j, q in zip(a.tolist(), b.tolist(), y.tolist()):
        assert [c for c in range(p) if (c * j) % p == i] == [q]         # the one c with c*b = a (mod p)


def test_split_depends_only_on_the_seed():
    p, n_train = 17, int(0.4 * 17 * 17)
    batch = make_task(p, "add", 0.4, [3, 9, 5, 0])
    alone = make_task(p, "add", 0.4, [5])
    assert torch.equal(batch.train_idx[2], alone.train_idx[0])
    assert torch.equal(batch.train_mask[2], alone.train_mask[0])
    # the study's scheme: the first n_train entries of a permutation from a generator seeded 1000 + seed
    for row, s in enumerate([3, 9, 5, 0]):
        perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(1000 + s))
        assert torch.equal(batch.train_idx[row, :n_train], perm[:n_train])
        assert batch.train_mask[row].sum() == n_train
        assert batch.train_mask[row][perm[:n_train]].all() and not batch.train_mask[row][perm[n_train:]].any()
    assert len({tuple(r.tolist()) for r in batch.train_idx}) == 4      # different seeds, different splits
    assert torch.equal(split_indices(p * p, n_train, [9]), batch.train_idx[1:2, :n_train])
    # 115 rows, padded to 128 (a whole block of 16) with the first row, weighted 0
    assert batch.train_idx.shape == (4, 128) and (batch.train_idx[:, n_train:] == batch.train_idx[:, :1]).all()
    assert torch.equal(batch.train_weight, (torch.arange(128) < n_train).expand(4, -1))


def _pairs(task, m, rows):
    """The (a, b, answer) triples of model m at batch rows `rows`, in order."""
    y = task.y if task.y.dim() == 1 else task.y[m]
    return [(int(task.a[r]), int(task.b[r]), int(y[r])) for r in rows]


def test_mixed_ops_and_fractions_keep_each_models_own_split():
    """A model in a batch of other ops and fractions holds the train rows (same pairs, same order, same
    answers) and test rows it holds alone; a div model's b = 0 pairs are in neither split; padding rows
    carry weight 0 and the model's own count of real rows."""
    p = 13
    models = [("div", 0.3, 4), ("add", 0.5, 4), ("mul", 0.7, 9), ("div", 0.5, 2), ("sub", 0.3, 4)]
    ops, fracs, seeds = zip(*models)
    batch = make_task(p, list(ops), list(fracs), list(seeds))
    assert batch.n_pairs == p * p and batch.y.shape == (5, p * p) and batch.valid is not None
    for m, (op, f, seed) in enumerate(models):
        alone = make_task(p, op, f, [seed])
        n = int(f * (p * (p - 1) if op == "div" else p * p))
        w = batch.train_weight[m]
        assert int(w.sum()) == n and bool(w[:n].all())                # real rows first, then padding
        assert _pairs(batch, m, batch.train_idx[m, :n].tolist()) == _pairs(alone, 0, alone.train_idx[0, :n].tolist())
        test_b = set(_pairs(batch, m, batch.test_mask[m].nonzero()[:, 0].tolist()))
        assert test_b == set(_pairs(alone, 0, alone.test_mask[0].nonzero()[:, 0].tolist()))
        assert int(batch.train_mask[m].sum()) == n
        for a, b, q in _pairs(batch, m, range(p * p)):
            if op == "div" and b == 0:
                continue
            assert q == {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p,
                         "div": next((c for c in range(p) if c * b % p == a), -1)}[op]
        if op == "div":                                               # b = 0: neither split, not valid
            zero = batch.b == 0
            assert not (batch.train_mask[m] & zero).any() and not (batch.test_mask[m] & zero).any()
            assert not batch.valid[m][zero].any()
        else:
            assert batch.valid[m].all()
    one = make_task(20, "add", 0.4, [1, 2])        # one op, one fraction, 160 rows (10 x 16): nothing padded
    assert one.train_weight is None and one.valid is None and one.y.dim() == 1


# ----------------------------------------------------------------------------- end to end

def _first_reaching(curves: pd.DataFrame, metric: str, threshold: float) -> dict:
    c = curves[curves.metric == metric].sort_values("step")
    out = {}
    for m, g in c.groupby("model"):
        hit = g[g.value >= threshold]
        out[m] = int(hit.step.iloc[0]) if len(hit) else None
    return out


def test_quick_preset_groks_end_to_end(tmp_path):
    cfg = dataclasses.replace(quick_cpu(), device="cpu", compile="off")
    df = train(cfg, tmp_path, progress=False)
    curves = pd.read_parquet(tmp_path / store.CURVES)
    models = pd.read_parquet(tmp_path / store.MODELS)
    pd.testing.assert_frame_equal(models, df)
    assert len(df) == cfg.seeds and not df.diverged.any()
    assert df.t_grok.notna().all(), df[["seed", "t_mem", "t_grok", "test_acc"]]
    assert (df.t_mem < df.t_grok).all()
    steps = np.sort(curves.step.unique())
    assert steps[0] == 0 and (np.diff(steps) == cfg.eval_every).all()  # evaluated every eval_every steps
    mem = _first_reaching(curves, "train_acc", cfg.mem_threshold)
    grok = _first_reaching(curves, "test_acc", cfg.grok_threshold)
    for r in df.itertuples():
        assert r.t_mem == mem[r.model] and r.t_grok == grok[r.model], (r, mem, grok)
        # the evaluation just before T_grok was below the threshold, T_grok's at or above
        g = curves[(curves.model == r.model) & (curves.metric == "test_acc")].set_index("step").value
        assert g[r.t_grok] >= cfg.grok_threshold and g[r.t_grok - cfg.eval_every] < cfg.grok_threshold
    assert steps[-1] == df.t_grok.max()                                 # stopped once every model grokked
    assert (df.steps == df.t_grok).all()                                # each model at its own T_grok
    ls = curves[curves.metric == "logit_scale"]
    assert (ls.step % cfg.logit_every == 0).all()
    # L at grok: mean over all pairs of ||z / tau|| of the model as it was at T_grok (where it stopped:
    # the checkpoint's weights), recomputed here from the weights
    flat = store.load_checkpoint(tmp_path)["state"]["flat"].double()
    a, b, _ = all_pairs(cfg.p, cfg.op)
    z = MLP(cfg).logits(flat, a, b)                                     # (M, N, V)
    for r in df.itertuples():
        want = (z[r.model] / r.tau).norm(dim=-1).mean().item()
        assert r.logit_scale_at_grok == pytest.approx(want, rel=1e-5)


def test_float64_end_to_end(tmp_path):
    cfg = TrainConfig(**TINY, seeds=2, dtype="float64", norm_targets=(6.0,), clamp_from=10, steps=60,
                      eval_every=10, logit_every=20, lr=3e-3)
    tr = Trainer(cfg, tmp_path / "f64", progress=False)
    df = tr.run()
    assert tr.backend == "torch"
    for k in ("flat", "m", "v", "target"):
        assert tr.state[k].dtype == torch.float64, k
    assert tr.step_idx == 60 and not df.diverged.any()
    total = _matrix_norms(tr).square().sum(1).sqrt()
    torch.testing.assert_close(total, torch.full_like(total, 6.0), rtol=1e-12, atol=0)   # float64 exact
    assert np.isfinite(df.train_loss).all()
    np.testing.assert_allclose(df.weight_norm, 6.0, rtol=1e-12)
    # the same models as float32 (same initial weights), to float32 accuracy
    t32 = Trainer(dataclasses.replace(cfg, dtype="float32"), tmp_path / "f32", progress=False)
    t32.run()
    assert t32.state["flat"].dtype == torch.float32
    err = (t32.state["flat"].double() - tr.state["flat"]).norm(dim=1) / tr.state["flat"].norm(dim=1)
    assert (err < 1e-3).all() and (err > 0).all()                      # close, and truly computed apart


# ----------------------------------------------------------------------------- divergence

NAN_CFG = TrainConfig(**SMALL, seeds=2, seed0=3, taus=(1.0, 1.3), norm_targets=(26.0,), clamp_from=100,
                      steps=500, stop_when_grokked=False)
POISON_AT, VICTIM = 150, 1


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    torch.set_num_threads(1)
    tr = Trainer(NAN_CFG, tmp_path_factory.mktemp("clean"), progress=False)
    return tr.run(), tr.curves(), tr.state["flat"].clone()


@pytest.mark.parametrize("where", ["flat", "m"])
def test_nan_in_one_model_leaves_the_others_bit_identical(tmp_path, clean_run, where):
    """NaN in a model's parameters (its loss turns NaN) or in its Adam moment (its update turns NaN)."""
    df0, curves0, flat0 = clean_run
    tr = Trainer(NAN_CFG, tmp_path, progress=False)
    inner = tr.step_fn

    def step(state, batch):
        if tr.step_idx == POISON_AT:
            state[where][VICTIM, 7] = float("nan")
        return inner(state, batch)
    tr.step_fn = step
    df = tr.run()
    others = [i for i in range(NAN_CFG.n_models) if i != VICTIM]
    assert df.diverged.tolist() == [i == VICTIM for i in range(NAN_CFG.n_models)]
    assert not df0.diverged.any()
    assert df0.t_mem.notna().all() and df0.t_grok.notna().sum() >= 2  # the compared results are real ones
    pd.testing.assert_frame_equal(df.iloc[others].reset_index(drop=True), df0.iloc[others].reset_index(drop=True),
                                  check_exact=True)
    c, c0 = tr.curves(), curves0
    pd.testing.assert_frame_equal(c[c.model != VICTIM].reset_index(drop=True),
                                  c0[c0.model != VICTIM].reset_index(drop=True), check_exact=True)
    assert torch.equal(tr.state["flat"][others], flat0[others])
    # the victim stopped updating at the poisoned step: frozen, flagged dead, its step count stuck
    assert not bool(tr.state["alive"][VICTIM]) and int(tr.state["t"][VICTIM]) == POISON_AT
    assert (tr.state["t"][others] == NAN_CFG.steps).all()
    assert df.t_mem[VICTIM] == df0.t_mem[VICTIM] and df.t_mem[VICTIM] < POISON_AT
    if where == "m":                            # its parameters stay the last finite ones
        assert torch.isfinite(tr.state["flat"][VICTIM]).all()


def test_trainer_and_baseline_restore_full_float32_matmuls(tmp_path):
    """A process that lowered float32 matmul precision (TF32 on CUDA, bf16 passes in oneDNN on a CPU)
    gets full float32 back when a Trainer or the baseline is built."""
    from fastgrok.bench.baseline import BaselineCell
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        Trainer(TrainConfig(**TINY, seeds=1), tmp_path / "run", progress=False)
        assert torch.get_float32_matmul_precision() == "highest"
        torch.set_float32_matmul_precision("high")
        BaselineCell(TrainConfig(**TINY, seeds=1))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_signal_during_the_final_checkpoint_still_stops_the_caller(tmp_path, monkeypatch):
    """Ctrl-C while a finished run writes its last checkpoint: the run is saved whole (done), and run()
    raises Interrupted so a grid does not go on to its next batch."""
    import os
    import signal
    from fastgrok.train.trainer import Interrupted
    tr = Trainer(TrainConfig(**TINY, seeds=1, steps=30, eval_every=10, logit_every=10), tmp_path, progress=False)
    checkpoint = Trainer.checkpoint

    def checkpoint_then_signal(self):
        checkpoint(self)
        if self.done:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(Trainer, "checkpoint", checkpoint_then_signal)
    with pytest.raises(Interrupted, match="had finished"):
        tr.run()
    ck = store.load_checkpoint(tmp_path)
    assert ck["done"] and ck["step"] == 30


def test_checkpoints_at_the_first_evaluation_after_each_multiple(tmp_path, monkeypatch):
    """checkpoint_every 100 with evaluations every 30: checkpoints at 120, 210, 300, ... (not only at
    common multiples, 300, 600, ...), then at the end."""
    steps = []
    checkpoint = Trainer.checkpoint

    def recording(self):
        steps.append(self.step_idx)
        checkpoint(self)
    monkeypatch.setattr(Trainer, "checkpoint", recording)
    cfg = TrainConfig(**TINY, seeds=1, steps=400, eval_every=30, logit_every=60, checkpoint_every=100,
                      stop_when_grokked=False)
    Trainer(cfg, tmp_path, progress=False).run()
    assert steps[:3] == [120, 210, 300] and steps[-1] == 400 and set(steps[3:]) == {400}


TINY_TF = dict(model="transformer", p=13, train_frac=0.7, lr=1e-2, d_model=32, n_heads=2, d_mlp=64, device="cpu",
               compile="off")


@pytest.mark.slow
def test_transformer_in_a_batch_matches_it_alone(tmp_path):
    """The transformer (autograd over the model axis): 4 models, seeds {0, 1} x tau {1.0, 1.5}, against
    each trained alone: the same T_mem and parameters after 150 steps."""
    cfg = TrainConfig(**TINY_TF, seeds=2, taus=(1.0, 1.5), steps=300)
    batch_df, batch_flat, _ = _run_with_snapshot(cfg, tmp_path / "batch", at=150)
    assert batch_df.t_mem.notna().all()
    for i, row in batch_df.iterrows():
        alone = dataclasses.replace(cfg, seeds=1, seed0=int(row.seed), taus=(float(row.tau),))
        df, flat, _ = _run_with_snapshot(alone, tmp_path / f"alone{i}", at=150)
        assert df.t_mem[0] == row.t_mem
        torch.testing.assert_close(flat[0], batch_flat[i], rtol=1e-5, atol=1e-5 * float(batch_flat[i].abs().max()))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_test_loss_is_the_float64_loss_over_each_models_test_rows(tmp_path, loss):
    """test_loss (curves, models.parquet) = the mean loss over the model's own test rows, against the
    direct form in float64 from the final weights (each model its own split and tau)."""
    cfg = TrainConfig(**SMALL, seeds=2, taus=(1.0, 1.5), steps=50, loss=loss)
    tr = Trainer(cfg, tmp_path, progress=False)
    df = tr.run()
    assert (df["steps"] == 50).all()                                 # no model stopped early
    task, lay = tr.task, tr.model.layout
    P = {k: v.double() for k, v in lay.views(tr.state["flat"]).items()}
    test = (~task.train_mask).nonzero()[:, 1].view(cfg.n_models, -1)   # (M, n_test) each model's own rows
    tau = torch.tensor([r["tau"] for r in tr.table], dtype=torch.float64)
    ref = _direct_mlp_loss(P, task.a[test], task.b[test], task.y[test], tau, loss, cfg.d_embed)
    np.testing.assert_allclose(df["test_loss"], ref.numpy(), rtol=1e-5)
    curves = tr.curves()
    last = curves[(curves.metric == "test_loss") & (curves.step == 50)].sort_values("model")["value"]
    np.testing.assert_allclose(last, ref.numpy(), rtol=1e-5)
    assert (ref > 0).all() and ref[0] != ref[1]


def test_test_loss_at_grok_is_the_evaluation_at_t_grok(tmp_path):
    cfg = dataclasses.replace(quick_cpu(), seeds=2, steps=600)       # seed 0 groks at 475, seed 1 later
    tr = Trainer(cfg, tmp_path, progress=False)
    df = tr.run()
    curves = tr.curves()
    assert df["t_grok"].notna().any()
    for r in df.itertuples():
        if pd.isna(r.t_grok):
            assert np.isnan(r.test_loss_at_grok)
            continue
        c = curves[(curves.model == r.model) & (curves.metric == "test_loss") & (curves.step == r.t_grok)]
        assert r.test_loss_at_grok == c["value"].iloc[0] > 0


def test_a_checkpoint_from_before_test_loss_resumes_with_it_unknown(tmp_path):
    cfg = TrainConfig(**SMALL, seeds=2, steps=50)
    tr = Trainer(cfg, tmp_path, progress=False)
    done = tr.run()
    ck = store.load_checkpoint(tmp_path)
    ck["records"]["evals"] = ck["records"]["evals"][:, :, :6]     # the 6 metrics written before test_loss
    again = Trainer(cfg, tmp_path, progress=False)
    again.restore(ck)
    res = again.results()
    assert res["test_loss"].isna().all()
    pd.testing.assert_frame_equal(res.drop(columns="test_loss"), done.drop(columns="test_loss"))
