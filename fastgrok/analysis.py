"""Statistics on a run directory: the study's numbers from per-seed results.

Pure functions on pandas DataFrames and numpy arrays; no plotting (figures live in `report.py`).
The inputs follow the run-directory schema the trainer writes:

    models.parquet  one row per model: model, cell, seed, tau, norm_target, rho, t_mem, t_grok,
                    logit_scale_at_grok, sc_rate, train_acc, test_acc, weight_norm, diverged, steps,
                    and for grid runs the setting columns (experiment, p, op, arch, loss, ...).
    curves.parquet  long format: model, step, metric, value.

The study's conventions (see paper-notes):
- A cell's T_grok (T_mem) is the median over the seeds that reached it; a cell *counts* when at
  least half of its seeds grokked (n_grokked >= 0.5 n). Delay = median T_grok - median T_mem.
- A cell's L at a step is the mean over its models of `logit_scale` at that step; its L at grok
  (`L_grok`) is L at the logged step nearest its median T_grok (the earlier step on a tie).
- Bootstrap CIs resample seeds with `rng = np.random.default_rng(0)`, one `rng.integers(0, S, S)`
  per resample, the same indices applied to every cell (seeds paired by seed id); medians are
  recomputed, L values are held fixed; the CI is the 2.5 and 97.5 percentiles.

Analyses over several cells run once per *setting* (the SETTING_COLS present, e.g. one per p).
Axis letters: K cells, S seeds, B bootstrap resamples.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SETTING_COLS = ("experiment", "p", "op", "arch", "loss", "lr", "wd", "train_frac", "init_scale", "orthograd",
                "grokfast_alpha", "grokfast_lambda", "dtype")
"""Columns that define a setting; multi-cell analyses run once per distinct combination."""
CELL_COLS = SETTING_COLS + ("arm", "fork_step", "rho", "tau", "norm_target", "layer_fracs")
"""Columns that describe a cell (layer_fracs: the per-matrix clamp shares, e.g. "0.4,0.5,0.1");
copied into the cell table when some model has a value in them."""
N_BOOT = 4000
"""Bootstrap resamples, as in the study."""
ATOL = 1e-6
"""Tolerance when matching a cell's rho or tau to a requested value."""
STUDY_RHO_HIGH = 1.15
"""The study's raised dose: the mediation's rho_high when several doses have a tau sweep."""
COLLAPSE_JUMP = 2.5
"""Dose law: the collapse onset is the first cell (ascending rho) whose L at grok exceeds this many
times the previous cell's."""
DOSE_RHO_MAX = 1.15
"""Dose law: the study's collapse-free fit keeps rho <= this."""
DOSE_MIN_CELLS = 3
"""Dose law: the fewest cells a fit is made with."""


# ---------------------------------------------------------------------------------------------
# Loading and small helpers
# ---------------------------------------------------------------------------------------------
def load_run(run_dir) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read `models.parquet`, `curves.parquet` (optional) and `config.json` (optional) of a run."""
    d = Path(run_dir)
    if not (d / "models.parquet").exists():
        raise FileNotFoundError(f"{d} has no models.parquet; is it a fastgrok run directory?")
    models = pd.read_parquet(d / "models.parquet")
    curves = (pd.read_parquet(d / "curves.parquet") if (d / "curves.parquet").exists()
              else pd.DataFrame({"model": [], "step": [], "metric": [], "value": []}))
    config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    check_models(models)
    return models, curves, config


def check_models(models: pd.DataFrame) -> None:
    """Raise ValueError if the columns every analysis relies on are missing or inconsistent."""
    missing = [c for c in ("model", "cell", "seed", "t_mem", "t_grok") if c not in models.columns]
    if missing:
        raise ValueError(f"models table lacks column(s) {missing}")
    if models.empty:
        raise ValueError("models table has no rows")
    if models["model"].duplicated().any():
        raise ValueError("model ids repeat in the models table; curves are keyed by model, so the "
                         "ids must be unique within a run directory")
    if models[["cell", "seed"]].duplicated().any():
        raise ValueError("a (cell, seed) pair occurs twice in the models table")


def _num(s: pd.Series) -> np.ndarray:
    """A column as float64 with NaN for nulls (handles nullable Int64)."""
    return pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()


def _nanmedian(x: np.ndarray, axis=None):
    """np.nanmedian without the all-NaN warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def _nanmean(x: np.ndarray, axis=None):
    """np.nanmean without the empty-slice warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _cell_value(s: pd.Series):
    """One value for a describing column over a cell's seeds: the shared value, else the median."""
    v = s.dropna()
    if v.empty:
        return np.nan
    if (v == v.iloc[0]).all():
        return v.iloc[0]
    return float(np.median(_num(v))) if pd.api.types.is_numeric_dtype(v) else v.iloc[0]


