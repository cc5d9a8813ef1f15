"""Regimes: a spec's `[[grid]]` block may name its regime, set its own step budget (`steps`) and its own
TrainConfig fields (`[grid.train]`), so one experiment runs each paper in its own setting (issue 30, item 5).
Checked: such a block's models equal a plain Trainer run of the same settings (bitwise), blocks of different
[grid.train] never share a batch, the results carry the regime, specs without blocks' extras plan as before,
and the claims table's verdicts against hand-made medians.
"""
from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.analysis import interventions
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.grid.executors import run_experiment
from fastgrok.grid.experiments import ExperimentSpec, load_experiment, to_toml
from fastgrok.grid.plan import batch_config, expand, make_plan, shape_of
from fastgrok.train.trainer import Trainer

SPEC = """
name = "regimes"
seeds = 2
p = [13]
train_frac = [0.7]
lr = [0.01]
wd = [1.0]
[train]
d_embed = 16
hidden = 32
eval_every = 10
compile = "off"
[budget]
steps = 60
[[grid]]
regime = "study"
[[grid]]
regime = "no decay, narrow"
steps = 40
wd = [0.0]
loss = ["ce", "stablemax"]
eps = [1e-12]
[grid.train]
hidden = 24
d_embed = 8
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spec() -> ExperimentSpec:
    return ExperimentSpec.from_dict(tomllib.loads(SPEC))


def test_blocks_carry_regime_budget_and_train_through_the_plan():
    s = spec()
    assert ExperimentSpec.from_dict(tomllib.loads(to_toml(s.to_dict()))) == s        # TOML round trip
    cells = expand(s)
    assert [(c.get("regime"), c.get("train"), c["budget"], c["loss"]) for c in cells] == [
        ("study", None, 60, "ce"), ("no decay, narrow", {"hidden": 24, "d_embed": 8}, 40, "ce"),
        ("no decay, narrow", {"hidden": 24, "d_embed": 8}, 40, "stablemax")]
    plan = make_plan(s, "cpu")
    assert [b["cells"] for b in plan["batches"]] == [[0], [1, 2]]                 # [grid.train] splits batches
    assert shape_of(cells[0]) != shape_of(cells[1]) and shape_of(cells[1]) == shape_of(cells[2])
    cfg = batch_config(s, [cells[1], cells[2]])
    assert (cfg.hidden, cfg.d_embed, cfg.eps, cfg.loss) == (24, 8, 1e-12, ("ce", "stablemax"))
    assert (batch_config(s, [cells[0]]).hidden, batch_config(s, [cells[0]]).eps) == (32, 1e-8)


@pytest.mark.parametrize("name", ["phase", "interventions", "mediation"])
def test_specs_without_block_extras_plan_as_before(name):
    """Cells of blocks without regime/steps/train have no new keys: plans (and cell ids) are unchanged."""
    s = load_experiment(name)
    if any(b.regime or b.train or b.steps for b in s.grids):
        pytest.skip("this built-in names regimes")
    assert not any({"regime", "train", "steps"} & set(c) for c in expand(s))


BAD = [
    ('[[grid]]\nregime = ""\n', "grid[0].regime"),
    ('[[grid]]\nregime = 3\n', "grid[0].regime"),
    ('[[grid]]\nsteps = 0\n', "grid[0].steps"),
    ('[[grid]]\n[grid.train]\nhiden = 3\n', "grid[0].train.hiden"),
    ('[[grid]]\n[grid.train]\neps = 1e-25\n', "grid[0].train.eps"),          # per model: a block axis
    ('[[grid]]\n[grid.train]\nsteps = 10\n', "grid[0].train.steps"),
    ('[[grid]]\n[grid.train]\nhidden = "wide"\n', "grid[0].train.hidden"),
    ('[[grid]]\n[grid.train]\nhidden = 0\n', "grid[0].train.hidden"),        # refused by TrainConfig
    ('[[grid]]\nrho = [1.0]\n[grid.train]\nhidden = 8\n', "grid[0].rho"),     # calibrated with [train]
    ('regime = "top"\n', "regime"),                                           # only in a block
    ('[[grid]]\ntrain = 3\n', "grid[0].train"),
]


@pytest.mark.parametrize("text,field", BAD, ids=[f for _, f in BAD])
def test_bad_block_extras_name_the_field(text, field):
    with pytest.raises(ConfigError) as e:
        ExperimentSpec.from_dict(tomllib.loads('name = "bad"\np = [11]\n' + text))
    assert str(e.value).startswith(f"{field}: "), str(e.value)
    assert "\n" not in str(e.value)


def test_a_blocks_models_equal_a_plain_run_of_its_settings(tmp_path):
    """The narrow no-decay block, packed in the grid, equals a Trainer run of TrainConfig with the spec's
    [train], the block's [grid.train], its axes and its budget: every column and curve, bitwise."""
    run = run_experiment(spec(), out=tmp_path / "grid", progress=False)
    res = store.Results(run)
    models, curves = res.models(), res.curves()
    assert list(models.drop_duplicates("cell")["regime"]) == ["study", "no decay, narrow", "no decay, narrow"]
    cfg = TrainConfig(p=13, train_frac=0.7, lr=0.01, wd=0.0, loss=("ce", "stablemax"), eps=1e-12, d_embed=8,
                      hidden=24, eval_every=10, compile="off", device="cpu", seeds=2, steps=40)
    tr = Trainer(cfg, tmp_path / "plain", progress=False, table=cfg.model_table())
    tr.run()
    mine = models[models["cell"] >= 1].reset_index(drop=True)
    plain = tr.results()
    cols = [c for c in plain.columns if c not in ("model", "cell")]
    pd.testing.assert_frame_equal(mine[cols], plain[cols], check_exact=True)
    ids = sorted(mine["model"])
    want = tr.curves().assign(model=lambda d: d["model"] + ids[0])
    keys = [k for k in ("model", "step", "metric") if k in want]
    got = curves[curves["model"].isin(ids)][want.columns.tolist()].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want.sort_values(keys).reset_index(drop=True), check_exact=True)


