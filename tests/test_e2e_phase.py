"""Issue 16 item 3 end to end, small: a 2 x 2 lr x wd grid of free cells run by the engine (no calibration),
then `fastgrok analyze`: the phase section, its figure, and each cell's phase as the rule says, recomputed
here from models.parquet."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fastgrok import store
from fastgrok.analysis import report as R
from fastgrok.cli import main
from fastgrok.grid.executors import run_experiment

from report_tables import check_tables

# p = 13 in 400 steps: wd 0.25 memorizes (train accuracy 1, test below 0.6), wd 16 fits nothing (0.09)
SPEC = """
name = "phase_tiny"
seeds = 1
p = [13]
train_frac = [0.8]
lr = [1e-2, 1e-1]
wd = [0.25, 16.0]

[train]
d_embed = 16
hidden = 32
eval_every = 10
compile = "off"
mem_threshold = 0.95

[budget]
steps = 400
"""


def test_phase_grid_run_then_analyze(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = run_experiment(spec, out=tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(n)
    assert not (run / "calibration.json").exists()
    assert main(["analyze", str(run)]) == 0
    text = (run / "report.md").read_text()
    result = R.analyze_dir(run)
    check_tables(result, text)
    assert "## Phase diagrams" in text and (run / "figures" / "phase.pdf").stat().st_size > 0
    assert "train accuracy >= 0.95" in text                     # the run's own mem_threshold

    # the rule, written out again per seed (one seed per cell: its phase is the cell's)
    m = store.Results(run).models().sort_values("cell")     # the parts (no consolidated models.parquet)
    tm, tg = m["t_mem"].astype("float64").to_numpy(), m["t_grok"].astype("float64").to_numpy()
    want = []
    for a, b, train, div in zip(tm, tg, m["train_acc"], m["diverged"]):
        if not np.isnan(b):
            want.append("comprehension" if np.isnan(a) or b <= 2 * a else "grokking")
        else:
            want.append("memorization" if train >= 0.95 and not div else "confusion")
    table = result["phase"].sort_values("cell")
    assert list(table["phase"]) == want
    assert len(set(want)) >= 2                                   # the grid is not one phase
