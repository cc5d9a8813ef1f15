"""`fastgrok train` as a user runs it: a real process, its exit code, its stderr and its run directory.

- every bad input of issue 2 exits with code 2 and one line on stderr (no traceback, no run directory);
- a run killed with SIGKILL (and one stopped with SIGTERM) resumed with `--resume DIR` ends with exactly
  the models.parquet and curves.parquet of an uninterrupted run;
- the run directory: config.json (the run's whole config), models.parquet (one row per model, issue 2's
  columns), curves.parquet (long format).
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fastgrok import store
from fastgrok.config import TrainConfig
from fastgrok.core.data import all_pairs
from fastgrok.core.models import MLP
from fastgrok.core.models import build_model
from fastgrok.core.step import eval_metrics

from cli_runner import ENV, FASTGROK, checkpointed, fastgrok


# ----------------------------------------------------------------------------- bad input

BAD = {
    "p below 2": (["--p", "1"], "p must be"),
    "p zero": (["--p", "0"], "p must be"),
    "p not an integer": (["--p", "7.5"], "--p"),
    "div with non-prime p": (["--op", "div", "--p", "12"], "prime"),
    "train frac 0": (["--train-frac", "0"], "train_frac"),
    "train frac 1": (["--train-frac", "1"], "train_frac"),
    "train frac above 1": (["--train-frac", "1.5"], "train_frac"),
    "train frac negative": (["--train-frac", "-0.2"], "train_frac"),
    "train frac nan": (["--train-frac", "nan"], "train_frac"),
    "tau zero": (["--tau", "0"], "tau"),
    "tau negative among several": (["--tau", "1.0", "-1"], "tau"),
    "tau nan": (["--tau", "nan"], "tau"),
    "tau inf": (["--tau", "inf"], "tau"),
    "norm target zero": (["--norm-target", "0"], "norm target"),
    "norm target negative among several": (["--norm-target", "50", "-3"], "norm target"),
    "norm target inf": (["--norm-target", "inf"], "norm target"),
    "negative steps": (["--steps", "-5"], "steps"),
    "zero seeds": (["--seeds", "0"], "seeds"),
    "unknown device": (["--device", "tpu"], "--device"),
    "unknown op": (["--op", "pow"], "--op"),
    "unknown model": (["--model", "rnn"], "--model"),
    "unknown loss": (["--loss", "hinge"], "--loss"),
    "unknown preset": (["--preset", "huge"], "--preset"),
    "resume with run options": (["--resume", "somewhere", "--p", "5"], "--resume"),
    "a tau given twice": (["--tau", "1", "1.3", "1"], "--tau lists 1 more than once"),
    "a norm target given twice": (["--norm-target", "40", "40"], "--norm-target lists 40 more than once"),
    "compile and no-compile": (["--compile", "on", "--no-compile"], "not allowed with"),
    # issue 15, item 6
    "seed0 beyond 64 bits": (["--seed0", "99999999999999999999"], "seed0 must be at most"),
    "seed0 whose last split seed overflows": (["--seed0", str(2**63 - 1000 - 3), "--seeds", "5"],
                                              "seed0 must be at most"),
    "negative lr in exponent form": (["--lr", "-1e-3"], "lr must be finite and > 0"),
    "negative wd in exponent form": (["--wd", "-1E-2"], "wd must be"),
    "tau minus infinity": (["--tau", "-inf"], "tau must be"),
    # issues 16 and 17: per-model values, each checked
    "one of several lrs zero": (["--lr", "1e-3", "0"], "lr must be finite and > 0"),
    "one of several wds negative": (["--wd", "1", "-0.5"], "wd must be finite and >= 0"),
    "init scale zero": (["--init-scale", "1", "0"], "init_scale must be finite and > 0"),
    "a train fraction of 1": (["--train-frac", "0.4", "1"], "train_frac must be in (0, 1)"),
    "a fraction leaving no train row": (["--p", "5", "--train-frac", "0.01"], "leaves an empty train or test set"),
    "div among ops with p not prime": (["--p", "8", "--op", "add", "div"], "op 'div' needs a prime p"),
    "perm with p not n!": (["--p", "7", "--op", "perm"], "op 'perm' needs p = n!"),
    "an lr given twice": (["--lr", "1e-3", "1e-3"], "--lr lists 0.001 more than once"),
    "grokfast alpha 1": (["--grokfast-alpha", "1"], "grokfast_alpha must be in [0, 1)"),
    "orthograd maybe": (["--orthograd", "maybe"], "--orthograd"),
}

BAD_SPECS = {
    "grok threshold above 1": ("[train]\ngrok_threshold = 5.0\n", "train.grok_threshold: grok_threshold must be in (0, 1]"),
    "mem threshold nan": ("[train]\nmem_threshold = nan\n", "train.mem_threshold: mem_threshold must be in (0, 1]"),
    "mem threshold zero": ("[train]\nmem_threshold = 0.0\n", "train.mem_threshold"),
    "an lr axis with a zero": ("lr = [1e-3, 0.0]\n", "spec.lr"),
    "a negative wd axis": ("wd = [-1.0]\n", "spec.wd: bad value -1.0 (must be finite and >= 0)"),
    "div at a p not prime": ('[[grid]]\np = [8]\nop = ["div"]\n', "op 'div' needs a prime p"),
    "init scale zero": ("init_scale = [0.0]\n", "spec.init_scale"),
    "lr in [train]": ("[train]\nlr = 1e-3\n", "train.lr"),
    "seed0 beyond 64 bits": ("[train]\nseed0 = 9223372036854775000\n", "train.seed0"),
    "a tau listed twice": ("tau = [1.0, 1.0]\n", "spec.tau: lists 1.0 more than once"),
    "a rho listed twice in a block": ('[[grid]]\nrho = ["free", 1.0, "free"]\n', "grid[0].rho: lists 'free'"),
    "name ..": (None, "name: must be a plain file name"),
    "name .": (None, "name: must be a plain file name"),
    "name with a backslash": (None, "name: must be a plain file name"),
}
"""Spec mistakes `fastgrok run` refuses in one line naming the field, before writing anything anywhere.
(None: the case is in the name, see SPEC_NAMES.)"""
SPEC_NAMES = {"name ..": "..", "name .": ".", "name with a backslash": "a\\\\b"}


def _assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastgrok: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args,needle", list(BAD.values()), ids=list(BAD))
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    out = tmp_path / "run"
    r = fastgrok("train", *args, "--out", out, cwd=tmp_path)
    _assert_one_line_error(r, needle)
    assert not out.exists() and not (tmp_path / "runs").exists()      # failed before any work


@pytest.mark.parametrize("text,needle", list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_bad_spec_exits_2_with_one_line(tmp_path, text, needle, request):
    name = SPEC_NAMES.get(request.node.callspec.id, "bad")
    spec = tmp_path / "spec" / "bad.toml"
    spec.parent.mkdir()
    spec.write_text(f'name = "{name}"\np = [11]\n' + (text or ""))
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    # default --out: runs/<name> under work/here; --max-steps bounds the run where a case is not refused
    r = fastgrok("run", spec, "--quiet", "--max-steps", "5", "--no-compile", cwd=work)
    _assert_one_line_error(r, needle)
    assert list(work.iterdir()) == [] and list((tmp_path / "work").iterdir()) == [work]   # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    r = fastgrok("train", "--device", "cuda", "--out", tmp_path / "run", cwd=tmp_path)
    _assert_one_line_error(r, "cuda")
    assert not (tmp_path / "run").exists()


def test_kernels_that_cannot_run_here(tmp_path):
    """Triton kernels in float64 (Triton is float32 only here, or not installed): the kernels' own error."""
    r = fastgrok("train", "--kernels", "triton", "--dtype", "float64", "--out", tmp_path / "run", cwd=tmp_path)
    _assert_one_line_error(r, "kernels=triton")
    assert not (tmp_path / "run").exists()


