"""The mediation analysis: how much of a raised clamp dose's delay a lower logit scale L undoes.

For one setting, T0 is the median T_grok of the baseline cell (rho = 1, tau = 1) and T1 that of the
raised dose (rho_high, tau = 1); the tau sweep at rho_high maps each cell's L at grok to its median
T_grok, and T2 is that map read at the baseline's L0. recovery = (T1 - T2) / (T1 - T0), with a CI
from the paired bootstrap over seeds (`analysis.paired_bootstrap`, L held fixed). The conventions
(medians, L at grok, the bootstrap) are those of analysis.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.analysis.display import for_setting, format_value
from fastgrok.analysis.statistics import (ATOL, N_BOOT, nanmedian, need_rho, numeric, cell_table, has_values, is_fork,
                                          match_value, paired_bootstrap, per_setting, seed_matrix, setting_groups,
                                          varying_setting_cols)

STUDY_RHO_HIGH = 1.15
"""The study's raised dose: the mediation's rho_high when several doses have a tau sweep."""


def interp_t2(L0: float, L_sweep: np.ndarray, T_sweep: np.ndarray) -> float:
    """T2 = np.interp(L0, L, T) over the sweep's cells sorted by L ascending (cells with NaN T or L
    left out; np.interp holds the end values outside the range)."""
    L_sweep, T_sweep = np.asarray(L_sweep, float), np.asarray(T_sweep, float)
    ok = np.isfinite(L_sweep) & np.isfinite(T_sweep)
    if not ok.any() or not np.isfinite(L0):
        return np.nan
    order = np.argsort(L_sweep[ok], kind="stable")
    return float(np.interp(L0, L_sweep[ok][order], T_sweep[ok][order]))


def _cells_at(cells: pd.DataFrame, rho: float, tau: float) -> pd.DataFrame:
    return cells.loc[match_value(cells["rho"], rho) & match_value(cells["tau"], tau)]


def mediation_gap(cells: pd.DataFrame, *, rho_high: float = 1.15,
                  baseline: tuple[float, float] = (1.0, 1.0)) -> str | None:
    """What one setting's cells lack for `mediation`, in words; None when nothing. It needs exactly
    one baseline cell, exactly one (rho_high, tau = 1) cell and >= 2 cells at rho_high with an L at
    grok (fork arms are left out)."""
    if not has_values(cells, "rho"):
        return "no rho values (the clamp dose of each cell)"
    if not has_values(cells, "tau"):
        return "no tau values (the temperature of each cell)"
    cells = cells.loc[~is_fork(cells)]
    for what, (rho, tau) in (("baseline cell", baseline), ("T1 cell", (rho_high, 1.0))):
        n = len(_cells_at(cells, rho, tau))
        if n != 1:
            where = f"(rho, tau) = ({rho:g}, {tau:g})"
            return (f"no {what} {where}" if n == 0
                    else f"{n} cells with {where} (pass one setting at a time)")
    n_L = int((match_value(cells["rho"], rho_high) & np.isfinite(numeric(cells["L_grok"]))).sum())
    if n_L < 2:
        return (f"the tau sweep at rho = {rho_high:g} has {n_L} cell(s) with an L at grok "
                "(needs >= 2)")
    return None


def mediation(cells: pd.DataFrame, per_seed: pd.DataFrame, *, rho_high: float = 1.15,
              baseline: tuple[float, float] = (1.0, 1.0), n_boot: int = N_BOOT,
              seed: int = 0) -> dict:
    """Mediation for one setting: T0 (baseline cell), T1 (rho_high, tau=1), T2 and recovery.

    cells: a cell table (cell, rho, tau, L_grok) of one setting; per_seed: rows cell, seed,
    t_grok (e.g. the models table). Cells are identified by (rho, tau). The sweep is every cell at
    rho_high with a finite L_grok (tau = 1 included). T2 = np.interp(L0, L, T) over the sweep sorted
    by L; recovery = (T1 - T2) / (T1 - T0); CI from the paired bootstrap (L held fixed).
    """
    need_rho(cells, "mediation")
    cells = cells.loc[~is_fork(cells)]
    gap = mediation_gap(cells, rho_high=rho_high, baseline=baseline)
    if gap:
        have = sorted(set(zip(numeric(cells["rho"]).round(4), numeric(cells["tau"]).round(4))))
        raise ValueError(f"mediation: {gap}; (rho, tau) present: {have}")
    base = _cells_at(cells, *baseline).iloc[0]
    high = _cells_at(cells, rho_high, 1.0).iloc[0]
    sweep = cells.loc[match_value(cells["rho"], rho_high) & np.isfinite(numeric(cells["L_grok"]))]
    sweep = sweep.sort_values("L_grok", kind="stable")
    ids = [base["cell"], high["cell"], *sweep["cell"]]
    T, seeds = seed_matrix(per_seed, ids)          # (K, S), rows: baseline, T1 cell, sweep...
    L0, L_sweep = float(base["L_grok"]), numeric(sweep["L_grok"])

    def recovery(med: np.ndarray) -> float:
        t0, t1, t2 = med[0], med[1], interp_t2(L0, L_sweep, med[2:])
        return (t1 - t2) / (t1 - t0) if t1 != t0 else np.nan

    med = nanmedian(T, axis=1)
    rec, lo, hi, samples = paired_bootstrap(T, recovery, n_boot=n_boot, seed=seed)
    counted = cells.set_index("cell").loc[ids, "counts"].astype(bool)
    return dict(rho_high=rho_high, L0=L0, L1=float(high["L_grok"]), T0=float(med[0]),
                T1=float(med[1]), T2=interp_t2(L0, L_sweep, med[2:]), recovery=rec, ci_low=lo,
                ci_high=hi, n_sweep=len(sweep), n_seeds=len(seeds),
                extrapolated=bool(L0 < L_sweep.min() or L0 > L_sweep.max()),
                all_count=bool(counted.all()), n_boot_ok=int(np.isfinite(samples).sum()))


def mediation_table(cells: pd.DataFrame, per_seed: pd.DataFrame, *, rho_high: float = 1.15,
                    baseline: tuple[float, float] = (1.0, 1.0), n_boot: int = N_BOOT,
                    seed: int = 0) -> pd.DataFrame:
    """`mediation` for every setting that has what it needs (see `mediation_gap`); one row per
    setting (empty if none has)."""
    need_rho(cells, "mediation")
    rows = []
    for keys, g in setting_groups(cells.loc[~is_fork(cells)]):
        if mediation_gap(g, rho_high=rho_high, baseline=baseline) is None:
            rows.append({**keys, **mediation(g, per_seed, rho_high=rho_high, baseline=baseline,
                                             n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)


def mediation_gaps(cells: pd.DataFrame, *, rho_high: float = 1.15,
                   baseline: tuple[float, float] = (1.0, 1.0)) -> list[tuple[dict, str]]:
    """(setting keys, what it lacks) for each setting that `mediation_table` leaves out."""
    gaps = [(keys, mediation_gap(g, rho_high=rho_high, baseline=baseline))
            for keys, g in setting_groups(cells.loc[~is_fork(cells)])]
    return [(keys, gap) for keys, gap in gaps if gap is not None]


def tau_sweep_rhos(cells: pd.DataFrame, *, baseline_rho: float = 1.0) -> list[float]:
    """The rho values above baseline_rho at which some setting has a tau sweep: >= 2 distinct taus
    among its non-fork cells at that rho, tau = 1 among them. Sorted ascending."""
    if "rho" not in cells.columns or "tau" not in cells.columns:
        return []
    found = set()
    for _, g in setting_groups(cells.loc[~is_fork(cells)]):
        rho = numeric(g["rho"])
        for r in np.unique(rho[np.isfinite(rho) & (rho > baseline_rho + ATOL)].round(6)):
            taus = numeric(g.loc[match_value(g["rho"], r), "tau"])
            taus = np.unique(taus[np.isfinite(taus)].round(6))
            if taus.size >= 2 and np.isclose(taus, 1.0, rtol=0.0, atol=ATOL).any():
                found.add(float(r))
    return sorted(found)


def pick_rho_high(rhos) -> float | None:
    """The mediation's raised dose among candidate rhos (see `tau_sweep_rhos`): the only one; of
    several, the study's 1.15 if present, else the largest; None when there is none."""
    rhos = sorted(float(r) for r in rhos)
    if not rhos:
        return None
    if len(rhos) > 1 and np.isclose(rhos, STUDY_RHO_HIGH, rtol=0.0, atol=ATOL).any():
        return STUDY_RHO_HIGH
    return rhos[-1]


