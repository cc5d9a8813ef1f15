"""Initial weights: the study's scales, its cell-level draw (`init = "study"`) and the per-model draw.

The study's recipe (paper-notes, "Init"), written out here with torch.randn as the reference: one CPU
generator seeded seed0 draws randn(S, p, d) for E of all S seeds, then randn(S, 2d, H) for W1, then
randn(S, H, p) for W2, each divided by sqrt(d), sqrt(2d), sqrt(H); seed s takes slice s; biases zero.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastgrok.grid import jobs as grid
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.grid.experiments import load_experiment
from fastgrok.core.models import MLP
from fastgrok.grid.plan import make_plan
from fastgrok.train.trainer import Trainer


def _study_draw(seed0: int, S: int, p: int, d: int = 128, H: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed0)
    E = torch.randn(S, p, d, generator=g) / math.sqrt(d)
    W1 = torch.randn(S, 2 * d, H, generator=g) / math.sqrt(2 * d)
    W2 = torch.randn(S, H, p, generator=g) / math.sqrt(H)
    return {"E": E, "W1": W1, "W2": W2}


def _weights(tr: Trainer) -> dict:
    return {k: v.cpu() for k, v in tr.model.layout.views(tr.state["flat"]).items()}


def test_study_draw_seed_for_seed_at_p59(tmp_path):
    # the acceptance cell: p = 59, 12 seeds from seed0 0; seeds 0 and 11 against the recipe
    tr = Trainer(TrainConfig(p=59, seeds=12, init="study"), tmp_path, progress=False)
    W, ref = _weights(tr), _study_draw(0, 12, 59)
    for s in (0, 11):
        for name in ("E", "W1", "W2"):
            assert torch.equal(W[name][s], ref[name][s]), (name, s)
        assert not W["b1"][s].any() and not W["b2"][s].any()
    # the first values, so a change of recipe shows as numbers and not only as a mismatch
    assert W["E"][0, 0, :3].tolist() == ref["E"][0, 0, :3].tolist()
    assert W["E"][11, 0, 0].item() == ref["E"][11, 0, 0].item() != W["E"][0, 0, 0].item()


def test_study_draw_depends_on_the_cell_not_the_batch(tmp_path):
    # seeds 3..5 of a cell of 6 from seed0 3, trained beside a cell of other seeds and temperatures
    cfg = TrainConfig(p=23, seeds=6, seed0=3, init="study", d_embed=16, hidden=32)
    alone = _weights(Trainer(cfg, tmp_path / "alone", progress=False))
    table = [{"model": i, "cell": 0, "seed": 7 + i, "tau": 1.3, "norm_target": None,
              "cell_seed0": 7, "cell_seeds": 2} for i in range(2)]
    table += [{"model": 2 + i, "cell": 1, "seed": 3 + s, "tau": 1.0, "norm_target": None,
               "cell_seed0": 3, "cell_seeds": 6} for i, s in enumerate((5, 0, 2))]
    mixed = _weights(Trainer(cfg, tmp_path / "mixed", progress=False, table=table))
    ref = _study_draw(3, 6, 23, d=16, H=32)
    for row, s in zip((2, 3, 4), (5, 0, 2)):
        for name in ("E", "W1", "W2"):
            assert torch.equal(mixed[name][row], alone[name][s]) and torch.equal(alone[name][s], ref[name][s])
    ref7 = _study_draw(7, 2, 23, d=16, H=32)
    assert torch.equal(mixed["E"][1], ref7["E"][1])
    # the same seed in a cell of another size is another draw (the cell decides, as in the study)
    other = _weights(Trainer(TrainConfig(p=23, seeds=4, seed0=3, init="study", d_embed=16, hidden=32),
                             tmp_path / "other", progress=False))
    assert torch.equal(other["E"][0], alone["E"][0]) and not torch.equal(other["W1"][0], alone["W1"][0])


def test_per_model_draw_depends_on_the_seed_alone_with_the_study_scales(tmp_path):
    cfg = TrainConfig(p=59, seeds=3, seed0=10)
    W = _weights(Trainer(cfg, tmp_path / "a", progress=False))
    solo = _weights(Trainer(TrainConfig(p=59, seeds=1, seed0=11), tmp_path / "b", progress=False))
    g = torch.Generator().manual_seed(11)                       # model 11's own generator, layout order
    E = torch.randn(59, 128, generator=g) / math.sqrt(128)      # E / sqrt(d): the width, not sqrt(p)
    W1 = torch.randn(256, 256, generator=g) / math.sqrt(256)
    W2 = torch.randn(256, 59, generator=g) / math.sqrt(256)
    for name, ref in (("E", E), ("W1", W1), ("W2", W2)):
        assert torch.equal(W[name][1], ref) and torch.equal(solo[name][0], ref)
    # at init ||E||^2 ~ p, ||W1||^2 ~ H, ||W2||^2 ~ p (paper-notes)
    sq = {n: W[n].square().sum((1, 2)).mean().item() for n in ("E", "W1", "W2")}
    assert sq["E"] == pytest.approx(59, rel=0.05) and sq["W1"] == pytest.approx(256, rel=0.05)
    assert sq["W2"] == pytest.approx(59, rel=0.05)


def test_grid_jobs_carry_the_cell_draw():
    spec = load_experiment("mediation")
    assert spec.train.get("init") == "study"           # the built-in specs that reproduce the study
    plan = make_plan(spec, "cpu")
    job = grid.batch_job(spec, plan, plan["batches"][0], {c["key"]: 50.0 for c in plan["calibrations"]},
                         "/tmp/x", "cpu", "off")
    assert {(r["cell_seed0"], r["cell_seeds"]) for r in job["rows"]} == {(0, 12)}
    cal = grid.calibration_job(spec, plan["calibrations"][0], "/tmp/x", "cpu", "off")
    assert [(r["seed"], r["cell_seed0"], r["cell_seeds"]) for r in cal["rows"]] == [(s, 0, 12) for s in range(12)]
    assert cal["cfg"]["init"] == "study"


def test_bad_init_is_refused():
    with pytest.raises(ConfigError, match="init must be one of model, study"):
        TrainConfig(init="nanda")
    lay = MLP(TrainConfig(p=23, d_embed=8, hidden=8)).layout
    with pytest.raises(ValueError, match="not one of its cell's seeds"):
        lay.init([5], torch.float32, "cpu", cells=[(0, 4)])


def test_transformer_embeddings_start_at_the_mlps_scale(tmp_path):
    # the grokking transformers' convention: tokens and positions N(0, 1)/sqrt(d_model) (like the MLP's E);
    # the other matrices N(0, 1)/sqrt(fan_in); one generator per model, layout order
    cfg = TrainConfig(model="transformer", p=11, seeds=1, seed0=4, d_model=16, n_heads=2, d_mlp=24)
    W = _weights(Trainer(cfg, tmp_path, progress=False))
    g = torch.Generator().manual_seed(4)
    ref = {"W_E": torch.randn(12, 16, generator=g) / 4.0, "W_pos": torch.randn(3, 16, generator=g) / 4.0}
    for c in "QKVO":
        ref[f"W_{c}0"] = torch.randn(16, 16, generator=g) / 4.0
    ref["W_in0"] = torch.randn(16, 24, generator=g) / 4.0
    ref["W_out0"] = torch.randn(24, 16, generator=g) / math.sqrt(24)
    ref["W_U"] = torch.randn(16, 11, generator=g) / 4.0
    for name, r in ref.items():
        assert torch.equal(W[name][0], r), name
