"""Run directories and interruptions across `fastgrok train` and `fastgrok run`, as a user meets them.

- neither command overwrites, resumes or misreads the other's run directory, and each says which
  command a directory belongs to; a file given as --out, a directory given as a spec, a spec that is not
  UTF-8, a run too big for the machine: one line on stderr, exit code 2, nothing written;
- Ctrl-C (SIGINT) during `fastgrok run`, in this process or in worker processes: one line, exit code 130,
  the running batches checkpointed where they stopped, and the same command again finishes with exactly
  the results of an uninterrupted run;
- result files are readable as the umask says (not only by their owner);
- `fastgrok status` on a train run (shown), on a missing directory; the clamp warning; plain progress lines
  when the output is not a terminal;
- one writer per run directory (a second is refused naming the first's PID; kill -9 leaves no stale lock);
- worker lifecycle: a driver killed while its workers start leaves no process; a worker killed mid-batch
  stops the run in one line naming its batch, and the same command resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fastgrok import store
from fastgrok.grid.experiments import apply_overrides, load_experiment, to_toml

_SCRIPT = Path(sys.executable).with_name("fastgrok")
FASTGROK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fastgrok.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

SPEC = {"name": "dirs_tiny", "seeds": 2, "p": [17], "train_frac": [0.8], "lr": [0.02], "wd": [2.0],
        "train": {"d_embed": 16, "hidden": 32, "eval_every": 10, "logit_every": 50, "clamp_from": 100,
                  "compile": "off", "stop_when_grokked": False, "checkpoint_every": 1000},
        "budget": {"steps": 1500}, "engine": {"max_models": 2, "compact_frac": 0.0},
        "grid": [{"norm_target": [20.0], "tau": [1.0, 1.5]}]}
"""Two batches of one cell (2 models) each, 1,500 steps: long enough to be interrupted mid-batch."""


def same_results(a, b) -> None:
    """Run directories a and b hold exactly the same results, read as datasets (store.Results: a grid's
    parts, a train run's tables)."""
    ra, rb = store.Results(a), store.Results(b)
    pd.testing.assert_frame_equal(ra.models(), rb.models(), check_exact=True)
    pd.testing.assert_frame_equal(ra.curves(), rb.curves(), check_exact=True)


def fastgrok(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FASTGROK, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, **kw)


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgrok: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def snapshot(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "dirs.toml"
    path.write_text(to_toml(SPEC))
    return path


@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    r = fastgrok("train", "--p", "17", "--seeds", "1", "--d-embed", "8", "--hidden", "16", "--steps", "30",
                 "--no-compile", "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def reference(spec_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    r = fastgrok("run", spec_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- whose directory

def test_run_refuses_a_train_run_directory(spec_path, train_run):
    before = snapshot(train_run)
    one_line_error(fastgrok("run", spec_path, "--out", train_run, "--quiet"), "holds a `fastgrok train` run")
    assert snapshot(train_run) == before


def test_train_refuses_a_grid_run_directory(reference):
    before = snapshot(reference)
    one_line_error(fastgrok("train", "--p", "17", "--out", reference), "holds a grid run")
    line = one_line_error(fastgrok("train", "--resume", reference), "holds a grid run")
    assert "fastgrok run" in line
    assert snapshot(reference) == before


def test_status_shows_a_train_run_and_names_a_missing_directory(train_run, tmp_path):
    r = fastgrok("status", train_run)                    # a train run: shown (it was an error before)
    assert r.returncode == 0 and "fastgrok train run, p=17" in r.stdout and "step 30 of 30: done" in r.stdout, r
    one_line_error(fastgrok("status", tmp_path / "nowhere"), "does not exist")


def test_user_mistakes_about_paths_are_one_line(spec_path, reference, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    one_line_error(fastgrok("run", spec_path, "--out", a_file), "is a file")
    one_line_error(fastgrok("train", "--p", "17", "--out", a_file), "is a file")
    one_line_error(fastgrok("run", reference), "is a directory")
    one_line_error(fastgrok("analyze", a_file), "is a file")
    one_line_error(fastgrok("analyze", tmp_path / "nowhere"), "does not exist")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    one_line_error(fastgrok("run", latin1), "not a UTF-8")
    assert a_file.read_text() == "not a directory"


def test_a_run_too_big_for_the_machine_is_refused_before_any_work(tmp_path):
    out = tmp_path / "big"
    one_line_error(fastgrok("train", "--p", "200000", "--out", out), "GiB")
    assert not out.exists()
    spec = tmp_path / "big.toml"                   # a grid too: refused before its directory is made,
    spec.write_text(to_toml({**SPEC, "p": [4000]}))   # so the fixed spec can use the same --out
    one_line_error(fastgrok("run", spec, "--out", out), "GiB")
    assert not out.exists()


def test_path_mistakes_under_a_file_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    one_line_error(fastgrok("train", "--p", "17", "--steps", "10", "--out", tmp_path / "a_file" / "sub"),
                   "is a file")


def test_free_rho_survives_overrides():
    """`--p`/`--seeds` on a spec with rho = "free" (the built-in samestate) re-checks the axes."""
    spec = apply_overrides(load_experiment("samestate"), p=23, seeds=2)
    assert spec.axes.p == (23,) and spec.seeds == 2 and None in (spec.axes.rho or (None,))


# ----------------------------------------------------------------------------- Ctrl-C and resume

def _ctrl_c_when(cmd, ready, pause: float = 0.0, sig=signal.SIGINT, group: bool = True):
    """Start cmd in its own process group, wait until ready(), then (after `pause` s) send SIGINT to the
    whole group as a terminal's Ctrl-C does (or `sig` to the process alone, group=False, as `kill PID`
    does). Returns (process, stderr, seconds it took to exit); asserts it exited with 130 and one closing
    line, no traceback."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it was interrupted: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run did not get there within 120 s"
            time.sleep(0.005)
        time.sleep(pause)
        (os.killpg if group else os.kill)(proc.pid, sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command" in err.strip().splitlines()[-1], err
    return proc, err, took


@pytest.mark.parametrize("workers", [None, 2], ids=["in-process", "2-workers"])
def test_ctrl_c_during_run_then_the_same_command_resumes(spec_path, reference, tmp_path, workers):
    out = tmp_path / "run"
    cmd = [*FASTGROK, "run", str(spec_path), "--out", str(out), "--quiet"] + (["--workers", str(workers)] if workers else [])
    # interrupt once some batch has checkpointed (its curves exist, at step 1,000 of 1,500), at once: the 500
    # steps left take well under a second on an idle machine, and a pause could let the batch finish
    proc, err, _ = _ctrl_c_when(cmd, lambda: any((out / "batches").glob("b*/curves.parquet")))
    steps = [json.loads(p.read_text())["step"] for p in (out / "batches").glob("b*/progress.json")]
    assert steps and any(0 < s < 1500 for s in steps)           # stopped mid-batch, with a checkpoint

    r = fastgrok("run", spec_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    same_results(out, reference)


CALIBRATED = {"name": "cal_tiny", "seeds": 3, "p": [17], "train_frac": [0.8], "lr": [0.02], "wd": [2.0],
              "train": {"d_embed": 16, "hidden": 32, "eval_every": 10, "logit_every": 50, "clamp_from": 100,
                        "compile": "off", "checkpoint_every": 50},
              "budget": {"steps": 300, "steps_ref": 600}, "calibration": {"steps": 400},
              "engine": {"max_models": 3, "compact_frac": 0.5},
              "grid": [{"rho": [1.0, 1.05], "tau": [1.0]}, {"rho": [1.15], "tau": [1.0, 1.5]},
                       {"rho": ["free"], "tau": [1.0]}]}
"""A free calibration (one job: one worker starts), then 5 batches of one cell each (the second worker
starts with them, while the first trains)."""


def test_ctrl_c_while_a_worker_starts_up_stops_promptly_then_resumes(tmp_path):
    """Ctrl-C to the process group at the first batch checkpoint, while the second worker is still
    starting (spawned with the batches, importing torch): the driver exits (130, one line) well before
    its 60 s kill fallback, no process is left behind, and the same command then finishes with the
    results of an uninterrupted run."""
    spec = tmp_path / "cal_tiny.toml"
    spec.write_text(to_toml(CALIBRATED))
    ref = fastgrok("run", spec, "--out", tmp_path / "ref", "--quiet")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    cmd = [*FASTGROK, "run", str(spec), "--out", str(out), "--quiet", "--workers", "2"]
    proc, err, took = _ctrl_c_when(cmd, lambda: any((out / "batches").glob("*/checkpoint.pt")))
    assert took < 40, f"the driver took {took:.0f} s to stop: it waited for a stuck worker"
    _assert_group_empties(proc)
    r = fastgrok("run", spec, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    same_results(out, tmp_path / "ref")


def _assert_group_empties(proc, wait_s: float = 10):
    for _ in range(int(wait_s * 10)):                # the group empties (workers, resource tracker)
        left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(proc.pid)], capture_output=True,
                              text=True).stdout.strip()
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left in the group:\n{left}"


def test_workers_of_a_killed_driver_checkpoint_and_exit(spec_path, reference, tmp_path):
    """kill -9 of `run --workers 2` while its workers train: the kernel's parent-death signal has each
    worker checkpoint and exit (before: they trained on for nobody, then waited on a dead queue); the
    same command then finishes with the reference results."""
    out = tmp_path / "run"
    cmd = [*FASTGROK, "run", str(spec_path), "--out", str(out), "--quiet", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not any((out / "batches").glob("b*/curves.parquet")):
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no batch got to its first evaluation within 120 s"
            time.sleep(0.01)
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        _assert_group_empties(proc, wait_s=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    r = fastgrok("run", spec_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    same_results(out, reference)


def test_sigterm_to_the_driver_stops_the_workers_then_resumes(spec_path, reference, tmp_path):
    """`kill PID` of `run --workers 2` (a scheduler's stop): the driver stops its workers as on Ctrl-C
    (130, one line), none is left orphaned, and the same command finishes with the reference results."""
    out = tmp_path / "run"
    cmd = [*FASTGROK, "run", str(spec_path), "--out", str(out), "--quiet", "--workers", "2"]
    proc, err, _ = _ctrl_c_when(cmd, lambda: any((out / "batches").glob("b*/curves.parquet")), pause=0.5,
                                sig=signal.SIGTERM, group=False)
    assert "stopped by signal 15" in err, err
    _assert_group_empties(proc)
    r = fastgrok("run", spec_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    same_results(out, reference)


# ----------------------------------------------------------------------------- files and messages

def test_result_files_follow_the_umask(train_run):
    mask = os.umask(0)
    os.umask(mask)
    for name in (store.CONFIG, store.CHECKPOINT, store.MODELS, store.CURVES, store.PROGRESS):
        mode = stat.S_IMODE((train_run / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


def test_clamp_that_never_starts_warns(tmp_path):
    r = fastgrok("train", "--p", "17", "--seeds", "1", "--d-embed", "8", "--hidden", "16", "--steps", "40",
                 "--norm-target", "10", "--no-compile", "--quiet", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "warning: the clamp starts at step 500" in r.stderr and "no model will be clamped" in r.stderr


def test_plain_progress_lines_when_not_a_terminal(tmp_path, monkeypatch, capsys):
    from fastgrok.train import progress_bar, trainer
    from fastgrok.config import TrainConfig
    monkeypatch.setattr(progress_bar.ProgressBar, "PLAIN_EVERY_S", 0.0)
    cfg = TrainConfig(p=17, seeds=1, d_embed=8, hidden=16, steps=60, eval_every=20, compile="off", device="cpu")
    trainer.Trainer(cfg, tmp_path / "run", progress=True).run()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["0/60", "20/60", "40/60", "60/60"], lines
    assert all("train " in ln and "grokked" in ln for ln in lines)


# ----------------------------------------------------------------------------- review 2

def test_a_copy_without_parts_is_done_and_not_trained_again(spec_path, reference, tmp_path):
    """A finished grid copied as docs/mediation_p31 is (its results as models.parquet and curves.parquet, as
    grids wrote them before 2026-12-07; no parts/): status counts it done, and the same command trains
    nothing, turns the tables back into parts and keeps the results."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    res, fp = store.Results(reference), store.run_identity(reference)
    store.write_parquet(copy / store.MODELS, res.models(), fingerprint=fp)
    store.write_parquet(copy / store.CURVES, res.curves(), fingerprint=fp)
    shutil.rmtree(copy / "parts")
    r = fastgrok("status", copy)
    assert r.returncode == 0 and "2/2 cells done" in r.stdout, r.stdout + r.stderr
    r = fastgrok("run", spec_path, "--out", copy, "--quiet")
    assert r.returncode == 0 and "every batch is already done" in r.stderr, r.stderr
    assert not (copy / "batches").exists() or not any((copy / "batches").iterdir())
    assert store.Results(copy).from_parts and not (copy / store.MODELS).exists()
    same_results(copy, reference)


def test_run_warns_even_quiet_when_the_clamp_never_starts(spec_path, tmp_path):
    r = fastgrok("run", spec_path, "--max-steps", "40", "--out", tmp_path / "run", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "warning: 2 clamped cell(s) end before their clamp starts" in r.stderr and "unclamped" in r.stderr
    assert "fastgrok analyze" in r.stdout


def test_resume_from_python_checks_the_config(tmp_path):
    from fastgrok.config import ConfigError, TrainConfig
    from fastgrok.train.trainer import load_config, train
    cfg = TrainConfig(p=17, seeds=1, d_embed=8, hidden=16, steps=20, eval_every=10, compile="off", device="cpu")
    train(cfg, tmp_path / "new", resume=True, progress=False)        # nothing to resume: a fresh run
    assert load_config(tmp_path / "new") == cfg
    with pytest.raises(ConfigError, match="differs in seeds"):
        train(dataclasses.replace(cfg, seeds=2), tmp_path / "new", resume=True, progress=False)


def test_unknown_override_is_a_config_error():
    from fastgrok.config import ConfigError
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(load_experiment("mediation"), seed=1)


def test_package_and_python_dash_m():
    import fastgrok
    assert fastgrok.__version__ != "unknown" and fastgrok.analysis.report.analyze_dir is not None
    r = subprocess.run([sys.executable, "-m", "fastgrok", "experiments"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith("mediation")     # under the header


def test_run_compile_override_is_kept_with_the_spec(spec_path, reference):
    """--compile/--no-compile on `fastgrok run` set the spec's train.compile: a rerun with another setting
    is another spec (its rounding would differ), refused before any work."""
    assert apply_overrides(load_experiment("mediation"), compile="off").train["compile"] == "off"
    before = snapshot(reference)
    one_line_error(fastgrok("run", spec_path, "--out", reference, "--compile", "on"), "differs in train.compile ('off' -> 'on')")
    assert snapshot(reference) == before


def test_train_warns_about_options_it_does_not_use(tmp_path):
    r = fastgrok("train", "--p", "17", "--seeds", "1", "--d-embed", "8", "--hidden", "16", "--steps", "20",
                 "--d-model", "32", "--clamp-mode", "layer", "--no-compile", "--quiet", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "--d-model set the transformer's size; this run trains the mlp: ignored" in r.stderr
    assert "without --norm-target: no model is clamped" in r.stderr
    assert "--d-embed" not in r.stderr                              # used by the MLP: no warning


def test_analyze_of_an_interrupted_train_run_says_it_is_unfinished(train_run, tmp_path, capsys):
    """A `train` run stopped by a signal (here: the stop a worker's SIGTERM leaves pending) is analysed as
    what it is: the terminal and report.md say at which step of how many it stopped, and how to go on."""
    from fastgrok.train import signals
    from fastgrok.cli import main
    out = tmp_path / "run"
    signals.note_stop(signal.SIGTERM)
    try:
        assert main(["train", "--p", "17", "--seeds", "1", "--d-embed", "8", "--hidden", "16", "--steps", "200",
                     "--no-compile", "--quiet", "--out", str(out)]) == 130
    finally:
        signals.note_stop(None)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] is False and progress["step"] < 200
    capsys.readouterr()
    assert main(["analyze", str(out)]) == 0
    said = f"unfinished: this run stopped at step {progress['step']:,} of 200"
    assert said in capsys.readouterr().out
    assert said in (out / "report.md").read_text()
    assert main(["analyze", str(train_run)]) == 0                   # a finished run: no such line
    assert "unfinished" not in capsys.readouterr().out


def test_analyze_into_a_closed_pipe_still_writes_the_report(train_run, tmp_path, monkeypatch):
    """`fastgrok analyze DIR | head -3`: the report and figures are written before the tables are printed,
    and the closed pipe ends the command quietly (141, as a SIGPIPE would), not with a traceback."""
    import shutil

    from fastgrok.cli import main
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    (run / "report.md").unlink(missing_ok=True)

    sink = open(tmp_path / "sink", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):                   # rich points the real stream at /dev/null through it
            return sink.fileno()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        rc = main(["analyze", str(run)])
    except SystemExit as e:                 # rich's own handling of a closed pipe: exit 1, quietly
        rc = e.code
    finally:
        sink.close()
    assert rc in (1, 141)
    assert (run / "report.md").exists() and (run / "figures").is_dir()


# ----------------------------------------------------------------------------- one writer per run directory

def _holding_lock(cmd, run_dir: Path) -> subprocess.Popen:
    """Start cmd; return once it holds run_dir's writer lock (its PID in DIR/.lock)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    lock = run_dir / store.LOCK
    while not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, f"the run ended before it was seen holding the lock: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no lock within 120 s"
        time.sleep(0.01)
    return proc


def _kill_9(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_one_writer_per_run_directory_and_kill_9_leaves_no_stale_lock(tmp_path):
    """A second `fastgrok run` into a live run's --out, and `train --resume` of a live `train`: refused in one
    line naming the live writer's PID, the live writers undisturbed. Once they are killed with -9 (the OS drops
    their locks) the same commands take the lock at once: no stale lock is in the way. (The writers have
    budgets they cannot finish during the test; the results of a resume after kill -9 are checked above.)"""
    spec = tmp_path / "long.toml"
    spec.write_text(to_toml({**SPEC, "name": "long_tiny", "budget": {"steps": 10**7}}))
    grid_dir, train_dir = tmp_path / "grid", tmp_path / "train"
    grid_cmd = [*FASTGROK, "run", str(spec), "--out", str(grid_dir), "--quiet"]
    writers = []
    try:
        writers.append(_holding_lock(grid_cmd, grid_dir))
        writers.append(_holding_lock([*FASTGROK, "train", "--p", "17", "--seeds", "1", "--d-embed", "8", "--hidden",
                                      "16", "--steps", str(10**7), "--keep-going", "--no-compile", "--quiet",
                                      "--out", str(train_dir)], train_dir))
        line = one_line_error(fastgrok("run", spec, "--out", grid_dir, "--quiet"), f"PID {writers[0].pid}")
        assert "another fastgrok process" in line
        one_line_error(fastgrok("train", "--resume", train_dir, "--quiet"), f"PID {writers[1].pid}")
        assert all(w.poll() is None for w in writers)           # the live writers were not disturbed
    finally:
        for w in writers:
            _kill_9(w)
    for cmd, d in ((grid_cmd, grid_dir), ([*FASTGROK, "train", "--resume", str(train_dir), "--quiet"], train_dir)):
        _kill_9(_holding_lock(cmd, d))                          # they took the lock: none was left stale


def test_a_refused_run_leaves_no_lock_behind(tmp_path):
    """A run refused before writing (too big) leaves no directory, not even the lock's."""
    out = tmp_path / "new" / "big"
    one_line_error(fastgrok("train", "--p", "200000", "--out", out), "GiB")
    from fastgrok.train import trainer
    from fastgrok.config import TrainConfig
    with pytest.raises(Exception, match="already holds a run|GiB"):
        trainer.train(TrainConfig(p=200000), out)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- worker lifecycle

def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds marker (the driver's, inherited
    by its workers and the multiprocessing resource tracker, even once they are orphaned under PID 1)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes():
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:                                      # gone meanwhile, or a zombie's empty environ
            continue
    return out


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _assert_none_left(marker: str, wait_s: float = 30) -> None:
    """Within wait_s no process of the run is left; any that is gets killed (the test cleans up after
    itself) and the test fails naming it."""
    deadline = time.monotonic() + wait_s
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def _start_marked(cmd, marker: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FASTGROK_TEST_MARKER": marker}, start_new_session=True)


@pytest.mark.parametrize("delay", [0.0, 0.5, 1.5, 3.0])
def test_driver_killed_while_workers_start_leaves_no_process(spec_path, tmp_path, delay):
    """kill -9 of `run --workers 2` `delay` s after its first worker was spawned (the worker still imports
    torch, before it could arm its parent-death signal): within 30 s no worker and no resource tracker is
    left (before: they ran on under PID 1, one training its batch into the run directory, then waited forever)."""
    marker = f"fastgrok-test-{os.getpid()}-{tmp_path.name}"
    proc = _start_marked([*FASTGROK, "run", str(spec_path), "--out", str(tmp_path / "run"), "--quiet",
                          "--workers", "2"], marker)
    try:
        deadline = time.monotonic() + 120
        while not any("spawn_main" in c for c in _marked(marker).values()):
            assert proc.poll() is None, f"the run ended before a worker started: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no worker within 120 s"
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        _assert_none_left(marker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_worker_killed_mid_batch_stops_the_run_then_it_resumes(reference, tmp_path):
    """SIGKILL to one of two workers while both train (the OOM killer's way): the driver says which batch's
    worker died, in one line (no BrokenProcessPool traceback), stops the other worker (which checkpoints),
    exits with code 1 within a minute and leaves no process; the same command then ends with the reference
    results."""
    marker = f"fastgrok-test-{os.getpid()}-{tmp_path.name}"
    out = tmp_path / "run"
    spec_path = tmp_path / "dirs.toml"          # SPEC, checkpointed every 100 steps: both batches show early
    spec_path.write_text(to_toml({**SPEC, "train": {**SPEC["train"], "checkpoint_every": 100}}))
    proc = _start_marked([*FASTGROK, "run", str(spec_path), "--out", str(out), "--quiet", "--workers", "2"], marker)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "batches").glob("b*/curves.parquet"))) < 2:     # both batches have trained a while
            assert proc.poll() is None, f"the run ended before a worker was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the batches did not both get going within 120 s"
            time.sleep(0.01)
        workers = sorted(pid for pid, c in _marked(marker).items() if "spawn_main" in c and _parent(pid) == proc.pid)
        assert len(workers) == 2, _marked(marker)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=90)
        _assert_none_left(marker)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"fastgrok: error: the worker running batch b00[01] died \(killed by SIGKILL", last), err
    assert "rerun the same command" in last
    r = fastgrok("run", spec_path, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    same_results(out, reference)
