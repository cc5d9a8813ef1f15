"""A run directory is data, never code, and never hides damage (issue 27).

- Nothing read from a run directory runs code: a crafted pickle in place of any state file is refused in
  one line and its payload does not run; no `torch.load` without `weights_only=True` remains.
- Every state file is sealed (store.seal_file): any changed byte is refused in one line naming the file,
  never read as a changed result; a results table, plan or progress file of another run is refused.
- The lock file is opened without following a link; `status` asks the lock, not the PID in it.
- Snapshots taken before a checkpoint must be there as written when it resumes.
- Run directories written before these changes (tests/data/legacy_af8d06a, written by commit af8d06a)
  still resume, to the same results as a run started today, and still analyze.
"""
from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.cli import main
from fastgrok.grid.experiments import to_toml

from cli_runner import fastgrok

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "data" / "legacy_af8d06a"
TRAIN = ["--p", "11", "--seeds", "2", "--d-embed", "8", "--hidden", "16", "--eval-every", "10",
         "--checkpoint-every", "20", "--snapshots", "3", "--no-compile", "--quiet"]
"""The legacy train run's flags (its README), less --steps and --out."""
SPEC = {"name": "sealed_tiny", "seeds": 2, "p": [11], "train_frac": [0.8], "lr": [0.02], "wd": [2.0],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 10, "logit_every": 10, "clamp_from": 10,
                  "compile": "off", "snapshots": 2},
        "budget": {"steps": 30}, "engine": {"max_models": 2, "compact_frac": 0.0},
        "grid": [{"norm_target": [20.0], "tau": [1.0, 1.5]}]}