def is_fork(df: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows that belong to a same-state fork arm (non-null `arm`)."""
    return df["arm"].notna().to_numpy() if "arm" in df.columns else np.zeros(len(df), bool)


def setting_groups(df: pd.DataFrame, extra: tuple[str, ...] = ()):
    """Yield (keys dict, sub-frame) per setting (SETTING_COLS + extra present in df)."""
    keys = [c for c in (*SETTING_COLS, *extra) if c in df.columns]
    if not keys:
        yield {}, df
        return
    for vals, g in df.groupby(keys, dropna=False, sort=True):
        vals = vals if isinstance(vals, tuple) else (vals,)
        yield dict(zip(keys, vals)), g


def match_value(values: pd.Series, x: float) -> np.ndarray:
    """Boolean mask of values equal to x within ATOL (NaN never matches)."""
    return np.isclose(_num(values), x, rtol=0.0, atol=ATOL)


def has_values(df: pd.DataFrame, col: str) -> bool:
    """Whether df has the column `col` with a non-null value in some row."""
    return col in df.columns and bool(df[col].notna().any())


def _need_rho(cells: pd.DataFrame, what: str) -> None:
    if not has_values(cells, "rho"):
        raise ValueError(f"{what} needs each cell's clamp dose rho (column 'rho', target = rho * "
                         "w_c); this run has no rho values")


# ---------------------------------------------------------------------------------------------
# Per-cell table
# ---------------------------------------------------------------------------------------------
def cell_logit_scale(models: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """A cell's L per logged step: mean over its models of `logit_scale`. Columns cell, step, L."""
    lc = curves.loc[curves["metric"] == "logit_scale", ["model", "step", "value"]]
    lc = lc.merge(models[["model", "cell"]], on="model")
    out = lc.groupby(["cell", "step"], as_index=False)["value"].mean()
    return out.rename(columns={"value": "L"})


def nearest_step_value(steps, values, t: float) -> float:
    """values at the step nearest t (the earlier step on a tie); NaN if t is NaN or no steps."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if not np.isfinite(t) or steps.size == 0:
        return np.nan
    order = np.argsort(steps, kind="stable")
    i = int(np.argmin(np.abs(steps[order] - t)))  # argmin takes the first, i.e. the earlier, tie
    return float(values[order][i])


def cell_curves(models: pd.DataFrame, curves: pd.DataFrame,
                metrics=("train_acc", "test_acc")) -> pd.DataFrame:
    """Per-cell mean over seeds of each metric per step. Columns cell, metric, step, value."""
    c = curves.loc[curves["metric"].isin(list(metrics)), ["model", "step", "metric", "value"]]
    c = c.merge(models[["model", "cell"]], on="model")
    return c.groupby(["cell", "metric", "step"], as_index=False)["value"].mean()


def cell_table(models: pd.DataFrame, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per cell: describing columns, n_seeds, n_grokked, n_diverged, counts, T_mem,
    T_grok, delay, L_grok, sc_rate (mean final), W_final (median final ‖W‖) and W_grok (median
    over grokked seeds of ‖W‖ at their T_grok: w_c when the cell is a free control)."""
    check_models(models)
    desc = [c for c in CELL_COLS if has_values(models, c)]
    rows = []
    for cell, g in models.groupby("cell", sort=True):
        tg, tm = _num(g["t_grok"]), _num(g["t_mem"])
        n, n_grok = len(g), int(np.isfinite(tg).sum())
        row = {"cell": cell, **{c: _cell_value(g[c]) for c in desc}}
        row.update(
            n_seeds=n, n_grokked=n_grok,
            n_diverged=int(np.nansum(_num(g["diverged"]))) if "diverged" in g else 0,
            counts=bool(2 * n_grok >= n),                       # the study's n_grokked >= 0.5 n
            T_mem=float(_nanmedian(tm)), T_grok=float(_nanmedian(tg)))
        row["delay"] = row["T_grok"] - row["T_mem"]
        row["sc_rate"] = float(_nanmean(_num(g["sc_rate"]))) if "sc_rate" in g and n else np.nan
        if "test_loss" in g:                                    # runs from before it have none
            row["test_loss"] = float(_nanmedian(_num(g["test_loss"])))
        row["W_final"] = float(_nanmedian(_num(g["weight_norm"]))) if "weight_norm" in g else np.nan
        rows.append(row)
    cells = pd.DataFrame(rows)
    cells["L_grok"], cells["W_grok"] = np.nan, np.nan
    tail = ["sc_rate", *(["test_loss"] if "test_loss" in cells else []), "W_final", "W_grok"]
    order = [c for c in cells.columns if c not in tail] + tail
    if curves is None or curves.empty:
        return cells[order]

    # L at grok: the cell's L at the logged step nearest its median T_grok.
    L = cell_logit_scale(models, curves)
    by_cell = {c: g for c, g in L.groupby("cell")}
    cells["L_grok"] = [
        nearest_step_value(by_cell[c]["step"], by_cell[c]["L"], t) if c in by_cell else np.nan
        for c, t in zip(cells["cell"], cells["T_grok"])]

    # ‖W‖ at each grokked seed's own T_grok (an evaluation step, so an exact match).
    w = curves.loc[curves["metric"] == "weight_norm", ["model", "step", "value"]]
    at = models[["model", "cell"]].assign(step=_num(models["t_grok"])).dropna(subset=["step"])
    at = at.merge(w.assign(step=w["step"].astype("float64")), on=["model", "step"])
    wg = at.groupby("cell")["value"].median()
    cells["W_grok"] = cells["cell"].map(wg).astype("float64")
    return cells[order]


def memorization_table(cells: pd.DataFrame) -> pd.DataFrame:
    """T_mem and delay beside T_grok per (non-fork) cell: does tau move T_grok but not T_mem?"""
    c = cells.loc[~is_fork(cells)]
    keys = [k for k in (*SETTING_COLS, "rho", "norm_target", "layer_fracs", "tau") if k in c.columns]
    cols = ["cell", *keys, "n_seeds", "n_grokked", "counts", "T_mem", "T_grok", "delay"]
    return c.sort_values(keys or "cell")[cols].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Paired bootstrap over seeds
# ---------------------------------------------------------------------------------------------
def seed_matrix(models: pd.DataFrame, cell_ids, col: str = "t_grok") -> tuple[np.ndarray, np.ndarray]:
    """(K, S) matrix of `col` for the given cells (rows, in order) and the sorted union of their
    seed ids (columns); NaN where a seed did not reach it or is absent from a cell."""
    sub = models.loc[models["cell"].isin(list(cell_ids)), ["cell", "seed"]].assign(v=_num(
        models.loc[models["cell"].isin(list(cell_ids)), col]))
    wide = sub.pivot(index="cell", columns="seed", values="v").reindex(list(cell_ids))
    wide = wide.reindex(columns=sorted(wide.columns))
    return wide.to_numpy(dtype="float64"), wide.columns.to_numpy()


def paired_bootstrap(T: np.ndarray, stat: Callable[[np.ndarray], float], *, n_boot: int = N_BOOT,
                     seed: int = 0) -> tuple[float, float, float, np.ndarray]:
    """Point estimate and 95% CI of stat(per-cell medians) under the study's paired bootstrap.

    T is (K, S): per-seed values (NaN = never reached) with seeds aligned across cells. Each
    resample draws idx = rng.integers(0, S, S) (one call per resample, as the study does), applies it
    to every cell, and recomputes each cell's nanmedian. Returns (point, lo, hi, samples (B,));
    lo/hi are the 2.5/97.5 percentiles over the finite samples.
    """
    T = np.asarray(T, dtype="float64")
    K, S = T.shape
    point = float(stat(_nanmedian(T, axis=1)))
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, S, S) for _ in range(n_boot)])  # (B, S)
    med = _nanmedian(T[:, idx], axis=2)                              # (K, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.array([stat(med[:, b]) for b in range(n_boot)], dtype="float64")
    ok = samples[np.isfinite(samples)]
    lo, hi = np.percentile(ok, [2.5, 97.5]) if ok.size else (np.nan, np.nan)
    return point, float(lo), float(hi), samples


