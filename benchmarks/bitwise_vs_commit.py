"""Results of today's code against another commit's, bit for bit: the quick preset (`fastgrok train --preset
quick`) and a small grid (16 models: lr x wd x tau, 2 seeds, p = 11) trained by each, compared on every
column both write (a column only today's writes, a per-model setting added since, is listed).

    OMP_NUM_THREADS=1 python benchmarks/bitwise_vs_commit.py af5668d

The other commit's code runs from a git worktree put first on PYTHONPATH (the kernels come from this
checkout's install, so the commit must have the same kernels/). A grid of before keeps its results in
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", "import fastgrok, sys; print(fastgrok.__file__)"], env=env,
                         cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith(pythonpath or str(ROOT)), f"fastgrok imported from {out}"
    subprocess.run([sys.executable, "-m", "fastgrok", *args, "--quiet"], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL)


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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        wt = d / "old-code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(wt), args.commit], check=True)
        try:
            (d / "spec.toml").write_text(SPEC)
            for who, path in (("old", str(wt)), ("new", None)):
                fastgrok(["train", "--preset", "quick", "--out", str(d / f"{who}-train")], path, d)
                fastgrok(["run", str(d / "spec.toml"), "--out", str(d / f"{who}-grid")], path, d)
            compare("quick preset", d / "old-train", d / "new-train")
            compare("grid", d / "old-grid", d / "new-grid")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)


if __name__ == "__main__":
    main()
