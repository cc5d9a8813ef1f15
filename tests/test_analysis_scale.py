"""Issue 29, item 3: the per-cell tables and `fastgrok status` computed from whole columns (one grouped pass)
equal, exactly, the per-cell computations they replace (tests/reference_cells.py), on tables that exercise
every branch: cells of 1 to 12 seeds, values missing, describing values that vary within a cell, nullable
integers, booleans, strings, forks, cells where nothing grokked. No timing here: the figures are in
benchmarks/RESULTS.md (benchmarks/analysis_scale.py)."""
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastgrok import store
from fastgrok.analysis import statistics as A
from fastgrok.analysis.phases import phase_table
from fastgrok.grid import rundir

import reference_cells as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def random_models(seed: int, n_cells: int = 60, forks: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    model = 0
    for cell in rng.permutation(n_cells):                   # cells out of order in the table
        n = int(rng.integers(1, 13))
        lr = float(rng.choice([1e-3, 3e-3, 1e-2]))
        rho = [np.nan, 1.0, 1.15][cell % 3]
        arm = rng.choice(["same", "raised"]) if forks and cell % 7 == 0 else None
        for s in rng.permutation(n):
            tm = int(rng.integers(1, 40)) * 25 if rng.random() < 0.8 else None
            tg = int(rng.integers(1, 200)) * 25 if rng.random() < (0.0 if cell % 11 == 0 else 0.6) else None
            rows.append({
                "model": model, "cell": int(cell), "seed": int(s), "experiment": "x", "p": 59 if cell % 2 else 31,
                "op": "add" if cell % 5 else "sub", "arch": "mlp", "loss": "ce",
                "lr": lr if cell % 13 else float(rng.choice([1e-3, 2e-3])),       # varies within some cells
                "wd": float(rng.choice([0.1, 1.0])) if cell % 17 == 0 else 1.0,
                "train_frac": 0.3 + 0.1 * (cell % 4), "dtype": "float32",
                "orthograd": bool(cell % 19 == 0),
                "tau": float(rng.choice([1.0, 1.5])) if cell % 23 == 0 else 1.0,
                "norm_target": np.nan, "rho": rho if not (cell % 29 == 0 and s == 0) else np.nan,
                "arm": arm, "fork_step": 500 if arm else None,
                "layer_fracs": ("0.4,0.5,0.1" if s % 2 else "0.3,0.3,0.4") if cell % 31 == 0 else None,
                "t_mem": tm, "t_grok": tg, "logit_scale_at_grok": float(rng.random()),
                "train_acc": float(rng.choice([1.0, 0.995, 0.5])), "test_acc": float(rng.random()),
                "train_loss": float(rng.random()), "test_loss": float(rng.random()) if rng.random() < 0.9 else np.nan,
                "sc_rate": float(rng.random() / 3) if rng.random() < 0.9 else np.nan,
                "weight_norm": float(40 + rng.random() * 10), "diverged": bool(rng.random() < 0.05),
                "steps": 5000})
            model += 1
    df = pd.DataFrame(rows)
    for c in ("t_mem", "t_grok", "fork_step"):
        df[c] = df[c].astype("Int64")
    return df


def random_curves(models: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 5001, 25)
    out = []
    for metric in ("logit_scale", "weight_norm", "train_acc", "test_acc"):
        m = np.repeat(models["model"].to_numpy(), len(steps))
        st = np.tile(steps, len(models))
        keep = (st % 50 == 0) if metric == "logit_scale" else np.ones(len(st), bool)
        out.append(pd.DataFrame({"model": m[keep], "step": st[keep], "metric": metric,
                                 "value": rng.random(int(keep.sum()))}))
    return pd.concat(out, ignore_index=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_and_phase_tables_equal_the_per_cell_computation(seed):
    models = random_models(seed)
    pd.testing.assert_frame_equal(A.cell_table(models), ref.cell_table(models), check_exact=True)
    curves = random_curves(models, seed)
    new, old = A.cell_table(models, curves), ref.cell_table(models, curves)
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert new["L_grok"].notna().any() and new["cell"].is_monotonic_increasing
    for th in ({}, {"mem_threshold": 0.9, "grok_threshold": 0.95}):
        pd.testing.assert_frame_equal(phase_table(models, **th), ref.phase_table(models, **th), check_exact=True)


def test_a_table_of_forks_only_has_no_phase_rows():
    models = random_models(3, n_cells=14)
    forks = models.loc[models["arm"].notna()]
    pd.testing.assert_frame_equal(phase_table(forks), ref.phase_table(forks))


def test_nearest_step_values_equal_nearest_step_value():
    rng = np.random.default_rng(0)
    L = pd.DataFrame({"cell": np.repeat([3, 1, 2], 5), "step": np.tile([0, 100, 200, 300, 400], 3),
                      "L": rng.random(15)})
    ids, t = np.array([1, 2, 3, 4, 5]), np.array([150.0, 290.0, np.nan, 100.0, 1e9])
    got = A.nearest_step_values(L, ids, t)
    want = [A.nearest_step_value(L.loc[L["cell"] == c, "step"], L.loc[L["cell"] == c, "L"], x)
            if (L["cell"] == c).any() else np.nan for c, x in zip(ids, t)]
    np.testing.assert_array_equal(got, want)          # a tie (150) takes the earlier step; no rows: NaN


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    import analysis_scale
    out = tmp_path_factory.mktemp("scale") / "run"
    analysis_scale.write_dir(out, 400)
    return out


def test_a_synthetic_grid_run_gives_the_per_cell_tables_and_status(synthetic_run):
    models, results, _ = A.open_run(synthetic_run)
    pd.testing.assert_frame_equal(A.cell_table(models, results), ref.cell_table(models, results), check_exact=True)
    pd.testing.assert_frame_equal(phase_table(models), ref.phase_table(models), check_exact=True)
    pd.testing.assert_frame_equal(rundir.status_table(synthetic_run), ref.status_table(synthetic_run),
                                  check_exact=True)


def test_a_large_status_prints_plain_columns_of_the_same_values(synthetic_run, monkeypatch):
    """Above RICH_ROWS cells, status prints aligned plain columns: the rows rich would draw, value for value."""
    def rows_of(text, plain):
        if plain:
            return [line.split() for line in text.splitlines()[2:]]
        return [line.strip("│ ").replace("│", " ").split() for line in text.splitlines() if line.startswith("│")]

    outs = {}
    for plain, limit in ((False, 10 ** 6), (True, 10)):
        monkeypatch.setattr(rundir, "RICH_ROWS", limit)
        monkeypatch.setenv("COLUMNS", "200")
        buf = io.StringIO()
        with redirect_stdout(buf):
            rundir.print_status(synthetic_run)
        outs[plain] = rows_of(buf.getvalue(), plain)
    assert len(outs[True]) == 100 and outs[True] == outs[False]


def test_the_terminal_shows_the_first_rows_of_a_long_table(monkeypatch):
    from rich.console import Console
    from fastgrok.analysis import terminal
    monkeypatch.setattr(terminal, "TERMINAL_ROWS", 5)
    df = pd.DataFrame({"cell": range(12), "T_grok": np.arange(12) * 100.0, "p": 59})
    buf = io.StringIO()
    con = Console(file=buf, width=120)
    for t in terminal.terminal_tables(df, "cells", 120):
        con.print(t)
    text = buf.getvalue()
    assert "first 5 of 12 rows; every row is in report.md" in text and "all rows: p = 59" in text
    assert "400" in text and "500" not in text
