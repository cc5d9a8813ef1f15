"""`fastgrok train`: every number a model reports is the one it reports trained alone.

The reference is the model trained by itself (`--seeds 1 --seed0 K --tau T`, a batch of M = 1): a batch
of cells x seeds must give each model exactly (bitwise) the row of models.parquet and the curves that
its solo run gives, whatever the others in the batch do (grok earlier, later, or not at all).
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fastgrok.cli import main

QUICK = ["--preset", "quick", "--no-compile", "--quiet", "--steps", "900"]
TAUS = ("1", "1.5")
SEEDS = 2           # seeds 0, 1: three models grok (475, 500, 700), one does not within 900 steps (at 1000)


def _train(out, *flags) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert main(["train", *QUICK, *flags, "--out", str(out)]) == 0
    return pd.read_parquet(out / "models.parquet"), pd.read_parquet(out / "curves.parquet")


@pytest.fixture(scope="module")
def batch_and_solo(tmp_path_factory):
    torch.set_num_threads(1)                        # tiny models: one thread is fastest on 2 shared cores
    root = tmp_path_factory.mktemp("solo")
    batch = _train(root / "batch", "--seeds", str(SEEDS), "--tau", *TAUS)
    solo = {(float(t), k): _train(root / f"solo-{t}-{k}", "--seeds", "1", "--seed0", str(k), "--tau", t)
            for t in TAUS for k in range(SEEDS)}
    return batch, solo


def test_every_models_column_equals_the_solo_run(batch_and_solo):
    (models, _), solo = batch_and_solo
    assert len(models) == len(TAUS) * SEEDS
    # the case that made batches differ: models that grok at different steps share the batch
    assert models.t_grok.nunique() > 1 and models.t_grok.isna().any()
    cols = [c for c in models.columns if c not in ("model", "cell")]   # a model's place in its batch
    assert {"t_mem", "t_grok", "test_acc", "train_acc", "train_loss", "weight_norm", "steps",
            "logit_scale_at_grok", "sc_rate", "diverged"} <= set(cols)
    for row in models.itertuples():
        alone = solo[(row.tau, row.seed)][0]
        assert len(alone) == 1
        for c in cols:
            a, b = getattr(row, c), alone[c].iloc[0]
            assert (pd.isna(a) and pd.isna(b)) or a == b, (row.tau, row.seed, c, a, b)


def test_every_curve_equals_the_solo_run(batch_and_solo):
    (models, curves), solo = batch_and_solo
    for row in models.itertuples():
        mine = curves[curves.model == row.model].drop(columns="model").reset_index(drop=True)
        alone = solo[(row.tau, row.seed)][1].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, check_exact=True)


def test_each_model_stops_at_its_t_grok_with_l_from_that_evaluation(batch_and_solo):
    (models, curves), _ = batch_and_solo
    for row in models.dropna(subset=["t_grok"]).itertuples():
        assert row.steps == row.t_grok
        mine = curves[curves.model == row.model]
        assert mine.step.max() == row.t_grok
        acc = mine[(mine.metric == "test_acc") & (mine.step == row.t_grok)].value
        assert acc.iloc[0] == row.test_acc >= 0.9
