"""Issue 27 (reliability): input validation, signals and resources, as an outside audit of the CLI found them.

- counts too large for a 64-bit integer (--steps, --eval-every, [train] eval_every, [budget] steps, a huge
  rho): one line, exit 2, nothing written (they raised OverflowError after writing config.json);
- inputs that ran nonsense: --steps 0, an empty --out, a grok threshold at or below chance, a fork factor
  <= 1 are refused; a tau so small that Adam's squared gradients overflow marks its models diverged, with a
  warning; `run` warns of a tiny test set as `train` does;
- bench checks its --json path and its --models counts' memory before measuring anything; a spec name too
  long for a directory leaves no runs/ behind;
- a Ctrl-C or SIGTERM while `--workers N` starts its workers stops the run (it was lost);
- the memory check honours the process's own limit (ulimit -v), before anything is written;
- the watchdog of a local Ray cluster stops what a driver killed outright leaves behind.
"""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from fastgrok import store
import pytest
import torch

from fastgrok.cli import main
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.grid.experiments import to_toml

from cli_runner import ENV, FASTGROK, fastgrok

HUGE = 10**23
TINY = ["--p", "11", "--d-embed", "8", "--hidden", "16", "--seeds", "1", "--no-compile", "--quiet"]
SPEC = {"name": "rel_tiny", "seeds": 1, "p": [11], "train_frac": [0.5],
        "train": {"d_embed": 8, "hidden": 16, "eval_every": 10, "compile": "off"},
        "budget": {"steps": 40}, "engine": {"max_models": 1}, "grid": [{"tau": [1.0, 1.5]}]}
"""Two batches of one model: with --workers 2, two workers start at once."""


def spec_file(tmp_path: Path, file: str = "spec", **changes) -> Path:
    """tmp_path/FILE.toml: SPEC with top-level keys replaced, or (key "section__field") one field of a
    section set."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in SPEC.items()}
    for k, v in changes.items():
        section, _, field = k.partition("__")
        if field:
            d.setdefault(section, {})[field] = v
        else:
            d[k] = v
    path = tmp_path / f"{file}.toml"
    path.write_text(to_toml(d))
    return path


def refused(capsys, args, needle: str) -> str:
    """`fastgrok ARGS` in this process: exit 2 and one line naming needle, no traceback."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:                         # argparse's errors (the CLI's, as a process)
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fastgrok: error:") and needle in lines[0], (rc, err)
    return lines[0]


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgrok: error:") and needle in lines[0], r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- tracebacks: huge counts

def test_counts_too_large_for_64_bits_are_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, ["train", *TINY, "--steps", HUGE, "--out", out], "steps must be an integer in [1, 10^18]")
    refused(capsys, ["train", *TINY, "--eval-every", HUGE, "--out", out], "eval_every must be an integer")
    refused(capsys, ["run", spec_file(tmp_path, train__eval_every=HUGE), "--out", out], "train.eval_every")
    refused(capsys, ["run", spec_file(tmp_path, budget__steps=HUGE), "--out", out], "budget.steps")
    # a rho whose budget, steps x (steps_ref / steps) ^ ((rho - 1) / (rho_ref - 1)), is past 10^18 (math.exp
    # overflowed), unless --max-steps caps it
    big_rho = spec_file(tmp_path, grid=[{"rho": [1000.0]}], calibration={"w_c": 20.0})
    refused(capsys, ["run", big_rho, "--out", out], "the step budget at rho 1000 is over 10^18")
    refused(capsys, ["run", spec_file(tmp_path), "--max-steps", HUGE, "--out", out], "max_steps")
    assert not out.exists()
    assert TrainConfig(steps=10**18, eval_every=10**18, logit_every=10**18).steps == 10**18    # the bound itself


# ----------------------------------------------------------------------------- silent nonsense

