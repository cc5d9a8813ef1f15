"""The study's p = 59 baseline cell, seed for seed (minutes on a CPU: run with FASTGROK_REPRODUCE=1).

`benchmarks/reproduce_study_seeds.py` holds the study's per-seed data and the runs; this test asks it for
every seed's T_grok and T_mem under `--init study` and for w_c from the grid's own free control."""
import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("FASTGROK_REPRODUCE") != "1",
                                reason="minutes on a CPU: set FASTGROK_REPRODUCE=1")

_path = Path(__file__).parent.parent / "benchmarks" / "reproduce_study_seeds.py"
_spec = importlib.util.spec_from_file_location("reproduce_study_seeds", _path)
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)


def test_train_reproduces_every_seed(tmp_path):
    got = repro.check_train(tmp_path / "train")
    assert got["t_grok"] == repro.T_GROK and got["t_mem"] == repro.T_MEM


def test_grid_calibrates_the_studys_w_c(tmp_path):
    got = repro.check_calibration(tmp_path / "grid")
    assert got["w_c"] == pytest.approx(repro.W_C, abs=5e-5)
    assert got["t_grok"] == repro.T_GROK and got["t_mem"] == repro.T_MEM
