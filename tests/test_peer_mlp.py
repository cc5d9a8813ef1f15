"""The peers' MLP (issue 30, item 3; core.models.PeerMLP): one-hot or embedding input, depth, activation and
biases, Prieto et al.'s draw (`init = "prieto"`), against plain torch modules written here; batched == solo;
the study's MLP untouched; its flags, export and cost model."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgrok.config import ConfigError, TrainConfig, prieto_mlp_p31

PRIETO = dict(mlp_input="onehot", mlp_layers=2, hidden=200, mlp_act="relu", mlp_bias=False)
"""Prieto et al.'s MLP: one-hot input, two hidden ReLU layers of 200, no biases."""


class Reference(nn.Module):
    """The MLP written plainly: one-hot (F.one_hot of a and of b, concatenated) or nn.Embedding input, then
    nn.Linear layers with ReLU or the exact GeLU between them (x @ weight.T + bias)."""

    def __init__(self, p, d_embed, hidden, mlp_input, mlp_layers, mlp_act, mlp_bias):
        super().__init__()
        self.p, self.onehot = p, mlp_input == "onehot"
        self.emb = None if self.onehot else nn.Embedding(p, d_embed)
        widths = [2 * p if self.onehot else 2 * d_embed] + [hidden] * mlp_layers + [p]
        layers = []
        for i in range(mlp_layers + 1):
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=mlp_bias))
            if i < mlp_layers:
                layers.append(nn.ReLU() if mlp_act == "relu" else nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, a, b):
        if self.onehot:
            x = torch.cat([F.one_hot(a, self.p), F.one_hot(b, self.p)], -1).to(self.net[0].weight.dtype)
        else:
            x = torch.cat([self.emb(a), self.emb(b)], -1)
        return self.net(x)

    def load_fastgrok(self, P: dict, m: int) -> None:
        """Model m's parameters from fastgrok's views (W{i} is (in, out): nn.Linear's weight transposed)."""
        with torch.no_grad():
            if self.emb is not None:
                self.emb.weight.copy_(P["E"][m])
            linears = [x for x in self.net if isinstance(x, nn.Linear)]
            for i, lin in enumerate(linears):
                lin.weight.copy_(P[f"W{i + 1}"][m].t())
                if lin.bias is not None:
                    lin.bias.copy_(P[f"b{i + 1}"][m])


SETTINGS = [PRIETO | {"hidden": 24},
            dict(mlp_input="onehot", mlp_layers=3, hidden=16, mlp_act="gelu", mlp_bias=True),
            dict(mlp_input="embed", mlp_layers=2, hidden=20, mlp_act="relu", mlp_bias=True),
            dict(mlp_input="embed", mlp_layers=1, hidden=20, mlp_act="relu", mlp_bias=False),
            dict(mlp_input="onehot", mlp_layers=1, hidden=20, mlp_act="gelu", mlp_bias=False)]


def _ce(z, y):
    """Mean cross-entropy per model and its dL/dz, written out (float64)."""
    logp = z.log_softmax(-1)
    loss = -logp.gather(-1, y[..., None]).squeeze(-1).mean(-1)
    dz = (logp.exp() - F.one_hot(y, z.shape[-1]).to(z.dtype)) / z.shape[1]
    return loss, dz, None


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("per_model_rows", [False, True])
def test_loss_and_grads_equal_a_plain_module(setting, per_model_rows):
    """Odd p, float64: each model's loss and every parameter's gradient equal autograd through a plain
    nn.Module with the same weights (rows shared by the models, or each model's own)."""
    from fastgrok.core.models import PeerMLP, build_model
    p, M, N = 13, 3, 150
    cfg = TrainConfig(p=p, d_embed=6, dtype="float64", **setting)
    model = build_model(cfg)
    assert isinstance(model, PeerMLP)
    g = torch.Generator().manual_seed(3)
    flat = model.layout.init([0, 1, 2], torch.float64, "cpu")
    flat = flat + 0.1 * torch.randn(flat.shape, generator=g, dtype=torch.float64)   # biases off zero too
    shape = (M, N) if per_model_rows else (N,)
    a, b = torch.randint(0, p, shape, generator=g), torch.randint(0, p, shape, generator=g)
    y = torch.randint(0, p, (M, N), generator=g)
    loss, grad, _ = model.loss_and_grads(flat, a, b, y, _ce)
    P, G = model.layout.views(flat), model.layout.views(grad)
    for m in range(M):
        ref = Reference(p, 6, **setting).double()
        ref.load_fastgrok(P, m)
        am, bm = (a[m], b[m]) if per_model_rows else (a, b)
        z = ref(am, bm)
        want = F.cross_entropy(z, y[m])
        want.backward()
        torch.testing.assert_close(loss[m], want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(model.logits(flat, a, b)[m], z.detach(), rtol=1e-12, atol=1e-13)
        got = {}
        ref_grads = {"E": None if ref.emb is None else ref.emb.weight.grad}
        linears = [x for x in ref.net if isinstance(x, nn.Linear)]
        for i, lin in enumerate(linears):
            ref_grads[f"W{i + 1}"] = lin.weight.grad.t()
            if lin.bias is not None:
                ref_grads[f"b{i + 1}"] = lin.bias.grad
        for name in model.layout.names:
            got[name] = G[name][m]
            torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-11, atol=1e-13, msg=name)
        assert set(got) == {k for k, v in ref_grads.items() if v is not None}


