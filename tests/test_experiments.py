"""Experiment specs (fastgrok/experiments.py): the built-in experiments load and expand to the study's
cells, step budgets grow with rho as documented, specs survive TOML round trips, and every bad spec
fails with a ConfigError naming the bad field before any training starts (API and CLI). No training."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from fastgrok.grid import jobs as grid, rundir
from fastgrok import store
from fastgrok.cli import main
from fastgrok.config import ConfigError
from fastgrok.grid.executors import run_experiment
from fastgrok.grid.experiments import (EXPERIMENTS, Budget, ExperimentSpec, apply_overrides,
                                  list_experiments, load_experiment, load_spec, to_toml)
from fastgrok.grid.plan import CALIB_AXES, cell_config, expand, make_plan, shape_of

BUILT_IN = ("mediation", "collapse", "dose", "mse", "float64", "samestate", "alloc", "transformer", "phase",
            "interventions", "atlas")
SWEEP = (1.0, 1.15, 1.3, 1.5, 1.7)          # the mediation tau sweep of the paper notes


def _cells(name_or_spec):
    spec = load_experiment(name_or_spec)
    return spec, expand(spec)


def _key(c, *axes):
    return tuple(c[a] for a in axes)


# ------------------------------------------------------------------------------------------ built-ins
def test_experiments_command_lists_the_built_ins(capsys):
    assert main(["experiments"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]                 # between the header and the note
    assert [ln.split()[0] for ln in lines] == list(BUILT_IN)
    descriptions = {n: d for n, d in list_experiments()}
    assert all(ln.endswith(descriptions[ln.split()[0]]) for ln in lines)    # every one has its description
    assert [n for n, _ in list_experiments()] == list(BUILT_IN) == list(EXPERIMENTS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_builtin_spec_loads_expands_and_plans(name):
    spec, cells = _cells(name)
    assert spec.name == name and spec.seeds == {"phase": 3, "interventions": 4, "atlas": 6}.get(name, 12)   # CPU-sized ones
    plan = make_plan(spec, "cpu")
    assert [c["cell"] for c in cells] == list(range(len(cells)))
    assert [c["model0"] for c in cells] == list(np.cumsum([0] + [c["seeds"] for c in cells])[:-1])
    assert {c["seeds"] for c in cells} >= {spec.seeds} or all(b.seeds for b in spec.grids)
    assert sorted(i for b in plan["batches"] for i in b["cells"]) == list(range(len(cells)))
    for b in plan["batches"]:                  # a batch holds one shape only
        assert len({shape_of(cells[i]) for i in b["cells"]}) == 1
    for c in cells:
        cfg = cell_config(spec, c)
        assert cfg.p == c["p"] and cfg.model == c["model"]
        assert c["budget"] == spec.budget.at(c["rho"]) or c["arm"] is not None or \
            c["budget"] in {spec.budget_at(c["rho"], b.steps) for b in spec.grids if b.steps}
    calib = {tuple(sorted(k["shape"].items())) for k in plan["calibrations"]}
    settings = {tuple(sorted((a, c[a]) for a in CALIB_AXES if c[a] is not None))    # None: the default (batch_size)
                for c in cells if c["rho"] is not None}
    assert calib == settings                   # one free control per clamped setting, dtype aside


def test_builtin_cells_are_the_studys():
    """Cells against ../shared/paper-notes.md, experiment by experiment."""
    _, c = _cells("mediation")
    assert [_key(x, "p", "rho", "tau") for x in c] == \
        [(p, 1.0, 1.0) for p in (59, 97)] + [(p, 1.15, t) for p in (59, 97) for t in SWEEP]
    assert {x["loss"] for x in c} == {"ce"} and {x["model"] for x in c} == {"mlp"}

    _, c = _cells("collapse")
    assert sorted(_key(x, "rho", "tau") for x in c) == sorted(itertools.product((1.0, 1.05, 1.1, 1.15), (1.0, 1.3, 1.7)))

    _, c = _cells("dose")
    rhos = [round(0.85 + 0.05 * i, 2) for i in range(9)]
    assert sorted(_key(x, "p", "rho") for x in c) == sorted(itertools.product((43, 59, 97), rhos))

    spec, c = _cells("mse")
    assert {x["loss"] for x in c} == {"mse"}
    assert sorted(_key(x, "rho", "tau") for x in c) == sorted([(1.0, 1.0)] + [(1.15, t) for t in SWEEP])
    assert cell_config(spec, c[0]).t_clamp == 50

    spec, c = _cells("float64")
    assert sorted(_key(x, "dtype", "rho") for x in c) == sorted(itertools.product(("float32", "float64"), (1.0, 1.15)))
    assert len(make_plan(spec, "cpu")["calibrations"]) == 1      # w_c measured once, in float32

    spec, c = _cells("samestate")
    assert [x["arm"] for x in c] == ["same", "raised", "lowered", "free"]
    assert {x["fork_step"] for x in c} == {800} and {x["rho"] for x in c} == {None}
    assert [x["factor"] for x in c] == [1.0, 1.15, pytest.approx(1 / 1.15), None]
    assert make_plan(spec, "cpu")["calibrations"] == []            # the parent is free
    assert len(make_plan(spec, "cpu")["batches"]) == 1             # a parent travels with its arms

    spec, c = _cells("alloc")
    assert spec.train["clamp_mode"] == "layer" and len(c) == 5 and {x["rho"] for x in c} == {1.0}
    fr = np.array([x["layer_fracs"] for x in c])
    np.testing.assert_allclose(fr.sum(1), 1.0)
    np.testing.assert_allclose(fr[:, 1], 0.5)                            # W1 fixed, E <-> W2 moved
    assert np.all(np.diff(fr[:, 0]) < 0) and np.all(np.diff(fr[:, 2]) > 0)

    spec, c = _cells("transformer")
    cfg = cell_config(spec, c[0])
    assert (cfg.model, cfg.lr, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.t_clamp) == ("transformer", 5e-4, 128, 4, 512, 600)
    assert sorted(_key(x, "rho", "tau") for x in c) == sorted([(1.0, 1.0)] + [(1.15, t) for t in SWEEP])


def test_phase_spec_expands_to_its_two_diagrams():
    """phase: lr x wd at train_frac 0.9 and train_frac x wd at lr 1e-2, log-spaced lr and wd, free cells (no
    calibration), 3 seeds; the two grids share their lr 1e-2, train_frac 0.9 row once; --p moves every cell."""
    spec, c = _cells("phase")
    lrs, wds = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    fracs = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    want = set(itertools.product(lrs, wds, [0.9])) | set(itertools.product([1e-2], wds, fracs))
    got = [_key(x, "lr", "wd", "train_frac") for x in c]
    assert len(got) == len(set(got)) == len(want) == 36 + 42 - 6 and set(got) == want
    assert all(np.allclose(np.diff(np.log10(v)), np.log10(v[1] / v[0]), atol=0.05) for v in (lrs, wds))
    assert {x["rho"] for x in c} == {None} and {x["norm_target"] for x in c} == {None}
    assert {x["tau"] for x in c} == {1.0} and {x["seeds"] for x in c} == {3} and {x["p"] for x in c} == {23}
    assert {x["budget"] for x in c} == {spec.budget.steps}
    plan = make_plan(spec, "cpu")
    assert plan["calibrations"] == []                       # unclamped: no free control to calibrate
    assert len(plan["batches"]) == 1                        # lr, wd and train_frac are per model: one batch
    cfg = cell_config(spec, c[0])
    assert (cfg.d_embed, cfg.hidden, cfg.compile, cfg.eval_every) == (32, 64, "off", 10)
    assert {x["p"] for x in expand(apply_overrides(spec, p=31))} == {31}


def test_a_spec_without_rho_skips_calibration(tmp_path):
    """Free cells only (no rho, no norm_target): no calibration planned, none written, none run."""
    spec = ExperimentSpec.from_dict({"name": "free", "seeds": 1, "p": [7], "lr": [1e-2, 3e-2], "wd": [1.0],
                                     "train": {"d_embed": 4, "hidden": 8, "compile": "off", "eval_every": 5},
                                     "budget": {"steps": 10}})
    assert make_plan(spec, "cpu")["calibrations"] == []
    run = run_experiment(spec, out=tmp_path / "run", progress=False)
    assert not (run / "calibration.json").exists() and not (run / "calibration").exists()


def test_lr_defaults_to_the_studys_for_each_model():
    """1e-3 for the MLP, 5e-4 for the transformer (paper-notes), in a run's config, a spec's cells and
    a saved config; an explicit lr wins."""
    from fastgrok.config import TrainConfig
    assert TrainConfig().learning_rate == 1e-3
    assert TrainConfig(model="transformer").learning_rate == 5e-4
    assert dataclasses.replace(TrainConfig(), model="transformer").learning_rate == 5e-4   # the CLI's path
    assert TrainConfig(model="transformer", lr=2e-3).learning_rate == 2e-3
    assert TrainConfig(model="transformer").to_dict()["lr"] == 5e-4                      # saved resolved
    spec = ExperimentSpec.from_dict({"name": "lrs", "p": [11], "model": ["mlp", "transformer"]})
    cells = expand(spec)
    assert {(c["model"], c["lr"]) for c in cells} == {("mlp", 1e-3), ("transformer", 5e-4)}
    spec = ExperimentSpec.from_dict({"name": "lrs", "p": [11], "model": ["transformer"], "lr": [1e-2]})
    assert {c["lr"] for c in expand(spec)} == {1e-2}


# ------------------------------------------------------------------------------------------ budgets
def test_budgets_grow_with_rho_as_documented():
    b = Budget()
    assert (b.at(None), b.at(0.85), b.at(1.0), b.at(1.15)) == (20000, 20000, 20000, 137000)
    rhos = [1.0 + 0.05 * i for i in range(1, 6)]
    got = [b.at(r) for r in rhos]
    assert all(x < y for x, y in zip(got, got[1:]))
    for r, s in zip(rhos, got):                 # 20000 * (137000 / 20000) ** ((rho - 1) / 0.15), rounded
        assert s == round(20000 * (137000 / 20000) ** ((r - 1.0) / 0.15))
    assert b.at(1.075) == round(math.sqrt(20000 * 137000))
    capped = Budget(max_steps=30000)
    assert [capped.at(r) for r in (None, 1.0, 1.05, 1.15)] == [20000, 20000, min(b.at(1.05), 30000), 30000]
    custom = Budget(steps=1000, steps_ref=4000, rho_ref=1.2)
    assert custom.at(1.1) == 2000 and custom.at(1.2) == 4000

    spec, cells = _cells("collapse")
    for c in cells:
        assert c["budget"] == b.at(c["rho"])
    spec, cells = _cells("samestate")          # an arm gets the larger of the parent's and its own budget
    assert {c["arm"]: c["budget"] for c in cells} == {"same": 20000, "raised": 137000, "lowered": 20000,
                                                      "free": 20000}


def test_overrides():
    spec = apply_overrides(load_experiment("mediation"), p=31, seeds=2, max_steps=1500)
    cells = expand(spec)
    assert len(cells) == 6 and {c["p"] for c in cells} == {31} and {c["seeds"] for c in cells} == {2}
    assert {c["budget"] for c in cells} == {1500}
    assert apply_overrides(spec, max_steps=5000).budget.max_steps == 1500        # a cap never rises
    for kw, field in ((dict(max_steps=0), "max_steps"), (dict(seeds=0), "seeds"), (dict(p=1), "p")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}:"):
            apply_overrides(load_experiment("mediation"), **kw)
    with pytest.raises(ConfigError, match=r"^fork\.step:"):
        apply_overrides(load_experiment("samestate"), max_steps=500)
    with pytest.raises(ConfigError, match=r"^spec\.op: op 'div' needs a prime p"):
        apply_overrides(ExperimentSpec.from_dict({"name": "x", "op": ["div"], "p": [11]}), p=12)


# ------------------------------------------------------------------------------------------ TOML
USER_SPECS = [
    'name = "u1"\ndescription = "quote \\" backslash \\\\ newline \\n tab \\t é"\nseeds = 3\np = [13, 17]\n'
    'op = ["sub"]\ntrain_frac = [0.5]\nlr = [0.001, 0.003]\nwd = [0.5]\n'
    '[train]\nd_embed = 8\nhidden = 16\nclamp_from = 10\ncompile = "off"\nstop_when_grokked = false\n'
    '[budget]\nsteps = 100\nsteps_ref = 300\nrho_ref = 1.2\nmax_steps = 250\n'
    '[calibration]\nsteps = 50\nseeds = 2\n[engine]\nmax_models = 4\nmemory_gb = 0.5\ncompact_frac = 0.0\n'
    '[[grid]]\nrho = [1.0, "free"]\ntau = [1.0]\n[[grid]]\nnorm_target = [12.5]\ntau = [0.5, 2.0]\nseeds = 1\n',
    'name = "u2"\np = [11]\nrho = ["free"]\ntau = [1.0, 1.5]\n[fork]\nstep = 50\narms = ["free", "raised"]\n'
    'factor = 1.3\n[calibration]\nw_c = 17.25\n',
    'name = "u3"\np = [11]\nrho = [1.0]\nlayer_fracs = [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]]\n'
    '[train]\nclamp_mode = "layer"\n',
]


@pytest.mark.parametrize("source", list(BUILT_IN) + [f"user{i}" for i in range(len(USER_SPECS))])
def test_to_toml_round_trip(source, tmp_path):
    if source.startswith("user"):
        path = tmp_path / "spec.toml"
        path.write_text(USER_SPECS[int(source[4:])])
        spec = load_spec(path)
    else:
        spec = load_experiment(source)
    text = to_toml(spec.to_dict())
    again = ExperimentSpec.from_dict(tomllib.loads(text))
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert to_toml(again.to_dict()) == text
    assert expand(again) == expand(spec)


def test_user_spec_values():
    spec = ExperimentSpec.from_dict(tomllib.loads(USER_SPECS[0]))
    assert spec.description == 'quote " backslash \\ newline \n tab \t é'
    cells = expand(spec)
    # block 0: p x lr x rho(1.0, free) with tau 1, 3 seeds; block 1: p x lr x tau(0.5, 2) at 12.5, 1 seed
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 2
    assert {(c["rho"], c["norm_target"], c["seeds"]) for c in cells} == {(1.0, None, 3), (None, None, 3),
                                                                           (None, 12.5, 1)}
    assert {c["budget"] for c in cells} == {100}
    assert {c["op"] for c in cells} == {"sub"}


# ------------------------------------------------------------------------------------------ bad specs
BASE = 'name = "bad"\np = [11]\n'
BAD = [
    # (spec text, the field the error must name)
    (BASE + "colour = 1\n", "colour"),
    (BASE + "[train]\nhiden = 64\n", "train.hiden"),
    (BASE + "[train]\nsteps = 100\n", "train.steps"),
    (BASE + '[train]\nhidden = "wide"\n', "train.hidden"),
    (BASE + "[train]\nhidden = 0\n", "train.hidden"),
    (BASE + "[[grid]]\ntau = [1.0]\n[[grid]]\ntua = [1.0]\n", "grid[1].tua"),
    (BASE + "[budget]\nstep = 100\n", "budget.step"),
    (BASE + "[budget]\nsteps = 0\n", "budget.steps"),
    (BASE + "[calibration]\nw_c = 0.0\n", "calibration.w_c"),
    (BASE + "[calibration]\nwc = 50.0\n", "calibration.wc"),
    (BASE + "[fork]\nstepp = 100\n", "fork.stepp"),
    (BASE + '[fork]\narms = ["same", "higher"]\n', "fork.arms"),
    (BASE + "[engine]\nmax_model = 4\n", "engine.max_model"),
    (BASE + "[engine]\ncompact_frac = 1.5\n", "engine.compact_frac"),
    (BASE + "grid = []\n", "grid"),
    (BASE + "tau = []\n", "spec.tau"),
    (BASE + "[[grid]]\nrho = []\n", "grid[0].rho"),
    (BASE + "seeds = 0\n", "seeds"),
    (BASE + "[[grid]]\nseeds = 0\n", "grid[0].seeds"),
    (BASE + "tau = [0.0]\n", "spec.tau"),
    (BASE + "[[grid]]\ntau = [1.0]\n[[grid]]\ntau = [1.0, -1.3]\n", "grid[1].tau"),
    (BASE + "rho = [1.0, 0]\n", "spec.rho"),
    (BASE + "[budget]\nsteps = 500\nsteps_ref = 600\n[fork]\nstep = 800\n", "fork.step"),
    (BASE + "rho = [1.0]\n[budget]\nsteps = 800\nsteps_ref = 900\n[fork]\nstep = 800\n", "fork.step"),
    (BASE + "[budget]\nsteps = 500\nsteps_ref = 600\n[fork]\nstep = 105\n", "fork.step"),   # not a multiple of 25
    (BASE + "[train]\nrho = [1.0]\n", "train.rho"),                           # an axis given in [train]
    (BASE + "rho = [1.0]\nnorm_target = [50.0]\n", "spec.norm_target"),
    (BASE + "rho = [1.0]\n[[grid]]\ntau = [1.0]\n[[grid]]\nrho = [1.1]\nnorm_target = [50.0]\n",
     "grid[1].norm_target"),
    (BASE + "layer_fracs = [[0.5, 0.5]]\n", "spec.layer_fracs"),
    (BASE + '[train]\nclamp_mode = "layer"\nlayer_fracs_x = 1\n', "train.layer_fracs_x"),
    (BASE + '[train]\nclamp_mode = "layer"\n[[grid]]\nlayer_fracs = [[0.5, 0.5]]\n', "grid[0].layer_fracs"),
    (BASE + '[[grid]]\np = [1]\n', "grid[0].p"),
    (BASE + 'op = ["div"]\n[[grid]]\np = [12]\n', "spec.op"),
    ('p = [11]\n', "name"),
    ('name = ".."\np = [11]\n', "name"),                                     # would write runs/.. = runs' parent
    (BASE + "[train]\ngrok_threshold = 5.0\n", "train.grok_threshold"),      # nothing could ever grok
    (BASE + "[train]\nmem_threshold = nan\n", "train.mem_threshold"),
    (BASE + "tau = [1.0, 1.0]\n", "spec.tau"),                                 # as `train --tau 1 1` is refused
    (BASE + "[[grid]]\nnorm_target = [20.0, 30.0, 20.0]\n", "grid[0].norm_target"),
]


@pytest.mark.parametrize("text,field", BAD, ids=[f for _, f in BAD])
def test_bad_spec_names_the_field(text, field):
    with pytest.raises(ConfigError) as e:
        ExperimentSpec.from_dict(tomllib.loads(text))
    assert str(e.value).startswith(f"{field}: "), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_spec_fails_before_any_training(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(grid, "Trainer", no_training)
    monkeypatch.setattr(grid, "run_job", no_training)
    for i, (text, field) in enumerate(BAD):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
            run_experiment(path, out=tmp_path / f"out{i}", progress=False)
        assert not (tmp_path / f"out{i}").exists()
    with pytest.raises(ConfigError, match=r"^fork\.step: "):
        run_experiment("samestate", overrides={"max_steps": 800}, out=tmp_path / "fork", progress=False)
    assert not (tmp_path / "fork").exists()


def test_rerun_with_another_spec_is_refused(tmp_path):
    spec = apply_overrides(load_experiment("mediation"), p=11, seeds=1, max_steps=10)
    rundir.init_run_dir(spec, tmp_path, "cpu")
    plan = (tmp_path / "plan.json").read_text()
    assert rundir.init_run_dir(spec, tmp_path, "cpu") == store.read_json(tmp_path / "plan.json")
    other = dataclasses.replace(spec, seeds=2)
    with pytest.raises(ConfigError, match=r"^out: .*differs in seeds"):
        rundir.init_run_dir(other, tmp_path, "cpu")
    assert (tmp_path / "plan.json").read_text() == plan


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastgrok.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_cli_bad_spec_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + "[train]\nhiden = 64\n[[grid]]\ntau = [1.0]\n")
    r = _cli("run", str(bad), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastgrok: error: train.hiden: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]        # no run directory, no runs/

    r = _cli("run", "samestate", "--max-steps", "500", "--quiet", cwd=tmp_path)   # default out: runs/samestate
    assert r.returncode == 2 and r.stderr.startswith("fastgrok: error: fork.step: ") and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]



def test_budget_steps_alone_keeps_the_study_ratio():
    """`[budget] steps` without steps_ref scales the rho = 1.15 budget by the study's 137k / 20k."""
    from fastgrok.grid.experiments import Budget
    assert Budget().at(1.15) == 137000 and Budget().at(1.0) == 20000
    b = Budget(steps=1500)
    assert b.at(1.0) == 1500 and b.at(1.15) == round(1500 * 137000 / 20000)
    assert Budget(steps=1500, steps_ref=3000).at(1.15) == 3000