# ---------------------------------------------------------------------------------------------
# Mediation (tau sweep at rho_high)
# ---------------------------------------------------------------------------------------------
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
    n_L = int((match_value(cells["rho"], rho_high) & np.isfinite(_num(cells["L_grok"]))).sum())
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
    _need_rho(cells, "mediation")
    cells = cells.loc[~is_fork(cells)]
    gap = mediation_gap(cells, rho_high=rho_high, baseline=baseline)
    if gap:
        have = sorted(set(zip(_num(cells["rho"]).round(4), _num(cells["tau"]).round(4))))
        raise ValueError(f"mediation: {gap}; (rho, tau) present: {have}")
    base = _cells_at(cells, *baseline).iloc[0]
    high = _cells_at(cells, rho_high, 1.0).iloc[0]
    sweep = cells.loc[match_value(cells["rho"], rho_high) & np.isfinite(_num(cells["L_grok"]))]
    sweep = sweep.sort_values("L_grok", kind="stable")
    ids = [base["cell"], high["cell"], *sweep["cell"]]
    T, seeds = seed_matrix(per_seed, ids)          # (K, S), rows: baseline, T1 cell, sweep...
    L0, L_sweep = float(base["L_grok"]), _num(sweep["L_grok"])

    def recovery(med: np.ndarray) -> float:
        t0, t1, t2 = med[0], med[1], interp_t2(L0, L_sweep, med[2:])
        return (t1 - t2) / (t1 - t0) if t1 != t0 else np.nan

    med = _nanmedian(T, axis=1)
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
    _need_rho(cells, "mediation")
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
        rho = _num(g["rho"])
        for r in np.unique(rho[np.isfinite(rho) & (rho > baseline_rho + ATOL)].round(6)):
            taus = _num(g.loc[match_value(g["rho"], r), "tau"])
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
# Regressions: collapse grid and dose law
# ---------------------------------------------------------------------------------------------
def ols_r2(y, *xs) -> float:
    """R² of an ordinary least-squares fit of y on the regressors xs with an intercept."""
    y = np.asarray(y, float)
    X = np.column_stack([np.ones_like(y), *[np.asarray(x, float) for x in xs]])  # (N, 1 + k)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res, ss_tot = np.sum((y - X @ beta) ** 2), np.sum((y - y.mean()) ** 2)
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else np.nan


