"""How a result's numbers and tables are shown, in report.md and in the terminal alike: the sections
(`TABLES`), the one function every printed number goes through (`format_value`) and a table's split
into the columns shown and those constant in every row (`display_table`).

A module below report.py, figures.py and terminal.py, so that each of them formats the same way
without importing another.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.config import AXIS_ADDED_DEFAULTS

TABLES = (("calibration", "Clamp calibration: w_c per setting"), ("cells", "Cells"),
          ("mediation", "Mediation: τ sweep at ρ_high"),
          ("collapse", "Collapse grid: ln T_grok on L and ρ"), ("dose_law", "Dose law: ln T = c + α‖W‖"),
          ("memorization", "Memorization control"),
          ("phase", "Phase diagrams: comprehension, grokking, memorization, confusion"),
          ("interventions", "Interventions side by side"),
          ("claims", "The papers' claims, each in its own regime: do they reproduce?"),
          ("forks", "Same-state forks"))
"""Result keys that hold tables, in report order, with their section titles."""


def format_value(x) -> str:
    """Integers (and integral floats) plainly, |x| >= 100 with one decimal, else 4 significant
    digits; bools yes/no; missing values as an em dash."""
    if x is None or x is pd.NA or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if np.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == round(x) and abs(x) < 1e15:
            return str(int(round(x)))
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"
    return str(x)


def display_table(df: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Split a table for display: a per-model setting added since the study (config.AXIS_ADDED_DEFAULTS:
    init_scale, the optimizers' knobs, label noise, ...) at its default in every row is left out (the
    report of a study-like run reads as before they existed; docs/analysis.md says so); with several rows,
    columns null in every row are left out (they say nothing, e.g. `arm` outside a fork experiment),
    columns holding one value in every row move to a constants dict; the rest is shown as is."""
    drop = [c for c in df.columns if c in AXIS_ADDED_DEFAULTS and _at_default(df[c], AXIS_ADDED_DEFAULTS[c])]
    if drop:
        df = df.drop(columns=drop)
    if len(df) <= 1:
        return {}, df
    consts, shown = {}, []
    for c in df.columns:
        col = df[c]
        if col.isna().all():
            continue
        if col.notna().all() and col.nunique() == 1:
            consts[c] = col.iloc[0]
        else:
            shown.append(c)
    return consts, df[shown]


def _at_default(col: pd.Series, default) -> bool:
    if default is None:
        return bool(col.isna().all())
    return bool(col.notna().all() and (col == default).all())


def for_setting(keys: dict, names: list[str]) -> str:
    """" for k=v, ..." naming a setting by the columns `names` (from `statistics.varying_setting_cols`); empty
    when none varies (the run has one setting)."""
    text = ", ".join(f"{k}={format_value(keys[k])}" for k in names if k in keys)
    return f" for {text}" if text else ""
