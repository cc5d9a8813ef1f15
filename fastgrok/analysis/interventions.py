"""The interventions analysis: the field's arms (StableMax, ⊥Grad, Grokfast, weight decay, the
clamp) side by side, one row per cell with its arm named from the columns that vary across the run; and,
per regime (a spec block's `regime`: one paper's setting), whether each paper's claim reproduces against
its baseline and its lr-matched control (CLAIMS).

A module of its own, apart from phases.py (see there).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.analysis.statistics import numeric, is_fork
from fastgrok.config import LOSS_INFO

INTERVENTION_COLS = ("regime", "loss", "wd", "lr", "rho", "orthograd", "grokfast_lambda")
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
        if c == "regime":
            parts.append(str(v) if isinstance(v, str) else "")
        elif c == "loss":
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


# ---------------------------------------------------------------------------------------------
# Claims: each paper's claim, in its own regime, against that regime's baseline and lr-matched control
# ---------------------------------------------------------------------------------------------
def intervention_of(row: pd.Series) -> str | None:
    """Which of the papers' interventions a cell runs: "stablemax", "orthograd", "grokfast" or None."""
    if row.get("loss") == "stablemax":
        return "stablemax"
    if bool(row.get("orthograd")) and not pd.isna(row.get("orthograd")):
        return "orthograd"
    lam = row.get("grokfast_lambda")
    if lam is not None and not pd.isna(lam) and float(lam) > 0:
        return "grokfast"
    return None


CLAIMS = {
    "stablemax": ("Prieto et al. 2025", "StableMax groks without weight decay where softmax CE does not "
                  "(softmax collapse)", "most StableMax seeds grok and no baseline seed does"),
    "orthograd": ("Prieto et al. 2025", "⊥Grad groks without weight decay, sooner than the baseline",
                  "most ⊥Grad seeds grok, and its median T_grok is below the baseline's"),
    "grokfast": ("Lee et al. 2024", "Grokfast-EMA groks at least 3x sooner than the baseline, and sooner "
                 "than an lr-matched baseline (not only a larger step)",
                 "baseline median T_grok >= 3x Grokfast's, and the lr-matched control's above Grokfast's"),
}
"""Per intervention: the paper, its claim in words, and the test applied here (seeds that never grok count
as later than their budget: a median over seeds is then a lower bound)."""

LR_MATCH = 1.40
"""The lr-matched control's lr over the intervention's: Grokfast-EMA's step under Adam measured 1.40x the
plain one (benchmarks/grokfast_adam.py); the control is the plain cell of the regime nearest that lr."""

GROKFAST_FACTOR = 3.0
"""Lee et al.'s speed-up as tested here: the issue's "the baseline takes at least 3x longer"."""


def median_t_grok(models: pd.DataFrame) -> tuple[float, bool]:
    """Median T_grok over a cell's seeds with the ungrokked at +inf, and whether it is a lower bound
    (then: the budget)."""
    t = numeric(models["t_grok"]).astype(float)
    med = float(np.median(np.where(t >= 0, t, np.inf)))          # NaN or negative: never grokked
    if med == float("inf"):
        return float(numeric(models["budget"]).max()), True
    return med, False


def n_grokked(models: pd.DataFrame) -> int:
    return int((numeric(models["t_grok"]) >= 0).sum())


def _fmt(t: tuple[float, bool]) -> str:
    return f"> {t[0]:,.0f}" if t[1] else f"{t[0]:,.0f}"


def claims_table(models: pd.DataFrame) -> pd.DataFrame:
    """One row per intervention cell of a run with regimes: its regime, paper and claim, the measured
    medians (intervention, baseline, lr-matched control) and whether the claim reproduces (yes / no /
    undetermined when the cell needed for the test is missing). Empty without a `regime` column.

    Within a regime, the baseline is the cell without an intervention at the intervention's lr (and its
    wd, loss other than StableMax's own); the lr-matched control, a cell without an intervention at another
    lr, the one nearest LR_MATCH x the intervention's."""
    if "regime" not in models or not models["regime"].notna().any():
        return pd.DataFrame()
    rows = []
    keys = ["cell", "regime", "loss", "lr", "wd", "orthograd", "grokfast_lambda"]
    cells = models.drop_duplicates("cell")[[k for k in keys if k in models]].reset_index(drop=True)
    cells["kind"] = [intervention_of(r) for _, r in cells.iterrows()]
    by_cell = dict(tuple(models.groupby("cell")))
    for regime, grp in cells.groupby("regime", sort=False):
        plain = grp.loc[grp["kind"].isna()]
        for _, c in grp.loc[grp["kind"].notna()].iterrows():
            kind = c["kind"]
            paper, claim, test = CLAIMS[kind]
            same_lr = plain.loc[(plain["lr"] == c["lr"]) & (plain["wd"] == c["wd"])]
            base = same_lr.loc[same_lr["loss"] == ("ce" if kind == "stablemax" else c["loss"])]
            other = plain.loc[(plain["lr"] != c["lr"]) & (plain["wd"] == c["wd"]) & (plain["loss"] == c["loss"])]
            mine = by_cell[c["cell"]]
            t_i = median_t_grok(mine)
            row = {"regime": regime, "paper": paper, "claim": claim, "test": test, "cell": int(c["cell"]),
                   "grokked": f"{n_grokked(mine)}/{len(mine)}", "T_grok": _fmt(t_i)}
            t_b = t_o = None
            if len(base):
                b = by_cell[base.iloc[0]["cell"]]
                t_b = median_t_grok(b)
                row.update(baseline_grokked=f"{n_grokked(b)}/{len(b)}",
                           baseline_T_grok=_fmt(t_b))
            if len(other):
                near = (np.log(other["lr"].astype(float) / (LR_MATCH * float(c["lr"])))).abs().idxmin()
                t_o = median_t_grok(by_cell[other.loc[near, "cell"]])
                row.update(control_lr=float(other.loc[near, "lr"]), control_T_grok=_fmt(t_o))
            verdict = claim_verdict(kind, n_grokked(mine), len(mine), t_i, t_b, t_o)
            row["reproduces"] = verdict
            rows.append(row)
    return pd.DataFrame(rows)


def claim_verdict(kind: str, n_grokked: int, n: int, t_i: tuple, t_b: tuple | None, t_o: tuple | None) -> str:
    """"yes", "no" or "undetermined: why" for one intervention cell: n_grokked of its n seeds grokked, median
    T_grok t_i, its baseline's t_b and lr-matched control's t_o ((median, is a lower bound) or None)."""
    if t_b is None:
        return "undetermined: no baseline cell in this regime"
    if n_grokked <= n / 2 or t_i[1]:
        return "no"
    if kind == "stablemax":
        return "yes" if t_b[1] else "no"
    if kind == "orthograd":
        return "yes" if t_b[1] or t_b[0] > t_i[0] else "no"
    if t_b[0] < GROKFAST_FACTOR * t_i[0]:
        return ("undetermined: the baseline had not grokked by its budget, under "
                f"{GROKFAST_FACTOR:g}x Grokfast's T_grok") if t_b[1] else "no"
    if t_o is None:
        return "undetermined: no lr-matched control in this regime"
    return "yes" if t_o[1] or t_o[0] > t_i[0] else "no"
