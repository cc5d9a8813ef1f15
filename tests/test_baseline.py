"""The eager per-cell baseline and fastgrok train the same models; the compiled step's index plan is exact."""
from __future__ import annotations

import tempfile

import pytest
import torch

from fastgrok.bench.baseline import BaselineCell, run_baseline
from fastgrok.config import TrainConfig
from fastgrok.core.models import MLP, _scatter_rows, _segment_sum, flat_row_index, segment_plan
from fastgrok.core.step import make_lossfn
from fastgrok.train.trainer import Trainer

TINY = dict(p=13, d_embed=16, hidden=32, seeds=3, device="cpu", compile="off")


@pytest.mark.parametrize("clamp", [False, True])
def test_baseline_follows_fastgrok(clamp):
    kw = dict(taus=(1.3,), norm_targets=(9.0,), clamp_from=3) if clamp else {}
    cfg = TrainConfig(**TINY, **kw)
    tr = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    cell = BaselineCell(cfg, tau=cfg.taus[0], norm_target=9.0 if clamp else None)
    for _ in range(6):
        torch.testing.assert_close(cell.step(), tr.step_fn(tr.state, tr.batch), rtol=1e-5, atol=1e-6)
    P = tr.model.layout.views(tr.state["flat"])
    for name, p in cell.params.items():
        torch.testing.assert_close(p.detach(), P[name], rtol=1e-4, atol=1e-5)
    train_acc, test_acc, _ = cell.evaluate()
    ev = tr.eval_fn(tr.state, tr.batch)
    torch.testing.assert_close(train_acc, ev[:, 1])
    torch.testing.assert_close(test_acc, ev[:, 2])
    assert cell.logit_scale() == pytest.approx(float(ev[:, 4].mean()), rel=1e-5)


def test_run_baseline_counts_steps_and_readouts():
    cfg = TrainConfig(**TINY, eval_every=5, logit_every=10)
    res = run_baseline(cfg, 20)
    assert res.steps == 20 and res.seeds == 3 and res.seconds > 0 and res.seed_steps_per_s > 0
    assert [e[0] for e in res.evals] == [0, 5, 10, 15, 20]
    assert [s for s, _ in res.logit_scale] == [0, 10, 20]


def _sums_in_row_order(rows, idx, R, keep=None):
    """The independent reference: each model's rows added one at a time, in row order, into its table."""
    M, N, H = rows.shape
    out = torch.zeros(M, R, H, dtype=rows.dtype)
    for m in range(M):
        for n in range(N):
            if keep is None or keep[m, n]:
                out[m, idx[m, n]] += rows[m, n]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scatter_rows_adds_in_row_order(dtype):
    """`_scatter_rows` (index_add_ over the stacked tables) gives the bits of adding each row in turn, and
    of scatter_add_ along N (what it replaced); with a flat index that leaves rows out, those rows' bits."""
    g = torch.Generator().manual_seed(2)
    M, N, R, H = 3, 97, 13, 37
    idx = torch.randint(0, R, (M, N), generator=g)
    idx[2] = idx[2].clamp_max(R - 3)                                    # values with no rows
    rows = (torch.randn(M, N, H, generator=g) * torch.logspace(-3, 3, N)[None, :, None]).to(dtype)
    ref = _sums_in_row_order(rows, idx, R)
    got = _scatter_rows(rows, idx, R)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    scatter = rows.new_zeros(M, R, H).scatter_add_(1, idx[..., None].expand(-1, -1, H), rows)
    torch.testing.assert_close(got, scatter, rtol=0, atol=0)
    keep = torch.rand(M, N, generator=g) > 0.3
    got = _scatter_rows(rows, idx, R, flat_row_index(idx, R, keep))
    torch.testing.assert_close(got, _sums_in_row_order(rows, idx, R, keep), rtol=0, atol=0)


def test_scatter_rows_compiled_is_eager():
    """Under torch.compile the sums are the same ATen call (an operator of fastgrok's own), bit for bit."""
    g = torch.Generator().manual_seed(3)
    M, N, R, H = 2, 59, 11, 16
    idx = torch.randint(0, R, (M, N), generator=g)
    rows = torch.randn(M, N, H, generator=g)
    flat = flat_row_index(idx, R)
    f = torch.compile(lambda r, i, fl: _scatter_rows(r * 1.5, i, R, fl), fullgraph=True)
    torch.testing.assert_close(f(rows, idx, flat), _sums_in_row_order(rows * 1.5, idx, R), rtol=0, atol=0)


