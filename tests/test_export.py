"""`fastgrok export` (fastgrok/export.py), with the real libraries:

- a snapshot as safetensors: safetensors' own loader gives, per model and name, the arrays of fastgrok's
  reader (snapshots.load), with the step and models in its metadata;
- a trained transformer, with and without LayerNorm, as a TransformerLens HookedTransformer: on all p^2
  inputs its logits at the last position equal fastgrok's to float32 rounding, and run_with_cache works;
- a trained MLP as a plain torch.nn.Module, with the same check;
- user mistakes are one line, exit 2.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fastgrok.train import snapshots
from fastgrok import store
from fastgrok.config import TrainConfig
from fastgrok.core.models import build_model
from fastgrok.train.trainer import train

from fastgrok.cli import main


def fastgrok(*args) -> int:
    """`fastgrok ARGS` in this process (the command's own code path, without a new interpreter's imports)."""
    return main([str(a) for a in args])

TINY = dict(p=11, steps=300, eval_every=50, compile="off", seeds=2, snapshots=3)
TRANSFORMER = dict(model="transformer", d_model=16, n_heads=2, d_mlp=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained tiny runs: the transformer without and with LayerNorm, and the MLP (2 models each)."""
    root = tmp_path_factory.mktemp("export")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfgs = {"transformer": TrainConfig(**TINY, **TRANSFORMER), "layernorm": TrainConfig(**TINY, **TRANSFORMER, layernorm=True),
            "mlp": TrainConfig(**TINY, d_embed=8, hidden=16)}
    for name, cfg in cfgs.items():
        train(cfg, root / name, progress=False)
    torch.set_num_threads(n)
    return root


