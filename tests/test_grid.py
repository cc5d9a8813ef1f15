"""The grid engine end to end on the CPU (fastgrok/plan.py, grid.py, rundir.py, executors.py), on tiny grids that
grok in a few hundred steps (p = 17, train fraction 0.8, widths 16/32, eager):

- a small mediation experiment (calibration + clamped tau sweep) gives the same per-model results packed
  in one batch, one cell per batch, with batch compaction, and on a local Ray cluster; its w_c and its
  cells match plain `Trainer` runs of the same settings;
- `kill -9` of `fastgrok run` mid-grid, then the same command again: the final Parquet equals an
  uninterrupted run's, with no duplicate rows and finished batches not rerun; `fastgrok status` on the
  partial and the finished directory;
- same-state forks: every arm starts from its parent's exact state at the fork step (checked against an
  independent free run to that step), is clamped to factor x the norm there, the free arm continues the
  free trajectory exactly, and results do not depend on packing.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok.grid import jobs as grid, rundir
from fastgrok import store
from fastgrok.cli import main
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.grid.executors import run_experiment
from fastgrok.grid.experiments import ExperimentSpec, to_toml
from fastgrok.train.trainer import Trainer

SHAPE = {"p": [17], "train_frac": [0.8], "lr": [0.02], "wd": [2.0]}
TRAIN = {"d_embed": 16, "hidden": 32, "eval_every": 10, "logit_every": 50, "clamp_from": 100, "compile": "off"}
TAUS = [1.0, 1.3, 1.7]
MEDIATION = {"name": "med_tiny", "seeds": 3, **SHAPE, "train": TRAIN,
             "budget": {"steps": 1500, "steps_ref": 3000}, "calibration": {"steps": 1000},
             "engine": {"compact_frac": 0.0},
             "grid": [{"rho": [1.0], "tau": [1.0]}, {"rho": [1.15], "tau": TAUS}]}


def spec_of(d: dict, **engine) -> ExperimentSpec:
    spec = ExperimentSpec.from_dict(d)
    return dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, **engine)) if engine else spec


def tables(run_dir):
    res = store.Results(run_dir)
    return res.models(), res.curves()


def assert_same_results(a, b):
    """Two run directories hold exactly the same models and curves."""
    for x, y in zip(tables(a), tables(b)):
        pd.testing.assert_frame_equal(x, y, check_exact=True)


def assert_no_duplicates(run_dir):
    models, curves = tables(run_dir)
    assert models["model"].is_unique
    assert not curves.duplicated(["model", "step", "metric"]).any()
    assert set(curves["model"]) == set(models["model"])


def plain_run(tmp, per_cell: bool = False, **kw) -> Trainer:
    """An independent reference: fastgrok's plain Trainer (TrainConfig cells, no grid). It stops each
    model at its own end (`fastgrok train`); per_cell: each cell's models when all of them have (the
    study's rule, the grid's), by giving it its config's own table."""
    cfg = TrainConfig(**{k: v[0] for k, v in SHAPE.items()}, **TRAIN, device="cpu", **kw)
    tr = Trainer(cfg, tmp, progress=False, table=cfg.model_table() if per_cell else None)
    tr.run()
    return tr


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread (two can be 50x slower when the
    cores are busy). Subprocesses get OMP_NUM_THREADS=1, Ray workers have it by default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return run_experiment(spec_of(MEDIATION), out=tmp_path_factory.mktemp("med") / "packed", progress=False)


