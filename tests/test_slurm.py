"""The SLURM executor (fastgrok/grid/slurm.py) against a real single-node SLURM (the session's
`slurm_cluster`: munged, slurmctld and slurmd, 2 CPUs), no mocks; tiny grids (p = 13, widths 16/32, eager):

- a grid with a calibration stage, submitted with --no-wait and then collected, 2 batches per array task,
  gives exactly the local executor's results;
- a task cancelled mid-batch (scancel): the driver names it and exits 1; the same command resubmits it,
  which resumes from its checkpoint: exactly the local results;
- the driver killed (kill -9) while its jobs run: the same command waits for the live jobs (it does not
  submit them again) and collects them: exactly the local results;
- SLURM's time-limit/preemption signal (USR2) to a running task: it checkpoints, submitit requeues it, it
  resumes: exactly the local results, the driver never noticing;
- one-line errors: no submitit, no SLURM on PATH, a bad partition, a SLURM flag with another executor.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from fastgrok import store
import pytest

from cli_runner import ENV, FASTGROK, checkpointed
from fastgrok.config import ConfigError
from fastgrok.grid import rundir
from fastgrok.grid.executors import run_experiment
from fastgrok.grid.experiments import ExperimentSpec, to_toml
from fastgrok.grid.slurm import Submitted

TRAIN = {"d_embed": 16, "hidden": 32, "eval_every": 10, "logit_every": 50, "clamp_from": 100, "compile": "off"}
SHAPE = {"p": [13], "train_frac": [0.8], "lr": [0.02], "wd": [2.0]}
# calibration, then 3 clamped cells x 2 seeds in 3 batches (max_models 2)
MED = {"name": "slurm_med", "seeds": 2, **SHAPE, "train": TRAIN, "budget": {"steps": 300, "steps_ref": 400},
       "calibration": {"steps": 200}, "engine": {"compact_frac": 0.0, "max_models": 2},
       "grid": [{"rho": [1.0], "tau": [1.0]}, {"rho": [1.15], "tau": [1.0, 1.5]}]}
# 3 free batches long enough to be caught mid-batch (checkpoints every 100 steps)
LONG = {"name": "slurm_long", "seeds": 2, **SHAPE, "rho": ["free"], "tau": [1.0, 1.5, 2.0],
        "train": {**TRAIN, "stop_when_grokked": False, "checkpoint_every": 100},
        "budget": {"steps": 2000}, "engine": {"compact_frac": 0.0, "max_models": 2}}


def tables(run_dir):
    """The run's models and curves (its parts, read as one dataset), in model order."""
    res = store.Results(run_dir)
    return (res.models().sort_values("model").reset_index(drop=True),
            res.curves().sort_values(["model", "step", "metric"]).reset_index(drop=True))


def assert_same_results(a, b):
    for x, y in zip(tables(a), tables(b)):
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    models, curves = tables(b)
    assert models["model"].is_unique and not curves.duplicated(["model", "step", "metric"]).any()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)                # as the tasks (--cpus-per-job 1): the same numerics
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def long_local(tmp_path_factory):
    return run_experiment(ExperimentSpec.from_dict(LONG), out=tmp_path_factory.mktemp("long") / "local",
                          progress=False)


def _env():
    return {**ENV, "SLURM_CONF": os.environ["SLURM_CONF"]}