def all_inputs(p: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    return a.reshape(-1), b.reshape(-1)


def fastgrok_logits(run, k: int) -> torch.Tensor:
    """fastgrok's own logits of model k (its final weights) on all p^2 inputs, (p^2, p)."""
    cfg = store.read_config(run / store.CONFIG)
    flat = store.load_checkpoint(run)["state"]["flat"][k:k + 1]
    with torch.no_grad():
        return build_model(cfg).logits(flat, *all_inputs(cfg.p))[0]


def test_a_snapshot_reads_the_same_with_safetensors(runs, tmp_path):
    from safetensors.numpy import load_file
    from safetensors import safe_open
    out = tmp_path / "s.safetensors"
    rc = fastgrok("export", runs / "transformer", "--snapshot", 300, "--to", "safetensors", out)
    assert rc == 0
    ours = snapshots.load(runs / "transformer" / "snapshots" / "step_000300.npz")
    got = load_file(out)
    names = [k for k in ours if k not in ("models", "reason", "flat")]
    assert sorted(got) == sorted(f"model{m}.{n}" for m in ours["models"] for n in names)
    for i, m in enumerate(ours["models"]):
        for n in names:
            assert (got[f"model{m}.{n}"] == ours[n][i]).all() and got[f"model{m}.{n}"].dtype == ours[n].dtype
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["step"] == "300" and json.loads(meta["models"]) == ours["models"].tolist()


@pytest.mark.parametrize("name", ["transformer", "layernorm"])
def test_transformer_lens_export_gives_fastgrok_logits_on_all_inputs(runs, tmp_path, name):
    from transformer_lens import HookedTransformer
    from fastgrok.export import load_transformer_lens
    out = tmp_path / "tl"
    rc = fastgrok("export", runs / name, "--model", 1, "--to", "transformer-lens", out)
    assert rc == 0
    tl = load_transformer_lens(out)
    assert isinstance(tl, HookedTransformer)
    assert tl.cfg.d_vocab == 12 and tl.cfg.n_ctx == 3 and tl.cfg.act_fn == "gelu"
    assert tl.cfg.normalization_type == ("LN" if name == "layernorm" else None)
    assert all((v == 0).all() for k, v in tl.state_dict().items() if k.rsplit(".", 1)[-1].startswith("b_"))
    a, b = all_inputs(11)
    tokens = torch.stack([a, b, torch.full_like(a, 11)], 1)
    with torch.no_grad():
        got, cache = tl.run_with_cache(tokens)
    ref = fastgrok_logits(runs / name, 1)
    assert pd.read_parquet(runs / name / "models.parquet")["train_acc"][1] > 0.5       # a trained model
    torch.testing.assert_close(got[:, -1], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert cache["blocks.0.attn.hook_pattern"].shape == (121, 2, 3, 3)


def test_the_mlp_exports_as_a_torch_module_with_fastgrok_logits(runs, tmp_path):
    from fastgrok.export import load_mlp
    out = tmp_path / "mlp"
    rc = fastgrok("export", runs / "mlp", "--model", 0, "--to", "transformer-lens", out)
    assert rc == 0
    module = load_mlp(out)
    assert isinstance(module, torch.nn.Module)
    a, b = all_inputs(11)
    with torch.no_grad():
        got = module(torch.stack([a, b], 1))
    ref = fastgrok_logits(runs / "mlp", 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_a_snapshots_model_exports_too(runs, tmp_path):
    from fastgrok.export import load_transformer_lens
    rc = fastgrok("export", runs / "transformer", "--model", 0, "--snapshot", 0, "--to", "transformer-lens", tmp_path / "t")
    assert rc == 0
    flat = snapshots.load(runs / "transformer" / "snapshots" / "step_000000.npz")["flat"][:1]
    cfg = store.read_config(runs / "transformer" / store.CONFIG)
    a, b = all_inputs(11)
    with torch.no_grad():
        ref = build_model(cfg).logits(torch.from_numpy(flat), a, b)[0]
        got = load_transformer_lens(tmp_path / "t")(torch.stack([a, b, torch.full_like(a, 11)], 1))[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("args, says", [
    (["--snapshot", "7", "--to", "safetensors"], "has no snapshot of step 7 (steps with snapshots: 0, 300)"),
    (["--to", "safetensors"], "give --snapshot STEP"),
    (["--to", "transformer-lens"], "give --model K"),
    (["--model", "5", "--to", "transformer-lens"], "--model 5: the run has models 0..1"),
])
def test_mistakes_are_one_line(runs, tmp_path, capsys, args, says):
    assert fastgrok("export", runs / "transformer", *args, tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgrok: error: ") and err.count("\n") == 1 and says in err, err
    assert fastgrok("export", tmp_path / "nowhere", "--to", "safetensors", "--snapshot", 0, tmp_path / "x") == 2
    assert "holds no run" in capsys.readouterr().err


def test_a_grid_models_snapshot_exports_as_its_cells_transformer(tmp_path):
    """A grid keeps no final checkpoint: its model K exports from a snapshot, built as its cell's config."""
    from fastgrok.grid.experiments import to_toml
    from fastgrok.export import load_transformer_lens
    spec = {"name": "export_grid", "seeds": 2, "p": [11], "model": ["transformer"], "lr": [3e-3],
            "train": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "eval_every": 25, "compile": "off",
                      "snapshots": 2, "stop_when_grokked": False},
            "budget": {"steps": 50}, "engine": {"max_models": 2}, "grid": [{"tau": [1.0, 1.5]}]}
    (tmp_path / "g.toml").write_text(to_toml(spec))
    assert fastgrok("run", tmp_path / "g.toml", "--out", tmp_path / "g", "--quiet") == 0
    assert fastgrok("export", tmp_path / "g", "--model", 3, "--to", "transformer-lens", tmp_path / "no") == 2
    assert fastgrok("export", tmp_path / "g", "--model", 3, "--snapshot", 50, "--to", "transformer-lens",
                    tmp_path / "t") == 0
    (z,) = [z for f in (tmp_path / "g" / "snapshots").glob("*/step_000050.npz")
            if 3 in (z := snapshots.load(f))["models"]]
    k = list(z["models"]).index(3)
    cfg = TrainConfig(p=11, model="transformer", d_model=16, n_heads=2, d_mlp=32)
    a, b = all_inputs(11)
    with torch.no_grad():
        ref = build_model(cfg).logits(torch.from_numpy(z["flat"][k:k + 1]), a, b)[0]
        got = load_transformer_lens(tmp_path / "t")(torch.stack([a, b, torch.full_like(a, 11)], 1))[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


PEER_FLAGS = {"nanda": ["--tf-act", "relu", "--tf-bias", "mlp", "--tf-unembed", "vocab", "--tf-init", "nanda"],
              "op-token-biases-ln": ["--tf-tokens", "a op b =", "--tf-bias", "all", "--tf-unembed", "vocab",
                                     "--tf-init", "torch", "--layernorm", "--n-layers", "2"]}


@pytest.mark.parametrize("name", list(PEER_FLAGS))
def test_the_peers_conventions_export_to_transformer_lens(tmp_path, name):
    """The tf_* conventions TransformerLens can express (the op token, logits over the vocabulary, ReLU,
    biases; issue 30): trained through the CLI flags, exported, its logits on all p^2 inputs are fastgrok's."""
    from fastgrok.export import load_transformer_lens
    torch.set_num_threads(1)
    assert fastgrok("train", "--model", "transformer", "--p", 11, "--d-model", 16, "--n-heads", 2, "--d-mlp", 32,
                    "--steps", 100, "--eval-every", 50, "--no-compile", "--seeds", 1, "--quiet",
                    *PEER_FLAGS[name], "--out", tmp_path / "run") == 0
    assert fastgrok("export", tmp_path / "run", "--model", 0, "--to", "transformer-lens", tmp_path / "tl") == 0
    tl = load_transformer_lens(tmp_path / "tl")
    cfg = store.read_config(tmp_path / "run" / store.CONFIG)
    op = cfg.tf_tokens == "a op b ="
    assert tl.cfg.n_ctx == 3 + op and tl.cfg.d_vocab == tl.cfg.d_vocab_out == 12 + op and tl.cfg.act_fn == cfg.tf_act
    biases = {k: v for k, v in tl.state_dict().items() if k.rsplit(".", 1)[-1] in ("b_Q", "b_O", "b_in", "b_out")}
    assert any((v != 0).any() for v in biases.values())                 # trained biases came across
    a, b = all_inputs(11)
    eq = torch.full_like(a, 11)
    tokens = torch.stack([a, torch.full_like(a, 12), b, eq] if op else [a, b, eq], 1)
    with torch.no_grad():
        got = tl(tokens)[:, -1]
    ref = fastgrok_logits(tmp_path / "run", 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_lee_block_is_refused_in_one_line(tmp_path, capsys):
    assert fastgrok("train", "--model", "transformer", "--p", 11, "--d-model", 16, "--n-heads", 2, "--d-mlp", 32,
                    "--steps", 20, "--eval-every", 10, "--no-compile", "--seeds", 1, "--quiet", "--layernorm",
                    "--tf-block", "lee", "--out", tmp_path / "run") == 0
    capsys.readouterr()
    assert fastgrok("export", tmp_path / "run", "--model", 0, "--to", "transformer-lens", tmp_path / "tl") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tf_block 'lee'" in err and "no TransformerLens form" in err, err
    assert fastgrok("train", "--model", "transformer", "--p", 11, "--tf-block", "lee", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs layernorm" in err, err