def test_zero_steps_and_an_empty_out_are_refused(tmp_path, capsys, monkeypatch):
    spec, cwd = spec_file(tmp_path), tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)                          # an empty --out named the current directory
    refused(capsys, ["train", *TINY, "--steps", "0", "--out", "run"], "steps must be an integer in [1, 10^18]")
    refused(capsys, ["train", *TINY, "--out", ""], "argument --out: an empty path")
    refused(capsys, ["run", spec, "--out", ""], "argument --out: an empty path")
    refused(capsys, ["bench", "--json", "", "--sections", "clamp"], "argument --json: an empty path")
    assert not any(cwd.iterdir())


def test_a_grok_threshold_at_or_below_chance_is_refused(tmp_path, capsys):
    """At 0.05 with p = 11 (chance 0.09) every model 'grokked' at step 0 and stopped there."""
    with pytest.raises(ConfigError, match=r"grok_threshold must be above chance, 1/p = 0.09091 at p = 11"):
        TrainConfig(p=11, grok_threshold=0.05)
    with pytest.raises(ConfigError, match="mem_threshold must be above chance"):
        TrainConfig(p=2, mem_threshold=0.5)
    out = tmp_path / "run"
    refused(capsys, ["run", spec_file(tmp_path, train__grok_threshold=0.05), "--out", out], "train.grok_threshold")
    ok = spec_file(tmp_path, "ok", p=[59], train__grok_threshold=0.05)     # above chance at p = 59 (0.017) ...
    refused(capsys, ["run", ok, "--p", "11", "--out", out], "train.grok_threshold")    # ... not at --p 11
    assert not out.exists()


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_a_fork_factor_of_at_most_1_is_refused(tmp_path, capsys, factor):
    """0.5 put the raised arm below the lowered one, whose budget became 37,262,370 steps; 1.0 made three
    identical arms."""
    spec = spec_file(tmp_path, grid=[{"rho": ["free"], "tau": [1.0]}], budget={"steps": 100},
                     fork={"step": 20, "factor": factor})
    refused(capsys, ["run", spec, "--out", tmp_path / "run"], "fork.factor: must be > 1")
    assert not (tmp_path / "run").exists()


def test_a_spec_name_too_long_for_a_directory_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["run", spec_file(tmp_path, name="x" * 300)], "name: is 300 bytes long")
    assert not (tmp_path / "runs").exists()
    refused(capsys, ["run", spec_file(tmp_path, name="é" * 128)], "name: is 256 bytes long")
    from fastgrok.grid.experiments import load_spec
    assert load_spec(spec_file(tmp_path, name="é" * 127)).name == "é" * 127      # 254 bytes: a file name