def test_the_layout_of_prietos_mlp():
    """Three matrices and no vectors: all decayed and clamped (the norm is over W1, W2, W3); Muon's hidden
    matrix is W2 only (W1 is the one-hot input's embedding, W3 the output layer)."""
    from fastgrok.core.models import build_model
    m = build_model(TrainConfig(p=31, **PRIETO))
    lay = m.layout
    assert lay.names == ("W1", "W2", "W3") and lay.shapes == ((62, 200), (200, 200), (200, 31))
    assert lay.n_matrices == 3 and lay.n_mat == lay.n_params == 62 * 200 + 200 * 200 + 200 * 31
    assert m.hidden == ("W2",)
    embed = build_model(TrainConfig(p=31, mlp_layers=3, mlp_bias=False))
    assert embed.layout.names == ("E", "W1", "W2", "W3", "W4") and embed.hidden == ("W1", "W2", "W3")
    biased = build_model(TrainConfig(p=31, mlp_input="onehot", mlp_layers=2))
    assert biased.layout.names[biased.layout.n_matrices:] == ("b1", "b2", "b3")


def test_the_study_setting_builds_the_study_mlp():
    """At config.STUDY_MLP the MLP is the study's table-form class, with its layout unchanged; one field
    off it and it is the peers' class."""
    from fastgrok.core.models import MLP, PeerMLP, build_model
    cfg = TrainConfig()
    assert cfg.study_mlp and type(build_model(cfg)) is MLP
    assert build_model(cfg).layout.names == ("E", "W1", "W2", "b1", "b2")
    for k, v in (("mlp_input", "onehot"), ("mlp_layers", 2), ("mlp_act", "relu"), ("mlp_bias", False)):
        c = TrainConfig(**{k: v})
        assert not c.study_mlp and type(build_model(c)) is PeerMLP, k
    assert not TrainConfig(model="transformer").study_mlp


def test_the_peers_mlp_at_the_study_setting_is_the_study_mlp_in_float64():
    """PeerMLP built with the study's fields (embedding, 1 GeLU layer, biases) computes the study MLP's loss
    and gradient (table form, hand-written backward) to float64 rounding: the two are the same function."""
    from fastgrok.core.models import MLP, PeerMLP
    cfg = TrainConfig(p=11, d_embed=8, hidden=12, dtype="float64")
    study, peer = MLP(cfg), PeerMLP(cfg)
    assert study.layout == peer.layout
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(2, study.layout.n_params, generator=g, dtype=torch.float64) * 0.3
    a, b = torch.randint(0, 11, (90,), generator=g), torch.randint(0, 11, (90,), generator=g)
    y = torch.randint(0, 11, (2, 90), generator=g)
    l1, g1, _ = study.loss_and_grads(flat, a, b, y, _ce)
    l2, g2, _ = peer.loss_and_grads(flat, a, b, y, _ce)
    torch.testing.assert_close(l1, l2, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("bias", [False, True])
def test_the_prieto_draw_is_their_codes_split_and_init(bias):
    """`init = "prieto"`: each model's train rows are random_split's under torch.manual_seed(seed) and its
    weights (and biases) the nn.Linear layers their code then builds, bit for bit (their MLP: one-hot of a
    then b, rows x * p + y)."""
    from fastgrok.train.state import build_state
    from torch.utils.data import random_split
    p, frac = 31, 0.8
    cfg = TrainConfig(p=p, train_frac=frac, seeds=3, seed0=4, init="prieto", compile="off", device="cpu",
                      **{**PRIETO, "mlp_bias": bias})
    st = build_state(cfg)
    P = st.model.layout.views(st.tensors["flat"])
    n = p * p
    n_train = int(frac * n)
    for m, seed in enumerate(range(4, 7)):
        torch.manual_seed(seed)
        train, test = random_split(list(range(n)), [n_train, n - n_train])
        layers = [nn.Linear(62, 200, bias=bias), nn.Linear(200, 200, bias=bias), nn.Linear(200, 31, bias=bias)]
        assert st.task.train_idx[m].tolist() == list(train.indices)
        assert sorted(torch.nonzero(st.task.test_mask[m]).flatten().tolist()) == sorted(test.indices)
        assert (st.task.a[st.task.train_idx[m]] * p + st.task.b[st.task.train_idx[m]]).tolist() == list(train.indices)
        for i, lin in enumerate(layers):
            assert torch.equal(P[f"W{i + 1}"][m], lin.weight.t()), (seed, i)
            if bias:
                assert torch.equal(P[f"b{i + 1}"][m], lin.bias), (seed, i)


def test_the_prieto_draw_is_refused_off_the_one_hot_mlp():
    with pytest.raises(ConfigError, match="init 'prieto'.*one-hot MLP"):
        TrainConfig(init="prieto")
    with pytest.raises(ConfigError, match="init 'prieto'"):
        TrainConfig(init="prieto", model="transformer")


@pytest.mark.parametrize("field,value,message", [
    ("mlp_input", "bits", "mlp_input must be one of embed, onehot; got 'bits'"),
    ("mlp_act", "tanh", "mlp_act must be one of gelu, relu; got 'tanh'"),
    ("mlp_layers", 0, "mlp_layers must be an integer >= 1 (hidden layers), got 0"),
    ("mlp_layers", 1.5, "mlp_layers must be an integer >= 1"),
    ("mlp_bias", "no", "mlp_bias must be true or false, got 'no'")])
def test_bad_mlp_fields_are_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _cli(capsys, *argv):
    from fastgrok.cli import main
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--mlp-layers", "0"], "mlp_layers must be an integer >= 1"),
    (["--mlp-act", "tanh"], "invalid choice: 'tanh'"),
    (["--mlp-input", "bits"], "invalid choice: 'bits'"),
    (["--mlp-bias", "maybe"], "expected on or off, got 'maybe'"),
    (["--init", "prieto"], "init 'prieto'")])