class Payload:
    """A pickle that, if unpickled with code execution, creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle(path: Path, marker: Path, through_torch: bool) -> None:
    """A file at path whose loading with pickle (torch.save's zip when through_torch) runs `touch marker`."""
    if through_torch:
        torch.save({"step": 0, "state": {}, "records": Payload(marker), "done": False, "capture_shares": False}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The command was refused (exit 2) with one error line holding the needles, and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastgrok: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished train run (60 steps), another train run (lr differs), a finished grid and another grid."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sealed")
    assert main(["train", *TRAIN, "--steps", "60", "--out", str(root / "train")]) == 0
    assert main(["train", *TRAIN, "--steps", "60", "--lr", "3e-3", "--out", str(root / "other")]) == 0
    (root / "spec.toml").write_text(to_toml(SPEC))
    assert main(["run", str(root / "spec.toml"), "--out", str(root / "grid"), "--quiet"]) == 0
    (root / "other.toml").write_text(to_toml({**SPEC, "lr": [0.01]}))
    assert main(["run", str(root / "other.toml"), "--out", str(root / "other_grid"), "--quiet"]) == 0
    return root


def copy(runs: Path, name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    shutil.copytree(runs / name, d)
    return d


# ----------------------------------------------------------------------------- no code from a run directory

def test_no_torch_load_without_weights_only():
    """Every torch.load call in the repository (package, kernels, benchmarks, tests) passes
    weights_only=True (read from the syntax tree)."""
    calls = []
    for path in [*ROOT.glob("fastgrok/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert len(calls) >= 3, "too few torch.load calls found: the scan is broken"
    assert all(safe for _, safe in calls), [c for c, safe in calls if not safe]


@pytest.mark.parametrize("where", ["train checkpoint", "grid batch checkpoint"])
def test_a_crafted_pickle_checkpoint_runs_nothing_and_is_refused(runs, tmp_path, where):
    marker = tmp_path / "pwned"
    if where == "train checkpoint":
        d = copy(runs, "train", tmp_path)
        crafted_pickle(d / "checkpoint.pt", marker, through_torch=True)
        r = fastgrok("train", "--resume", d, "--steps", "80", "--quiet")
    else:
        d = copy(runs, "grid", tmp_path)
        for f in ("parts/models/b001.parquet", "parts/curves/b001.parquet"):
            (d / f).unlink()                                # batch b001 is running again, from its checkpoint
        (d / "batches" / "b001").mkdir(parents=True)
        crafted_pickle(d / "batches" / "b001" / "checkpoint.pt", marker, through_torch=True)
        r = fastgrok("run", runs / "spec.toml", "--out", d, "--quiet")
    one_line(r, "checkpoint.pt", "nothing of it was run")
    assert not marker.exists(), "the checkpoint's pickled code ran"


@pytest.mark.parametrize("name, command", [
    ("models.parquet", "analyze {d}"), ("curves.parquet", "analyze {d}"), ("progress.json", "status {d}"),
    ("config.json", "status {d}"), ("snapshots/step_000010.npz", "train --resume {d} --steps 80 --quiet")])
def test_a_crafted_pickle_in_any_other_state_file_runs_nothing(runs, tmp_path, name, command):
    d = copy(runs, "train", tmp_path)
    marker = tmp_path / "pwned"
    crafted_pickle(d / name, marker, through_torch=False)
    one_line(fastgrok(*command.format(d=d).split()), name.split("/")[-1])
    assert not marker.exists()


def test_a_crafted_pickle_as_a_snapshot_index_is_refused_by_its_reader(runs, tmp_path):
    """fastgrok itself never reads index.json back (it is rebuilt from the files); its reader refuses it."""
    from fastgrok.train.snapshots import read_index
    d = copy(runs, "train", tmp_path)
    marker = tmp_path / "pwned"
    crafted_pickle(d / "snapshots" / "index.json", marker, through_torch=False)
    with pytest.raises(store.StateError, match="index.json"):
        read_index(d / "snapshots")
    assert not marker.exists()


# ----------------------------------------------------------------------------- seals

def sealed_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".json", ".parquet", ".pt", ".npz"))


def test_every_state_file_is_sealed_and_any_changed_byte_is_refused(runs):
    """Each state file of a train run and a grid run carries a seal, and changing any one of its bytes (every
    position of the JSON, parquet and snapshot files; every 7th of the checkpoints) makes read_verified
    refuse it."""
    files = sealed_files(runs / "train") + sealed_files(runs / "grid")
    kinds = {p.suffix for p in files}
    assert kinds == {".json", ".parquet", ".pt", ".npz"}, kinds
    for path in files:
        data = path.read_bytes()
        assert store.SEAL_MARK in data, f"{path} is not sealed"
        assert store.read_verified(path) == data
        stride = 7 if path.suffix == ".pt" else 1
        for i in range(0, len(data), stride):
            changed = bytearray(data)
            changed[i] ^= 0x01 if i % 2 else 0x80
            with pytest.raises(store.StateError, match="damaged"):
                store.verified(path, bytes(changed))
        with pytest.raises(store.StateError, match="damaged"):
            store.verified(path, data[:-1])                         # a lost byte
        with pytest.raises(store.StateError, match="damaged"):
            store.verified(path, data + b"\n")                     # an added one


def flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    i = min(int(len(data) * where), len(data) - 1)
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("run, name, command", [
    ("train", "checkpoint.pt", "train --resume {d} --quiet"),
    ("train", "checkpoint.pt", "train --resume {d} --steps 80 --quiet"),
    ("train", "models.parquet", "analyze {d}"),
    ("train", "curves.parquet", "analyze {d}"),
    ("train", "progress.json", "status {d}"),
    ("train", "snapshots/step_000010.npz", "train --resume {d} --steps 80 --quiet"),
    ("grid", "parts/curves/b000.parquet", "run {spec} --out {d} --quiet"),
    ("grid", "parts/models/b001.parquet", "run {spec} --out {d} --quiet"),
    ("grid", "plan.json", "status {d}"),
    ("grid", "parts/models/b000.parquet", "analyze {d}"),
    ("grid", "parts/curves/b001.parquet", "analyze {d}"),
    ("grid", "parts/models/b001.parquet", "status {d}"),
    ("grid", "spec.json", "status {d}"),
], ids=lambda x: x if "{" not in x else None)
@pytest.mark.parametrize("where", [0.6])
def test_a_flipped_byte_is_one_line_naming_the_file_and_changes_nothing(runs, tmp_path, run, name, command, where):
    d = copy(runs, run, tmp_path)
    flip(d / name, where)
    before = {p: p.read_bytes() for p in sealed_files(d)}
    one_line(fastgrok(*command.format(d=d, spec=runs / "spec.toml").split()), name.split("/")[-1])
    assert {p: p.read_bytes() for p in sealed_files(d)} == before, "a refused command wrote"


@pytest.mark.parametrize("run, other, name, command", [
    ("train", "other", "models.parquet", "analyze {d}"),
    ("train", "other", "curves.parquet", "analyze {d}"),
    ("train", "other", "progress.json", "status {d}"),
    ("grid", "other_grid", "parts/models/b000.parquet", "analyze {d}"),
    ("grid", "other_grid", "parts/curves/b001.parquet", "analyze {d}"),
    ("grid", "other_grid", "plan.json", "status {d}"),
    ("grid", "other_grid", "plan.json", "run {spec} --out {d} --quiet"),
])
def test_a_file_of_another_run_is_refused(runs, tmp_path, run, other, name, command):
    d = copy(runs, run, tmp_path)
    shutil.copy(runs / other / name, d / name)
    one_line(fastgrok(*command.format(d=d, spec=runs / "spec.toml").split()), name, "another run")


# ----------------------------------------------------------------------------- the lock

def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(runs, tmp_path):
    d = copy(runs, "train", tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (d / ".lock").unlink(missing_ok=True)
    (d / ".lock").symlink_to(precious)
    one_line(fastgrok("train", "--resume", d, "--steps", "80", "--quiet"), ".lock", "symbolic link")
    assert precious.read_text() == "keep me\n"


def test_status_asks_the_lock_not_the_pid_in_it(runs, tmp_path):
    """A stopped run whose .lock names a live process (PID 1) is stopped; one whose lock is held is running."""
    d = copy(runs, "train", tmp_path)
    progress = store.read_json(d / "progress.json")
    store.write_json(d / "progress.json", {**progress, "done": False})
    (d / ".lock").write_text("1\n")
    r = fastgrok("status", d)
    assert r.returncode == 0 and "stopped" in r.stdout and "PID 1" not in r.stdout, r.stdout + r.stderr
    with store.writer_lock(d):
        r = fastgrok("status", d)
    assert r.returncode == 0 and f"running (PID {os.getpid()})" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- snapshots before a checkpoint

def test_a_snapshot_lost_before_the_checkpoint_is_refused_and_later_ones_are_written_again(runs, tmp_path):
    d = copy(runs, "train", tmp_path)
    (d / "snapshots" / "step_000010.npz").unlink()
    one_line(fastgrok("train", "--resume", d, "--steps", "80", "--quiet"), "step_000010.npz", "missing")
    d = copy(runs, "train", tmp_path / "later")
    (d / "snapshots" / "step_000070.npz").write_bytes(b"PK\x03\x04 a torn file of an earlier start")
    r = fastgrok("train", "--resume", d, "--steps", "80", "--quiet")
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh"
    assert main(["train", *TRAIN, "--steps", "80", "--out", str(fresh)]) == 0
    for name in ("models.parquet", "curves.parquet"):
        pd.testing.assert_frame_equal(store.read_parquet(d / name), store.read_parquet(fresh / name))
    assert not (d / "snapshots" / "step_000070.npz").exists()


# ----------------------------------------------------------------------------- run directories of before

SUMS_OVER_ROWS = {"train_loss", "test_loss", "logit_scale", "logit_scale_at_grok", "test_loss_at_grok"}
"""The readouts summed over rows: since 2026-12-07 in kernels.reference.row_sum's fixed order, so the legacy
runs' values of them (summed by a reduction) equal today's to rounding, not bit for bit."""


def _equal_but_row_sums(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The tables bit for bit equal, but the sums over rows (SUMS_OVER_ROWS: models' columns, or curves'
    metrics) within float32 rounding (relative 1e-6)."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    got, want = got.reset_index(drop=True), want.reset_index(drop=True)
    if "metric" in got.columns:
        pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"), check_exact=True)
        summed = got.metric.isin(SUMS_OVER_ROWS).to_numpy()
        a, b = got.value.to_numpy(), want.value.to_numpy()
        assert np.array_equal(a[~summed], b[~summed], equal_nan=True)
        np.testing.assert_allclose(a[summed], b[summed], rtol=1e-6, atol=0)
        return
    cols = [c for c in got.columns if c in SUMS_OVER_ROWS]
    pd.testing.assert_frame_equal(got.drop(columns=cols), want.drop(columns=cols), check_exact=True)
    for c in cols:
        np.testing.assert_allclose(got[c].to_numpy(float), want[c].to_numpy(float), rtol=1e-6, atol=0)


def test_a_train_run_written_before_resumes_to_todays_results(tmp_path):
    """The legacy train run (finished at 60 steps; its checkpoint pickles Records and numpy arrays) analyzes,
    and extended to 90 steps gives the tables of a 90-step run started today: bit for bit but the sums over
    rows its first 60 steps read with the old order (`_equal_but_row_sums`)."""
    d = tmp_path / "legacy"
    shutil.copytree(LEGACY / "train_run", d)
    assert fastgrok("analyze", d).returncode == 0
    assert fastgrok("status", d).returncode == 0
    r = fastgrok("train", "--resume", d, "--steps", "90", "--quiet")
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh"
    assert main(["train", *TRAIN, "--steps", "90", "--out", str(fresh)]) == 0
    assert (d / "models.parquet").read_bytes() == (fresh / "models.parquet").read_bytes()   # all read at step 90
    _equal_but_row_sums(store.read_parquet(d / "curves.parquet"), store.read_parquet(fresh / "curves.parquet"))
    ck = store.load_checkpoint(d)
    assert ck["format"] == store.CHECKPOINT_FORMAT and ck["step"] == 90


def test_a_grid_stopped_before_resumes_to_todays_results(tmp_path):
    """The legacy grid (batch b000 done, b001 checkpointed at step 109 in format 1) shows its status, and the
    same command finishes it with the results of the grid run whole today: its parts move to today's layout
    (parts/models|curves/<batch>.parquet), the consolidated tables of before go, and the dataset read of
    each (store.Results) equals today's exactly but the sums over rows the legacy steps read
    (`_equal_but_row_sums`); before the rerun, analyze reads the old layout."""
    d = tmp_path / "legacy"
    shutil.copytree(LEGACY / "grid_run", d)
    spec = LEGACY / "legacy_tiny.toml"
    r = fastgrok("status", d)
    assert r.returncode == 0 and "step 109/400" in r.stdout, r.stdout + r.stderr
    old = store.Results(d)                                  # the old layout, read as one dataset
    # (a setting added since, as label_noise, reads at the value such runs had: store.with_added_columns)
    pd.testing.assert_frame_equal(old.models(), store.with_added_columns(store.read_parquet(d / "models.parquet")),
                                  check_exact=True)
    pd.testing.assert_frame_equal(old.curves(), store.read_parquet(d / "curves.parquet"), check_exact=True)
    assert fastgrok("analyze", d, "--out", tmp_path / "rep").returncode == 0
    assert fastgrok("run", spec, "--out", d, "--quiet").returncode == 0
    assert fastgrok("run", spec, "--out", tmp_path / "fresh", "--quiet").returncode == 0
    assert not (d / "models.parquet").exists() and not (d / "curves.parquet").exists()
    assert sorted(p.relative_to(d).as_posix() for p in (d / "parts").rglob("*.parquet")) == \
        ["parts/curves/b000.parquet", "parts/curves/b001.parquet", "parts/models/b000.parquet", "parts/models/b001.parquet"]
    new, fresh = store.Results(d), store.Results(tmp_path / "fresh")
    _equal_but_row_sums(new.models(), fresh.models())
    _equal_but_row_sums(new.curves(), fresh.curves())
    b000 = new.models()["cell"].isin(store.read_plan(d)["batches"][0]["cells"])
    pd.testing.assert_frame_equal(new.models().loc[b000].reset_index(drop=True), old.models(), check_exact=True)
    assert fastgrok("analyze", d).returncode == 0


def test_state_files_stay_readable_by_other_tools(runs):
    """Seals live in each format's own fields: plain pandas, zipfile/numpy and json read the files."""
    import json
    import zipfile

    import numpy as np
    d = runs / "train"
    assert len(pd.read_parquet(d / "models.parquet")) == 2
    assert json.loads((d / "progress.json").read_text())["done"] is True
    with np.load(d / "snapshots" / "step_000000.npz") as z:
        assert z["flat"].shape[0] == 2
    assert zipfile.ZipFile(d / "checkpoint.pt").comment.startswith(store.SEAL_KEY.encode())
    assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 60
