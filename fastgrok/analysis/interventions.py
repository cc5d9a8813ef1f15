"""The interventions analysis: the field's arms (StableMax, ⊥Grad, Grokfast, weight decay, the
clamp) side by side, one row per cell with its arm named from the columns that vary across the run.

A module of its own, apart from phases.py (see there).
"""
from __future__ import annotations

import pandas as pd

from fastgrok.analysis.statistics import numeric, is_fork
from fastgrok.config import LOSS_INFO

INTERVENTION_COLS = ("loss", "wd", "lr", "rho", "orthograd", "grokfast_lambda")
"""What tells the arms of an interventions run apart (the columns that vary are named in each arm)."""


def has_interventions(models: pd.DataFrame) -> bool:
    """Whether any model trained with StableMax, ⊥Grad or Grokfast (an interventions run)."""
    return (("loss" in models and (models["loss"] == "stablemax").any())
            or ("orthograd" in models and models["orthograd"].fillna(False).astype(bool).any())
            or ("grokfast_lambda" in models and (numeric(models["grokfast_lambda"]) > 0).any()))


def arm_name(row: pd.Series, varying: list[str]) -> str:
    """A cell's arm in words from the intervention columns that vary across the run."""
    parts = []
    for c in varying:
        v = row.get(c)
        if c == "loss":
            parts.append(LOSS_INFO[v][0] if v in LOSS_INFO else str(v))
        elif c == "orthograd":
            parts.append("⊥Grad" if bool(v) else "")
        elif c == "grokfast_lambda":
            parts.append(f"Grokfast λ={float(v):g}" if float(v) > 0 else "")
        elif c == "rho":
            parts.append("free" if pd.isna(v) else f"clamp ρ={float(v):g}")
        else:
            parts.append(f"{c}={float(v):g}")
    return ", ".join(p for p in parts if p) or "baseline"


def interventions_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (non-fork) cell, its arm named: seeds, grokked, T_mem, T_grok, delay, final SC rate
    and test loss (medians over seeds; SC rate the mean), the arms in the run's cell order."""
    c = cells.loc[~is_fork(cells)]
    varying = [k for k in INTERVENTION_COLS if k in c and c[k].nunique(dropna=False) > 1]
    out = pd.DataFrame({"cell": c["cell"], "arm": [arm_name(r, varying) for _, r in c.iterrows()]})
    for k in ("n_seeds", "n_grokked", "T_mem", "T_grok", "delay", "sc_rate", "test_loss", "W_final"):
        if k in c:
            out[k] = c[k].to_numpy()
    return out.reset_index(drop=True)
