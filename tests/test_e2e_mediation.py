"""Issue 5 end to end: a small mediation grid run by the engine (calibration, packed batch), then
`fastgrok analyze`: the report, tables and figures exist, and the numbers in the report are those of
the tables, which match the study's definitions recomputed here from models.parquet."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok.analysis import report as R
from fastgrok import store
from fastgrok.grid.executors import run_experiment

from report_tables import check_tables

# p = 23 at train fraction 0.8 groks in ~800 steps with these widths (measured: 3/3 seeds, eager)
SPEC = """
name = "mediation_tiny"
seeds = 3
p = [23]
train_frac = [0.8]
lr = [3e-3]

[train]
d_embed = 32
hidden = 64
clamp_from = 100
compile = "off"

[budget]
steps = 3000
steps_ref = 6000

[[grid]]
rho = [1.0]
tau = [1.0]

[[grid]]
rho = [1.15]
tau = [1.0, 1.3, 1.7]
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    spec = d / "spec.toml"
    spec.write_text(SPEC)
    n = torch.get_num_threads()
    torch.set_num_threads(1)                        # tiny models: one thread is fastest on 2 shared cores
    try:
        return run_experiment(spec, out=d / "run", progress=False)
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_engine_run_then_analyze(run_dir):
    models = store.Results(run_dir).models()          # the parts, as one table (no consolidated models.parquet)
    assert len(models) == 4 * 3 and models["model"].is_unique
    assert (run_dir / "calibration.json").exists()
    # the clamp held every clamped model at rho * w_c
    import json
    w_c = next(iter(store.read_json(run_dir / "calibration.json").values()))["w_c"]
    np.testing.assert_allclose(models["norm_target"], models["rho"] * w_c, rtol=1e-12)
    np.testing.assert_allclose(models["weight_norm"], models["norm_target"], rtol=1e-4)

    out = subprocess.run([sys.executable, "-m", "fastgrok.cli", "analyze", str(run_dir)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "250"})     # wide enough for whole tables
    assert out.returncode == 0, out.stderr
    text = (run_dir / "report.md").read_text()
    for name in ("mediation", "curves"):
        for ext in ("png", "pdf"):
            f = run_dir / "figures" / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 0
        assert f"figures/{name}.png" in text

    result = R.analyze_dir(run_dir)
    check_tables(result, text)                     # every number of the report is the table's
    med = result["mediation"].iloc[0]
    assert R.format_value(med["recovery"]) in out.stdout

    # T0, T1 and T2 by the study's definitions, from the per-seed table
    def median_t(rho, tau):
        sel = np.isclose(models["rho"], rho) & np.isclose(models["tau"], tau)
        return float(np.median(models.loc[sel, "t_grok"].astype(float)))
    assert med["T0"] == median_t(1.0, 1.0) and med["T1"] == median_t(1.15, 1.0)
    cells = result["cells"]
    sweep = cells.loc[np.isclose(cells["rho"].astype(float), 1.15)].sort_values("L_grok")
    T_sweep = [median_t(1.15, t) for t in sweep["tau"]]
    T2 = np.interp(med["L0"], sweep["L_grok"].astype(float), T_sweep)
    assert med["T2"] == pytest.approx(T2, rel=1e-12)
    assert med["recovery"] == pytest.approx((med["T1"] - T2) / (med["T1"] - med["T0"]), rel=1e-12)
    assert med["ci_low"] <= med["recovery"] <= med["ci_high"]
