"""Progress measures at evaluation (fastgrok/progress.py) against float64 references written here.

- Fourier sparsity and key frequencies: an embedding whose power sits in frequencies 3 and 7 (plus a DC
  offset, which is left out) reads 1.0 with keys 7, 3; a random one about K / (p//2); both against a
  numpy FFT with the conjugate pairs merged by hand; the transformer reads its W_E's first p rows;
- per-matrix norms against torch.linalg.norm of each matrix;
- restricted and excluded losses against a direct float64 implementation: the p^2 x p^2 projection matrix
  built explicitly from cos/sin of w(a + b), CE and MSE; NaN for another op and for the transformer;
- a batch of mixed models (ops, taus, seeds) gives each model exactly the curves it gives alone;
- a checkpoint from before the progress measures resumes with them NaN; curves.parquet holds them.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fastgrok import store
from fastgrok.cli import main
from fastgrok.config import TrainConfig, without_defaults
from fastgrok.core.measures import K_FREQ, fourier_stats
from fastgrok.core.step import EVAL_METRICS, eval_metrics
from fastgrok.train.trainer import Trainer, train

TINY = dict(p=13, train_frac=0.6, lr=1e-2, d_embed=16, hidden=32, device="cpu", compile="off", kernels="torch")


pytestmark = pytest.mark.usefixtures("one_thread")       # conftest.py


# ------------------------------------------------------------------------------------------ references
def _ref_power(E: np.ndarray) -> np.ndarray:
    """(p, d) -> power of k = 1 .. p//2: |FFT|^2 over tokens, summed over columns, k and p - k merged."""
    p = E.shape[0]
    P = (np.abs(np.fft.fft(E, axis=0)) ** 2).sum(1)                  # (p,) k = 0 .. p-1
    return np.array([P[k] + (P[p - k] if p - k != k else 0.0) for k in range(1, p // 2 + 1)])


def _ref_fourier(E: np.ndarray) -> tuple[float, list[int]]:
    pw = _ref_power(E)
    keys = list(np.argsort(-pw, kind="stable")[:K_FREQ] + 1)
    return pw[np.array(keys) - 1].sum() / pw.sum(), keys


def _cols(tr: Trainer, ev: torch.Tensor) -> dict[str, np.ndarray]:
    ev = ev.double().cpu().numpy()
    return {m: ev[:, i] for i, m in enumerate(tr.metrics)}


def _trained(cfg: TrainConfig, path, steps: int) -> Trainer:
    tr = Trainer(dataclasses.replace(cfg, steps=steps, stop_when_grokked=False), path, progress=False)
    tr.run()
    return tr


# ------------------------------------------------------------------------------------------ Fourier
@pytest.mark.parametrize("p", [31, 32])
def test_an_embedding_in_frequencies_3_and_7_has_sparsity_one(p):
    t = torch.arange(p, dtype=torch.float64)
    cols = [2.0 * torch.cos(2 * math.pi * 7 * t / p + 0.3), 0.5 * torch.cos(2 * math.pi * 3 * t / p),
            torch.sin(2 * math.pi * 7 * t / p), 0.7 * torch.sin(2 * math.pi * 3 * t / p - 1.0)]
    E = torch.stack(cols, 1) + 5.0                                   # + a DC offset: left out
    out, keys = fourier_stats(E[None])
    assert out.shape == (1, 1 + K_FREQ) and out.dtype == torch.float64
    assert out[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert out[0, 1:3].tolist() == [7.0, 3.0] and keys[0, :2].tolist() == [7, 3]
    ref, ref_keys = _ref_fourier(E.numpy())
    assert ref == pytest.approx(1.0, abs=1e-12) and ref_keys[:2] == [7, 3]


@pytest.mark.parametrize("p", [59, 60])
def test_a_random_embedding_has_sparsity_near_k_over_half_p(p):
    E = torch.randn(3, p, 4096, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    out, _ = fourier_stats(E)
    for m in range(3):
        ref, keys = _ref_fourier(E[m].numpy())
        assert out[m, 0].item() == pytest.approx(ref, rel=1e-12)
        assert out[m, 1:].tolist() == [float(k) for k in keys]
    expected = K_FREQ / (p // 2) if p % 2 else K_FREQ / (p // 2 - 0.5)   # even p: k = p/2 has half the power
    assert (out[:, 0] > expected).all() and (out[:, 0] < 1.1 * expected).all(), (out[:, 0], expected)


def test_fewer_frequencies_than_k_pad_with_nan():
    E = torch.randn(2, 7, 5, dtype=torch.float64)                     # p = 7: frequencies 1, 2, 3
    out, keys = fourier_stats(E)
    assert out[:, 0].tolist() == pytest.approx([1.0, 1.0])
    assert keys.shape == (2, 3) and sorted(out[0, 1:4].tolist()) == [1.0, 2.0, 3.0]
    assert torch.isnan(out[:, 4:]).all()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_evaluation_reads_the_embeddings_fourier_stats_and_every_matrix_norm(tmp_path, model):
    extra = dict(d_model=16, n_heads=2, d_mlp=32) if model == "transformer" else {}
    tr = _trained(TrainConfig(**TINY, model=model, seeds=2, taus=(1.0, 1.5), **extra), tmp_path, steps=30)
    got = _cols(tr, tr.eval_fn(tr.state, tr.batch))
    lay = tr.model.layout
    P = lay.views(tr.state["flat"])
    names, M = lay.names[: lay.n_matrices], len(tr.table)
    assert tr.metrics == EVAL_METRICS + ("fourier_sparsity",) + tuple(f"key_freq_{i}" for i in range(1, 6)) + \
        tuple(f"norm_{n}" for n in names)
    for n in names:
        ref = torch.stack([torch.linalg.norm(P[n][m].double()) for m in range(M)]).numpy()
        np.testing.assert_allclose(got[f"norm_{n}"], ref, rtol=1e-12)
    E = P["E"] if model == "mlp" else P["W_E"][:, : tr.cfg.p]        # the transformer: its first p rows
    for m in range(M):
        ref, keys = _ref_fourier(E[m].double().numpy())
        assert got["fourier_sparsity"][m] == pytest.approx(ref, rel=1e-9)
        assert [got[f"key_freq_{i}"][m] for i in range(1, 6)] == [float(k) for k in keys]


# ------------------------------------------------------------------------------------------ restricted loss
def _direct_logits(P: dict, a, b) -> torch.Tensor:
    """(M, N, V) the MLP's logits in the direct (non-table) form, float64."""
    x = torch.cat([P["E"][:, a], P["E"][:, b]], -1)                   # (M, N, 2d)
    h = F.gelu(x @ P["W1"] + P["b1"][:, None])
    return h @ P["W2"] + P["b2"][:, None]


def _loss(z, y, tau, loss):
    s = z / tau
    if loss == "mse":
        return ((s - F.one_hot(y, s.shape[-1]).double()) ** 2).sum(-1).mean()
    return F.cross_entropy(s, y)


def _ref_restricted(z, a, b, y, keys, p, tau, train_rows, loss):
    """One model: (restricted loss over all pairs, excluded loss over train rows) by an explicit N x N projection."""
    ab = (a + b).double()
    vecs = []
    for w in keys:
        for f in (torch.cos, torch.sin):
            u = f(2 * math.pi * w * ab / p)
            if u.norm() > 1e-9:
                vecs.append(u / u.norm())
    Uk = torch.stack(vecs, 1)                                         # (N, 2k) key directions
    const = torch.full((len(a), 1), 1 / math.sqrt(len(a)), dtype=torch.float64)
    U = torch.cat([const, Uk], 1)
    P_S, P_key = U @ U.T, Uk @ Uk.T                                   # (N, N)
    restricted = _loss(P_S @ z, y, tau, loss)
    excl = (z - P_key @ z)[train_rows]
    return restricted.item(), _loss(excl, y[train_rows], tau, loss).item()


@pytest.mark.parametrize("dtype,loss,rtol", [("float64", "ce", 1e-9), ("float64", "mse", 1e-9),
                                             ("float32", "ce", 2e-4)])
def test_restricted_and_excluded_loss_against_an_explicit_projection(tmp_path, dtype, loss, rtol):
    cfg = TrainConfig(**TINY, seeds=2, taus=(1.0, 1.5), dtype=dtype, loss=loss, restricted_loss=True)
    tr = _trained(cfg, tmp_path, steps=150)
    assert tr.metrics[-2:] == ("restricted_loss", "excluded_loss")
    got = _cols(tr, tr.eval_fn(tr.state, tr.batch))
    P = {k: v.double() for k, v in tr.model.layout.views(tr.state["flat"]).items()}
    task, p = tr.task, cfg.p
    z = _direct_logits(P, task.a, task.b)
    for m, row in enumerate(tr.table):
        tau = row["tau"]
        _, keys = _ref_fourier(P["E"][m].numpy())
        rows = task.train_mask[m].nonzero()[:, 0]
        r, e = _ref_restricted(z[m], task.a, task.b, task.y, keys, p, tau, rows, loss)
        assert got["restricted_loss"][m] == pytest.approx(r, rel=rtol)
        assert got["excluded_loss"][m] == pytest.approx(e, rel=rtol)
        assert got["excluded_loss"][m] > got["train_loss"][m]         # the key frequencies carry the fit


def test_restricted_loss_is_nan_off_addition_and_for_the_transformer(tmp_path):
    tr = _trained(TrainConfig(**TINY, op=("add", "mul"), seeds=1, restricted_loss=True), tmp_path / "ops", 20)
    got = _cols(tr, tr.eval_fn(tr.state, tr.batch))
    assert [r["op"] for r in tr.table] == ["add", "mul"]
    assert np.isfinite(got["restricted_loss"][0]) and np.isfinite(got["excluded_loss"][0])
    assert np.isnan(got["restricted_loss"][1]) and np.isnan(got["excluded_loss"][1])
    assert np.isfinite(got["fourier_sparsity"]).all()
    tf = dict(model="transformer", d_model=16, n_heads=2, d_mlp=32)
    tr = _trained(TrainConfig(**TINY, **tf, seeds=1, restricted_loss=True), tmp_path / "tf", 5)
    got = _cols(tr, tr.eval_fn(tr.state, tr.batch))
    assert np.isnan(got["restricted_loss"]).all() and np.isnan(got["excluded_loss"]).all()


def test_restricted_loss_is_off_by_default_and_keeps_old_fingerprints():
    assert TrainConfig().restricted_loss is False
    assert "restricted_loss" not in without_defaults(TrainConfig().to_dict())
    assert "restricted_loss" in without_defaults(TrainConfig(restricted_loss=True).to_dict())
    with pytest.raises(ValueError, match="restricted_loss must be true or false"):
        TrainConfig(restricted_loss=1)


# ------------------------------------------------------------------------------------------ in a batch
def test_a_batch_of_mixed_models_gives_each_its_curves_alone(tmp_path):
    cfg = TrainConfig(**TINY, op=("add", "sub"), seeds=2, taus=(1.0, 1.5), steps=100, restricted_loss=True)
    batch = Trainer(cfg, tmp_path / "batch", progress=False)
    batch.run()
    curves = batch.curves()
    new = set(batch.metrics) - set(EVAL_METRICS)
    assert new >= {"fourier_sparsity", "norm_E", "norm_W1", "norm_W2", "restricted_loss", "excluded_loss"}
    for row in batch.table:
        alone = dataclasses.replace(cfg, op=row["op"], seeds=1, seed0=row["seed"], taus=(row["tau"],))
        solo = Trainer(alone, tmp_path / f"solo{row['model']}", progress=False)
        solo.run()
        mine = curves[curves.model == row["model"]].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, solo.curves().drop(columns="model").reset_index(drop=True),
                                      check_exact=True)
        r = mine[mine.metric == "restricted_loss"].value
        assert (r.notna() if row["op"] == "add" else r.isna()).all()


# ------------------------------------------------------------------------------------------ records
def test_an_old_checkpoint_resumes_with_the_progress_measures_nan(tmp_path):
    cfg = TrainConfig(**TINY, seeds=2, steps=50, stop_when_grokked=False)
    train(cfg, tmp_path, progress=False)
    ck = store.load_checkpoint(tmp_path)
    ck["records"]["evals"] = ck["records"]["evals"][:, :, : len(EVAL_METRICS)]     # written before them
    store.save_checkpoint(tmp_path, ck)
    train(dataclasses.replace(cfg, steps=100), tmp_path, resume=True, progress=False)
    c = pd.read_parquet(tmp_path / "curves.parquet")
    for m in ("fourier_sparsity", "key_freq_1", "norm_W1"):
        v = c[c.metric == m]
        assert v[v.step <= 50].value.isna().all() and (v.step <= 50).sum() == 2 * 3
        assert v[v.step > 50].value.notna().all() and (v.step > 50).sum() == 2 * 2
    assert c[c.metric == "train_acc"].value.notna().all()


def test_a_config_saved_before_restricted_loss_resumes(tmp_path):
    cfg = TrainConfig(**TINY, seeds=1, steps=25)
    train(cfg, tmp_path, progress=False)
    saved = store.read_json(tmp_path / "config.json")
    del saved["restricted_loss"]                                       # as written before the field
    (tmp_path / "config.json").write_text(json.dumps(saved))           # (and before seals)
    train(dataclasses.replace(cfg, steps=50), tmp_path, resume=True, progress=False)
    assert pd.read_parquet(tmp_path / "models.parquet").steps.tolist() == [50]


@pytest.mark.parametrize("flag", [[], ["--restricted-loss"]])
def test_curves_parquet_holds_the_progress_measures(tmp_path, flag):
    out = tmp_path / "run"
    args = ["train", "--p", "13", "--seeds", "2", "--d-embed", "16", "--hidden", "32", "--steps", "50",
            "--no-compile", "--quiet", "--device", "cpu", *flag, "--out", str(out)]
    assert main(args) == 0
    cfg = store.read_config(out / "config.json")
    assert cfg.restricted_loss is bool(flag)
    curves = pd.read_parquet(out / "curves.parquet")
    tr = Trainer(cfg, tmp_path / "unused", progress=False)
    assert set(curves.metric) == set(eval_metrics(tr.model, cfg))
    assert ("restricted_loss" in set(curves.metric)) is bool(flag)
    per_eval = curves[curves.metric == "norm_W2"].groupby("model").step.apply(list)
    assert all(s == [0, 25, 50] for s in per_eval)                    # recorded at every evaluation
    models = pd.read_parquet(out / "models.parquet")
    assert "fourier_sparsity" not in models.columns                     # models.parquet keeps its columns


def test_a_specs_train_table_turns_it_on_without_a_calibration_of_its_own():
    from fastgrok.grid.experiments import ExperimentSpec
    from fastgrok.grid.plan import calib_key, cell_config, expand
    d = {"name": "x", "p": [11], "rho": [1.0, 1.1], "tau": [1.0]}
    spec = ExperimentSpec.from_dict({**d, "train": {"restricted_loss": True}})
    cells = expand(spec)
    assert len(cells) == 2 and all(cell_config(spec, c).restricted_loss for c in cells)
    assert [calib_key(c) for c in cells] == [calib_key(c) for c in expand(ExperimentSpec.from_dict(d))]
