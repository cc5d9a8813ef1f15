"""Weight snapshots (`--snapshots N`, fastgrok/snapshots.py):

- the steps are the log-spaced rule's (0 and the budget among them) plus each model's T_mem and T_grok,
  only while the model runs;
- every file opens with numpy.load alone; a saved flat is the trainer's state at that step (step 0: the
  initial draw; T_grok: the frozen row of the run's final checkpoint), the named arrays its views;
- the size bound is printed before training, and a run above the cap is refused in one line;
- a run killed with SIGKILL and resumed has byte-identical snapshot files (and index) to an uninterrupted one;
- a model's snapshots in a batch equal its solo run's (`--seeds 1 --seed0 K`);
- a grid's snapshots live in DIR/snapshots/<batch>/ and survive the removal of batches/<id>.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.config import TrainConfig, quick_cpu
from fastgrok.grid.experiments import ExperimentSpec
from fastgrok.train.snapshots import layout_of, log_steps, read_index
from fastgrok.train.trainer import Trainer

from cli_runner import ENV, FASTGROK, checkpointed, fastgrok

N = 12
FLAGS = ["--preset", "quick", "--seeds", "2", "--seed0", "1", "--snapshots", str(N), "--checkpoint-every", "100",
         "--no-compile"]
"""2 models of the quick preset (seeds 1 and 2; budget 5000, eval every 25): T_mem 50, T_grok 700 and 525."""


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run with snapshots, and its stderr."""
    out = tmp_path_factory.mktemp("snap") / "run"
    r = fastgrok("train", *FLAGS, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def files(run: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((run / "snapshots").iterdir())}


def test_log_steps_rule():
    s = log_steps(20, 5000, 25)
    assert s[0] == 0 and s[-1] == 5000 and s == sorted(set(s)) and len(s) <= 20
    assert all(x % 25 == 0 for x in s)
    ratios = np.diff(np.log(s[2:]))                  # log-spaced above the first few (rounded) steps
    assert ratios.max() < 3 * ratios.min()
    assert log_steps(5, 330, 25) == [0, 25, 75, 330]     # 330^(k/4) = 4.3, 18.2, 77.5, 330: 4.3 joins 0
    assert log_steps(1, 5000, 25) == [0] and log_steps(0, 5000, 25) == []
    assert log_steps(3, 100, 1) == [0, 10, 100]


def test_snapshot_steps_are_log_spaced_plus_each_models_t_mem_and_t_grok(ref):
    out, _ = ref
    models = pd.read_parquet(out / "models.parquet")
    index = pd.DataFrame(read_index(out / "snapshots"))
    sched = log_steps(N, 5000, 25)
    for m in models.itertuples():
        got = index.loc[index["model"] == m.model].set_index("step")["reason"].to_dict()
        want = {s: ["log"] for s in sched if s <= m.steps}
        for s, why in ((m.t_mem, "t_mem"), (m.t_grok, "t_grok")):
            want.setdefault(int(s), []).append(why)
        assert got == {s: "+".join(w) for s, w in want.items()}, m.model
        assert max(got) == m.t_grok == m.steps                  # nothing after the model stopped
    assert set(index["file"]) == {f"step_{s:06d}.npz" for s in index["step"]}


def test_files_open_with_numpy_and_hold_the_trainers_state(ref):
    out, _ = ref
    cfg = TrainConfig(**{**store.read_json(out / "config.json"), "taus": (1.0,)})
    lay = layout_of(cfg)
    for f in (out / "snapshots").glob("step_*.npz"):
        with np.load(f) as z:                                   # no pickle, no torch
            assert z["flat"].dtype == np.float32 and z["flat"].shape == (len(z["models"]), lay.n_params)
            assert z["models"].dtype == np.int64 and len(z["reason"]) == len(z["models"])
            np.testing.assert_array_equal(np.concatenate([z[n].reshape(len(z["models"]), -1) for n in lay.names], 1),
                                          z["flat"])
    with np.load(out / "snapshots" / "step_000000.npz") as z:      # step 0: the initial draw
        init = Trainer(cfg, out / "unused", progress=False).state["flat"].numpy()
        np.testing.assert_array_equal(z["flat"], init[z["models"]])
        assert list(z["models"]) == [0, 1] and list(z["reason"]) == ["log", "log"]
    final = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["flat"].numpy()   # (M, P)
    models = pd.read_parquet(out / "models.parquet")
    for m in models.itertuples():                               # frozen at its T_grok from then on
        with np.load(out / "snapshots" / f"step_{int(m.t_grok):06d}.npz") as z:
            k = list(z["models"]).index(m.model)
            np.testing.assert_array_equal(z["flat"][k], final[m.model])


def test_size_bound_is_printed_and_a_run_above_the_cap_is_refused_in_one_line(ref, tmp_path):
    out, stderr = ref
    line = next(x for x in stderr.splitlines() if "snapshots: at most" in x)
    assert f"({N} + 2) x 2 models x (2 x 22,495 params x 4 + 4,608) bytes" in line
    bound = (N + 2) * 2 * (2 * 22495 * 4 + 4608)
    assert sum(f.stat().st_size for f in (out / "snapshots").iterdir()) <= bound
    for extra in (["--snapshots", "100000"], ["--snapshots", "5", "--snapshot-cap-gib", "0.001"]):
        r = fastgrok("train", "--preset", "quick", *extra, "--out", tmp_path / "big")
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastgrok: error: snapshots: at most"), r.stderr
        assert "above the cap" in r.stderr and not (tmp_path / "big").exists()


def test_killed_and_resumed_run_has_identical_snapshot_files(ref, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*FASTGROK, "train", *FLAGS, "--quiet", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not checkpointed(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not json.loads((out / "progress.json").read_text())["done"]
    r = fastgrok("train", "--resume", out)
    assert r.returncode == 0, r.stderr
    assert files(out) == files(ref[0])                          # the same files, byte for byte, index included


def test_a_batched_models_snapshots_equal_its_solo_runs(ref, tmp_path):
    out = tmp_path / "solo"
    r = fastgrok("train", *FLAGS[:2], "--seeds", "1", "--seed0", "2", *FLAGS[6:], "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    solo = read_index(out / "snapshots")
    batched = [x for x in read_index(ref[0] / "snapshots") if x["model"] == 1]
    assert [(x["step"], x["reason"]) for x in solo] == [(x["step"], x["reason"]) for x in batched]
    for x in solo:
        with np.load(out / "snapshots" / x["file"]) as a, np.load(ref[0] / "snapshots" / x["file"]) as b:
            k = list(b["models"]).index(1)
            for name in a.files:
                if name not in ("models", "reason"):
                    np.testing.assert_array_equal(a[name][0], b[name][k])


def test_grid_snapshots_survive_the_batch_cleanup(tmp_path):
    from fastgrok.grid.executors import run_experiment
    torch.set_num_threads(1)
    spec = ExperimentSpec.from_dict({
        "name": "snap", "seeds": 2, "p": [17], "train_frac": [0.8], "lr": [0.02], "wd": [2.0],
        "train": {"d_embed": 16, "hidden": 32, "eval_every": 10, "logit_every": 50, "compile": "off", "snapshots": 6},
        "budget": {"steps": 1500}, "engine": {"max_models": 2},
        "grid": [{"rho": ["free"], "tau": [1.0, 1.3]}]})
    out = run_experiment(spec, out=tmp_path / "grid", progress=False)
    assert not any((out / "batches").glob("*"))                 # checkpoints gone ...
    models = store.Results(out).models()                        # the grid's parts, as one table
    index = read_index(out / "snapshots")
    assert sorted({x["model"] for x in index}) == sorted(models["model"])          # ... snapshots kept
    assert {x["file"].split("/")[0] for x in index} == {"b000", "b001"}
    for x in index:
        with np.load(out / "snapshots" / x["file"]) as z:
            assert x["model"] in z["models"]
    for m in models.itertuples():
        steps = {x["step"]: x["reason"] for x in index if x["model"] == m.model}
        assert min(steps) == 0 and "t_mem" in steps[m.t_mem] and "t_grok" in steps[m.t_grok] and max(steps) <= m.steps


def test_snapshots_are_a_config_field_with_an_old_default():
    from fastgrok.config import ADDED_READOUTS, without_defaults
    assert ADDED_READOUTS["snapshots"] == 0
    d = quick_cpu().to_dict()
    assert "snapshots" not in without_defaults(d) and "snapshot_cap_gib" not in without_defaults(d)
