"""Lee et al.'s regime in fastgrok (issue 30 item 5): x*y mod 97, train fraction 0.5, their 2-layer transformer
(config.TF_PRESETS["lee"]), Adam with coupled L2 decay 0.005, lr 1e-3, betas (0.9, 0.98), a 10-step linear
warm-up, minibatches of 512, evaluated every 10 steps; seeds 0, 1, 2 in one batch.

    OMP_NUM_THREADS=1 python benchmarks/results/peer_repro/fg_lee.py NAME STEPS LAMBDA [OUT_ROOT [WD]]

LAMBDA 2 is Grokfast-EMA (alpha 0.98, lambda 2), 0 the baseline. WD (default 0.005, their README's Grokfast
command) is the coupled L2 decay: 0 is their README's baseline command, which has no --weight_decay. Trains through fastgrok.train.trainer.train
(the run directory OUT_ROOT/NAME holds models.parquet and curves.parquet), then prints a JSON line per model:
the first evaluated step with test (their "validation") accuracy >= 0.95, and the accuracies every 100 steps.
grok_threshold 0.95 makes each model stop at that step (T_grok), as every fastgrok run stops at its own end.
A run directory that already holds the run is resumed and extended to STEPS (train(..., resume=True)).
STEPS 0 trains nothing: it reads what a stopped run's checkpoint holds (a run stopped by SIGTERM checkpoints
before it exits) and prints the same lines.
"""
import json
import sys
import time
from pathlib import Path

import pandas as pd

from fastgrok import store
from fastgrok.config import TF_PRESETS, TrainConfig
from fastgrok.train.trainer import Trainer, load_config, train

name, steps, lam = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
root = sys.argv[4] if len(sys.argv) > 4 else "benchmarks/results/peer_repro"
wd = float(sys.argv[5]) if len(sys.argv) > 5 else 0.005
if steps == 0:                                  # a stopped run: its checkpoint's records
    cfg = load_config(f"{root}/{name}")
    trainer = Trainer(cfg, f"{root}/{name}", progress=False)
    ck = store.load_checkpoint(f"{root}/{name}")
    trainer.restore(ck)
    curves, wall = trainer.curves(), float("nan")
    res = pd.DataFrame(trainer.table)
    print("STOPPED", "at step", ck["step"], flush=True)
else:
    cfg = TrainConfig(model="transformer", **TF_PRESETS["lee"], p=97, op="mul", train_frac=0.5, seeds=3, seed0=0,
                      optimizer="adam", lr=1e-3, wd=wd, beta1=0.9, beta2=0.98, warmup=10, batch_size=512,
                      grokfast_alpha=0.98, grokfast_lambda=lam, steps=steps, eval_every=10, logit_every=200,
                      grok_threshold=0.95, dtype="float32", compile="off", device="cpu")
    print("CONFIG", json.dumps(cfg.to_dict()), flush=True)
    t = time.time()
    resume = (Path(root) / name / "config.json").exists()
    res = train(cfg, f"{root}/{name}", progress=True, resume=resume)
    wall = time.time() - t
    print("WALL", wall, "resumed" if resume else "", flush=True)
    curves = pd.read_parquet(f"{root}/{name}/curves.parquet")
curves = curves[curves.metric.isin(["train_acc", "test_acc"])].pivot_table(
    index=["model", "step"], columns="metric", values="value").reset_index()
for m, c in curves.groupby("model"):
    c = c.sort_values("step")
    hit = c[c.test_acc >= 0.95]
    print("RESULT", json.dumps({
        "seed": int(res.loc[res.model == m, "seed"].iloc[0]), "steps_run": int(c.step.max()),
        "first_step_test_acc_ge_0.95": int(hit.step.iloc[0]) if len(hit) else None,
        "max_test_acc": float(c.test_acc.max()),
        "acc_every_100": {int(s): [round(float(r.train_acc), 4), round(float(r.test_acc), 4)]
                          for s, r in c.set_index("step").iterrows() if s % 100 == 0},
        "wall_s": round(wall, 1)}), flush=True)
