"""Results of today's code against another commit's, bit for bit: the quick preset (`fastgrok train --preset
quick`) and a small grid (16 models: lr x wd x tau, 2 seeds, p = 11) trained by each, compared on every
column both write (a column only today's writes, a per-model setting added since, is listed).

    OMP_NUM_THREADS=1 python benchmarks/bitwise_vs_commit.py af5668d
    OMP_NUM_THREADS=1 python benchmarks/bitwise_vs_commit.py 47d45c2 --study-step 30

--study-step N adds the study's MLP at p = 59, 12 models, N steps of the training step compiled and eager
(fastgrok.core.step.build_step_fns, no run directory), then one evaluation: the parameters compared bit for
bit, the evaluation column by column (the commit must have build_step_fns).

The other commit's code runs from a git worktree put first on PYTHONPATH, its kernels/ linked in as
fastgrok/kernels (each side imports its own; checked). A grid of before keeps its results in
DIR/models.parquet and curves.parquet; today's in parts, read with store.Results.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SPEC = """name = "bitwise"
seeds = 2
p = [11]
lr = [1e-3, 3e-3]
wd = [0.5, 1.0]
tau = [1.0, 1.5]
[train]
d_embed = 8
hidden = 16
compile = "off"
[budget]
steps = 300
"""


def fastgrok(args: list[str], pythonpath: str | None, cwd: Path) -> None:
    """`python -m fastgrok ARGS` from cwd (not this checkout: `-m` puts the working directory first on
    sys.path, ahead of PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "fastgrok", *args, "--quiet"], env=side_env(pythonpath, cwd), cwd=cwd,
                   check=True, stdout=subprocess.DEVNULL)


def side_env(pythonpath: str | None, cwd: Path) -> dict:
    """The environment of one side's subprocesses (one thread; its code first on PYTHONPATH), checked:
    fastgrok and fastgrok.kernels import from the side's own code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", "import fastgrok, fastgrok.kernels as K; print(fastgrok.__file__); "
                          "print(K.__file__)"], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    for f in out.stdout.split():
        assert f.startswith(pythonpath or str(ROOT)), f"imported from {f}"
    return env


STUDY_STEP = """
import sys, torch
torch.set_num_threads(1)
from fastgrok.config import TrainConfig
from fastgrok.core.step import build_step_fns
from fastgrok.train.state import build_state
compiled, steps, out = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3]
st = build_state(TrainConfig(p=59, seeds=12, device="cpu", compile="off"))
step, ev = build_step_fns(st.model, st.cfg, st.backend, compiled)
for _ in range(steps):
    step(st.tensors, st.batch)
torch.save({"flat": st.tensors["flat"], "eval": ev(st.tensors, st.batch)}, out)
"""


def study_step(steps: int, compiled: bool, out: Path, pythonpath: str | None, cwd: Path) -> None:
    subprocess.run([sys.executable, "-c", STUDY_STEP, "1" if compiled else "0", str(steps), str(out)],
                   env=side_env(pythonpath, cwd), cwd=cwd, check=True)


def compare_step(name: str, old: Path, new: Path) -> None:
    import torch
    from fastgrok.core.step import eval_metrics
    from fastgrok.config import TrainConfig
    from fastgrok.core.models import build_model
    a, b = torch.load(old, weights_only=True), torch.load(new, weights_only=True)
    same = torch.equal(a["flat"], b["flat"])
    print(f"{name} parameters ({tuple(a['flat'].shape)}): {'bitwise equal' if same else 'DIFFER'}"
          + ("" if same else f", max |diff| {(a['flat'] - b['flat']).abs().max().item():.3g}"))
    cfg = TrainConfig(p=59, seeds=12)
    names = eval_metrics(build_model(cfg), cfg)
    ea, eb = a["eval"], b["eval"]
    n = min(ea.shape[1], eb.shape[1])
    diff = [(names[j] if j < len(names) else str(j), (ea[:, j] - eb[:, j]).abs().max().item())
            for j in range(n) if not torch.equal(ea[:, j], eb[:, j])]
    print(f"{name} evaluation ({n} columns): " + ("bitwise equal" if not diff else
          "equal but " + ", ".join(f"{k} (max |diff| {v:.2g})" for k, v in diff)))


def tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from fastgrok import store
    if (run / "models.parquet").exists():
        m, c = pd.read_parquet(run / "models.parquet"), pd.read_parquet(run / "curves.parquet")
    else:
        res = store.Results(run)
        m, c = res.models(), res.curves()
    return (m.sort_values("model").reset_index(drop=True),
            c.sort_values(["model", "step", "metric"]).reset_index(drop=True))


def compare(name: str, old: Path, new: Path) -> None:
    for kind, a, b in zip(("models", "curves"), tables(old), tables(new)):
        added = [c for c in b.columns if c not in a.columns]
        pd.testing.assert_frame_equal(a, b[a.columns], check_exact=True, check_dtype=False)
        print(f"{name} {kind}: {a.shape[0]} rows x {a.shape[1]} columns bitwise equal"
              + (f"; columns only today's writes: {', '.join(added)}" if added else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the commit to compare with (e.g. the last one before a refactor)")
    ap.add_argument("--study-step", type=int, default=0, metavar="N",
                    help="also N steps of the p = 59 study MLP's step, compiled and eager (module docstring)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        wt = d / "old-code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(wt), args.commit], check=True)
        try:
            if not (wt / "fastgrok" / "kernels").exists():
                (wt / "fastgrok" / "kernels").symlink_to(wt / "kernels")
            (d / "spec.toml").write_text(SPEC)
            for who, path in (("old", str(wt)), ("new", None)):
                fastgrok(["train", "--preset", "quick", "--out", str(d / f"{who}-train")], path, d)
                fastgrok(["run", str(d / "spec.toml"), "--out", str(d / f"{who}-grid")], path, d)
                for compiled in (False, True) if args.study_step else ():
                    study_step(args.study_step, compiled, d / f"{who}-step-{compiled}.pt", path, d)
            compare("quick preset", d / "old-train", d / "new-train")
            compare("grid", d / "old-grid", d / "new-grid")
            for compiled in (False, True) if args.study_step else ():
                compare_step(f"study MLP p = 59, M = 12, {args.study_step} steps, {'compiled' if compiled else 'eager'}:",
                             d / f"old-step-{compiled}.pt", d / f"new-step-{compiled}.pt")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)


if __name__ == "__main__":
    main()
