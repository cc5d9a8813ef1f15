"""Tracking (`--track wandb|tensorboard`, fastgrok/tracking.py), with the real libraries, offline:

- what TensorBoard's event reader and W&B's offline run file hold equals models.parquet and
  curves.parquet: each cell's quartiles of every curve at each evaluation, each model's curves (a small
  run), each cell's T_mem/T_grok summary, the cell table;
- a resumed (extended) W&B run continues its tracked run (the same run id);
- a tracker error is one warning line and training goes on; a missing library is one line naming the extra;
- a grid of 200 models in 10 cells (2 batches) logs 210 series, which match its Parquet results.
"""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.train import tracking
from fastgrok.cli import main
from fastgrok.config import TrainConfig
from fastgrok.train.trainer import train

CFG = dict(p=11, d_embed=8, hidden=16, seeds=3, lr=(0.01,), taus=(1.0, 1.5), steps=200, eval_every=25, compile="off")
"""2 cells x 3 tiny MLPs; they memorise (T_mem 75-100) and do not grok in 200 steps."""


def tracked(tmp_path, backend, resume=False, **kw):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**{**CFG, **kw}), tmp_path, progress=False, track=backend, resume=resume)
    finally:
        torch.set_num_threads(n)
    return pd.read_parquet(tmp_path / "models.parquet"), pd.read_parquet(tmp_path / "curves.parquet")


