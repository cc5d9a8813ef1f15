"""The grid's jobs: what one batch (or one calibration) of a plan (plan.py) needs, as plain data
(picklable for Ray), and running one: a batch's trainer (a fork batch: its parents to the fork step, then
the arms from them), its models with each cell's columns attached. The driver (executors.py) writes
what a job returns into the run directory (rundir.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastgrok import store
from fastgrok.grid.experiments import CONFIG_AXES, PACKED_AXES, ExperimentSpec
from fastgrok.grid.plan import batch_config, calib_key, calibration_steps
from fastgrok.train.state import Records
from fastgrok.train.trainer import Trainer


# ---------------------------------------------------------------------------------------------
# Jobs: what one batch (or one calibration) needs, as plain data (picklable for Ray)
# ---------------------------------------------------------------------------------------------
def batch_job(spec: ExperimentSpec, plan: dict, batch: dict, w_c: dict, run_dir: Path, device: str,
              compile_mode: str) -> dict:
    cells = [plan["cells"][i] for i in batch["cells"]]
    cfg = batch_config(spec, cells)
    seed0 = cfg.seed0
    job = {"kind": "batch", "id": batch["id"], "dir": str(Path(run_dir) / "batches" / batch["id"]),
           "cfg": batch_config(spec, cells, device=device, compile=compile_mode,
                               steps=max(c["budget"] for c in cells)).to_dict(),
           "compact_frac": spec.engine.compact_frac, "columns": {}, "fork": None,
           "snapshot_dir": str(Path(run_dir) / "snapshots" / batch["id"])}   # survives batches/<id>'s removal
    for c in cells:
        job["columns"][c["cell"]] = {"experiment": spec.name, **{a: c[a] for a in CONFIG_AXES
                                                                 if a != "model" and a in c},
                                     "arch": c["model"], "arm": c["arm"], "fork_step": c["fork_step"],
                                     "budget": c["budget"], "layer_fracs": _fracs_str(c["layer_fracs"]),
                                     **({"regime": c.get("regime")} if spec.has_regimes else {})}

    def packed(c) -> dict:                  # the cell's per-model settings, carried by each of its rows
        return {a: c[a] for a in PACKED_AXES if c.get(a) is not None}

    def t_clamp(c) -> int:                  # by the cell's loss
        return cfg.t_clamp_of(c["loss"])

    def target(c):
        if c["rho"] is not None:
            return c["rho"] * (spec.calibration.w_c or w_c[calib_key(c)])
        return c["norm_target"]

    if spec.fork is None:
        job["rows"] = [{"model": c["model0"] + s, "cell": c["cell"], "seed": seed0 + s, "tau": c["tau"],
                        "norm_target": target(c), "rho": c["rho"], "budget": c["budget"], "t_clamp": t_clamp(c),
                        "layer_fracs": c["layer_fracs"], "cell_seed0": seed0, "cell_seeds": c["seeds"], **packed(c)}
                       for c in cells for s in range(c["seeds"])]
        return job
    # forks: parents (one per parent id, in order) train to the fork step; arms copy their rows
    parents, parent_rows, arm_rows = {}, [], []
    for c in cells:
        if c["parent"] not in parents:
            parents[c["parent"]] = len(parent_rows)
            parent_rows += [{"model": len(parent_rows) + s, "cell": c["parent"], "seed": seed0 + s, "tau": c["tau"],
                             "norm_target": target(c), "rho": c["rho"], "budget": c["fork_step"],
                             "t_clamp": t_clamp(c), "cell_seed0": seed0, "cell_seeds": c["seeds"], **packed(c)}
                            for s in range(c["seeds"])]
        for s in range(c["seeds"]):
            arm_rows.append({"model": c["model0"] + s, "cell": c["cell"], "seed": seed0 + s, "tau": c["tau"],
                             "norm_target": None, "rho": None, "budget": c["budget"], "t_clamp": c["fork_step"],
                             "parent_row": parents[c["parent"]] + s, "factor": c["factor"],
                             "cell_seed0": seed0, "cell_seeds": c["seeds"], **packed(c)})
    job["rows"] = arm_rows
    job["fork"] = {"step": spec.fork.step, "parents": parent_rows}
    return job


def calibration_job(spec: ExperimentSpec, cal: dict, run_dir: Path, device: str, compile_mode: str) -> dict:
    n = spec.calibration.seeds or spec.seeds
    steps = calibration_steps(spec)
    cfg = spec.base_config(**cal["shape"], dtype="float32")
    return {"kind": "calibration", "id": cal["key"], "dir": str(Path(run_dir) / "calibration" / cal["key"]),
            "cfg": spec.base_config(**cal["shape"], dtype="float32", device=device, compile=compile_mode,
                                    steps=steps, snapshots=0).to_dict(),             # the cells' models only
            "rows": [{"model": s, "cell": 0, "seed": cfg.seed0 + s, "tau": 1.0, "norm_target": None, "rho": None,
                      "budget": steps, "cell_seed0": cfg.seed0, "cell_seeds": n} for s in range(n)],
            "compact_frac": 0.0, "columns": None, "fork": None}


def _fracs_str(f) -> str | None:
    return None if not f else ",".join(f"{x:g}" for x in f)


def run_job(job: dict, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train one job (resuming from its checkpoint); returns (models, curves) with the cell columns."""
    from fastgrok.config import TrainConfig
    cfg = TrainConfig.from_dict(job["cfg"])
    d = Path(job["dir"])
    if job["fork"] is not None:
        tr = _fork_trainer(job, cfg, d, progress)
    else:
        tr = Trainer(cfg, d, table=job["rows"], compact_frac=job["compact_frac"], progress=progress,
                     snapshot_dir=job.get("snapshot_dir"))
        ck = store.load_checkpoint(d)
        if ck is not None:
            tr.restore(ck)
    models = tr.run()
    curves = tr.curves()
    if job["columns"] is not None:
        models = attach_columns(models, job["columns"])
    return models, curves