def test_spec_eval_every_adapts_logit_every_as_train_does():
    """[train] eval_every = 7: logit_every becomes 203 (200 rounded up to a multiple of 7), as with
    `fastgrok train --eval-every 7`; a given logit_every is kept; a divisor of 200 changes nothing."""
    from fastgrok.cli import _config_from_args, build_parser
    spec = ExperimentSpec.from_dict({"name": "x", "p": [11], "train": {"eval_every": 7}})
    assert spec.base_config(p=11).logit_every == 203
    assert _config_from_args(build_parser().parse_args(["train", "--eval-every", "7"])).logit_every == 203
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec                  # spec.json reads back the same
    assert ExperimentSpec.from_dict({"name": "x", "train": {"eval_every": 10}}).train == {"eval_every": 10}
    with pytest.raises(ConfigError, match="train.logit_every"):
        ExperimentSpec.from_dict({"name": "x", "train": {"eval_every": 7, "logit_every": 200}})


def test_cpu_time_charges_each_model_its_batchs_padded_rows_and_each_compiled_batch():
    """`fastgrok experiments`' CPU time: two train fractions packed in one batch both cost the larger's
    rows (padding), a compiled batch adds its compilation, and calibration controls are counted; the
    per-step time is the measured fit (sizes.py; benchmarks/model_step_times.py measured 3.90 ms at the
    study's p = 59 MLP, 0.66 ms at p = 31, compiled; uncompiled 1.9x)."""
    from fastgrok.grid import sizes
    from fastgrok.config import TrainConfig
    assert sizes.model_step_seconds(TrainConfig()) == pytest.approx(3.90e-3, rel=0.05)
    assert sizes.model_step_seconds(TrainConfig(p=31, train_frac=0.6, d_embed=64, hidden=128)) == \
        pytest.approx(0.66e-3, rel=0.05)
    base = {"name": "t", "seeds": 3, "p": [31], "train_frac": [0.3, 0.9],
            "train": {"d_embed": 64, "hidden": 128}, "budget": {"steps": 4000}}
    for compile_mode, n_compiles in (("off", 0), ("on", 1)):
        spec = ExperimentSpec.from_dict({**base, "train": {**base["train"], "compile": compile_mode}})
        assert len(make_plan(spec, "cpu")["batches"]) == 1
        wide = TrainConfig(p=31, train_frac=0.9, d_embed=64, hidden=128)
        z = sizes.experiment_size(spec)
        assert z["models"] == 6 and z["model_steps"] == 6 * 4000
        assert z["cpu_s"] == pytest.approx(6 * 4000 * sizes.model_step_seconds(wide, compiled=bool(n_compiles))
                                           + n_compiles * sizes.COMPILE_S)
    assert sizes.model_step_seconds(wide, compiled=False) == pytest.approx(sizes.EAGER * sizes.model_step_seconds(wide))
    assert sizes.model_step_seconds(dataclasses.replace(wide, dtype="float64")) == \
        pytest.approx(sizes.FLOAT64 * sizes.model_step_seconds(wide)) and sizes.FLOAT64 > 2
    clamped = ExperimentSpec.from_dict({**base, "train_frac": [0.6], "rho": [1.0],
                                        "train": {**base["train"], "compile": "off"}})
    z = sizes.experiment_size(clamped)
    assert z["models"] == 3 + 3 and z["model_steps"] > 3 * 4000                 # + the free controls for w_c