def _driver(spec_path, run, *extra):
    return subprocess.Popen([*FASTGROK, "run", str(spec_path), "--out", str(run), "--executor", "slurm",
                             "--cpus-per-job", "1", "--quiet", *extra], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _spec_file(tmp_path, d):
    path = tmp_path / f"{d['name']}.toml"
    path.write_text(to_toml(d))
    return path


def _job_of(run, batch: str, proc) -> str:
    """The SLURM job (array task) of `batch` once it has checkpointed past step 0 (mid-batch)."""
    for _ in range(1200):
        assert proc.poll() is None, f"the driver ended early: {proc.communicate()[1]}"
        rec = run / "slurm" / "jobs.json"
        if rec.exists() and checkpointed(run / "batches" / batch):
            return json.loads(rec.read_text())["jobs"][f"batch-{batch}"]["job"]
        time.sleep(0.1)
    raise AssertionError(f"{batch} never checkpointed")


def _log(run, job: str) -> str:
    """The task's logs (submitit's: stdout, then stderr)."""
    return "".join((run / "slurm" / f"{job}_0_log.{k}").read_text() for k in ("out", "err"))


def _rerun(spec_path, run):
    return subprocess.run([*FASTGROK, "run", str(spec_path), "--out", str(run), "--executor", "slurm",
                           "--cpus-per-job", "1", "--quiet"], env=_env(), capture_output=True, text=True,
                          timeout=600)


# ------------------------------------------------------------------------------------------ results
def test_slurm_grid_matches_local(slurm_cluster, tmp_path, capsys):
    spec = ExperimentSpec.from_dict(MED)
    local = run_experiment(spec, out=tmp_path / "local", progress=False)
    run = tmp_path / "slurm"
    opts = {"cpus_per_job": 1, "batches_per_job": 2, "poll_s": 0.5}
    with pytest.raises(Submitted, match="rerun the same command to collect"):   # --no-wait: the calibration
        run_experiment(spec, out=run, executor="slurm", progress=True, slurm={**opts, "wait": False})
    (cal,) = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]
    assert cal.startswith("calibration-") and not (run / "calibration.json").exists()
    run_experiment(spec, out=run, executor="slurm", progress=True, slurm=opts)    # collects, then the batches
    err = capsys.readouterr().err
    assert "fastgrok: slurm: submitted 3 batch job(s) as 2 array task(s)" in err   # 2 batches per task
    assert "running" in err                                                       # progress while it waits
    assert_same_results(local, run)
    assert rundir.done_batches(run) == {"b000", "b001", "b002"}
    assert sorted(p.relative_to(run / "parts").as_posix() for p in (run / "parts").rglob("*.parquet")) == \
        sorted(f"{k}/b00{i}.parquet" for i in range(3) for k in ("models", "curves"))
    assert not list(run.glob("batches/*/slurm-result-*"))            # every result moved into its part
    assert not list((run / "slurm" / "results").iterdir())
    record = (run / "slurm" / "jobs.json").read_bytes()
    run_experiment(spec, out=run, executor="slurm", progress=False, slurm=opts)   # all done: nothing submitted
    assert (run / "slurm" / "jobs.json").read_bytes() == record


def test_results_left_by_a_task_of_before_are_collected(slurm_cluster, tmp_path):
    """A result a task left where tasks of before 2026-12-08 left it (beside the job's checkpoint) is
    collected by the next driver, like one in DIR/slurm/results/: exactly the local results, and no
    result file stays behind."""
    spec = ExperimentSpec.from_dict(MED)
    local = run_experiment(spec, out=tmp_path / "local", progress=False)
    run, opts = tmp_path / "slurm", {"cpus_per_job": 1, "poll_s": 0.5}
    with pytest.raises(Submitted):                                  # the calibration, not waited for
        run_experiment(spec, out=run, executor="slurm", progress=False, slurm={**opts, "wait": False})
    (key,) = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]
    for _ in range(1200):                                           # the task leaves its result
        staged = list((run / "slurm" / "results").glob(f"{key}-*.models.parquet"))
        if staged:
            break
        time.sleep(0.1)
    digest = staged[0].name[len(key) + 1:].split(".")[0]
    job_dir = run / "calibration" / key.split("-", 1)[1]
    job_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("curves", "models"):                               # models last, as a task writes them
        (run / "slurm" / "results" / f"{key}-{digest}.{kind}.parquet").rename(
            job_dir / f"slurm-result-{digest}.{kind}.parquet")
    run_experiment(spec, out=run, executor="slurm", progress=False, slurm=opts)
    assert_same_results(local, run)
    assert not list(run.rglob("slurm-result-*")) and not list((run / "slurm" / "results").iterdir())


def test_a_poll_lists_one_directory_and_looks_up_no_file_per_job(tmp_path, monkeypatch):
    """The driver's poll: one listing of DIR/slurm/results/ (`_listed`), then `_staged` with it per waiting
    job looks up none of the job's files; of 1,000 jobs, the one whose result is there is found."""
    from fastgrok.grid import slurm as S
    jobs = [{"kind": "batch", "id": f"b{i:03d}", "dir": str(tmp_path / "batches" / f"b{i:03d}")} for i in range(1000)]
    m, c = S._result_paths(jobs[7], tmp_path)
    store.write_parquet(c, pd.DataFrame({"model": [0], "step": [0], "metric": ["x"], "value": [1.0]}))
    store.write_parquet(m, pd.DataFrame({"model": [0], "cell": [0], "seed": [0]}))
    listings, lookups = [], []
    real_scandir, real_exists = os.scandir, S.Path.exists
    monkeypatch.setattr(S.os, "scandir", lambda p: listings.append(p) or real_scandir(p))
    monkeypatch.setattr(S.Path, "exists", lambda self: lookups.append(self.name) or real_exists(self))
    listed = S._listed(tmp_path)
    got = [S._staged(job, tmp_path, listed) for job in jobs]
    assert len(listings) == 1 and not [n for n in lookups if "batch-" in n or "slurm-result" in n]
    assert [i for i, g in enumerate(got) if g is not None] == [7]
    assert got[7][0]["cell"].tolist() == [0] and got[7][1]["value"].tolist() == [1.0]