def _fork_trainer(job: dict, cfg, d: Path, progress: bool) -> Trainer:
    """Parents trained to the fork step (stopping for nothing else), then one model per arm and seed
    starting from its parent's flat/m/v/t rows, clamped to factor * ||W|| at the fork from then on."""
    fork = job["fork"]
    # the parents are no cell's models: no snapshots (the arms' start at the fork step)
    parent = Trainer(dataclasses.replace(cfg, stop_when_grokked=False, snapshots=0), d / "parent",
                     table=fork["parents"], progress=progress)
    ck = store.load_checkpoint(d / "parent")
    if ck is not None:
        parent.restore(ck)
    parent.run()
    ps = parent.state
    b = ps["bounds"]
    n0 = ps["flat"][:, b[0]:b[-1]].double().square().sum(1).sqrt().cpu().numpy()   # (M_parent,)
    rows = [dict(r) for r in job["rows"]]
    for r in rows:
        f = r.pop("factor")
        r["norm_target"] = None if f is None else float(f * n0[r["parent_row"]])
    idx_np = np.array([r.pop("parent_row") for r in rows])
    tr = Trainer(cfg, d, table=rows, compact_frac=job["compact_frac"], progress=progress,
                 snapshot_dir=job.get("snapshot_dir"))
    ck = store.load_checkpoint(d)
    if ck is not None:
        tr.restore(ck)
        return tr
    idx = torch.as_tensor(idx_np, device=tr.device)
    pr = parent.records
    records = Records(list(pr.steps), [e[idx_np] for e in pr.evals], pr.t_mem[idx_np].copy(),
                      pr.t_grok[idx_np].copy(), pr.diverged[idx_np].copy(), np.full(len(rows), -1))
    # each arm from its parent's rows (ema: Grokfast's filter, where a model uses it); diverged parents' arms frozen
    tensors = {k: ps[k].index_select(0, idx).clone() for k in ("flat", "m", "v", "t", "ema") if k in ps}
    tensors["alive"] = ~torch.as_tensor(records.diverged, device=tr.device)
    tr.start_from(tensors, records, parent.step_idx)
    return tr


def attach_columns(models: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """The trainer's columns plus each cell's parameters (experiment, p, op, arch, ..., arm, fork_step)."""
    cols = pd.DataFrame([{"cell": int(k), **v} for k, v in columns.items()])
    cols = cols.drop(columns=[c for c in cols.columns if c != "cell" and c in models.columns])  # the trainer's own
    out = models.merge(cols, on="cell", how="left")
    for c in ("fork_step", "budget", "p"):
        out[c] = out[c].astype("Int64")
    for c in ("arm", "layer_fracs"):
        out[c] = out[c].astype("string")
    return out
