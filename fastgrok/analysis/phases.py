"""Phase diagrams after Liu et al. (2022): each seed's and each cell's phase (comprehension, grokking,
memorization, confusion) and the lr x wd and train_frac x wd diagrams a run's cells span.

A module apart from interventions.py rather than one `regimes` module: the two share no code and
answer different questions (where in hyperparameter space a run groks, against what one method
changes at one setting), and each has its own experiment, report section and figure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.analysis.statistics import CELL_COLS, SETTING_COLS, CellGroups, numeric, check_models, has_values, is_fork

PHASES = ("comprehension", "grokking", "memorization", "confusion")
"""Liu et al.'s four phases, in their order along the Goldilocks zone."""
PHASE_TIES = ("grokking", "memorization", "comprehension", "confusion")
"""A cell whose seeds tie between phases takes the first tied phase of this order: a tie puts the cell
on a boundary, and the slower of two generalizing outcomes (grokking over comprehension), a fit over
no fit (memorization over confusion) and a generalization over none (grokking over memorization) need
no majority, while a claim of no delay (comprehension) or of no fit (confusion) does."""
COMPREHENSION_RATIO = 2.0
"""A seed that grokked comprehends when T_grok <= this x T_mem: its delay T_grok - T_mem is at most the
time it took to memorize (a scale-free window: T_mem runs from tens of steps at large lr to thousands
at small lr, so a fixed number of steps would call every small-lr cell grokking)."""
DIAGRAM_AXES = (("lr", "wd", "train_frac"), ("train_frac", "wd", "lr"))
"""The diagrams looked for: (y axis, x axis, axis held fixed)."""


def seed_phases(models: pd.DataFrame, *, mem_threshold: float = 0.99,
                ratio: float = COMPREHENSION_RATIO) -> np.ndarray:
    """Each model's phase (an array of PHASES names) from its T_mem, T_grok (recorded by the trainer at
    the run's mem_threshold and grok_threshold), final train accuracy and divergence:
    - grokked (a T_grok): comprehension when T_grok <= ratio x T_mem, or it generalized before it
      memorized (no T_mem, or T_mem after T_grok); grokking otherwise;
    - not grokked: memorization when its final train accuracy is >= mem_threshold (and it did not
      diverge); confusion otherwise (it never fit the train set, lost it, or diverged)."""
    tg, tm = numeric(models["t_grok"]), numeric(models["t_mem"])
    train = numeric(models["train_acc"]) if "train_acc" in models else np.where(np.isfinite(tm), 1.0, 0.0)
    div = np.nan_to_num(numeric(models["diverged"])) > 0 if "diverged" in models else np.zeros(len(models), bool)
    grok = np.isfinite(tg)
    with np.errstate(invalid="ignore"):
        fast = ~np.isfinite(tm) | (tg <= ratio * tm)
        fit = (train >= mem_threshold) & ~div
    return np.where(grok, np.where(fast, "comprehension", "grokking"),
                    np.where(fit, "memorization", "confusion"))


def majority_phase(phases) -> str:
    """The phase most seeds of a cell are in; a tie goes to the first tied phase of PHASE_TIES."""
    counts = {ph: int(np.sum(np.asarray(phases) == ph)) for ph in PHASES}
    top = max(counts.values())
    return next(ph for ph in PHASE_TIES if counts[ph] == top)


def phase_table(models: pd.DataFrame, *, mem_threshold: float = 0.99, grok_threshold: float = 0.90,
                ratio: float = COMPREHENSION_RATIO) -> pd.DataFrame:
    """One row per (non-fork) cell: its describing columns (lr, wd, train_frac, ...), n seeds, n_mem and
    n_grok (seeds with a T_mem, a T_grok), the medians of T_mem and T_grok over the seeds that reached
    them, delay (the median over the seeds with both of T_grok - T_mem), the medians of the final
    train_acc and test_acc, the seeds per phase (`seed_phases`) and the cell's `phase` (`majority_phase`).
    grok_threshold is the one the run's T_grok was recorded at; kept in the column `grok_threshold`
    beside `mem_threshold` so the table says which thresholds made it."""
    check_models(models)
    m = models.loc[~is_fork(models)]
    ph = seed_phases(m, mem_threshold=mem_threshold, ratio=ratio)
    desc = [c for c in CELL_COLS if has_values(m, c) and c not in ("arm", "fork_step")]
    if m.empty:
        return pd.DataFrame()
    G = CellGroups(m)                                       # per cell, from whole columns (exact: see CellGroups)
    tg, tm = G.col("t_grok"), G.col("t_mem")
    code = pd.Index(PHASES).get_indexer(ph[G.order])        # each seed's phase as its index in PHASES
    counts = np.zeros((len(G), len(PHASES)), np.int64)     # (K, 4) seeds per phase
    np.add.at(counts, (G.codes, code), 1)
    top = counts.max(axis=1, keepdims=True)
    ties = [PHASES.index(p) for p in PHASE_TIES]
    majority = np.asarray(PHASE_TIES)[np.argmax(counts[:, ties] == top, axis=1)]
    nan = [np.nan] * len(G)
    cols = {"cell": G.ids.tolist(), **{c: G.values(c) for c in desc}, "n": G.sizes.tolist(),
            "n_mem": G.count(np.isfinite(tm)).tolist(), "n_grok": G.count(np.isfinite(tg)).tolist(),
            "T_mem": G.median(tm).tolist(), "T_grok": G.median(tg).tolist(), "delay": G.median(tg - tm).tolist(),
            "train_acc": G.median(G.col("train_acc")).tolist() if "train_acc" in m else nan,
            "test_acc": G.median(G.col("test_acc")).tolist() if "test_acc" in m else nan,
            **{f"n_{p}": counts[:, i].tolist() for i, p in enumerate(PHASES)},
            "phase": majority.tolist(), "mem_threshold": [float(mem_threshold)] * len(G),
            "grok_threshold": [float(grok_threshold)] * len(G)}
    # a row per cell, as a list of dicts: the columns' dtypes inferred as the per-cell table's always were
    return pd.DataFrame([dict(zip(cols, r)) for r in zip(*cols.values())])


def phase_diagrams(table: pd.DataFrame) -> list[dict]:
    """The phase diagrams a `phase_table` holds: per setting (the setting columns other than lr, wd and
    train_frac, and the clamp and tau columns) and value of the fixed axis, the cells spanning >= 2
    values of both axes of an entry of DIAGRAM_AXES (lr x wd at one train_frac, train_frac x wd at one
    lr). Each: {"keys": the setting, "y", "x", "fixed": (axis, value), "cells": its rows}."""
    if table.empty or not all(c in table.columns for c in ("lr", "wd", "train_frac")):
        return []
    keys = [c for c in (*SETTING_COLS, "rho", "tau", "norm_target", "layer_fracs")
            if c in table.columns and c not in ("lr", "wd", "train_frac")]
    groups = table.groupby(keys, dropna=False, sort=True) if keys else [((), table)]
    out = []
    for vals, g in groups:
        vals = vals if isinstance(vals, tuple) else (vals,)
        for y, x, fixed in DIAGRAM_AXES:
            for v, d in g.groupby(fixed, sort=True):
                if d[y].nunique() >= 2 and d[x].nunique() >= 2:
                    out.append({"keys": dict(zip(keys, vals)), "y": y, "x": x, "fixed": (fixed, v), "cells": d})
    return out
