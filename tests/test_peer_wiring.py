"""The peers' optimizer settings and minibatches wired into training (issue 30 items 1, 2): per-model
Adam hyperparameters, optimizers, warm-up and batch sizes reach the step only when some model uses them
(the study's batch stays on its own code path), and a model trains as torch.optim / a DataLoader would
drive it."""
from __future__ import annotations

import pytest
import torch

from fastgrok.cli import main
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.train.state import build_state

TINY = dict(p=11, d_embed=8, hidden=16, seeds=2, steps=5, compile="off", train_frac=0.5)


def test_the_study_batch_holds_no_per_model_adam_hyperparameters():
    b = build_state(TrainConfig(**TINY)).batch
    assert b.beta1 is None and b.beta2 is None and b.eps is None


def test_per_model_betas_and_eps_are_float64_tensors_when_they_differ():
    st = build_state(TrainConfig(**TINY, eps=(1e-8, 1e-25), beta2=0.98))
    assert st.batch.eps.dtype == torch.float64 and st.batch.eps.tolist() == [1e-8, 1e-8, 1e-25, 1e-25]
    assert st.batch.beta2 is None and st.batch.beta1 is None      # one value for all: the config's float
    # a table whose rows all hold another value than the config's: tensors too
    rows = [{"model": 0, "cell": 0, "seed": 0, "tau": 1.0, "norm_target": None, "beta1": 0.8}]
    assert build_state(TrainConfig(**TINY), rows).batch.beta1.tolist() == [0.8]


