"""A run directory's state that cannot be used gives one line naming the file and what to do, never a
traceback; a checkpoint or grid part of another configuration is refused (fingerprints).

Each case corrupts one file of a finished run (a copy) -- truncated, garbage bytes, valid but of the wrong
type or shape, or another run's -- and runs the command that reads it, in process (fastgrok.cli.main).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from fastgrok.cli import main
from fastgrok.grid.experiments import to_toml

TRAIN = ["--p", "17", "--d-embed", "8", "--hidden", "16", "--steps", "30", "--eval-every", "10",
         "--no-compile", "--quiet"]
SPEC = {"name": "state_tiny", "seeds": 2, "p": [17], "train_frac": [0.8], "lr": [0.02], "wd": [2.0],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 10, "logit_every": 10, "clamp_from": 10,
                  "compile": "off"},
        "budget": {"steps": 30}, "calibration": {"steps": 30}, "engine": {"max_models": 2, "compact_frac": 0.0},
        "grid": [{"rho": [1.0], "tau": [1.0, 1.5]}]}
"""A calibration and two batches of one cell each, 30 steps."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("state")
    assert main(["train", *TRAIN, "--seeds", "2", "--out", str(root / "train")]) == 0
    assert main(["train", *TRAIN, "--seeds", "2", "--lr", "3e-3", "--out", str(root / "other")]) == 0
    spec = root / "spec.toml"
    spec.write_text(to_toml(SPEC))
    assert main(["run", str(spec), "--out", str(root / "grid"), "--quiet"]) == 0
    other = root / "other_spec.toml"
    other.write_text(to_toml({**SPEC, "lr": [0.01]}))
    assert main(["run", str(other), "--out", str(root / "other_grid"), "--quiet"]) == 0
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot this file\x13" * 7)


def _json(obj):
    return lambda path: path.write_text(json.dumps(obj))


def _edit_json(**kw):
    def f(path):
        path.write_text(json.dumps({**json.loads(path.read_text()), **kw}))
    return f


def _torch(obj):
    return lambda path: torch.save(obj, path)


def _other(run: str, name: str):
    """The same file of another run of the same shapes (another lr)."""
    return lambda path, root: shutil.copy(root / run / name, path)


def _frame(edit):
    return lambda path: edit(pd.read_parquet(path)).to_parquet(path, index=False)


# (run, file, how, command) -- command "{d}" is the run directory, "{spec}" the grid's spec
CASES = [
    ("train", "checkpoint.pt", _truncate, "train --resume {d}"),
    ("train", "checkpoint.pt", _garbage, "train --resume {d}"),
    ("train", "checkpoint.pt", _torch([1, 2, 3]), "train --resume {d}"),
    ("train", "checkpoint.pt", _other("other", "checkpoint.pt"), "train --resume {d}"),
    ("train", "config.json", _truncate, "train --resume {d}"),
    ("train", "config.json", _garbage, "train --resume {d}"),
    ("train", "config.json", _edit_json(seeds="4"), "train --resume {d}"),
    ("train", "config.json", _json([1, 2]), "train --resume {d}"),
    ("train", "config.json", _edit_json(lr=0.5), "train --resume {d}"),            # -> the checkpoint's fingerprint
    ("train", "progress.json", _truncate, "status {d}"),
    ("train", "progress.json", _json({"step": "x"}), "status {d}"),
    ("train", "progress.json", _truncate, "train --resume {d} --steps 60"),
    ("train", "models.parquet", _truncate, "analyze {d}"),
    ("train", "models.parquet", _garbage, "analyze {d}"),
    ("train", "models.parquet", _frame(lambda df: df.drop(columns="t_grok")), "analyze {d}"),
    ("train", "models.parquet", _frame(lambda df: df.iloc[:0]), "analyze {d}"),
    ("train", "models.parquet", _frame(lambda df: pd.concat([df, df])), "analyze {d}"),
    ("train", "curves.parquet", _truncate, "analyze {d}"),
    ("train", "curves.parquet", _frame(lambda df: df.drop(columns="metric")), "analyze {d}"),
    ("grid", "plan.json", _truncate, "status {d}"),
    ("grid", "plan.json", _json({"cells": 3}), "status {d}"),
    ("grid", "plan.json", _truncate, "run {spec} --out {d} --quiet"),
    ("grid", "spec.json", _truncate, "run {spec} --out {d} --quiet"),
    ("grid", "spec.json", _json(["x"]), "status {d}"),
    ("grid", "calibration.json", _truncate, "status {d}"),
    ("grid", "calibration.json", _json({"p=17": {"w_c": "big"}}), "run {spec} --out {d} --quiet"),
    ("grid", "calibration.json", _garbage, "analyze {d}"),
    ("grid", "parts/models/b000.parquet", _truncate, "run {spec} --out {d} --quiet"),
    ("grid", "parts/curves/b001.parquet", _garbage, "run {spec} --out {d} --quiet"),
    ("grid", "parts/curves/b001.parquet", _garbage, "analyze {d}"),
    ("grid", "parts/models/b000.parquet", _other("other_grid", "parts/models/b000.parquet"),
     "run {spec} --out {d} --quiet"),
    ("grid", "parts/curves/b000.parquet", _other("other_grid", "parts/curves/b000.parquet"), "analyze {d}"),
    ("grid", "parts/models/b000.parquet", _garbage, "status {d}"),
    ("grid", "parts/models/b001.parquet", _truncate, "analyze {d}"),
    ("grid", "parts/models/b001.parquet", _garbage, "run {spec} --out {d} --quiet"),
]


@pytest.mark.parametrize("run,name,how,command", CASES,
                         ids=[f"{i}-{c[0]}-{c[1]}-{c[3].split()[0]}" for i, c in enumerate(CASES)])
def test_bad_state_file_is_one_line_naming_it(runs, tmp_path, capsys, run, name, how, command):
    d = tmp_path / run
    shutil.copytree(runs / run, d)
    path = d / name
    assert path.exists()
    how(path, runs) if how.__code__.co_argcount == 2 else how(path)
    capsys.readouterr()
    argv = command.format(d=d, spec=runs / "spec.toml").split()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastgrok: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and str(d / name) in errors[0], err
    assert "Traceback" not in err


def test_an_old_checkpoint_without_fingerprint_resumes(runs, tmp_path):
    """A checkpoint written before fingerprints (no "fingerprint" key) of this run's shape is accepted."""
    d = tmp_path / "train"
    shutil.copytree(runs / "train", d)
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    del ck["fingerprint"]
    torch.save(ck, d / "checkpoint.pt")
    before = pd.read_parquet(d / "models.parquet")
    assert main(["train", "--resume", str(d), "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(d / "models.parquet"), before, check_exact=True)