def test_the_driver_drops_left_results_of_written_parts_only(tmp_path):
    """A driver killed between writing a batch's part and dropping its result leaves the result in
    DIR/slurm/results/; the next driver drops it (`_sweep`), and keeps the results of batches not written
    yet and files being written."""
    from fastgrok.grid import slurm as S
    mapper = object.__new__(S.SlurmMapper)
    mapper.run_dir = tmp_path
    res = tmp_path / "slurm" / "results"
    res.mkdir(parents=True)
    (tmp_path / "parts" / "models").mkdir(parents=True)
    (tmp_path / "parts" / "models" / "b000.parquet").write_bytes(b"")          # b000 is done
    waiting = {"batch-b002": {"kind": "batch", "id": "b002", "dir": str(tmp_path / "batches" / "b002")}}
    own = [p.name for p in S._result_paths(waiting["batch-b002"], tmp_path)]
    left = [f"batch-b000-0123456789abcdef.{k}.parquet" for k in ("models", "curves")]
    kept = ["batch-b001-0123456789abcdef.models.parquet", ".batch-b001-0123456789abcdef.curves.parquet.x.tmp", *own]
    for name in left + kept:
        (res / name).write_bytes(b"")
    mapper._sweep(waiting)
    assert sorted(p.name for p in res.iterdir()) == sorted(kept)


# ------------------------------------------------------------------------------------------ interruptions
def test_scancel_mid_batch_then_rerun(slurm_cluster, long_local, tmp_path):
    spec_path, run = _spec_file(tmp_path, LONG), tmp_path / "run"
    proc = _driver(spec_path, run)
    job = _job_of(run, "b000", proc)
    subprocess.run(["scancel", job], env=_env(), check=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]                                          # the error: one line
    assert last.startswith(f"fastgrok: error: 1 job(s) ended in SLURM without results: batch-b000 ({job}, "
                           "CANCELLED)") and "the same command resubmits them" in last, err
    assert "batch-b000: stopped by signal 15 at step" in _log(run, job)         # checkpointed mid-batch
    assert "b001" in rundir.done_batches(run)                                    # the others finished
    r = _rerun(spec_path, run)
    assert r.returncode == 0, r.stderr
    assert_same_results(long_local, run)


def test_killed_driver_then_rerun_collects(slurm_cluster, long_local, tmp_path):
    spec_path, run = _spec_file(tmp_path, LONG), tmp_path / "run"
    proc = _driver(spec_path, run)
    _job_of(run, "b000", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    submitted = json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]
    r = _rerun(spec_path, run)                  # while the jobs still run: it waits for them
    assert r.returncode == 0, r.stderr
    assert "already queued or running in SLURM" in r.stderr
    assert json.loads((run / "slurm" / "jobs.json").read_text())["jobs"] == submitted   # nothing resubmitted
    assert_same_results(long_local, run)


def test_time_limit_signal_checkpoints_and_requeues(slurm_cluster, long_local, tmp_path):
    spec_path, run = _spec_file(tmp_path, LONG), tmp_path / "run"
    proc = _driver(spec_path, run)
    job = _job_of(run, "b000", proc)
    # what SLURM sends before a time limit or a preemption (submitit's --signal=USR2@90)
    subprocess.run(["scancel", "--signal=USR2", job], env=_env(), check=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    log = _log(run, job)
    assert "batch-b000: stopped by signal 12 at step" in log and "Calling checkpoint method" in log
    assert f"Requeued job {job}" in log and "Job completed successfully" in log  # submitit requeued it
    assert_same_results(long_local, run)


# ------------------------------------------------------------------------------------------ errors
def test_one_line_errors(tmp_path, monkeypatch):
    spec_path = _spec_file(tmp_path, MED)
    base = [*FASTGROK, "run", str(spec_path), "--out", str(tmp_path / "run")]
    r = subprocess.run([*base, "--partition", "gpu"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == \
        "fastgrok: error: --partition is an option of the SLURM executor (--executor slurm)"
    pytest.importorskip("submitit")
    bare = {**ENV, "PATH": os.path.dirname(sys.executable)}                       # no SLURM commands
    r = subprocess.run([*base, "--executor", "slurm"], env=bare, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sinfo is not on PATH" in r.stderr
    assert not (tmp_path / "run").exists()                                        # refused before any write
    monkeypatch.setitem(sys.modules, "submitit", None)                           # as if not installed
    with pytest.raises(ConfigError, match=r"needs submitit: pip install 'fastgrok\[slurm\]'"):
        run_experiment(ExperimentSpec.from_dict(MED), out=tmp_path / "run", executor="slurm")


def test_bad_partition_is_one_line(slurm_cluster, tmp_path):
    with pytest.raises(ConfigError, match=r"--partition: 'nope' is not a partition of this cluster \(debug\)"):
        run_experiment(ExperimentSpec.from_dict(MED), out=tmp_path / "run", executor="slurm",
                       slurm={"partition": "nope"})
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="engine.time_limit: must be an integer >= 1"):
        ExperimentSpec.from_dict({**MED, "engine": {"time_limit": 0}})
