"""The per-cell computations of before 2026-12-07 (main at 2592318), a pandas group per cell, kept verbatim as
the reference the vectorised ones (statistics.cell_table, phases.phase_table, rundir.status_table) must equal
exactly (tests/test_analysis_scale.py)."""
import numpy as np
import pandas as pd

from fastgrok import store
from fastgrok.analysis import statistics as A
from fastgrok.analysis.phases import majority_phase, seed_phases, PHASES
from fastgrok.grid import rundir


def cell_table(models: pd.DataFrame, curves=None) -> pd.DataFrame:
    A.check_models(models)
    desc = [c for c in A.CELL_COLS if A.has_values(models, c)]
    rows = []
    for cell, g in models.groupby("cell", sort=True):
        tg, tm = A.numeric(g["t_grok"]), A.numeric(g["t_mem"])
        n, n_grok = len(g), int(np.isfinite(tg).sum())
        row = {"cell": cell, **{c: A.cell_value(g[c]) for c in desc}}
        row.update(
            n_seeds=n, n_grokked=n_grok,
            n_diverged=int(np.nansum(A.numeric(g["diverged"]))) if "diverged" in g else 0,
            counts=bool(2 * n_grok >= n),
            T_mem=float(A.nanmedian(tm)), T_grok=float(A.nanmedian(tg)))
        row["delay"] = row["T_grok"] - row["T_mem"]
        row["sc_rate"] = float(A._nanmean(A.numeric(g["sc_rate"]))) if "sc_rate" in g and n else np.nan
        if "test_loss" in g:
            row["test_loss"] = float(A.nanmedian(A.numeric(g["test_loss"])))
        row["W_final"] = float(A.nanmedian(A.numeric(g["weight_norm"]))) if "weight_norm" in g else np.nan
        rows.append(row)
    cells = pd.DataFrame(rows)
    cells["L_grok"], cells["W_grok"] = np.nan, np.nan
    tail = ["sc_rate", *(["test_loss"] if "test_loss" in cells else []), "W_final", "W_grok"]
    order = [c for c in cells.columns if c not in tail] + tail
    if curves is None or curves.empty:
        return cells[order]
    L = A.cell_logit_scale(models, curves)
    by_cell = {c: g for c, g in L.groupby("cell")}
    cells["L_grok"] = [
        A.nearest_step_value(by_cell[c]["step"], by_cell[c]["L"], t) if c in by_cell else np.nan
        for c, t in zip(cells["cell"], cells["T_grok"])]
    wg = A.values_at(models, curves, "weight_norm").groupby("cell")["value"].median()
    cells["W_grok"] = cells["cell"].map(wg).astype("float64")
    return cells[order]


def phase_table(models: pd.DataFrame, *, mem_threshold: float = 0.99, grok_threshold: float = 0.90,
                ratio: float = 2.0) -> pd.DataFrame:
    A.check_models(models)
    m = models.loc[~A.is_fork(models)]
    ph = seed_phases(m, mem_threshold=mem_threshold, ratio=ratio)
    desc = [c for c in A.CELL_COLS if A.has_values(m, c) and c not in ("arm", "fork_step")]
    rows = []
    for cell, g in m.assign(_phase=ph).groupby("cell", sort=True):
        tg, tm = A.numeric(g["t_grok"]), A.numeric(g["t_mem"])
        row = {"cell": cell, **{c: A.cell_value(g[c]) for c in desc}, "n": len(g),
               "n_mem": int(np.isfinite(tm).sum()), "n_grok": int(np.isfinite(tg).sum()),
               "T_mem": float(A.nanmedian(tm)), "T_grok": float(A.nanmedian(tg)),
               "delay": float(A.nanmedian(tg - tm)),
               "train_acc": float(A.nanmedian(A.numeric(g["train_acc"]))) if "train_acc" in g else np.nan,
               "test_acc": float(A.nanmedian(A.numeric(g["test_acc"]))) if "test_acc" in g else np.nan}
        row.update({f"n_{p}": int((g["_phase"] == p).sum()) for p in PHASES})
        row.update(phase=majority_phase(g["_phase"].to_numpy()), mem_threshold=float(mem_threshold),
                   grok_threshold=float(grok_threshold))
        rows.append(row)
    return pd.DataFrame(rows)


def status_table(run_dir) -> pd.DataFrame:
    """rundir.status_table's per-cell rows as they were computed (a scan per cell), for a directory of
    finished batches."""
    plan = store.read_plan(run_dir)
    results = store.Results(run_dir, models_required=("cell", "t_grok"), curves=False)
    done = rundir.done_batches(run_dir)
    models = results.models()
    models = models.reindex(columns=["cell", "t_grok", *(c for c in ("steps", "diverged") if c in models)])
    state = {c: ("done" if b["id"] in done else "pending") for b in plan["batches"] for c in b["cells"]}
    by_cell = dict(tuple(models.groupby("cell", sort=False)))
    empty = models.iloc[:0]
    rows = []
    for c in plan["cells"]:
        m = by_cell.get(c["cell"], empty)
        finished = len(m) if state[c["cell"]] == "done" else 0
        tg = pd.to_numeric(m["t_grok"], errors="coerce").dropna()
        rows.append({"cell": c["cell"], "p": c["p"], "arch": c["model"], "loss": c["loss"], "dtype": c["dtype"],
                     "rho": rundir._dose_label(c), "tau": c["tau"], "arm": c["arm"] or "",
                     "done": f"{finished}/{c['seeds']}", "grokked": f"{len(tg)}/{c['seeds']}",
                     "median T_grok": float(tg.median()) if len(tg) else float("nan"), "state": state[c["cell"]]})
    return pd.DataFrame(rows)