def counting_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Non-fork cells that count (at least half their seeds grokked) with a positive T_grok."""
    c = cells.loc[~is_fork(cells) & cells["counts"].astype(bool).to_numpy()]
    return c.loc[_num(c["T_grok"]) > 0]


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
    _need_rho(cells, "the collapse regression")
    c = counting_cells(cells)
    c = c.loc[np.isfinite(_num(c["L_grok"])) & np.isfinite(_num(c["rho"]))]
    rows = []
    for keys, g in setting_groups(c):
        if len(g) < 4:
            continue
        y, L, rho = np.log(_num(g["T_grok"])), _num(g["L_grok"]), _num(g["rho"])
        r2_L, r2_rho, r2_both = ols_r2(y, L), ols_r2(y, rho), ols_r2(y, L, rho)
        rows.append({**keys, "n_cells": len(g), "r2_L": r2_L, "r2_rho": r2_rho,
                     "r2_both": r2_both, "delta_r2": r2_both - r2_L})
    return pd.DataFrame(rows)


def with_norm(cells: pd.DataFrame) -> pd.DataFrame:
    """Non-fork cells with a column W: ‖W‖ of the dose law, the cell's norm_target, or its median
    final weight_norm (W_final) when unclamped; cells with neither are left out."""
    c = cells.loc[~is_fork(cells)]
    W = _num(c["norm_target"]) if "norm_target" in c.columns else np.full(len(c), np.nan)
    c = c.assign(W=np.where(np.isfinite(W), W, _num(c["W_final"])))
    return c.loc[np.isfinite(c["W"].to_numpy())]


def dose_groups(cells: pd.DataFrame):
    """(keys, cells with W) per setting and tau that spans >= 3 distinct ‖W‖ (see `with_norm`)."""
    for keys, g in setting_groups(with_norm(cells), extra=("tau",)):
        if g["W"].round(9).nunique() >= 3:
            yield keys, g


def collapse_free_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """One setting's cells for the study's dose-law fit: its counting tau = 1 clamp cells (non-fork,
    one per rho) in ascending rho, cut before the first whose L at grok is more than COLLAPSE_JUMP x
    the previous cell's (the softmax-collapse onset), then rho <= DOSE_RHO_MAX. Column W: the median over
    grokked seeds of ‖W‖ at grok (W_grok) where known, else the cell's ‖W‖ of `with_norm`."""
    c = with_norm(counting_cells(cells))
    c = c.loc[match_value(c["tau"], 1.0) & np.isfinite(_num(c["rho"]))] if has_values(c, "tau") else c.iloc[:0]
    if "layer_fracs" in c.columns:
        c = c.loc[c["layer_fracs"].isna().to_numpy()]
    c = c.sort_values("rho", kind="stable")
    L = _num(c["L_grok"])
    cut = len(c)
    for i in range(1, len(c)):
        if L[i] > COLLAPSE_JUMP * L[i - 1]:
            cut = i
            break
    c = c.iloc[:cut]
    c = c.loc[_num(c["rho"]) <= DOSE_RHO_MAX + ATOL]
    Wg = _num(c["W_grok"]) if "W_grok" in c.columns else np.full(len(c), np.nan)
    return c.assign(W=np.where(np.isfinite(Wg), Wg, c["W"].to_numpy()))