def mediation_from_run(models: pd.DataFrame, curves: pd.DataFrame, rho_high: float = 1.15,
                       baseline: tuple[float, float] = (1.0, 1.0), *, n_boot: int = N_BOOT,
                       seed: int = 0) -> pd.DataFrame:
    """Cell table + `mediation_table` straight from a run's models and curves."""
    return mediation_table(cell_table(models, curves), models, rho_high=rho_high,
                           baseline=baseline, n_boot=n_boot, seed=seed)


# ---------------------------------------------------------------------------------------------
# Which rho_high, and the notes the report gives with the mediation table
# ---------------------------------------------------------------------------------------------
def several_taus(cells: pd.DataFrame) -> bool:
    """Whether the cells have more than one tau."""
    return "tau" in cells.columns and cells["tau"].nunique() > 1


def some_setting_sweeps_tau(cells: pd.DataFrame) -> bool:
    """Whether some setting's non-fork cells have several taus: a tau sweep was attempted."""
    plain = cells.loc[~is_fork(cells)]
    return "tau" in plain.columns and bool((per_setting(plain, "tau", "nunique") > 1).any())


def choose_rho_high(cells: pd.DataFrame, *, baseline_rho: float = 1.0) -> tuple[float | None, str | None]:
    """The mediation's raised dose picked from the cells (`tau_sweep_rhos`, `pick_rho_high`) and
    a note when the choice needs one: none to pick (the mediation is skipped) or several."""
    rhos = tau_sweep_rhos(cells, baseline_rho=baseline_rho)
    rho_high = pick_rho_high(rhos)
    if rho_high is None:
        return None, (f"Mediation skipped: no rho above the baseline's ({format_value(baseline_rho)}) "
                      "has a tau sweep (>= 2 taus, tau = 1 among them).")
    if len(rhos) > 1:
        return rho_high, (f"Mediation at rho_high = {format_value(rho_high)}, chosen among the rhos "
                          f"with a tau sweep ({', '.join(format_value(r) for r in rhos)}): the "
                          f"study's {format_value(STUDY_RHO_HIGH)} if present, else the largest; "
                          "analyze_dir(rho_high=...) picks another.")
    return rho_high, None


