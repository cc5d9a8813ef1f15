"""The study's regressions of T_grok across cells: the collapse grid and the dose law.

- Collapse grid: per setting, ln T_grok on L at grok, on rho and on both (R² each), one point per
  counting cell (`analysis.counting_cells`): does L explain the delay beyond the dose?
- Dose law: ln T_grok = c + alpha * ‖W‖, the study's collapse-free fit (tau = 1, cut at the
  softmax-collapse onset) and a fit over the whole grid.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.analysis.statistics import (ATOL, need_rho, numeric, counting_cells, has_values, is_fork, match_value,
                               per_setting, setting_groups)

COLLAPSE_JUMP = 2.5
"""Dose law: the collapse onset is the first cell (ascending rho) whose L at grok exceeds this many
times the previous cell's."""
DOSE_RHO_MAX = 1.15
"""Dose law: the study's collapse-free fit keeps rho <= this."""
DOSE_MIN_CELLS = 3
"""Dose law: the fewest cells a fit is made with."""


def ols_r2(y, *xs) -> float:
    """R² of an ordinary least-squares fit of y on the regressors xs with an intercept."""
    y = np.asarray(y, float)
    X = np.column_stack([np.ones_like(y), *[np.asarray(x, float) for x in xs]])  # (N, 1 + k)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res, ss_tot = np.sum((y - X @ beta) ** 2), np.sum((y - y.mean()) ** 2)
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else np.nan


def spans_collapse_grid(cells: pd.DataFrame) -> bool:
    """Whether one setting's cells span a collapse grid: >= 3 distinct rhos and >= 2 taus."""
    if not (has_values(cells, "rho") and has_values(cells, "tau")):
        return False
    return cells["rho"].round(6).nunique() >= 3 and cells["tau"].round(6).nunique() >= 2


def collapse_grid(cells: pd.DataFrame) -> pd.DataFrame:
    """The non-fork cells of the settings that span a collapse grid (`spans_collapse_grid`)."""
    grids = [g for _, g in setting_groups(cells.loc[~is_fork(cells)]) if spans_collapse_grid(g)]
    return pd.concat(grids) if grids else cells.iloc[:0]


def collapse_r2(cells: pd.DataFrame) -> pd.DataFrame:
    """Per setting: OLS (with intercept, one point per counting cell) of ln T_grok on L_grok, on
    rho, and on both; columns n_cells, r2_L, r2_rho, r2_both, delta_r2 = r2_both - r2_L. Settings
    with fewer than 4 usable cells are left out."""
    need_rho(cells, "the collapse regression")
    c = counting_cells(cells)
    c = c.loc[np.isfinite(numeric(c["L_grok"])) & np.isfinite(numeric(c["rho"]))]
    rows = []
    for keys, g in setting_groups(c):
        if len(g) < 4:
            continue
        y, L, rho = np.log(numeric(g["T_grok"])), numeric(g["L_grok"]), numeric(g["rho"])
        r2_L, r2_rho, r2_both = ols_r2(y, L), ols_r2(y, rho), ols_r2(y, L, rho)
        rows.append({**keys, "n_cells": len(g), "r2_L": r2_L, "r2_rho": r2_rho,
                     "r2_both": r2_both, "delta_r2": r2_both - r2_L})
    return pd.DataFrame(rows)


def with_norm(cells: pd.DataFrame) -> pd.DataFrame:
    """Non-fork cells with a column W: ‖W‖ of the dose law, the cell's norm_target, or its median
    final weight_norm (W_final) when unclamped; cells with neither are left out."""
    c = cells.loc[~is_fork(cells)]
    W = numeric(c["norm_target"]) if "norm_target" in c.columns else np.full(len(c), np.nan)
    c = c.assign(W=np.where(np.isfinite(W), W, numeric(c["W_final"])))
    return c.loc[np.isfinite(c["W"].to_numpy())]


def dose_groups(cells: pd.DataFrame):
    """(keys, cells with W) per setting and tau that spans >= 3 distinct ‖W‖ (see `with_norm`)."""
    c = with_norm(cells)
    c = c.loc[per_setting(c.assign(W9=c["W"].round(9)), "W9", "nunique", extra=("tau",)).to_numpy() >= 3]
    if len(c):
        yield from setting_groups(c, extra=("tau",))    # only the settings that qualify: one grouped pass


def collapse_free_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """One setting's cells for the study's dose-law fit: its counting tau = 1 clamp cells (non-fork,
    one per rho) in ascending rho, cut before the first whose L at grok is more than COLLAPSE_JUMP x
    the previous cell's (the softmax-collapse onset), then rho <= DOSE_RHO_MAX. Column W: the median over
    grokked seeds of ‖W‖ at grok (W_grok) where known, else the cell's ‖W‖ of `with_norm`."""
    c = with_norm(counting_cells(cells))
    c = c.loc[match_value(c["tau"], 1.0) & np.isfinite(numeric(c["rho"]))] if has_values(c, "tau") else c.iloc[:0]
    if "layer_fracs" in c.columns:
        c = c.loc[c["layer_fracs"].isna().to_numpy()]
    c = c.sort_values("rho", kind="stable")
    L = numeric(c["L_grok"])
    cut = len(c)
    for i in range(1, len(c)):
        if L[i] > COLLAPSE_JUMP * L[i - 1]:
            cut = i
            break
    c = c.iloc[:cut]
    c = c.loc[numeric(c["rho"]) <= DOSE_RHO_MAX + ATOL]
    Wg = numeric(c["W_grok"]) if "W_grok" in c.columns else np.full(len(c), np.nan)
    return c.assign(W=np.where(np.isfinite(Wg), Wg, c["W"].to_numpy()))


def _fit_row(g: pd.DataFrame) -> dict:
    y, w = np.log(numeric(g["T_grok"])), g["W"].to_numpy(dtype="float64")
    X = np.column_stack([np.ones_like(w), w])  # (N, 2)
    (c0, alpha), *_ = np.linalg.lstsq(X, y, rcond=None)
    return {"n_cells": len(g), "W_min": float(w.min()), "W_max": float(w.max()), "c": float(c0),
            "alpha": float(alpha), "r2": ols_r2(y, w)}


def dose_law(cells: pd.DataFrame) -> pd.DataFrame:
    """Fits of ln T_grok = c + alpha * ‖W‖, two rows kinds (column `fit`):
    - "collapse-free": the study's fit, per setting, over `collapse_free_cells` (tau = 1, cut at the
      collapse onset, rho <= 1.15), made only with >= DOSE_MIN_CELLS cells;
    - "whole grid": per setting and tau, over every counting cell, ‖W‖ being the cell's norm_target, or
      its median final weight_norm (W_final) when unclamped; >= 3 distinct ‖W‖.
    Columns: the setting (and tau), fit, n_cells, W_min, W_max, c, alpha, r2."""
    rows = []
    if has_values(cells, "rho"):
        for keys, g in setting_groups(cells.loc[~is_fork(cells)]):
            free = collapse_free_cells(g)
            if len(free) >= DOSE_MIN_CELLS and free["W"].round(9).nunique() >= 2:
                rows.append({**keys, "tau": 1.0, "fit": "collapse-free", **_fit_row(free)})
    for keys, g in dose_groups(counting_cells(cells)):
        rows.append({**keys, "fit": "whole grid", **_fit_row(g)})
    return pd.DataFrame(rows)