def test_the_atlas_spans_the_fields_axes_with_100000_models():
    """Issue 29, item 5: the built-in atlas has >= 100,000 models over ops, several p, lr x wd x train_frac,
    tau, the optimizer and loss arms and seeds; free cells (no calibration); `fastgrok experiments` sizes it
    in CPU and (estimated) GPU time."""
    spec, cells = _cells("atlas")
    assert sum(c["seeds"] for c in cells) >= 100_000 and spec.seeds >= 3
    values = {a: {c[a] for c in cells} for a in ("p", "op", "lr", "wd", "train_frac", "tau", "loss", "orthograd",
                                                 "grokfast_lambda")}
    assert len(values["p"]) >= 3 and len(values["op"]) >= 4 and len(values["tau"]) >= 2
    assert min(len(values[a]) for a in ("lr", "wd", "train_frac")) >= 4
    assert values["loss"] == {"ce", "stablemax", "mse"} and values["orthograd"] == {False, True}
    assert values["grokfast_lambda"] == {0.0, 2.0} and {c["rho"] for c in cells} == {None}
    from fastgrok.grid import sizes
    z = sizes.experiment_size(spec)
    assert z["models"] == sum(c["seeds"] for c in cells) and z["cpu_s"] > z["gpu_s"] > 0


def test_pack_sizes_a_cell_once_per_shape_of_its_tensors(monkeypatch):
    """pack sizes one cell of those differing only in SIZE_FREE_AXES: their bytes are equal, and the batches
    are those of sizing every cell."""
    from fastgrok.grid import plan as P
    spec, cells = _cells("atlas")
    for c in cells[::997]:
        for a, v in (("lr", 0.3), ("wd", 0.0), ("init_scale", 2.0)):
            assert P.bytes_per_model(spec, {**c, a: v}) == P.bytes_per_model(spec, c), a
    some = cells[::7]
    budget = 300 * max(P.bytes_per_model(spec, c) for c in some)
    shared = P.pack(spec, some, budget)
    monkeypatch.setattr(P, "SIZE_FREE_AXES", ())                 # every cell sized on its own
    assert P.pack(spec, some, budget) == shared and len(shared) > 3
