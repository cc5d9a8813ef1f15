"""Parts are the store (issue 29): a finished batch writes its results once, readers take the parts as one
dataset (store.Results, DuckDB), curves are wide and lossless, and the usual tools load them in one line.

References are independent of the new code: tables written by earlier fastgrok (tests/data, docs/), and the
pandas analysis of a long curves table.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.analysis import statistics as A
from fastgrok.cli import main
from fastgrok.grid import rundir
from fastgrok.grid.experiments import to_toml

ROOT = Path(__file__).parent.parent
LEGACY = Path(__file__).parent / "data" / "legacy_af8d06a"
SPEC = {"name": "parts_tiny", "seeds": 2, "p": [11], "train_frac": [0.5], "lr": [0.01, 0.03], "wd": [1.0],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 10, "logit_every": 20, "compile": "off"},
        "budget": {"steps": 40}, "engine": {"max_models": 2}, "grid": [{"rho": ["free"]}]}
"""Two free cells x 2 seeds, one cell a batch, 40 steps: two parts."""


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parts")
    (root / "spec.toml").write_text(to_toml(SPEC))
    assert main(["run", str(root / "spec.toml"), "--out", str(root / "grid"), "--quiet"]) == 0
    return root / "grid"


@pytest.mark.parametrize("path", [LEGACY / "train_run" / "curves.parquet", LEGACY / "grid_run" / "curves.parquet",
                                  ROOT / "docs" / "mediation_p31" / "curves.parquet"], ids=lambda p: p.parent.name)
def test_wide_curves_give_back_the_long_table_exactly(path):
    """Tables written by earlier fastgrok (logit_scale only every logit_every steps) survive long -> wide ->
    long bit for bit, and a recorded NaN stays a row while an unrecorded value stays absent."""
    long = pd.read_parquet(path)
    nan_row = long.iloc[[3]].assign(value=np.nan)
    long = pd.concat([long.iloc[:3], nan_row, long.iloc[4:]], ignore_index=True)
    back = store.curves_to_long(store.curves_to_wide(long))
    ref = long.sort_values(["model", "step"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, ref, check_exact=True)
    assert back["value"].isna().sum() == ref["value"].isna().sum() >= 1


def test_the_analysis_from_the_dataset_equals_the_pandas_one():
    """cell_table by DuckDB's grouped queries (store.Results) equals the pandas analysis of the whole long
    table value for value, on the repository's mediation run (84 models); the per-cell mean curves (figures
    only) to 1e-12 (DuckDB's compensated sum and pandas' may round a mean's last bit differently)."""
    d = ROOT / "docs" / "mediation_p31"
    models, results, _ = A.open_run(d)
    curves = pd.read_parquet(d / "curves.parquet")
    pd.testing.assert_frame_equal(A.cell_table(models, results), A.cell_table(models, curves), check_exact=True)
    for metrics in (("train_acc", "test_acc"), ("logit_scale",), ("sc_rate", "weight_norm")):
        pd.testing.assert_frame_equal(A.cell_curves(models, results, metrics), A.cell_curves(models, curves, metrics),
                                      check_exact=False, rtol=1e-12, atol=0, check_dtype=False)


def test_a_grid_is_its_parts_and_loads_in_one_line(grid):
    """A grid writes parts/models|curves/<batch>.parquet and no consolidated table; pandas, pyarrow and DuckDB
    read them in one line each, equal to store.Results and to the parts read one by one."""
    import duckdb
    assert sorted(p.relative_to(grid).as_posix() for p in (grid / "parts").rglob("*.parquet")) == \
        ["parts/curves/b000.parquet", "parts/curves/b001.parquet", "parts/models/b000.parquet",
         "parts/models/b001.parquet"]
    assert not (grid / "models.parquet").exists() and not (grid / "curves.parquet").exists()
    res = store.Results(grid)
    one_by_one = pd.concat([pd.read_parquet(p) for p in sorted((grid / "parts" / "models").iterdir())],
                           ignore_index=True)
    pd.testing.assert_frame_equal(res.models(), one_by_one.sort_values("model").reset_index(drop=True))
    models = pd.read_parquet(grid / "parts" / "models").sort_values("model").reset_index(drop=True)
    pd.testing.assert_frame_equal(models, res.models(), check_dtype=False, check_categorical=False)
    wide = duckdb.sql(f"SELECT * FROM '{grid}/parts/curves/*.parquet' ORDER BY model, step").df()
    assert len(wide) == len(pd.read_parquet(grid / "parts" / "curves"))
    pd.testing.assert_frame_equal(store.curves_to_long(wide), res.curves(), check_exact=True)
    assert wide["logit_scale"].isna().sum() > 0 and set(wide["step"]) == {0, 10, 20, 30, 40}


def test_a_finished_batch_reads_and_rewrites_no_other_part(grid, tmp_path):
    """write_part touches its own batch only: with the other batch's part damaged it still writes, and leaves
    that part's bytes as they were (before, each batch re-read and rewrote every part)."""
    d = tmp_path / "grid"
    shutil.copytree(grid, d)
    res = store.Results(d)
    models, curves = res.models(), res.curves()
    other = store.part_path(d, "b000", "models")
    other.write_bytes(b"not a part")
    mine = models.loc[models["cell"] == 1]
    rundir.write_part(d, "b001", mine.reset_index(drop=True), curves.loc[curves["model"].isin(mine["model"])])
    assert other.read_bytes() == b"not a part"
    assert rundir.done_batches(d) == {"b000", "b001"}
    with pytest.raises(store.StateError, match=str(other)):
        store.Results(d)