def test_bad_mlp_flags_exit_2_with_one_line(capsys, tmp_path, flags, message):
    from fastgrok.cli import main
    try:
        code = main(["train", "--quiet", "--steps", "1", "--out", str(tmp_path / "x"), *flags])
        err = capsys.readouterr().err
    except SystemExit as e:
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_the_flags_reach_the_config(tmp_path):
    """`fastgrok train` with the MLP flags trains that MLP: its saved config holds them, and the preset
    `prieto` is Prieto et al.'s setting."""
    import json
    from fastgrok.cli import main
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--p", "7", "--seeds", "1", "--steps", "20", "--eval-every", "10",
                 "--no-compile", "--mlp-input", "onehot", "--mlp-layers", "2", "--hidden", "16", "--mlp-act", "relu",
                 "--mlp-bias", "off", "--init", "prieto", "--train-frac", "0.6", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in PRIETO} == PRIETO | {"hidden": 16} and saved["init"] == "prieto"
    pre = prieto_mlp_p31()
    assert {k: getattr(pre, k) for k in PRIETO} == PRIETO and pre.init == "prieto"
    assert (pre.p, pre.train_frac, pre.lr, pre.wd, pre.loss, pre.eps, pre.beta2) == (31, 0.8, 0.01, 0.0, "stablemax",
                                                                                     1e-25, 0.999)


def test_step_flops_counts_each_layer():
    from fastgrok.core.models import step_flops
    cfg = TrainConfig(p=31, train_frac=0.8, **PRIETO)
    assert step_flops(cfg) == 6.0 * 768 * (62 * 200 + 200 * 200 + 200 * 31)
    study = TrainConfig()
    assert step_flops(study) == 6.0 * study.n_train * (256 * 256 + 256 * 59)


# ----------------------------------------------------------------------------- batched == solo
KNOBS = [{}, {"train_frac": 0.6}, {"loss": "stablemax", "eps": 1e-25}, {"orthograd": True},
         {"lr": 3e-3, "train_frac": 0.5}, {"optimizer": "muon", "wd": 0.1}, {"norm_target": 20.0, "t_clamp": 30}]
