"""Seed for seed: fastgrok against the study's own per-seed results at its p = 59 baseline cell.

    python benchmarks/reproduce_study_seeds.py                 # the train run (~5 min on 2 CPU cores)
    python benchmarks/reproduce_study_seeds.py --calibrate     # also the grid run that measures w_c itself

1. `fastgrok train --p 59 --seeds 12 --init study --norm-target 54.489295959472656 --clamp-from 500`:
   every seed's T_grok and T_mem must equal the study's (its bundled data, below).
2. `--calibrate`: `fastgrok run` of a spec holding the p = 59 rho = 1, tau = 1 cell with init = "study":
   its free control must give w_c = 54.4893 (the study's rule: the median ||W|| at the step the last
   seed grokked) and the clamped cell the same per-seed T_grok.

Exit status 0 when everything matches, 1 otherwise; a JSON summary goes to --json. The same checks run
as a test with `FASTGROK_REPRODUCE=1 pytest tests/test_reproduction.py` (kept out of the default run).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from fastgrok import store

W_C = 54.489295959472656
"""The study's w_c at p = 59 (CE, MLP): its control run's median ||W|| where the last seed grokked."""
T_GROK = [4150, 3825, 3600, 3525, 3400, 3850, 3975, 3625, 3725, 3775, 3150, 3525]
T_MEM = [175] * 11 + [150]
"""The study's per-seed results for seeds 0-11 of its baseline cell (rho 1, tau 1, clamp from 500)."""

SPEC = """name = "study_baseline_p59"
description = "the study's p = 59 baseline cell (rho 1, tau 1), w_c from its own free control"
seeds = 12
p = [59]
rho = [1.0]
tau = [1.0]

[train]
init = "study"
"""


def _fastgrok(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fastgrok.cli", *args, "--quiet"], check=True)


def per_seed(models: pd.DataFrame) -> tuple[list, list]:
    m = models.sort_values("seed")
    return [int(x) for x in m["t_grok"]], [int(x) for x in m["t_mem"]]


def check_train(out: Path) -> dict:
    t0 = time.perf_counter()
    _fastgrok("train", "--p", "59", "--seeds", "12", "--init", "study", "--norm-target", repr(W_C),
              "--clamp-from", "500", "--out", str(out))
    tg, tm = per_seed(pd.read_parquet(out / "models.parquet"))
    return {"t_grok": tg, "t_mem": tm, "match": tg == T_GROK and tm == T_MEM,
            "seconds": round(time.perf_counter() - t0, 1)}


def check_calibration(out: Path) -> dict:
    t0 = time.perf_counter()
    spec = out.parent / "study_baseline_p59.toml"
    spec.write_text(SPEC)
    _fastgrok("run", str(spec), "--out", str(out))
    (cal,) = store.read_json(out / "calibration.json").values()
    tg, tm = per_seed(store.Results(out).models())          # a grid's results are its parts
    return {"w_c": cal["w_c"], "calibration": cal, "t_grok": tg, "t_mem": tm,
            "match": abs(cal["w_c"] - W_C) < 5e-5 and tg == T_GROK and tm == T_MEM,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", action="store_true", help="also the grid run that measures w_c")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = ap.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="fastgrok-repro-"))
    root.mkdir(parents=True, exist_ok=True)
    summary = {"study": {"t_grok": T_GROK, "t_mem": T_MEM, "w_c": W_C}, "train": check_train(root / "train")}
    if args.calibrate:
        summary["calibration"] = check_calibration(root / "grid")
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(v["match"] for k, v in summary.items() if k != "study") else 1


if __name__ == "__main__":
    sys.exit(main())
