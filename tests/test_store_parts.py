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


@pytest.mark.parametrize("path", [LEGACY / "train_run" / "curves.parquet", LEGACY / "grid_run" / "curves.parquet",
                                  ROOT / "docs" / "mediation_p31" / "curves.parquet"], ids=lambda p: p.parent.name)
def test_a_curves_part_file_is_lossless_sealed_and_compact(path, tmp_path):
    """write_curves_part's file gives the long table back bit for bit through the checked read; its footer
    holds the seal, the fingerprint and the layout key, no ARROW:schema or pandas copy of the schema, and
    min/max statistics for the keys only, in one row group; it is smaller than the same curves written as
    a long part was until 2026-12-07 (pyarrow's defaults, ARROW:schema and pandas' metadata, sealed), and
    a flipped byte is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    long = pd.read_parquet(path)
    part, old = tmp_path / "wide.parquet", tmp_path / "long.parquet"
    store.write_curves_part(part, long, fingerprint="f" * 64)
    table = pa.Table.from_pandas(long, preserve_index=False)
    table = table.replace_schema_metadata({**table.schema.metadata, store.FINGERPRINT_KEY: b"f" * 64,
                                           store.SEAL_KEY.encode(): store.SEAL_PLACEHOLDER.encode()})
    store.atomic_write(old, lambda tmp: pq.write_table(table, tmp), seal=True)
    back = store.curves_to_long(pq.read_table(store._buffer(store.read_verified(part))))
    ref = long.sort_values(["model", "step"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, ref, check_exact=True)
    assert np.array_equal(back["value"].to_numpy().view("u8"), ref["value"].to_numpy().view("u8"))
    md = pq.ParquetFile(part).metadata
    assert set(md.metadata) == {store.SEAL_KEY.encode(), store.FINGERPRINT_KEY, b"fastgrok.layout"}
    assert store.read_fingerprint(part) == "f" * 64
    rg = md.row_group(0)
    assert md.num_row_groups == 1
    assert [rg.column(i).path_in_schema for i in range(md.num_columns) if rg.column(i).is_stats_set] == ["model", "step"]
    assert part.stat().st_size < old.stat().st_size
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(store.StateError, match="damaged"):
        store.read_verified(part)


@pytest.mark.parametrize("path", [LEGACY / "train_run" / "models.parquet", LEGACY / "grid_run" / "models.parquet",
                                  ROOT / "docs" / "mediation_p31" / "models.parquet"], ids=lambda p: p.parent.name)
def test_a_models_table_without_arrow_schema_reads_back_the_same_frame(path, tmp_path):
    """store.write_parquet keeps pandas' metadata and fastgrok's keys but no ARROW:schema: tables written by
    earlier fastgrok (with it) come back as the same frame, dtypes included; a models part (keys) keeps
    statistics for model, cell and seed only, and is smaller than the table of before; a table with a
    categorical column keeps ARROW:schema and gives it back."""
    import pyarrow.parquet as pq
    df = pd.read_parquet(path)
    for keys in (None, ("model", "cell", "seed")):
        out = tmp_path / f"{keys is None}.parquet"
        store.write_parquet(out, df, fingerprint="f" * 64, keys=keys)
        pd.testing.assert_frame_equal(store.read_parquet(out), df, check_exact=True)
        md = pq.ParquetFile(out).metadata
        assert set(md.metadata) == {b"pandas", store.SEAL_KEY.encode(), store.FINGERPRINT_KEY}
        assert out.stat().st_size < path.stat().st_size
    rg = md.row_group(0)
    assert [rg.column(i).path_in_schema for i in range(md.num_columns) if rg.column(i).is_stats_set] == \
        ["model", "cell", "seed"]
    cat = df.assign(tag=pd.Categorical(["a", "b"] * (len(df) // 2) + ["a"] * (len(df) % 2)))
    store.write_parquet(out, cat, keys=("model", "cell", "seed"))       # a type parquet's own cannot give back
    pd.testing.assert_frame_equal(store.read_parquet(out), cat, check_exact=True)
    assert b"ARROW:schema" in pq.ParquetFile(out).metadata.metadata


def test_parts_of_the_first_wide_writer_still_read(grid, tmp_path):
    """A run whose curves parts were written as main wrote them on 2026-12-07 (pyarrow's defaults with
    ARROW:schema, dictionaries, zstd level 3) beside parts written today reads as one dataset, equal to the
    run written today throughout."""
    import pyarrow.parquet as pq
    d = tmp_path / "grid"
    shutil.copytree(grid, d)
    path = store.part_path(d, "b000", "curves")
    table = pq.read_table(store._buffer(store.read_verified(path)))
    meta = {**table.schema.metadata, store.SEAL_KEY.encode(): store.SEAL_PLACEHOLDER.encode()}
    table = table.replace_schema_metadata(meta)
    store.atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd",
                                                        write_statistics=list(store.CURVE_KEYS)), seal=True)
    assert b"ARROW:schema" in pq.ParquetFile(path).metadata.metadata      # the old writer's footer
    new, old = store.Results(grid), store.Results(d)
    pd.testing.assert_frame_equal(old.curves(), new.curves(), check_exact=True)
    pd.testing.assert_frame_equal(old.models(), new.models(), check_exact=True)
    cells = new.models()[["model", "cell"]]
    pd.testing.assert_frame_equal(old.cell_means(cells, ["test_acc", "logit_scale"]),
                                  new.cell_means(cells, ["test_acc", "logit_scale"]), check_exact=True)


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