"""Prieto et al.'s setting, then one thing changed (Muon: its hidden matrix W2; a clamp on W1, W2, W3)."""
BASE = dict(op="add", train_frac=0.8, lr=1e-2, wd=0.0, init_scale=1.0, orthograd=False, grokfast_alpha=0.98,
            grokfast_lambda=0.0, loss="ce", label_noise=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
            optimizer="adamw", momentum=0.95, muon_lr=0.02, warmup=0, batch_size=None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prietos_mlp_trains_bit_for_bit_as_alone(tmp_path, dtype):
    """Prieto et al.'s MLP and draw, seeds 0-6 each with other settings (train fractions that pad its rows,
    StableMax with eps 1e-25, ⊥Grad, another lr, Muon, the clamp) in one batch: every curve of each model equals
    its solo run's, bitwise."""
    from fastgrok.train.trainer import Trainer
    torch.set_num_threads(1)
    cfg = TrainConfig(p=23, steps=120, eval_every=10, logit_every=40, compile="off", seeds=1,
                      dtype=dtype, init="prieto", **{**PRIETO, "hidden": 64})
    rows = [{"model": i, "cell": i, "seed": i, "tau": 1.0, "norm_target": None, **BASE, **k}
            for i, k in enumerate(KNOBS)]
    clamped = KNOBS.index({"norm_target": 20.0, "t_clamp": 30})
    batch = Trainer(cfg, tmp_path / "batch", table=rows, progress=False)
    models = batch.run()
    curves = batch.curves()
    assert models.t_mem.notna().sum() >= 3                      # it trains: most memorize within 120 steps
    for i, row in enumerate(rows):
        alone = Trainer(cfg, tmp_path / f"solo{i}", table=[{**row, "model": 0, "cell": 0}], progress=False)
        alone_models = alone.run()
        mine = curves[curves.model == i].drop(columns="model").reset_index(drop=True)
        theirs = alone.curves().drop(columns="model").reset_index(drop=True)
        assert len(mine) > 20 and mine[["step", "metric"]].equals(theirs[["step", "metric"]])
        assert (mine.value.to_numpy() == theirs.value.to_numpy()).all(), KNOBS[i]
        if i == clamped:                                        # the clamp holds ||W|| over W1, W2, W3 at 20
            norm = mine[(mine.metric == "weight_norm") & (mine.step >= 30)].value
            assert len(norm) > 5 and abs(norm - 20.0).max() < 1e-3
        for c in ("t_mem", "t_grok", "steps"):
            a, b = models.iloc[i][c], alone_models.iloc[0][c]
            assert (pd.isna(a) and pd.isna(b)) or a == b, (KNOBS[i], c)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("setting", [PRIETO | {"hidden": 16},
                                     dict(mlp_input="embed", mlp_layers=2, hidden=16, mlp_act="gelu", mlp_bias=True)])
def test_export_writes_the_peers_mlp_as_a_module(tmp_path, setting):
    """`export --to transformer-lens` of a peers' MLP run: load_mlp gives its logits on all p^2 pairs."""
    from fastgrok.cli import main
    from fastgrok.core.models import build_model
    from fastgrok.export import load_mlp, model_params
    torch.set_num_threads(1)
    out = tmp_path / "run"
    args = ["train", "--quiet", "--p", "7", "--seeds", "2", "--steps", "20", "--eval-every", "10", "--no-compile",
            "--train-frac", "0.6", "--d-embed", "4", "--out", str(out)]
    for k, v in setting.items():
        args += [f"--{k.replace('_', '-')}", ("on" if v else "off") if isinstance(v, bool) else str(v)]
    assert main(args) == 0
    assert main(["export", str(out), "--model", "1", "--to", "transformer-lens", str(tmp_path / "exp")]) == 0
    module = load_mlp(tmp_path / "exp")
    cfg, P = model_params(out, 1)
    m = build_model(cfg)
    flat = m.layout.pack({k: v[None] for k, v in P.items()})
    a, b = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    want = m.logits(flat, a, b)[0]
    got = module(torch.stack([a, b], 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want.abs().max() > 0


def test_runs_saved_before_the_mlp_fields_keep_their_fingerprint():
    """A config saved without the MLP fields (every run before them) reads as the study's MLP and keeps its
    fingerprint; a peers' MLP does not share it."""
    from fastgrok.config import STUDY_MLP, with_defaults
    from fastgrok.store import config_fingerprint
    for cfg in (TrainConfig(), TrainConfig(model="transformer"), TrainConfig(p=31, lr=0.01)):
        old = {k: v for k, v in cfg.to_dict().items() if k not in STUDY_MLP}
        assert config_fingerprint(old) == config_fingerprint(cfg.to_dict())
        assert TrainConfig.from_dict(old) == cfg and with_defaults(old) == with_defaults(cfg.to_dict())
    assert config_fingerprint(TrainConfig(mlp_layers=2).to_dict()) != config_fingerprint(TrainConfig().to_dict())


def test_d_embed_on_the_one_hot_mlp_is_said_to_be_ignored(tmp_path, capsys):
    from fastgrok.cli import main
    torch.set_num_threads(1)
    assert main(["train", "--quiet", "--p", "5", "--seeds", "1", "--steps", "2", "--eval-every", "1", "--no-compile",
                 "--train-frac", "0.6", "--mlp-input", "onehot", "--d-embed", "8", "--out", str(tmp_path / "r")]) == 0
    assert "--d-embed sets the embedding's width; the one-hot MLP (--mlp-input onehot) has none: ignored" in \
        capsys.readouterr().err
