"""Summarise the issue-30 side-by-side runs (the authors' code and fastgrok) into one JSON.

The authors' runs log one line per evaluation (the logging patches in docs/fidelity-runs/*.patch):
Prieto et al.'s `METRICS {json}` lines and Grokfast's `EPOCH e step s train_acc a val_acc v` lines.
fastgrok's runs are run directories (models.parquet, curves.parquet).

    python benchmarks/peer_repro_summary.py benchmarks/results/peer_repro > benchmarks/results/peer_repro/summary.json

(RUNS_DIR, the run directories themselves, works as well.)
"""
import json
import re
import sys
from pathlib import Path

import pandas as pd


def prieto(log: Path) -> dict:
    rows = [json.loads(line[len("METRICS "):]) for line in log.read_text().splitlines() if line.startswith("METRICS ")]
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    hit = df[df.test_acc >= 0.90]
    at = lambda s: df[df.step == s].iloc[0].to_dict() if (df.step == s).any() else None
    last = df.iloc[-1].to_dict()
    return {"steps_logged": int(df.step.max()), "log_every": int(df.step.iloc[1] - df.step.iloc[0]),
            "first_step_test_acc_ge_0.90": int(hit.step.iloc[0]) if len(hit) else None,
            "w_norm_at_22000": (at(22000) or {}).get("w_norm"), "at_22000": at(22000), "last": last,
            "max_test_acc": float(df.test_acc.max())}


def grokfast(log: Path) -> dict:
    pat = re.compile(r"EPOCH (\d+) step (\d+) train_acc ([\d.]+) val_acc ([\d.]+)")
    rows = [tuple(map(float, m.groups())) for m in map(pat.search, log.read_text().splitlines()) if m]
    if not rows:
        return {}
    df = pd.DataFrame(rows, columns=["epoch", "step", "train_acc", "val_acc"])
    hit = df[df.val_acc >= 0.95]
    return {"steps_run": int(df.step.max()), "first_step_val_acc_ge_0.95": int(hit.step.iloc[0]) if len(hit) else None,
            "max_val_acc": float(df.val_acc.max()), "last": df.iloc[-1].to_dict(),
            "val_acc_every_500": {int(s): float(v) for s, v in zip(df.step, df.val_acc) if int(s) % 500 == 0}}


def fastgrok(run: Path) -> dict:
    models = pd.read_parquet(run / "models.parquet")
    curves = pd.read_parquet(run / "curves.parquet")
    out = {"config": {k: v for k, v in json.loads((run / "config.json").read_text()).items()
                      if k in ("p", "train_frac", "lr", "wd", "loss", "orthograd", "eps", "beta1", "beta2", "steps",
                               "eval_every", "d_embed", "hidden", "seeds", "dtype", "mlp_input", "mlp_layers",
                               "mlp_act", "mlp_bias", "init", "model", "op", "optimizer", "batch_size", "warmup",
                               "grokfast_alpha", "grokfast_lambda", "n_layers", "tf_block", "grok_threshold")},
           "models": []}
    for _, m in models.iterrows():
        c = curves[curves.model == m.model]
        w = c[(c.metric == "weight_norm") & (c.step == 22000)].value
        out["models"].append({"seed": int(m.seed), "t_grok": None if pd.isna(m.t_grok) else int(m.t_grok),
                              "t_mem": None if pd.isna(m.t_mem) else int(m.t_mem), "steps": int(m.steps),
                              "test_acc_end": float(m.test_acc), "weight_norm_end": float(m.weight_norm),
                              "weight_norm_at_22000": float(w.iloc[0]) if len(w) else None})
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    out = {}
    for d in sorted(root.iterdir()):
        log = d / "log.txt" if d.is_dir() else d            # a run directory, or its committed log
        name = d.name if d.is_dir() else d.name.removesuffix(".log")
        if not log.is_file() or (d.is_file() and d.suffix != ".log"):
            continue
        if name.startswith("prieto_"):
            out[name] = prieto(log)
        elif name.startswith("grokfast_"):
            out[name] = grokfast(log)
    runs = sorted((root / "fg").glob("*")) if (root / "fg").exists() else sorted(root.glob("fastgrok_*"))
    for d in runs:
        if (d / "models.parquet").exists():
            out["fastgrok_" + d.name.removeprefix("fastgrok_")] = fastgrok(d)
    print(json.dumps(out, indent=1, default=float))