# ------------------------------------------------------------------------------------------ mediation
def test_mediation_packed_equals_cells_run_separately(packed, tmp_path, capsys, monkeypatch):
    plan = store.read_json(packed / store.PLAN)
    assert [b["cells"] for b in plan["batches"]] == [[0, 1, 2, 3]]            # one batch of 12 models
    sep = run_experiment(spec_of(MEDIATION, max_models=3), out=tmp_path / "sep", progress=False)
    assert [b["cells"] for b in store.read_json(sep / store.PLAN)["batches"]] == [[0], [1], [2], [3]]
    assert_same_results(packed, sep)
    assert_no_duplicates(packed)

    models, curves = tables(packed)
    assert len(models) == 12 and (models["t_mem"].notna()).all()
    assert models["t_grok"].notna().sum() >= 9                     # the grid is about grokking: most do
    # w_c: the median over the free control's seeds of ||W|| at the step its last seed grokked (the
    # study's rule), from a plain free run
    ref = plain_run(tmp_path / "calib", per_cell=True, seeds=3, steps=1000)   # the control stops as a cell
    rm, rc = ref.results(), ref.curves()
    wn = rc[rc["metric"] == "weight_norm"].set_index(["model", "step"])["value"]
    assert rm["t_grok"].notna().all()
    end = int(rm["t_grok"].max())
    w_c = float(np.median([wn[(m, end)] for m in rm["model"]]))
    (cal,) = store.read_calibration(packed).values()
    assert cal == {"w_c": w_c, "source": "last grok", "step": end, "n_grokked": 3, "seeds": 3}
    (key,) = store.read_calibration(packed)
    assert f"w_c[{key}] = {w_c:.4g} (3/3 grokked" in _status(packed, capsys, monkeypatch)   # key not eaten as markup
    np.testing.assert_array_equal(models["norm_target"], models["rho"] * w_c)
    np.testing.assert_allclose(models["weight_norm"], models["norm_target"], rtol=1e-5)   # the clamp held

    # cells against plain runs of one cell each (the study's per-cell stopping; budget grows with rho)
    for cell, rho, tau, steps in ((0, 1.0, 1.0, 1500), (3, 1.15, 1.7, 3000)):
        ref = plain_run(tmp_path / f"cell{cell}", per_cell=True, seeds=3, steps=steps, taus=(tau,),
                        norm_targets=(rho * w_c,))
        exp = ref.results()
        got = models[models["cell"] == cell].reset_index(drop=True)
        assert list(got["seed"]) == list(exp["seed"]) and (got["budget"] == steps).all()
        for col in ("t_mem", "t_grok", "steps", "train_acc", "test_acc", "train_loss", "weight_norm",
                    "logit_scale_at_grok", "sc_rate", "diverged", "tau", "norm_target"):
            np.testing.assert_array_equal(got[col].to_numpy(), exp[col].to_numpy(), err_msg=col)
        c = curves[curves["model"].isin(got["model"])].copy()
        c["model"] -= got["model"].min()
        pd.testing.assert_frame_equal(c.reset_index(drop=True),
                                      ref.curves().sort_values(["model", "step"], kind="stable")
                                      .reset_index(drop=True), check_exact=True)


def test_a_cells_results_do_not_depend_on_the_budgets_packed_with_it(tmp_path):
    """Budgets between evaluations (73 and 137, evaluation every 10) force an evaluation of the whole batch
    at that step; it counts only for the models whose budget it is. Each cell packed with the others
    equals the cell trained alone: T_mem, T_grok, final values and curves, compaction or not."""
    cfg = TrainConfig(**{k: v[0] for k, v in SHAPE.items()}, **TRAIN, device="cpu", seeds=2, taus=(1.0, 1.3, 1.7),
                      stop_when_grokked=False)
    budgets = {0: 137, 1: 73, 2: 150}
    table = [dict(r, budget=budgets[r["cell"]]) for r in cfg.model_table()]
    for frac in (0.0, 0.3):
        packed = Trainer(cfg, tmp_path / f"packed{frac}", table=table, compact_frac=frac, progress=False)
        packed.run()
        pm, pc = packed.results(), packed.curves()
        assert sorted(set(pc["step"]) - set(range(0, 151, 10))) == [73, 137]
        for cell in budgets:
            rows = [r for r in table if r["cell"] == cell]
            solo = Trainer(cfg, tmp_path / f"solo{frac}_{cell}", table=rows, progress=False)
            solo.run()
            pd.testing.assert_frame_equal(pm[pm["cell"] == cell].reset_index(drop=True), solo.results(),
                                          check_exact=True)
            ids = [r["model"] for r in rows]
            pd.testing.assert_frame_equal(pc[pc["model"].isin(ids)].reset_index(drop=True), solo.curves(),
                                          check_exact=True)
            assert (pm.loc[pm["cell"] == cell, "steps"] == budgets[cell]).all()
        assert store.read_json(tmp_path / f"packed{frac}" / store.PROGRESS)["steps"] == 150   # its own budgets