def mediation_caution_notes(med: pd.DataFrame, cells: pd.DataFrame, *, n_boot: int) -> list[str]:
    """Notes on mediation rows to read with care: a cell in it that does not count (a minority of its
    seeds grokked: its median is over those few), L0 outside the sweep's L (T2 extrapolated), bootstrap
    resamples without a recovery (T1 = T0 in them, or no grokked seed in a cell)."""
    names = varying_setting_cols(cells.loc[~is_fork(cells)])
    notes = []
    for _, r in med.iterrows():
        where = for_setting(r.to_dict(), names)
        if not r["all_count"]:
            notes.append(f"Mediation{where}: some of its cells do not count (a minority of their seeds "
                         "grokked); their median T_grok is over the seeds that did, so read the recovery "
                         "with care.")
        if r["extrapolated"]:
            notes.append(f"Mediation{where}: the baseline's L0 = {format_value(r['L0'])} lies outside the "
                         "sweep's L, so T2 is the sweep's end value (np.interp does not extrapolate).")
        T0, T1 = r.get("T0"), r.get("T1")
        for T, v, cell in (("T0", T0, "baseline ρ = 1, τ = 1"), ("T1", T1, f"ρ = {format_value(r.get('rho_high'))}, τ = 1")):
            if "T0" in r and pd.isna(v):
                notes.append(f"Mediation{where}: no recovery, {T} is missing: no seed of the {cell} cell "
                             "grokked within its budget.")
        if "T0" in r and not pd.isna(T0) and not pd.isna(T1) and T1 == T0:
            notes.append(f"Mediation{where}: no recovery: T1 = T0 (no delay to recover).")
        if r["n_boot_ok"] < n_boot:
            notes.append(f"Mediation{where}: {n_boot - int(r['n_boot_ok'])} of {n_boot} bootstrap resamples "
                         "gave no recovery and are left out of the CI.")
    return notes


def mediation_skip_notes(cells: pd.DataFrame, *, rho_high: float, baseline=(1.0, 1.0),
                         only_swept: bool = False) -> list[str]:
    """One note per setting the mediation table leaves out, saying what it lacks (the setting named
    by `for_setting`). only_swept: only for the settings with several taus (where a sweep was attempted)."""
    plain = cells.loc[~is_fork(cells)]
    names = varying_setting_cols(plain)
    notes = []
    for keys, g in setting_groups(plain):
        if only_swept and not several_taus(g):
            continue
        gap = mediation_gap(g, rho_high=rho_high, baseline=baseline)
        if gap is not None:
            notes.append(f"Mediation skipped{for_setting(keys, names)}: {gap}.")
    return notes