def test_segment_plan_sums_like_scatter_add():
    g = torch.Generator().manual_seed(0)
    M, N, R, H = 3, 40, 7, 5
    idx = torch.randint(0, R, (M, N), generator=g)
    idx[1] = idx[1].clamp_max(R - 2)                                    # a value with no rows
    rows = torch.randn(M, N, H, generator=g)
    slot, valid = segment_plan(idx, R)
    assert slot.shape[:2] == (M, R) and valid.sum() == M * N
    torch.testing.assert_close(_segment_sum(rows, slot, valid), _scatter_rows(rows, idx, R), rtol=0, atol=0)


def test_segment_plan_leaves_out_padding_rows():
    """A padded model's padding (its first row repeated, gradient zero) is left out of the plan: K stays the
    real rows' largest count, and the sum is scatter_add's over the kept rows, bitwise (with the dropped
    rows' zeros, every real sum is also the plain one's)."""
    g = torch.Generator().manual_seed(1)
    M, N, R, H, n_real = 2, 300, 7, 5, 120
    idx = torch.randint(0, R, (M, N), generator=g)
    keep = torch.ones(M, N, dtype=torch.bool)
    keep[1, n_real:] = False                                            # model 1: 120 rows, then padding
    idx[1, n_real:] = idx[1, 0]                                         # padding repeats its first row
    rows = torch.randn(M, N, H, generator=g)
    rows[1, n_real:] = 0.0                                              # whose gradient is zero
    slot, valid = segment_plan(idx, R, keep)
    counts = [torch.bincount(idx[m][keep[m]], minlength=R) for m in range(M)]
    assert slot.shape[2] == max(int(c.max()) for c in counts) < N - n_real       # not the padding's count
    assert valid.sum() == keep.sum()
    torch.testing.assert_close(_segment_sum(rows, slot, valid), _scatter_rows(rows, idx, R), rtol=0, atol=0)
    with_padding = segment_plan(idx, R)
    assert with_padding[0].shape[2] > N - n_real


def test_loss_and_grads_with_plan_matches_scatter():
    cfg = TrainConfig(**TINY)
    tr = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    model, b = MLP(cfg), tr.batch
    flat = tr.state["flat"] + 0.1 * torch.randn_like(tr.state["flat"])
    lossfn = make_lossfn("ce", "torch", b.tau)
    l0, g0, _ = model.loss_and_grads(flat, b.train_a, b.train_b, b.train_y, lossfn)
    l1, g1, _ = model.loss_and_grads(flat, b.train_a, b.train_b, b.train_y, lossfn,
                                     plan=model.plan(b.train_a, b.train_b))
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    # the gathers CUDA's plan holds (segment_plan), here on the CPU: the same sums in the same order
    (sa, va), (sb, vb) = segment_plan(b.train_a, model.p), segment_plan(b.train_b, model.p)
    l2, g2, _ = model.loss_and_grads(flat, b.train_a, b.train_b, b.train_y, lossfn,
                                     plan={"slot_a": sa, "valid_a": va, "slot_b": sb, "valid_b": vb})
    torch.testing.assert_close(l2, l0, rtol=0, atol=0)
    torch.testing.assert_close(g2, g0, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_step_matches_eager_step():
    """The compiled step (index plan, pre-activations recomputed) trains as the eager one does."""
    cfg = TrainConfig(**{**TINY, "seeds": 2}, norm_targets=(9.0,), clamp_from=2)
    eager = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    comp = Trainer(cfg.__class__(**{**cfg.to_dict(), "compile": "on"}), tempfile.mkdtemp(), progress=False)
    for _ in range(4):
        torch.testing.assert_close(comp.step_fn(comp.state, comp.batch), eager.step_fn(eager.state, eager.batch),
                                   rtol=1e-5, atol=1e-6)
    assert comp.batch.plan is not None and eager.batch.plan is None
    for key in ("flat", "m", "v"):
        torch.testing.assert_close(comp.state[key], eager.state[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp.eval_fn(comp.state, comp.batch), eager.eval_fn(eager.state, eager.batch),
                               rtol=1e-4, atol=1e-5)