def _fit_row(g: pd.DataFrame) -> dict:
    y, w = np.log(_num(g["T_grok"])), g["W"].to_numpy(dtype="float64")
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


# ---------------------------------------------------------------------------------------------
# Same-state forks
# ---------------------------------------------------------------------------------------------
def fork_ratio(delays: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float, int]:
    """The study's same-state ratio of one arm to "same": delays (2, S) per seed (row 0 the arm, row 1
    "same"; NaN = did not grok), over the seeds idx that grokked in BOTH arms: median(arm[idx]) /
    median(same[idx]); CI from n_boot paired resamples b = rng.choice(idx, len(idx), True) with
    rng = default_rng(seed), b applied to both arms, 2.5 / 97.5 percentiles. Returns (ratio, lo, hi,
    len(idx)); NaNs when no seed grokked in both."""
    D = np.asarray(delays, dtype="float64")
    idx = np.nonzero(np.isfinite(D[0]) & np.isfinite(D[1]))[0]
    if idx.size == 0:
        return np.nan, np.nan, np.nan, 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.median(D[0, idx]) / np.median(D[1, idx]))
        rng = np.random.default_rng(seed)
        samples = np.empty(n_boot)
        for k in range(n_boot):
            b = rng.choice(idx, len(idx), True)
            samples[k] = np.median(D[0, b]) / np.median(D[1, b])
    ok = samples[np.isfinite(samples)]
    lo, hi = np.percentile(ok, [2.5, 97.5]) if ok.size else (np.nan, np.nan)
    return ratio, float(lo), float(hi), int(idx.size)