# ------------------------------------------------------------------------------------------ claims
def frame(rows):
    """Models of hand-made cells: (cell, regime, loss, lr, orthograd, grokfast_lambda, t_grok per seed)."""
    out = []
    for cell, regime, loss, lr, ortho, lam, ts, budget in rows:
        for s, t in enumerate(ts):
            out.append({"model": len(out), "cell": cell, "seed": s, "regime": regime, "loss": loss, "lr": lr,
                        "wd": 0.0, "orthograd": ortho, "grokfast_lambda": lam, "t_grok": t, "budget": budget})
    return pd.DataFrame(out)


NO = np.nan


def test_claims_verdicts_from_hand_made_medians():
    m = frame([
        (0, "Prieto SM", "ce", 0.01, False, 0.0, [NO, NO, NO], 1000),
        (1, "Prieto SM", "stablemax", 0.01, False, 0.0, [500, 700, NO], 1000),    # 2/3 grok, none of CE
        (2, "Prieto OG", "ce", 0.01, False, 0.0, [800, 900, 950], 1000),
        (3, "Prieto OG", "ce", 0.01, True, 0.0, [100, 120, 130], 1000),          # 120 < 900
        (4, "Lee", "ce", 1e-3, False, 0.0, [3000, 3200, NO], 5000),              # median 3200
        (5, "Lee", "ce", 1.4e-3, False, 0.0, [2000, 2100, 2500], 5000),          # lr-matched control 2100
        (6, "Lee", "ce", 1e-3, False, 2.0, [900, 1000, 1100], 5000),             # 3200 / 1000 >= 3, 2100 > 1000
        (7, "Lee short", "ce", 1e-3, False, 0.0, [NO, NO, NO], 2000),            # baseline > 2000 only
        (8, "Lee short", "ce", 1e-3, False, 2.0, [900, 1000, 1100], 2000),
        (9, "lonely", "ce", 1e-3, False, 2.0, [10, 20, 30], 100),                # no baseline
    ])
    t = interventions.claims_table(m).set_index("cell")
    assert list(t.index) == [1, 3, 6, 8, 9]
    assert t.loc[1, "reproduces"] == "yes" and t.loc[1, "grokked"] == "2/3" and t.loc[1, "baseline_T_grok"] == "> 1,000"
    assert t.loc[3, "reproduces"] == "yes" and (t.loc[3, "T_grok"], t.loc[3, "baseline_T_grok"]) == ("120", "900")
    assert t.loc[6, "reproduces"] == "yes" and (t.loc[6, "baseline_T_grok"], t.loc[6, "control_T_grok"]) == ("3,200", "2,100")
    assert t.loc[6, "control_lr"] == 1.4e-3
    assert t.loc[8, "reproduces"].startswith("undetermined: the baseline had not grokked by its budget")
    assert t.loc[9, "reproduces"] == "undetermined: no baseline cell in this regime"
    assert interventions.claims_table(m.drop(columns="regime")).empty


@pytest.mark.parametrize("kind,n,t_i,t_b,t_o,want", [
    ("stablemax", 2, (500, False), (900, False), None, "no"),          # the baseline grokked too
    ("stablemax", 1, (NO, True), (1000, True), None, "no"),            # 1 of 3: not most
    ("orthograd", 3, (120, False), (100, False), None, "no"),          # not sooner
    ("orthograd", 3, (120, False), (1000, True), None, "yes"),         # the baseline never grokked
    ("grokfast", 3, (1000, False), (2900, False), (5000, True), "no"),  # 2.9x < 3x
    ("grokfast", 3, (1000, False), (3000, False), (900, False), "no"),  # the lr-matched control is sooner
    ("grokfast", 3, (1000, False), (3000, False), None, "undetermined: no lr-matched control in this regime"),
])
def test_claim_verdict_rules(kind, n, t_i, t_b, t_o, want):
    assert interventions.claim_verdict(kind, n, 3, t_i, t_b, t_o) == want


def test_interventions_figure_has_a_row_per_regime_its_arms_labelled_without_it():
    from fastgrok.analysis.figures import MAX_REGIME_ROWS, regime_rows
    models = pd.DataFrame({"cell": [0, 0, 1, 2, 3], "regime": ["A: x", "A: x", "A: x", "B", "B"]})
    table = pd.DataFrame({"cell": [0, 1, 2, 3], "arm": ["A: x, CE", "A: x, StableMax", "B, CE", "B"]})
    rows = regime_rows(table, models)
    assert [name for name, _ in rows] == ["A: x", "B"]
    assert [list(t["label"]) for _, t in rows] == [["CE", "StableMax"], ["CE", "cell 3"]]
    one = regime_rows(table, models.assign(regime="A: x"))                      # one regime: one row, arms as named
    assert len(one) == 1 and one[0][0] == "" and list(one[0][1]["label"]) == list(table["arm"])
    assert len(regime_rows(table, models.drop(columns="regime"))) == 1
    many = pd.DataFrame({"cell": range(MAX_REGIME_ROWS + 1), "regime": [f"r{i}" for i in range(MAX_REGIME_ROWS + 1)]})
    assert len(regime_rows(many.assign(arm=many["regime"]), many)) == 1           # too many regimes: one row