def expected(models: pd.DataFrame, curves: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(tag, step) -> value, from the Parquet results alone."""
    c = curves.merge(models[["model", "cell"]], on="model")
    c = c[c["metric"].isin(tracking.CURVES)]
    out = {}
    for (cell, metric, step), g in c.groupby(["cell", "metric", "step"]):
        for name, q in tracking.QUARTILES:
            out[(f"cell{cell}/{metric}/{name}", step)] = float(np.percentile(g["value"], q))
    if len(models) <= tracking.PER_MODEL_MAX:
        for r in c.itertuples():
            out[(f"model{r.model}/{r.metric}", r.step)] = r.value
    return out


def check_logged(logged: dict[tuple[str, int], float], models, curves):
    want = expected(models, curves)
    assert set(logged) == set(want)
    for k, v in want.items():
        assert logged[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_tensorboard_logs_what_the_parquet_results_hold(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    models, curves = tracked(tmp_path, "tensorboard")
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    logged = {(t, e.step): e.value for t in tags if not t.startswith("summary/") for e in ea.Scalars(t)}
    check_logged(logged, models, curves)
    summary = {t[len("summary/"):]: ea.Scalars(t)[-1].value for t in tags if t.startswith("summary/")}
    for cell, g in models.groupby("cell"):
        assert summary[f"cell{cell}/t_mem_median"] == g["t_mem"].astype(float).median()
        assert summary[f"cell{cell}/grokked"] == g["t_grok"].notna().mean()
    table = ea.Tensors("cells/text_summary")[-1].tensor_proto.string_val[0].decode().splitlines()
    assert len(table) == 2 + 2 and "t_mem_median" in table[0]          # the cell table, as Markdown text
    assert [float(x) for x in table[2].split("|")[1:-1][table[0].split("|")[1:-1].index(" t_mem_median ")].split()] \
        == [models[models["cell"] == 0]["t_mem"].astype(float).median()]


def wandb_records(run_file):
    """The records of a W&B offline run file (`run-ID.wandb`: a LevelDB-style log of W&B's own protobuf
    Records, blocks of 32 KiB after a 7-byte header), parsed with W&B's protobuf module."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:                 # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                          # FULL, or the LAST of FIRST/MIDDLE.../LAST
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def wandb_history(run_dir):
    """{run id: [history rows]} of every offline run under run_dir/wandb, and the last summary values."""
    runs, summary = {}, {}
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        rows = runs.setdefault(f.stem[len("run-"):], [])
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return runs, summary


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_logs_what_the_parquet_results_hold_and_a_resume_continues_it(tmp_path, offline):
    tracked(tmp_path, "wandb", steps=100)
    models, curves = tracked(tmp_path, None, resume=True)   # extended to 200 steps, without track: the run's
    runs, summary = wandb_history(tmp_path)
    assert len(runs) == 1 and len(list(tmp_path.glob("wandb/offline-run-*"))) == 2     # one run, two parts
    logged = {(k, row["step"]): v for row in next(iter(runs.values())) for k, v in row.items()
              if re.match(r"(cell|model)\d+/", k)}
    check_logged(logged, models, curves)             # the first part's steps, and the resumed part's
    for cell, g in models.groupby("cell"):
        assert summary[f"cell{cell}/t_mem_median"] == g["t_mem"].astype(float).median()
    assert summary["cells/_type"] == "table-file" and summary["cells/nrows"] == 2
    table = json.loads(sorted(tmp_path.glob("wandb/offline-run-*"))[-1].joinpath("files", summary["cells/path"]).read_text())
    col = table["columns"].index("t_mem_median")
    assert [row[col] for row in table["data"]] == list(models.groupby("cell")["t_mem"].median().astype(float))


def test_a_tracker_error_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def boom(self, step, values):
        raise RuntimeError("disk on fire\nsecond line")
    monkeypatch.setattr(tracking.TensorBoard, "scalars", boom)
    models, _ = tracked(tmp_path, "tensorboard")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastgrok: warning: tracking (tensorboard) failed: disk on fire;" in err
    assert (models["steps"] == 200).all()


def test_a_missing_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    assert main(["train", "--p", "11", "--seeds", "1", "--steps", "10", "--no-compile", "--track", "wandb",
                 "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "fastgrok: error: wandb is not installed: pip install 'fastgrok[wandb]'\n"
    assert not (tmp_path / "r").exists()


def test_a_grid_of_200_models_logs_210_series_as_its_parquet_results_say(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from fastgrok.grid.executors import run_experiment
    from fastgrok.grid.experiments import ExperimentSpec
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = ExperimentSpec.from_dict({
        "name": "tracked", "seeds": 20, "p": [11], "train_frac": [0.4], "lr": [0.01], "wd": [1.0],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 25, "logit_every": 50, "compile": "off"},
        "budget": {"steps": 100}, "engine": {"max_models": 100, "track": "tensorboard"},
        "grid": [{"rho": ["free"], "tau": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]}]})
    try:
        out = run_experiment(spec, out=tmp_path / "grid", progress=False)
    finally:
        torch.set_num_threads(n)
    models, curves = store.Results(out).models(), store.Results(out).curves()
    assert len(models) == 200 and len(list((out / "parts" / "models").glob("*.parquet"))) == 2      # 2 batches
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    series = [t for t in tags if not t.startswith("summary/")]
    assert len(series) == 10 * len(tracking.CURVES) * 3 == 210 and len(tags) == 210 + 10 * 3
    check_logged({(t, e.step): e.value for t in series for e in ea.Scalars(t)}, models, curves)
    assert ea.Scalars("summary/cell7/t_mem_median")[-1].value == models[models["cell"] == 7]["t_mem"].astype(float).median()


def test_a_wandb_grid_is_one_run_and_a_rerun_continues_it(tmp_path, offline):
    from fastgrok.grid.executors import run_experiment
    from fastgrok.grid.experiments import ExperimentSpec
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = ExperimentSpec.from_dict({
        "name": "tracked", "seeds": 2, "p": [11], "train_frac": [0.4], "lr": [0.01], "wd": [1.0],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 25, "logit_every": 50, "compile": "off"},
        "budget": {"steps": 100}, "engine": {"max_models": 2, "track": "wandb"},
        "grid": [{"rho": ["free"], "tau": [1.0, 1.5]}]})
    try:
        for _ in range(2):                          # the rerun finds every batch done, and tracks on
            out = run_experiment(spec, out=tmp_path / "grid", progress=False)
    finally:
        torch.set_num_threads(n)
    models, curves = store.Results(out).models(), store.Results(out).curves()
    runs, summary = wandb_history(out)
    assert len(runs) == 1 and len(list(out.glob("wandb/offline-run-*"))) == 2
    check_logged({(k, row["step"]): v for row in next(iter(runs.values())) for k, v in row.items()
                  if re.match(r"(cell|model)\d+/", k)}, models, curves)
    assert summary["cell1/t_mem_median"] == models[models["cell"] == 1]["t_mem"].astype(float).median()


def test_engine_track_is_checked():
    from fastgrok.grid.experiments import ExperimentSpec
    from fastgrok.config import ConfigError
    with pytest.raises(ConfigError, match="engine.track"):
        ExperimentSpec.from_dict({"name": "x", "seeds": 1, "p": [11], "engine": {"track": "mlflow"}})