def test_a_tiny_tau_marks_its_models_diverged_with_a_warning(tmp_path, capsys, one_thread):
    """tau 1e-30: a gradient ~1e30 in the logits, whose square overflows float32 in Adam's v; the update
    m / sqrt(v) is 0, and the model sat at a train loss of 2e28, not marked diverged. The tau = 1 model of
    the same batch trains as ever."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tau", "1e-30", "1", "--steps", "50", "--eval-every", "25", "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert "fastgrok: warning: tau 1e-30 is so small that (1/tau)^2 overflows float32" in err, err
    models = pd.read_parquet(out / "models.parquet")
    assert models["diverged"].tolist() == [True, False]
    assert models["steps"].tolist() == [25, 50]                 # stopped at its first evaluation after
    from fastgrok.config import tiny_tau_warning
    assert tiny_tau_warning((1e-19, 1.0), "float32") is None and tiny_tau_warning((1e-30,), "float64") is None


def test_run_warns_of_a_tiny_test_set_and_a_tiny_tau(tmp_path, capsys, one_thread):
    """The audit's `fastgrok run mediation --p 2`: one train row and 3 test pairs, with no warning (train
    gave one); here a budget of 1 step. And a spec's tau of 1e-30 warns and diverges as in `train`."""
    assert main(["run", "mediation", "--p", "2", "--seeds", "1", "--max-steps", "1", "--no-compile", "--quiet",
                 "--out", str(tmp_path / "med")]) == 0
    err = capsys.readouterr().err
    assert "fastgrok: warning: only 3 test pair(s) at p = 2, train fraction 0.4" in err, err
    out = tmp_path / "tau"
    assert main(["run", str(spec_file(tmp_path, grid=[{"tau": [1e-30, 1.0]}])), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "fastgrok: warning: tau 1e-30 is so small" in err and "test pair" not in err, err
    models = store.Results(out).models().sort_values("tau")
    assert models["diverged"].tolist() == [True, False]


# ----------------------------------------------------------------------------- bench

def test_bench_checks_its_json_path_before_measuring(tmp_path, capsys):
    """A directory as --json failed only after 16 s of measuring."""
    t0 = time.monotonic()
    refused(capsys, ["bench", "--json", tmp_path, "--sections", "clamp"], "is a directory; give a file name for --json")
    (tmp_path / "a_file").write_text("x")
    refused(capsys, ["bench", "--json", tmp_path / "a_file" / "b.json"], "is a file, so no file can be made")
    refused(capsys, ["bench", "--plot", tmp_path, "--json", tmp_path / "b.json"], "--plot")
    assert time.monotonic() - t0 < 5 and not (tmp_path / "b.json").exists()


def test_bench_refuses_a_model_count_that_cannot_fit_before_building_it(tmp_path):
    """--models 100000000 built a table of 10^8 models before any memory check and set off the OOM killer
    at 21.5 GB. Run under a 4 GiB address-space limit, so an attempt fails here, not the machine."""
    out = tmp_path / "b.json"

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    r = subprocess.run([*FASTGROK, "bench", "--device", "cpu", "--sections", "step", "--models", "1,100000000",
                        "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=limited)
    one_line_error(r, "--models 100000000: 100000000 model(s) at p = 59")
    assert not out.exists()
    from fastgrok.bench import sections as bench
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="--models 100000000"):
        bench.check_models_fit((1, 10**8), torch.device("cpu"), quick=False)
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- signals during worker start-up

# the driver as `fastgrok run`, each worker's start followed by a pause (inside the start-up window) after
# it writes a marker: the test's signal lands there for certain, as it did by chance in the audit
_SLOW_START = r"""
import os, sys, time
import multiprocessing.process as P
start = P.BaseProcess.start
def slow_start(self):
    start(self)
    open(os.environ["FG_STARTED"], "a").close()
    time.sleep(0.6)
P.BaseProcess.start = slow_start
from fastgrok.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _live_in_group(pgid: int, wait_s: float = 10) -> str:
    """The processes of the group still running (zombies are dead) after waiting up to wait_s for none."""
    deadline = time.monotonic() + wait_s
    while True:
        ps = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
        live = "\n".join(line for line in ps.splitlines() if not line.strip().startswith("Z"))
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "sigterm-to-the-driver"])
def test_a_stop_while_workers_start_stops_the_run_then_it_resumes(tmp_path, sig, group):
    """Ctrl-C (SIGINT to the process group) or SIGTERM to the driver while `--workers 2` starts its workers
    was lost (the workers start with stop signals held, and the driver ignored them meanwhile): the run went
    on to the end with exit 0. Now it stops (130, the usual closing line), no process is left, and the same
    command then runs to the end."""
    spec, out, marker = spec_file(tmp_path), tmp_path / "run", tmp_path / "started"
    args = ["run", str(spec), "--out", str(out), "--quiet", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_START, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "FG_STARTED": str(marker)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no worker started within 60 s"
            time.sleep(0.005)
        time.sleep(0.3)                     # the first worker imports torch: its stop signals must be held
        (os.killpg if group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command" in err.strip().splitlines()[-1], err
    assert not _live_in_group(proc.pid), _live_in_group(proc.pid)
    assert not (out / "parts" / "models").exists() or not any((out / "parts" / "models").iterdir())
    if group:                                           # (once is enough: the stop came before any job)
        r = fastgrok(*args)
        assert r.returncode == 0, r.stderr
        assert len(store.Results(out).models()) == 2


# ----------------------------------------------------------------------------- resource limits

def test_the_memory_check_honours_the_address_space_limit(tmp_path):
    """Under `ulimit -v` (2.5 GiB) a run needing ~3 GiB passed the check (MemAvailable only), wrote
    config.json (a grid: plan.json, progress.json) and then failed out of memory. Now it is refused first."""
    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2**29, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = tmp_path / "run"
    big = ["--p", "97", "--seeds", "32", "--steps", "10", "--no-compile", "--quiet"]
    r = subprocess.run([*FASTGROK, "train", *big, "--out", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=120, preexec_fn=limited)
    one_line_error(r, "this process's limit (ulimit -v) leaves it")
    assert not out.exists()
    spec = spec_file(tmp_path, p=[97], seeds=32, train={"compile": "off"}, engine={"max_models": 32})
    r = subprocess.run([*FASTGROK, "run", str(spec), "--out", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=120, preexec_fn=limited)
    one_line_error(r, "ulimit -v")
    assert not out.exists()


# ----------------------------------------------------------------------------- the Ray executor's watchdog

# a driver that starts the watchdog, then a child that starts a grandchild ignoring SIGTERM (its pid in a
# file), then waits (argv[2] "kill") or exits normally ("exit")
_DRIVER = r"""
import subprocess, sys, time
from fastgrok.grid import watchdog
w = watchdog.start()
subprocess.Popen(["bash", "-c", f"trap '' TERM; sleep 600 & echo $! > {sys.argv[1]}.tmp; mv {sys.argv[1]}.tmp {sys.argv[1]}; wait"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.0)                                         # the watchdog has seen them (it looks every 0.5 s)
print("ready", flush=True)
if sys.argv[2] == "exit":
    watchdog.stop(w)
else:
    time.sleep(600)
"""


def _sleeper(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_watchdog_stops_what_a_killed_driver_leaves_and_nothing_on_a_normal_exit(tmp_path):
    """The Ray executor's local cluster outlived a kill -9 of its driver (two agents, 60 s). Its watchdog,
    here around a stand-in process tree: kill -9 of the driver, and within seconds the grandchild that
    ignores SIGTERM is gone too; a driver that exits normally (watchdog.stop) leaves its processes alone."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, tmp_path / "killed", "kill"], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline() == "ready\n"
    sleeper = _sleeper(tmp_path / "killed")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(sleeper), "the driver's grandchild outlived it"
    r = subprocess.run([sys.executable, "-c", _DRIVER, tmp_path / "exited", "exit"], stdout=subprocess.PIPE,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stdout == "ready\n"
    sleeper = _sleeper(tmp_path / "exited")
    try:
        time.sleep(1.0)
        assert _alive(sleeper), "a normal exit stopped the processes it left on purpose"
    finally:
        os.kill(sleeper, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("RAY_ADDRESS") is not None,
                    reason="reads /proc; a local cluster of the driver's own")
def test_a_local_ray_cluster_goes_with_its_killed_driver(tmp_path):
    """kill -9 of `fastgrok run --executor ray` while its tasks train: every process the driver started
    (Ray's GCS, raylet, dashboard, workers, and the raylet's two agents, which stayed ~65 s) is gone
    within seconds (measured: ~3 s, the watchdog's SIGTERM grace included)."""
    pytest.importorskip("ray")
    from fastgrok.grid.watchdog import _processes, descendants
    spec, out = spec_file(tmp_path, budget={"steps": 10**6}), tmp_path / "run"
    proc = subprocess.Popen([*FASTGROK, "run", str(spec), "--out", str(out), "--quiet", "--executor", "ray"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("batches/*/progress.json")):     # Ray is up and a task trains
            assert proc.poll() is None and time.monotonic() < deadline, "no batch started within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)                                          # the watchdog looks every 0.5 s
        started = descendants(proc.pid, _processes())
        assert len(started) > 3
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while True:
            procs = _processes()
            left = [pid for pid, t in started.items() if pid in procs and procs[pid][1] == t]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left, subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, left))],
                                        capture_output=True, text=True).stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
