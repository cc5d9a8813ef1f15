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