def test_resume_of_a_directory_without_a_run(tmp_path):
    r = fastgrok("train", "--resume", tmp_path / "nothing", cwd=tmp_path)
    _assert_one_line_error(r, "no run")


# ----------------------------------------------------------------------------- kill and resume

FLAGS = ["--p", "23", "--train-frac", "0.7", "--lr", "1e-2", "--d-embed", "32", "--hidden", "64",
         "--seeds", "2", "--seed0", "3", "--tau", "1.0", "1.3", "--norm-target", "26", "--clamp-from", "100",
         "--steps", "500", "--checkpoint-every", "100", "--no-compile"]
"""4 models (2 cells x 2 seeds), clamped from step 100; three of them grok by step 425, one not in 500 (at 550)."""
EXPECTED = TrainConfig(p=23, train_frac=0.7, lr=1e-2, d_embed=32, hidden=64, seeds=2, seed0=3, taus=(1.0, 1.3),
                       norm_targets=(26.0,), clamp_from=100, steps=500, checkpoint_every=100, compile="off")
MODEL_COLUMNS = ["cell", "seed", "tau", "norm_target", "t_mem", "t_grok", "logit_scale_at_grok", "train_acc",
                 "test_acc", "weight_norm", "diverged"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run (with its progress bar and summary)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = fastgrok("train", *FLAGS, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "median T_grok" in r.stdout and "models.parquet" in r.stdout
    return out


def _start_and_interrupt(out: Path, sig: int) -> subprocess.Popen:
    """Start a run, wait for its first checkpoint, then send `sig` while it is still training."""
    proc = subprocess.Popen([*FASTGROK, "train", *FLAGS, "--quiet", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not checkpointed(out):
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(0.05)                                   # somewhere between checkpoints
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _assert_same_results(run: Path, ref: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(run / "models.parquet"), pd.read_parquet(ref / "models.parquet"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "curves.parquet"), pd.read_parquet(ref / "curves.parquet"),
                                  check_exact=True)
    assert json.loads((run / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_to_identical_results(tmp_path, reference_run, sig):
    out = tmp_path / "run"
    proc = _start_and_interrupt(out, sig)
    stderr = proc.stderr.read()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:                                              # checkpoints, says how to resume, exits 130
        assert proc.returncode == 130, stderr
        assert f"--resume {out}" in stderr and "Traceback" not in stderr
    progress = json.loads((out / "progress.json").read_text())
    assert not progress["done"] and 100 <= progress["step"] < 500    # really stopped mid-run
    killed_models = pd.read_parquet(out / "models.parquet")           # what the partial run had on disk
    r = fastgrok("train", "--resume", out)
    assert r.returncode == 0, r.stderr
    _assert_same_results(out, reference_run)
    assert json.loads((out / "progress.json").read_text())["done"]
    assert len(killed_models) == 4                                     # the partial results were readable


def test_finished_run_extended_with_more_steps_matches_the_longer_run(tmp_path, reference_run):
    """--resume DIR --steps N: a run that ended at its budget (330, between two evaluations every 25)
    goes on to N and ends exactly as the run started with N (the evaluation its old budget forced, and what
    it detected, left out); a shorter --steps is refused; config.json records the new budget."""
    out = tmp_path / "run"
    short = [f if f != "500" else "330" for f in FLAGS]
    r = fastgrok("train", *short, "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert {k: progress[k] for k in ("step", "done", "steps", "checkpoint")} == \
        {"step": 330, "done": True, "steps": 330, "checkpoint": 330}
    assert 330 in set(pd.read_parquet(out / "curves.parquet").step)
    r = fastgrok("train", "--resume", out, "--steps", "200")
    assert r.returncode == 2 and "not shorten" in r.stderr and "Traceback" not in r.stderr
    r = fastgrok("train", "--resume", out, "--steps", "500", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "extending the run from 330 to 500 steps" in r.stderr
    _assert_same_results(out, reference_run)


def test_extending_a_run_whose_models_all_grokked_says_so(tmp_path):
    out = tmp_path / "run"
    r = fastgrok("train", "--preset", "quick", "--seeds", "1", "--out", out)     # with its progress output
    assert r.returncode == 0, r.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] and progress["step"] < progress["steps"]
    # the early stop ends the progress output with a line saying where and why (not a bar left mid-way)
    assert f"done at step {progress['step']}/{progress['steps']} (every model grokked or diverged): grokked 1/1" \
        in r.stdout, r.stdout
    before = pd.read_parquet(out / "models.parquet")
    r = fastgrok("train", "--resume", out, "--steps", str(2 * progress["steps"]), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nothing to extend" in r.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "models.parquet"), before, check_exact=True)


# ----------------------------------------------------------------------------- the run directory

def test_run_directory_contents(reference_run):
    cfg = TrainConfig.from_dict(store.read_json(reference_run / "config.json"))
    assert cfg == EXPECTED

    models = pd.read_parquet(reference_run / "models.parquet")
    assert set(MODEL_COLUMNS) <= set(models.columns), set(MODEL_COLUMNS) - set(models.columns)
    table = pd.DataFrame(EXPECTED.model_table())
    assert len(models) == EXPECTED.n_models == 4
    for c in ("cell", "seed", "tau", "norm_target"):
        assert models[c].tolist() == table[c].tolist(), c
    assert str(models.t_mem.dtype) == "Int64" and str(models.t_grok.dtype) == "Int64"
    assert models.t_grok.isna().any() and models.t_grok.notna().any()   # null where never reached
    assert models.diverged.dtype == bool and not models.diverged.any()
    np.testing.assert_allclose(models.weight_norm, 26.0, rtol=1e-5)    # clamped from step 100 on

    curves = pd.read_parquet(reference_run / "curves.parquet")
    assert list(curves.columns) == ["model", "step", "metric", "value"]
    assert set(curves.metric) == set(eval_metrics(build_model(EXPECTED), EXPECTED))   # EVAL_METRICS, progress
    assert not curves.duplicated(["model", "step", "metric"]).any()
    assert (curves.step % EXPECTED.eval_every == 0).all() and curves.step.max() == EXPECTED.steps
    assert (curves[curves.metric == "logit_scale"].step % EXPECTED.logit_every == 0).all()
    # the per-model results are the curves' readouts: T_mem/T_grok the first evaluation over the
    # threshold, final accuracies and norm the last evaluation (T_grok: a model stops when it groks), L at
    # grok that of the weights at T_grok (the checkpoint's, where the model stopped)
    flat = torch.load(reference_run / "checkpoint.pt", weights_only=True)["state"]["flat"].double()
    a, b, _ = all_pairs(EXPECTED.p, EXPECTED.op)
    z = MLP(EXPECTED).logits(flat, a, b)                                # (M, N, V)
    for r in models.itertuples():
        mine = curves[curves.model == r.model]
        series = {m: g.set_index("step").value.sort_index() for m, g in mine.groupby("metric")}
        for col, metric, thr in (("t_mem", "train_acc", EXPECTED.mem_threshold),
                                 ("t_grok", "test_acc", EXPECTED.grok_threshold)):
            hit = series[metric][series[metric] >= thr]
            want = int(hit.index[0]) if len(hit) else None
            got = getattr(r, col)
            assert (pd.isna(got) and want is None) or got == want, (r.model, col, got, want)
        for col in ("train_acc", "test_acc", "weight_norm"):
            assert getattr(r, col) == series[col].iloc[-1]
        if not pd.isna(r.t_grok):
            assert r.steps == r.t_grok and series["test_acc"].index[-1] == r.t_grok
            want = (z[r.model] / r.tau).norm(dim=-1).mean().item()
            assert r.logit_scale_at_grok == pytest.approx(want, rel=1e-5)
            if r.t_grok % EXPECTED.logit_every == 0:
                assert r.logit_scale_at_grok == series["logit_scale"][r.t_grok]


def test_existing_run_directory_is_not_overwritten(reference_run):
    before = (reference_run / "models.parquet").read_bytes()
    r = fastgrok("train", *FLAGS, "--out", reference_run)
    _assert_one_line_error(r, "already holds a run")
    assert (reference_run / "models.parquet").read_bytes() == before


def test_a_tiny_test_set_is_flagged(tmp_path):
    """p = 3 at train fraction 0.7: 3 test pairs, where 0.90 test accuracy means all 3 right by chance."""
    r = fastgrok("train", "--p", "3", "--train-frac", "0.7", "--seeds", "1", "--d-embed", "8", "--hidden", "8",
                 "--steps", "5", "--no-compile", "--quiet", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "warning: only 3 test pair(s) at p = 3" in r.stderr
    r = fastgrok("train", "--p", "11", "--seeds", "1", "--d-embed", "8", "--hidden", "8", "--steps", "5",
                 "--no-compile", "--quiet", "--out", tmp_path / "run2")
    assert r.returncode == 0 and "test pair" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    """The disk fills up at the run's first checkpoint (the atomic writer raises ENOSPC): one line saying
    so (exit 1, no traceback), the files written before it intact, and a resume once there is room
    finishes the run."""
    from fastgrok import cli, store
    real, calls = store.atomic_write, []

    def fills_up(path, write, **kw):
        calls.append(Path(path).name)
        if Path(path).name == store.CHECKPOINT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write, **kw)

    monkeypatch.setattr(store, "atomic_write", fills_up)
    out = tmp_path / "run"
    args = ["train", "--p", "11", "--seeds", "1", "--d-embed", "8", "--hidden", "8", "--steps", "60",
            "--checkpoint-every", "50", "--no-compile", "--quiet", "--out", str(out)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastgrok: error: the disk is full") and "kept" in err[-1], err
    assert "Traceback" not in "\n".join(err) and store.CHECKPOINT in calls
    assert not json.loads((out / "progress.json").read_text())["done"]         # written before: intact
    assert not (out / store.CHECKPOINT).exists() and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(store, "atomic_write", real)                          # room again
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "progress.json").read_text())["done"]


def test_atomic_write_keeps_the_old_version_when_the_disk_fills(tmp_path):
    path = tmp_path / "x.json"
    store.write_json(path, {"a": 1})

    def half_then_full(tmp):
        Path(tmp).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(store.DiskFull):
        store.atomic_write(path, half_then_full)
    assert store.read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ----------------------------------------------------------------------------- status, help, experiments

def test_status_of_a_train_run_is_live(tmp_path):
    """`fastgrok status` of a `train` directory shows its step, models grokked and state; progress.json is
    rewritten at evaluations (seconds apart), so status follows a run long before its first checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*FASTGROK, "train", "--p", "17", "--seeds", "2", "--d-embed", "8", "--hidden", "16",
                             "--steps", "1000000", "--checkpoint-every", "1000000", "--keep-going", "--no-compile",
                             "--quiet", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress.json").exists() or json.loads((out / "progress.json").read_text())["step"] == 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "progress.json did not move within 120 s"
            time.sleep(0.05)
        r = fastgrok("status", out)
        assert r.returncode == 0, r.stderr
        assert "fastgrok train run, p=17 add mlp ce float32, 2 models (1 cells x 2 seeds)" in r.stdout, r.stdout
        assert re.search(rf"step [\d,]+ of 1,000,000: running \(PID {proc.pid}\)", r.stdout), r.stdout
        assert re.search(r"memorized \d/2, grokked \d/2, diverged 0", r.stdout), r.stdout
        assert "no checkpoint yet" in r.stdout
    finally:
        proc.kill()
        proc.wait(timeout=30)
    r = fastgrok("status", out)
    assert r.returncode == 0 and f"stopped; continue it: fastgrok train --resume {out}" in r.stdout, r.stdout


def test_help_says_what_a_preset_sets():
    r = fastgrok("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())                       # argparse wraps lines
    assert "modulus (default 59; --preset prieto: 31; --preset quick: 31)" in text
    assert "(--preset prieto: 0.01; --preset quick: 0.01)" in text
    assert "step budget (default 20000; --preset prieto: 35000; --preset quick: 5000)" in text
    assert "quick: A configuration that groks in seconds on a 2-core CPU (see README) (sets --p 31" in text


def test_experiments_shows_size_and_time_at_the_given_p():
    r = fastgrok("experiments", "--p", "31")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:-1]}
    assert list(rows) == ["mediation", "collapse", "dose", "mse", "float64", "samestate", "alloc", "transformer",
                          "phase", "interventions", "atlas"]
    # mediation at one p: 6 cells x 12 seeds and one calibration of 12 free models; budgets 20k (rho 1) to 137k
    assert rows["mediation"][1:4] == ["6", "84", "20,000-137,000"]
    assert rows["mediation"][5] in ("min", "h")                             # a duration: "90 min"
    assert "at p = 31" in r.stdout.splitlines()[-1]
    assert fastgrok("experiments", "--p", "1").stdout == ""                 # a bad p: its error alone


def test_analyze_out_leaves_the_run_directory_untouched(tmp_path):
    """`analyze --out DIR` on the repository's docs/ run: the report lands in DIR, docs/ is unchanged."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "mediation_p31"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(docs.rglob("*")) if p.is_file()}
    r = fastgrok("analyze", docs, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report" / "report.md").exists() and list((tmp_path / "report" / "figures").glob("*.png"))
    assert f"report: {tmp_path / 'report' / 'report.md'}" in r.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(docs.rglob("*")) if p.is_file()}
    assert after == before