@pytest.mark.parametrize("flag,bad", [("--eps", "0"), ("--beta1", "1"), ("--beta2", "-0.1")])
def test_bad_adam_hyperparameters_are_one_line_errors(tmp_path, capsys, flag, bad):
    assert main(["train", "--p", "11", "--steps", "2", "--quiet", flag, bad, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[2:] in err


def test_eps_on_the_command_line_makes_cells(tmp_path):
    import pandas as pd
    out = tmp_path / "r"
    assert main(["train", "--p", "11", "--seeds", "1", "--d-embed", "8", "--hidden", "8", "--steps", "3",
                 "--no-compile", "--quiet", "--eps", "1e-8", "1e-25", "--beta1", "0.8", "--out", str(out)]) == 0
    models = pd.read_parquet(out / "models.parquet")
    assert models.eps.tolist() == [1e-8, 1e-25] and (models.beta1 == 0.8).all() and (models.beta2 == 0.999).all()


# ----------------------------------------------------------------------------- optimizers in the step
def _steps_and_reference(cfg: TrainConfig, make_opt, steps: int = 8):
    """Each model of cfg trained `steps` steps by the step (train_step), and by torch.optim driving the
    same parameters with the same gradients (the model's loss_and_grads); both trajectories."""
    from fastgrok.core.step import make_lossfn, loss_name, train_step
    st = build_state(cfg)
    model, batch, state = st.model, st.batch, st.tensors
    lossfn = make_lossfn(loss_name(cfg, batch), st.backend, batch.tau, batch.train_weight, batch.kind)
    params = [torch.nn.Parameter(row.clone()) for row in state["flat"]]
    opts = [make_opt(p, r) for p, r in zip(params, st.table)]
    got, want = [], []
    for _ in range(steps):
        g = model.loss_and_grads(torch.stack([p.detach() for p in params]), batch.train_a, batch.train_b,
                                 batch.train_y, lossfn)[1]
        for p, gi, (opt, sched) in zip(params, g, opts):
            p.grad = gi.clone()
            opt.step()
            if sched is not None:
                sched.step()
        train_step(model, cfg, st.backend, state, batch)
        got.append(state["flat"].clone())
        want.append(torch.stack([p.detach().clone() for p in params]))
    return torch.stack(got), torch.stack(want)


def _warm(opt, W):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 if u > W else u / W) if W else None


F64_MLP = dict(p=11, d_embed=8, hidden=16, seeds=1, compile="off", train_frac=0.5, dtype="float64")


def test_adam_in_the_step_is_torch_adam_with_its_warmup():
    """optimizer adam, per-model lr, wd (coupled L2 on every parameter), betas, eps and warm-up: each model
    follows torch.optim.Adam + LambdaLR on the same gradients (float64, 1e-12)."""
    cfg = TrainConfig(**F64_MLP, optimizer="adam", lr=(1e-2, 3e-3), wd=(0.0, 0.05), beta2=0.98, eps=1e-6,
                      warmup=3)
    got, want = _steps_and_reference(cfg, lambda p, r: (
        opt := torch.optim.Adam([p], lr=r["lr"], betas=(r["beta1"], r["beta2"]), eps=r["eps"],
                                weight_decay=r["wd"], foreach=False), _warm(opt, r["warmup"])))
    assert not torch.equal(got[0], got[-1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_sgd_in_the_step_is_torch_sgd_with_momentum():
    cfg = TrainConfig(**F64_MLP, optimizer="sgd", lr=0.1, wd=(0.0, 0.01), momentum=(0.9, 0.5), warmup=(0, 2))
    got, want = _steps_and_reference(cfg, lambda p, r: (
        opt := torch.optim.SGD([p], lr=r["lr"], momentum=r["momentum"], weight_decay=r["wd"], foreach=False),
        _warm(opt, r["warmup"])))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_muon_in_the_step_orthogonalizes_w1_only():
    """optimizer muon: W1 (the MLP's hidden matrix) takes core.optim.muon's update at muon_lr, E, W2 and the
    biases torch's AdamW (lr, wd on every parameter): against core.optim.muon applied by hand."""
    from fastgrok.core.optim import muon
    cfg = TrainConfig(**F64_MLP, optimizer="muon", lr=3e-3, wd=0.1, muon_lr=0.05, momentum=0.9)
    st = build_state(cfg)
    lay = st.model.layout
    assert st.model.hidden == ("W1",) and lay.spans(["W1"]) == [(lay.offsets[1], 16, 16)]
    from fastgrok.core.step import make_lossfn, train_step
    b, s = st.batch, st.tensors
    flat, m, v = s["flat"].clone(), torch.zeros_like(s["flat"]), torch.zeros_like(s["flat"])
    lossfn = make_lossfn("ce", st.backend, b.tau, b.train_weight)
    for k in range(1, 6):
        g = st.model.loss_and_grads(flat, b.train_a, b.train_b, b.train_y, lossfn)[1]
        flat, m, v = muon(flat, g, m, v, torch.tensor([k]), lr=3e-3, muon_lr=0.05, momentum=0.9, beta1=0.9,
                          beta2=0.999, eps=1e-8, wd=0.1, mats=[(lay.offsets[1], 16, 16)], n_decay=lay.n_params)
        train_step(st.model, cfg, st.backend, s, b)
    assert torch.equal(s["flat"], flat)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:                    # argparse's own refusals (a bad choice, not an integer)
        return e.code


def test_the_optimizer_settings_are_checked_in_one_line(tmp_path, capsys):
    for flag, bad in (("--optimizer", "lamb"), ("--momentum", "1"), ("--warmup", "-1"), ("--warmup", "1.5"),
                      ("--muon-lr", "0")):
        assert _exit_code(["train", "--p", "11", "--steps", "2", "--quiet", flag, bad, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag[2:].replace("-", "_") in err.replace("-", "_"), err
    with pytest.raises(ConfigError, match="momentum"):
        TrainConfig(momentum=-0.1)
    TrainConfig(optimizer="muon", dtype="float64")          # muon in float64 is fine


def test_the_study_batch_has_no_optimizer_dispatch():
    b = build_state(TrainConfig(**TINY)).batch
    assert b.opt_groups is None and b.optimizer is None and b.warmup is None and b.lr64 is None
    b = build_state(TrainConfig(**TINY, warmup=5)).batch
    assert b.opt_groups == (("adamw", None),) and b.warmup.tolist() == [5, 5]


# ----------------------------------------------------------------------------- minibatches
@pytest.mark.parametrize("n,B", [(40, 16), (40, 8), (37, 50)])
def test_a_models_minibatches_are_a_shuffled_dataloaders(n, B):
    """Model rows step by step equal torch's DataLoader(range(n), B, shuffle=True, drop_last=False) with a
    generator seeded shuffle_seed(seed), epoch after epoch (the last batch the rest); and asked again from
    an earlier step (a resume) the same."""
    from torch.utils.data import DataLoader
    from fastgrok.train.minibatches import Minibatches, shuffle_seed
    mb = Minibatches([n], [B], [7])
    loader = DataLoader(range(n), batch_size=B, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(shuffle_seed(7)))
    want = [b.tolist() for _ in range(4) for b in loader]
    got = [mb.rows(0, s).tolist() for s in range(len(want))]
    assert got == want and len({tuple(sorted(x)) for x in got[:mb.steps_per_epoch(0)]}) == mb.steps_per_epoch(0)
    late = len(want) - 1
    assert [Minibatches([n], [B], [7]).rows(0, s).tolist() for s in (late, 2)] == [want[late], want[2]]
    assert mb.rows(0, 1).tolist() == want[1]                     # back to an earlier epoch


def test_full_batch_models_read_no_minibatch():
    st = build_state(TrainConfig(**TINY))
    assert st.minibatches is None and st.batch.mb_idx is None
    st = build_state(TrainConfig(**TINY, batch_size=(4, 1000)))
    assert st.minibatches is not None and st.batch.mb_idx.shape[1] % 16 == 0
    assert main(["train", "--p", "11", "--steps", "2", "--quiet", "--batch-size", "0", "--out", "/nonexistent/x"]) == 2


def test_minibatch_models_train_as_alone_in_a_mixed_batch(tmp_path):
    """batch sizes 32, 100, full and 50 with another lr and train fraction, in one batch (padded rows,
    different epochs): each model's curves equal its solo run bit for bit."""
    import pandas as pd
    from fastgrok.config import quick_cpu
    from fastgrok.train.trainer import Trainer
    torch.set_num_threads(1)
    cfg = TrainConfig(**{**quick_cpu().to_dict(), "steps": 150, "eval_every": 25, "logit_every": 50})
    knobs = [{"batch_size": 32}, {"batch_size": 100}, {}, {"batch_size": 50, "lr": 3e-3, "train_frac": 0.45},
             {"batch_size": 32, "optimizer": "adam", "wd": 0.0, "warmup": 10}]
    rows = [{"model": i, "cell": i, "seed": i % 2, "tau": 1.0, "norm_target": None, **k} for i, k in enumerate(knobs)]
    batch = Trainer(cfg, tmp_path / "batch", table=rows, progress=False)
    models, curves = batch.run(), batch.curves()
    firsts = []
    for i, r in enumerate(rows):
        alone = Trainer(cfg, tmp_path / f"solo{i}", table=[{**r, "model": 0}], progress=False)
        alone.run()
        mine = curves[curves.model == i].drop(columns="model").reset_index(drop=True)
        theirs = alone.curves().drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, theirs, check_exact=True)
        firsts.append(mine[mine.metric == "weight_norm"].value.iloc[-1])
    assert len(set(firsts)) == len(firsts)          # they trained differently