def fork_table(models: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per fork (setting, tau, fork_step) and arm: delay_from_fork, the median over the seeds that
    grokked of T_grok - fork_step; for each arm but "same", ratio = delay(arm) / delay(same) over the
    seeds that grokked in both arms (n_both), with the study's paired bootstrap CI (`fork_ratio`)."""
    if "arm" not in models.columns or "fork_step" not in models.columns:
        raise ValueError("fork_table needs the columns 'arm' and 'fork_step'")
    f = models.loc[models["arm"].notna()]
    f = f.assign(delay_from_fork=_num(f["t_grok"]) - _num(f["fork_step"]))
    rows = []
    for keys, g in setting_groups(f, extra=("tau", "fork_step")):
        if g.groupby("arm")["cell"].nunique().max() > 1:
            raise ValueError(f"fork {keys} has several cells for one arm")
        arms = sorted(g["arm"].unique(), key=lambda a: (a != "same", a))
        cell_of = {a: g.loc[g["arm"] == a, "cell"].iloc[0] for a in arms}
        for a in arms:
            ga = g.loc[g["arm"] == a]
            row = {**keys, "arm": a, "cell": cell_of[a], "n_seeds": len(ga),
                   "n_grokked": int(np.isfinite(ga["delay_from_fork"]).sum()),
                   "delay_from_fork": float(_nanmedian(ga["delay_from_fork"].to_numpy())),
                   "ratio": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_both": np.nan}
            if a != "same" and "same" in cell_of:
                D, _ = seed_matrix(g, [cell_of[a], cell_of["same"]], col="delay_from_fork")
                row["ratio"], row["ci_low"], row["ci_high"], row["n_both"] = fork_ratio(D, n_boot=n_boot, seed=seed)
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Phase diagrams (Liu et al. 2022): comprehension, grokking, memorization, confusion
# ---------------------------------------------------------------------------------------------
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
    tg, tm = _num(models["t_grok"]), _num(models["t_mem"])
    train = _num(models["train_acc"]) if "train_acc" in models else np.where(np.isfinite(tm), 1.0, 0.0)
    div = np.nan_to_num(_num(models["diverged"])) > 0 if "diverged" in models else np.zeros(len(models), bool)
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
    rows = []
    for cell, g in m.assign(_phase=ph).groupby("cell", sort=True):
        tg, tm = _num(g["t_grok"]), _num(g["t_mem"])
        row = {"cell": cell, **{c: _cell_value(g[c]) for c in desc}, "n": len(g),
               "n_mem": int(np.isfinite(tm).sum()), "n_grok": int(np.isfinite(tg).sum()),
               "T_mem": float(_nanmedian(tm)), "T_grok": float(_nanmedian(tg)),
               "delay": float(_nanmedian(tg - tm)),
               "train_acc": float(_nanmedian(_num(g["train_acc"]))) if "train_acc" in g else np.nan,
               "test_acc": float(_nanmedian(_num(g["test_acc"]))) if "test_acc" in g else np.nan}
        row.update({f"n_{p}": int((g["_phase"] == p).sum()) for p in PHASES})
        row.update(phase=majority_phase(g["_phase"].to_numpy()), mem_threshold=float(mem_threshold),
                   grok_threshold=float(grok_threshold))
        rows.append(row)
    return pd.DataFrame(rows)


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


# ---------------------------------------------------------------------------------------------
# Interventions: the field's arms side by side
# ---------------------------------------------------------------------------------------------
INTERVENTION_COLS = ("loss", "wd", "lr", "rho", "orthograd", "grokfast_lambda")
"""What tells the arms of an interventions run apart (the columns that vary are named in each arm)."""


def has_interventions(models: pd.DataFrame) -> bool:
    """Whether any model trained with StableMax, ⊥Grad or Grokfast (an interventions run)."""
    return (("loss" in models and (models["loss"] == "stablemax").any())
            or ("orthograd" in models and models["orthograd"].fillna(False).astype(bool).any())
            or ("grokfast_lambda" in models and (_num(models["grokfast_lambda"]) > 0).any()))


def arm_name(row: pd.Series, varying: list[str]) -> str:
    """A cell's arm in words from the intervention columns that vary across the run."""
    parts = []
    for c in varying:
        v = row.get(c)
        if c == "loss":
            parts.append({"ce": "CE", "mse": "MSE", "stablemax": "StableMax"}.get(v, str(v)))
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