def test_compaction_gives_the_same_results(packed, tmp_path, monkeypatch):
    sizes = []
    compact = Trainer.compact

    def counting(self):
        before = len(self.rows)
        compact(self)
        sizes.append((before, len(self.rows)))
    monkeypatch.setattr(Trainer, "compact", counting)
    assert tables(packed)[0].groupby("cell")["steps"].max().nunique() == 4     # the cells stop apart
    run = run_experiment(spec_of(MEDIATION, compact_frac=0.25), out=tmp_path / "compact", progress=False)
    assert sizes and sizes[0][0] == 12 and all(b > a for b, a in sizes)    # the batch shrank (cells end apart)
    assert_same_results(packed, run)


def test_ray_executor_matches_local(packed, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    inits = []
    real_init = ray.init

    def counting_init(*a, **k):
        out = real_init(*a, **k)
        inits.append(k.get("address"))
        return out
    monkeypatch.setattr(ray, "init", counting_init)
    crash = tmp_path / "crashed"
    monkeypatch.setenv("FASTGROK_CRASH_ONCE", str(crash))     # the first task kills its worker: retried
    try:
        # one cell per batch: 4 tasks after the calibration task, finishing in any order on 2 CPUs
        run = run_experiment(spec_of(MEDIATION, max_models=3), out=tmp_path / "ray", executor="ray",
                             progress=False)
        assert not ray.is_initialized()            # the local cluster the executor started is gone
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert inits == [None]                         # one local cluster for calibration and batches
    assert crash.exists()                          # a worker died, its task ran again
    assert_same_results(packed, run)
    assert sorted(p.relative_to(run / "parts").as_posix() for p in (run / "parts").rglob("*.parquet")) == \
        sorted(f"{k}/b00{i}.parquet" for i in range(4) for k in ("models", "curves"))


def test_local_workers_match_one_process(packed, tmp_path, monkeypatch):
    """Two local worker processes (as on a 2-GPU machine; here 2 CPU workers): calibration and 4 batches
    run in the workers (never in this process), results identical to the single-process run."""
    def not_here(*a, **k):
        raise AssertionError("a job ran in the driver process")
    monkeypatch.setattr(grid, "run_job", not_here)     # spawned workers import their own, unpatched
    run = run_experiment(spec_of(MEDIATION, max_models=3), out=tmp_path / "workers", workers=2, progress=False)
    assert_same_results(packed, run)
    assert_no_duplicates(run)
    with pytest.raises(ConfigError, match="workers"):
        run_experiment(spec_of(MEDIATION), out=tmp_path / "bad", workers=0, progress=False)
    with pytest.raises(ConfigError, match="workers is an option of the local executor"):
        run_experiment(spec_of(MEDIATION), out=tmp_path / "bad", workers=2, executor="ray", progress=False)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ kill -9
KILL = {"name": "kill_tiny", "seeds": 2, **SHAPE,
        "train": {**TRAIN, "stop_when_grokked": False, "checkpoint_every": 50},
        "budget": {"steps": 600}, "engine": {"max_models": 2, "compact_frac": 0.0},
        "grid": [{"norm_target": [20.0], "tau": [1.0, 1.5]}, {"rho": ["free"], "tau": [1.0]}]}


def _status(run_dir, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")            # rich: wide enough for whole rows
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


def test_kill_9_mid_grid_then_resume(tmp_path, capsys, monkeypatch):
    spec_path = tmp_path / "kill.toml"
    spec_path.write_text(to_toml(KILL))
    ref = run_experiment(spec_path, out=tmp_path / "ref", progress=False)

    out = tmp_path / "run"
    args = ["run", str(spec_path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fastgrok.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    b001 = out / "batches" / "b001"
    deadline = time.monotonic() + 240
    try:   # kill once batch b000 is done and b001 has checkpointed (progress.json past step 0: its last file)
        while not (store.part_path(out, "b000", "models").exists() and (b001 / store.CHECKPOINT).exists()
                   and (b001 / store.PROGRESS).exists() and store.read_json(b001 / store.PROGRESS)["step"] > 0):
            assert proc.poll() is None, f"fastgrok run ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no batch checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = store.load_checkpoint(b001)["step"]
    assert 0 < step_at_kill < 600                                  # killed inside batch b001
    part0 = store.part_path(out, "b000", "models")
    stamp = (part0.stat().st_mtime_ns, part0.read_bytes())

    # the partial directory: cell 0 done, cell 1 running from its checkpoint, cell 2 pending
    st = rundir.status_table(out)
    assert list(st["done"]) == ["2/2", "0/2", "0/2"]
    assert st["state"][0] == "done" and st["state"][1].startswith("step ") and st["state"][2] == "pending"
    text = _status(out, capsys, monkeypatch)
    assert "kill_tiny: 1/3 cells done" in text and "pending" in text and st["state"][1] in text

    # the same command again (in this process, to see what it trains): b001 continues from its
    # checkpoint, b002 runs, b000 is not touched
    runs = []
    trainer_run = Trainer.run

    def spy(self):
        start = self.step_idx
        out_ = trainer_run(self)
        runs.append((self.run_dir.name, start, self.step_idx))
        return out_
    monkeypatch.setattr(Trainer, "run", spy)
    assert main(args) == 0
    assert runs == [("b001", step_at_kill, 600), ("b002", 0, 600)]
    assert (part0.stat().st_mtime_ns, part0.read_bytes()) == stamp
    assert list((out / "batches").iterdir()) == []
    assert_same_results(ref, out)
    assert_no_duplicates(out)
    models, _ = tables(out)
    assert len(models) == 6 and (models["steps"] == 600).all()

    st = rundir.status_table(out)
    assert list(st["done"]) == ["2/2"] * 3 and list(st["state"]) == ["done"] * 3
    assert list(st["grokked"]) == [f"{n}/2" for n in models.groupby("cell")["t_grok"].count()]
    text = _status(out, capsys, monkeypatch)
    assert "kill_tiny: 3/3 cells done" in text and text.count("2/2") >= 3

    assert main(args) == 0                                                   # a finished grid: no-op
    assert len(runs) == 2 and (part0.stat().st_mtime_ns, part0.read_bytes()) == stamp
    assert_same_results(ref, out)


def test_status_of_a_dir_without_a_grid(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ forks
FORK_STEP = 100
FREE = {"name": "free_tiny", "seeds": 2, **SHAPE, "train": TRAIN, "rho": ["free"], "tau": [1.0, 1.5],
        "budget": {"steps": 600, "steps_ref": 1200, "max_steps": 800}}
FORKS = {**FREE, "name": "fork_tiny", "fork": {"step": FORK_STEP, "factor": 1.15}}


def test_forks_start_from_the_parent_state(tmp_path, monkeypatch, capsys):
    starts = []
    fork_trainer = grid._fork_trainer

    def capture(job, cfg, d, progress):
        tr = fork_trainer(job, cfg, d, progress)
        starts.append((tr.step_idx, [dict(r) for r in tr.table],
                       {k: tr.state[k].clone() for k in ("flat", "m", "v", "t")}))
        return tr
    monkeypatch.setattr(grid, "_fork_trainer", capture)
    a = run_experiment(spec_of(FORKS), out=tmp_path / "a", progress=False)
    assert len(store.read_json(a / store.PLAN)["batches"]) == 1 and len(starts) == 1
    b = run_experiment(spec_of(FORKS, max_models=8), out=tmp_path / "b", progress=False)
    assert len(store.read_json(b / store.PLAN)["batches"]) == 2 and len(starts) == 3
    assert_same_results(a, b)                   # reproducible, whatever the packing
    assert_no_duplicates(a)

    # the parents' state at the fork step, independently: a plain free run of FORK_STEP steps per tau
    parent = {}
    for tau in FREE["tau"]:
        tr = plain_run(tmp_path / f"parent{tau}", seeds=2, taus=(tau,), steps=FORK_STEP, stop_when_grokked=False)
        n_mat = tr.model.layout.n_mat
        for i, row in enumerate(tr.table):
            parent[(tau, row["seed"])] = ({k: tr.state[k][i] for k in ("flat", "m", "v", "t")},
                                          float(tr.state["flat"][i, :n_mat].double().norm()))
    n_rows = 0
    for step, rows, state in starts:
        assert step == FORK_STEP
        for i, r in enumerate(rows):
            ps, _ = parent[(r["tau"], r["seed"])]
            for k in ("flat", "m", "v", "t"):
                assert torch.equal(state[k][i], ps[k]), (r, k)          # identical parameters and moments
            n_rows += 1
    assert n_rows == 16 * 2                                            # 2 taus x 4 arms x 2 seeds, two runs

    models, curves = tables(a)
    assert sorted(models["arm"].unique()) == ["free", "lowered", "raised", "same"]
    factor = {"same": 1.0, "raised": 1.15, "lowered": 1 / 1.15}
    wn = curves[curves["metric"] == "weight_norm"]
    for r in models.itertuples():
        _, n0 = parent[(r.tau, r.seed)]
        assert r.fork_step == FORK_STEP
        if r.arm == "free":
            assert np.isnan(r.norm_target)
            continue
        assert r.norm_target == pytest.approx(factor[r.arm] * n0, rel=1e-12)
        after = wn[(wn["model"] == r.model) & (wn["step"] > FORK_STEP)]["value"]
        np.testing.assert_allclose(after, r.norm_target, rtol=1e-5)       # clamped from the fork on
        before = wn[(wn["model"] == r.model) & (wn["step"] == FORK_STEP)]["value"]
        assert float(before.iloc[0]) == pytest.approx(n0, rel=1e-5)
    assert (models.loc[models["arm"] == "raised", "budget"] == 800).all()   # at(1.15) = 1200, max_steps 800

    # the free arm continues the free trajectory exactly: an unforked free run of the same cells
    free = run_experiment(spec_of(FREE), out=tmp_path / "free", progress=False)
    fm, fc = tables(free)
    arm = models[models["arm"] == "free"].reset_index(drop=True)
    for col in ("seed", "tau", "t_mem", "t_grok", "steps", "test_acc", "train_loss", "weight_norm"):
        np.testing.assert_array_equal(arm[col].to_numpy(), fm[col].to_numpy(), err_msg=col)
    ids = dict(zip(arm["model"], fm["model"]))
    ac = curves[curves["model"].isin(ids)].assign(model=lambda d: d["model"].map(ids))
    pd.testing.assert_frame_equal(ac.reset_index(drop=True), fc, check_exact=True)

    text = _status(a, capsys, monkeypatch)
    assert "fork_tiny: 8/8 cells done" in text and "lowered" in text


def test_status_of_a_running_fork_batch(tmp_path, capsys, monkeypatch):
    """The state of a fork batch while its parents train (parent/), then its arms (no training here)."""
    rundir.init_run_dir(spec_of(FORKS), tmp_path, "cpu")
    bdir = tmp_path / "batches" / "b000"
    assert set(rundir.status_table(tmp_path)["state"]) == {"pending"}
    store.write_json(bdir / "parent" / store.PROGRESS, {"step": 40, "done": False, "steps": FORK_STEP})
    assert set(rundir.status_table(tmp_path)["state"]) == {f"fork parent, step 40/{FORK_STEP}"}
    (bdir / store.CHECKPOINT).write_bytes(b"")                  # the arms' first checkpoint, being written
    assert set(rundir.status_table(tmp_path)["state"]) == {"running"}
    store.write_json(bdir / store.PROGRESS, {"step": 150, "done": False, "steps": 800})
    st = rundir.status_table(tmp_path)
    assert set(st["state"]) == {"step 150/800"} and list(st["arm"]) == ["same", "raised", "lowered", "free"] * 2
    assert "fork_tiny: 0/8 cells done" in _status(tmp_path, capsys, monkeypatch)


def test_status_counts_the_cells_that_finished_inside_a_running_batch(tmp_path, capsys):
    """A batch of 4 cells (2 seeds each) at step 2000, from its saved results: cell 0 stopped at its
    budget (1500), cell 1 grokked and stopped, cells 2 and 3 still running: done 2/2, 2/2, 0/2, 0/2."""
    spec = spec_of({**MEDIATION, "seeds": 2, "calibration": {"w_c": 20.0}})
    plan = rundir.init_run_dir(spec, tmp_path, "cpu")
    assert [b["cells"] for b in plan["batches"]] == [[0, 1, 2, 3]]
    assert [c["budget"] for c in plan["cells"]] == [1500, 3000, 3000, 3000]
    bdir = tmp_path / "batches" / "b000"
    store.write_json(bdir / store.PROGRESS, {"step": 2000, "done": False, "steps": 3000})
    rows = [(0, 0, None, 1500), (0, 1, None, 1500), (1, 2, 300, 350), (1, 3, 350, 350), (2, 4, 380, 2000),
            (2, 5, None, 2000), (3, 6, None, 2000), (3, 7, None, 2000)]
    models = pd.DataFrame(rows, columns=["cell", "model", "t_grok", "steps"]).astype({"t_grok": "Int64"})
    store.write_parquet(bdir / store.MODELS, models.assign(diverged=False))
    st = rundir.status_table(tmp_path)
    assert list(st["done"]) == ["2/2", "2/2", "0/2", "0/2"]
    assert list(st["grokked"]) == ["0/2", "2/2", "1/2", "0/2"]
    rundir.print_status(tmp_path)                        # the title counts as the rows do: 2 of 4 cells done
    assert "2/4 cells done" in capsys.readouterr().out


def test_status_shows_a_started_batch_before_its_first_checkpoint(tmp_path, monkeypatch, capsys):
    """A batch whose trainer has started (no checkpoint yet: the first comes after checkpoint_every steps)
    reads as at its step, not "pending"."""
    from fastgrok.train.trainer import Trainer
    spec = spec_of({**MEDIATION, "seeds": 2, "calibration": {"w_c": 20.0}})
    plan = rundir.init_run_dir(spec, tmp_path, "cpu")
    assert set(rundir.status_table(tmp_path)["state"]) == {"pending"}

    def stop_here(self):
        raise RuntimeError("stopped at the first evaluation")
    monkeypatch.setattr(Trainer, "_evaluate", stop_here)
    bdir = tmp_path / "batches" / plan["batches"][0]["id"]
    tr = Trainer(TrainConfig(p=7, seeds=1, d_embed=4, hidden=4, steps=300, device="cpu", compile="off"), bdir,
                 progress=False)
    with pytest.raises(RuntimeError, match="first evaluation"):
        tr.run()
    assert not (bdir / "checkpoint.pt").exists()
    assert set(rundir.status_table(tmp_path)["state"]) == {"step 0/300"}


def test_calibrate_from_reads_every_norm_where_the_last_seed_grokked():
    # 4 seeds, ||W|| = 40 + seed + step / 100 at steps 0..500 (every 100); T_grok 100, 300, 100, 100:
    # the control stops at 300, where the last seed grokked, and w_c is the median of every seed's norm there
    steps = range(0, 501, 100)
    curves = pd.DataFrame([dict(model=m, step=s, metric="weight_norm", value=40.0 + m + s / 100)
                           for m in range(4) for s in steps])
    models = pd.DataFrame({"model": range(4), "t_grok": pd.array([100, 300, 100, 100], "Int64"),
                           "steps": 300})
    cal = rundir.calibrate_from(models, curves)
    # at 300: 43, 44, 45, 46 -> 44.5; at each own T_grok: 41, 44, 43, 44 -> 43.5 (the old rule)
    assert cal == {"w_c": 44.5, "source": "last grok", "step": 300, "n_grokked": 4, "seeds": 4}
    # a seed that never grokked: the control ran to its budget (500): 45, 46, 47, 48 -> 46.5
    models["t_grok"] = pd.array([100, None, 100, 100], "Int64")
    models["steps"] = 500
    assert rundir.calibrate_from(models, curves) == {"w_c": 46.5, "source": "budget", "step": 500,
                                                   "n_grokked": 3, "seeds": 4}


# ------------------------------------------------------------------------------------------ a larger cap
def test_a_grid_extended_with_a_larger_max_steps_equals_the_longer_run(tmp_path, monkeypatch, capsys):
    """A finished grid rerun with a larger --max-steps: the batches whose budget grows (rho 1.15, capped at
    1,500 then 2,500) train again, the rest (the rho 1 batch, the calibration: their budgets are below both
    caps) are kept untouched, and the results equal a run started with the larger cap."""
    spec = spec_of(MEDIATION, max_models=3)          # one cell per batch: b000 rho 1, b001-b003 rho 1.15
    out = tmp_path / "run"
    run_experiment(spec, overrides={"max_steps": 1500}, out=out, progress=False)
    part0 = store.part_path(out, "b000", "models")
    stamp = (part0.stat().st_mtime_ns, (out / "calibration.json").stat().st_mtime_ns)
    ran = []
    real = grid.run_job

    def spy(job, progress=False):
        ran.append(job["id"])
        return real(job, progress=progress)
    monkeypatch.setattr(grid, "run_job", spy)
    capsys.readouterr()
    run_experiment(spec, overrides={"max_steps": 2500}, out=out, progress=False)
    assert "extending the grid to 2,500 steps at most: 3 of 4 batches and 0 of 1 calibrations train again" \
        in capsys.readouterr().err
    assert sorted(ran) == ["b001", "b002", "b003"]
    assert (part0.stat().st_mtime_ns, (out / "calibration.json").stat().st_mtime_ns) == stamp
    ref = run_experiment(spec, overrides={"max_steps": 2500}, out=tmp_path / "ref", progress=False)
    assert_same_results(out, ref)
    assert_no_duplicates(out)
    assert store.read_json(out / "spec.json") == store.read_json(ref / "spec.json")
    with pytest.raises(ConfigError, match="differs in budget.max_steps"):     # shortening is still refused
        run_experiment(spec, overrides={"max_steps": 1000}, out=out, progress=False)


# ----------------------------------------------------------------------------- packed per-model axes
PHASE = {"name": "knobs_tiny", "seeds": 1, "p": [17], "train": TRAIN, "budget": {"steps": 400},
         "engine": {"compact_frac": 0.0},
         "grid": [{"lr": [0.01, 0.02], "wd": [0.5, 2.0], "train_frac": [0.8]},
                  {"lr": [0.02], "wd": [2.0], "train_frac": [0.6], "op": ["div"], "init_scale": [1.3]}]}


@pytest.mark.parametrize("compact", [0.0, 0.3])
def test_lr_wd_fraction_op_and_init_scale_cells_pack_into_one_batch_with_solo_results(tmp_path, compact):
    """Cells differing in lr, wd, train fraction, op and init scale are ONE batch; each cell's models equal
    the same cell run as its own spec (T_mem, T_grok, steps, accuracies exactly; losses to rounding),
    also when finished models are dropped (compaction trims the padding no kept model needs)."""
    from fastgrok.grid.plan import make_plan
    spec = spec_of(PHASE, compact_frac=compact)
    plan = make_plan(spec, "cpu")
    assert len(plan["cells"]) == 5 and len(plan["batches"]) == 1
    run_experiment(spec, out=tmp_path / "packed", device="cpu", progress=False)
    packed = store.Results(tmp_path / "packed").models()
    assert packed.t_grok.notna().any() and packed.t_mem.notna().all()
    for c in plan["cells"]:
        one = {**PHASE, "name": f"cell{c['cell']}", "grid": [{k: [c[k]] for k in
                                                             ("lr", "wd", "train_frac", "op", "init_scale")}]}
        run_experiment(spec_of(one), out=tmp_path / f"c{c['cell']}", device="cpu", progress=False)
        alone = store.Results(tmp_path / f"c{c['cell']}").models().iloc[0]
        mine = packed[packed.cell == c["cell"]].iloc[0]
        for k in ("lr", "wd", "train_frac", "op", "init_scale"):
            assert mine[k] == alone[k] == c[k]
        for k in ("t_mem", "t_grok", "steps", "train_acc", "test_acc", "diverged"):
            assert (pd.isna(mine[k]) and pd.isna(alone[k])) or mine[k] == alone[k], (c, k, mine[k], alone[k])
        for k in ("train_loss", "test_loss", "weight_norm"):
            assert mine[k] == pytest.approx(alone[k], rel=1e-5), (c, k)
