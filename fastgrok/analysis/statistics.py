"""Statistics on a run directory's per-seed results: the per-cell table, the paired bootstrap, the forks.

Pure functions on pandas DataFrames and numpy arrays; no plotting (figures live in `figures.py`).
The study's analyses built on these have modules of their own: `mediation.py` (the tau sweep at
rho_high), `regressions.py` (collapse grid, dose law), `phases.py` (phase diagrams) and
`interventions.py` (the field's arms side by side).
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

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fastgrok import store
from fastgrok.config import GRID_AXES

SETTING_COLS = ("experiment", "regime", *("arch" if a == "model" else a for a in GRID_AXES if a != "dtype"), "dtype")
"""Columns that define a setting; multi-cell analyses run once per distinct combination (`regime`: a spec
block's regime name, in runs whose blocks give one)."""
CELL_COLS = SETTING_COLS + ("arm", "fork_step", "rho", "tau", "norm_target", "layer_fracs")
"""Columns that describe a cell (layer_fracs: the per-matrix clamp shares, e.g. "0.4,0.5,0.1");
copied into the cell table when some model has a value in them."""
N_BOOT = 4000
"""Bootstrap resamples, as in the study."""
ATOL = 1e-6
"""Tolerance when matching a cell's rho or tau to a requested value."""


RESULT_COLUMNS = {"models": ("model", "cell", "seed", "t_mem", "t_grok"), "curves": ("model", "step", "metric", "value")}
"""The columns every analysis relies on, per results table (a table without one is refused)."""


# ---------------------------------------------------------------------------------------------
# Loading and small helpers
# ---------------------------------------------------------------------------------------------
def open_run(run_dir) -> tuple[pd.DataFrame, "store.Results", dict]:
    """A run's models table, its results dataset (store.Results: every file checked, the curves queried per
    cell by `cell_curves` and `cell_table`, never loaded whole) and its `config.json` (optional). A grid's
    results are its parts (or, copied without them, models.parquet and curves.parquet); a damaged file or
    a table of another run is a StateError naming it."""
    d = Path(run_dir)
    if not (d / "models.parquet").exists() and not store.part_files(d, "models"):
        raise FileNotFoundError(f"{d} has no models.parquet and no parts/; is it a fastgrok run directory?")
    results = store.Results(d, models_required=RESULT_COLUMNS["models"])
    models = results.models()
    config = store.read_json(d / "config.json") if (d / "config.json").exists() else {}
    check_models(models)
    return models, results, config


def load_run(run_dir) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """`open_run` with the curves loaded as one long table (model, step, metric, value): for a small run."""
    models, results, config = open_run(run_dir)
    return models, results.curves(), config


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


def numeric(s: pd.Series) -> np.ndarray:
    """A column as float64 with NaN for nulls (handles nullable Int64)."""
    return pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()


def nanmedian(x: np.ndarray, axis=None):
    """np.nanmedian without the all-NaN warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def _nanmean(x: np.ndarray, axis=None):
    """np.nanmean without the empty-slice warning (an all-NaN slice gives NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def cell_value(s: pd.Series):
    """One value for a describing column over a cell's seeds: the shared value, else the median."""
    v = s.dropna()
    if v.empty:
        return np.nan
    if (v == v.iloc[0]).all():
        return v.iloc[0]
    return float(np.median(numeric(v))) if pd.api.types.is_numeric_dtype(v) else v.iloc[0]


def is_fork(df: pd.DataFrame) -> np.ndarray:
    """Boolean mask of the rows that belong to a same-state fork arm (non-null `arm`)."""
    return df["arm"].notna().to_numpy() if "arm" in df.columns else np.zeros(len(df), bool)


def per_setting(df: pd.DataFrame, col: str, how: str, extra: tuple[str, ...] = ()) -> pd.Series:
    """For each row of df, `how` ("nunique", "size", ...) of `col` over the rows of its setting (the groups
    of `setting_groups`), in one grouped pass: which settings a loop over `setting_groups` needs to visit."""
    keys = [c for c in (*SETTING_COLS, *extra) if c in df.columns]
    if not keys:
        return pd.Series(getattr(df[col], how)(), index=df.index)
    return df.groupby(keys, dropna=False, sort=False)[col].transform(how)


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
    return np.isclose(numeric(values), x, rtol=0.0, atol=ATOL)


def has_values(df: pd.DataFrame, col: str) -> bool:
    """Whether df has the column `col` with a non-null value in some row."""
    return col in df.columns and bool(df[col].notna().any())


def need_rho(cells: pd.DataFrame, what: str) -> None:
    if not has_values(cells, "rho"):
        raise ValueError(f"{what} needs each cell's clamp dose rho (column 'rho', target = rho * "
                         "w_c); this run has no rho values")


# ---------------------------------------------------------------------------------------------
# Per-cell table
# ---------------------------------------------------------------------------------------------
def cell_logit_scale(models: pd.DataFrame, curves) -> pd.DataFrame:
    """A cell's L per logged step: mean over its models of `logit_scale`. Columns cell, step, L."""
    out = cell_curves(models, curves, metrics=("logit_scale",))
    return out.drop(columns="metric").rename(columns={"value": "L"})


def nearest_step_value(steps, values, t: float) -> float:
    """values at the step nearest t (the earlier step on a tie); NaN if t is NaN or no steps."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if not np.isfinite(t) or steps.size == 0:
        return np.nan
    order = np.argsort(steps, kind="stable")
    i = int(np.argmin(np.abs(steps[order] - t)))  # argmin takes the first, i.e. the earlier, tie
    return float(values[order][i])


def cell_curves(models: pd.DataFrame, curves, metrics=("train_acc", "test_acc")) -> pd.DataFrame:
    """Per-cell mean over seeds of each metric per step. Columns cell, metric, step, value. curves: a long
    DataFrame, or a run's store.Results (a grouped query over its parts)."""
    if not isinstance(curves, pd.DataFrame):
        return curves.cell_means(models, metrics)
    c = curves.loc[curves["metric"].isin(list(metrics)), ["model", "step", "metric", "value"]]
    c = c.merge(models[["model", "cell"]], on="model")
    return c.groupby(["cell", "metric", "step"], as_index=False)["value"].mean()


def values_at(models: pd.DataFrame, curves, metric: str, col: str = "t_grok") -> pd.DataFrame:
    """Each model's `metric` at the step in its `col` (an evaluation step, so an exact match); models
    without one left out. Columns model, cell, step, value."""
    at = models[["model", "cell"]].assign(step=numeric(models[col])).dropna(subset=["step"])
    if not isinstance(curves, pd.DataFrame):
        got = curves.at_steps(metric, at.astype({"step": "int64"}))
        return at.merge(got.astype({"step": "float64"}), on=["model", "step"])
    w = curves.loc[curves["metric"] == metric, ["model", "step", "value"]]
    return at.merge(w.assign(step=w["step"].astype("float64")), on=["model", "step"])


class CellGroups:
    """A models table's rows grouped by cell, in one pass: cells in ascending id (as groupby("cell")), each
    cell's rows in table order. Per-cell reductions run on whole columns (numpy, pandas' grouped median), so
    a table of 100,000 models costs a few vectorised passes, not a pandas group per cell; each gives exactly
    the value of the per-cell computation it replaces (a median is the middle value or the mean of the two,
    a mean is np.nanmean of the cell's own values, a describing value is `cell_value`'s)."""

    def __init__(self, df: pd.DataFrame):
        self.df = df
        self.ids, codes = np.unique(df["cell"].to_numpy(), return_inverse=True)
        codes = codes.reshape(-1)
        self.order = np.argsort(codes, kind="stable")           # rows by cell, table order within a cell
        self.codes = codes[self.order]
        self.sizes = np.bincount(codes, minlength=len(self.ids))
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def col(self, name: str) -> np.ndarray:
        """A column as float64 (`numeric`), rows in group order."""
        return numeric(self.df[name])[self.order]

    def count(self, mask_sorted: np.ndarray) -> np.ndarray:
        """Per cell: how many of its rows the mask (in group order) holds."""
        return np.bincount(self.codes, weights=mask_sorted, minlength=len(self.ids)).round().astype(np.int64)

    def median(self, x_sorted: np.ndarray) -> np.ndarray:
        """Per cell: the median of its finite values and infinities, NaN left out (`nanmedian`); NaN for a
        cell with none."""
        return pd.Series(x_sorted).groupby(self.codes, sort=True).median().reindex(
            range(len(self.ids))).to_numpy(dtype="float64")

    def split(self, x_sorted: np.ndarray) -> list[np.ndarray]:
        """Per cell: its rows of x (in group order)."""
        return np.split(x_sorted, self.starts[1:])

    def values(self, name: str) -> list:
        """Per cell: `cell_value` of the column (its shared non-null value, else the median or the first),
        computed on whole columns; a cell whose values differ goes through `cell_value` itself."""
        s = self.df[name]
        notna = s.notna().to_numpy()[self.order]
        raw = s.to_numpy(dtype=object)[self.order]
        rows = np.flatnonzero(notna)                             # non-null rows, group order
        g = self.codes[rows]
        out = [np.nan] * len(self.ids)
        if rows.size == 0:
            return out
        first_cells, first_at = np.unique(g, return_index=True)  # each cell's first non-null row
        firsts = raw[rows[first_at]]
        same = raw[rows] == firsts[np.searchsorted(first_cells, g)]
        differs = set(g[~np.asarray(same, dtype=bool)].tolist())
        first_vals = s.iloc[self.order[rows[first_at]]].tolist() if len(first_at) else []
        for k, v in zip(first_cells.tolist(), first_vals):
            out[k] = v
        for k in differs:                                        # rare: a describing value that varies
            out[k] = cell_value(s.iloc[self.order[self.starts[k]:self.starts[k] + self.sizes[k]]])
        return out


def cell_table(models: pd.DataFrame, curves=None) -> pd.DataFrame:
    """One row per cell: describing columns, n_seeds, n_grokked, n_diverged, counts, T_mem,
    T_grok, delay, L_grok, sc_rate (mean final), W_final (median final ‖W‖) and W_grok (median
    over grokked seeds of ‖W‖ at their T_grok: w_c when the cell is a free control)."""
    check_models(models)
    desc = [c for c in CELL_COLS if has_values(models, c)]
    G = CellGroups(models)
    tg, tm = G.col("t_grok"), G.col("t_mem")
    n_grok = G.count(np.isfinite(tg))
    T_mem, T_grok = G.median(tm), G.median(tg)
    cols = {"cell": G.ids.tolist(), **{c: G.values(c) for c in desc},
            "n_seeds": G.sizes.tolist(), "n_grokked": n_grok.tolist(),
            "n_diverged": (G.count(np.nan_to_num(G.col("diverged"))).tolist() if "diverged" in models
                           else [0] * len(G)),
            "counts": (2 * n_grok >= G.sizes).tolist(),              # the study's n_grokked >= 0.5 n
            "T_mem": T_mem.tolist(), "T_grok": T_grok.tolist(), "delay": (T_grok - T_mem).tolist(),
            "sc_rate": ([float(_nanmean(x)) for x in G.split(G.col("sc_rate"))] if "sc_rate" in models
                        else [np.nan] * len(G))}
    if "test_loss" in models:                                   # runs from before it have none
        cols["test_loss"] = G.median(G.col("test_loss")).tolist()
    cols["W_final"] = G.median(G.col("weight_norm")).tolist() if "weight_norm" in models else [np.nan] * len(G)
    # a row per cell, as a list of dicts: the columns' dtypes inferred as the per-cell table's always were
    cells = pd.DataFrame([dict(zip(cols, r)) for r in zip(*cols.values())])
    cells["L_grok"], cells["W_grok"] = np.nan, np.nan
    tail = ["sc_rate", *(["test_loss"] if "test_loss" in cells else []), "W_final", "W_grok"]
    order = [c for c in cells.columns if c not in tail] + tail
    if curves is None or curves.empty:
        return cells[order]

    # L at grok: the cell's L at the logged step nearest its median T_grok.
    cells["L_grok"] = nearest_step_values(cell_logit_scale(models, curves), cells["cell"], cells["T_grok"])

    # ‖W‖ at each grokked seed's own T_grok (an evaluation step, so an exact match).
    wg = values_at(models, curves, "weight_norm").groupby("cell")["value"].median()
    cells["W_grok"] = cells["cell"].map(wg).astype("float64")
    return cells[order]


def nearest_step_values(L: pd.DataFrame, cell_ids, t) -> np.ndarray:
    """Per cell of cell_ids: `nearest_step_value` of its rows of L (columns cell, step, L; a step once per
    cell) at its t, for every cell at once; NaN for a cell without rows or a non-finite t."""
    cell_ids = np.asarray(cell_ids)
    t = np.asarray(t, dtype="float64")
    out = np.full(len(cell_ids), np.nan)
    if len(L) == 0:
        return out
    pos = pd.Series(np.arange(len(cell_ids)), index=cell_ids)
    at = pos.reindex(L["cell"].to_numpy()).to_numpy()            # each row's index in cell_ids (NaN: none)
    keep = ~np.isnan(at)
    at = at[keep].astype(np.int64)
    steps = L["step"].to_numpy(dtype="float64")[keep]
    vals = L["L"].to_numpy(dtype="float64")[keep]
    ok = np.isfinite(t[at])
    at, steps, vals = at[ok], steps[ok], vals[ok]
    d = np.abs(steps - t[at])
    best = np.lexsort((steps, d, at))                           # per cell: nearest, then the earlier step
    first = np.ones(len(best), bool)
    first[1:] = at[best][1:] != at[best][:-1]
    out[at[best][first]] = vals[best][first]
    return out


def memorization_table(cells: pd.DataFrame) -> pd.DataFrame:
    """T_mem and delay beside T_grok per (non-fork) cell: does tau move T_grok but not T_mem?"""
    c = cells.loc[~is_fork(cells)]
    keys = [k for k in (*SETTING_COLS, "rho", "norm_target", "layer_fracs", "tau") if k in c.columns]
    cols = ["cell", *keys, "n_seeds", "n_grokked", "counts", "T_mem", "T_grok", "delay"]
    return c.sort_values(keys or "cell")[cols].reset_index(drop=True)


def counting_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Non-fork cells that count (at least half their seeds grokked) with a positive T_grok."""
    c = cells.loc[~is_fork(cells) & cells["counts"].astype(bool).to_numpy()]
    return c.loc[numeric(c["T_grok"]) > 0]


# ---------------------------------------------------------------------------------------------
# Paired bootstrap over seeds
# ---------------------------------------------------------------------------------------------
def seed_matrix(models: pd.DataFrame, cell_ids, col: str = "t_grok") -> tuple[np.ndarray, np.ndarray]:
    """(K, S) matrix of `col` for the given cells (rows, in order) and the sorted union of their
    seed ids (columns); NaN where a seed did not reach it or is absent from a cell."""
    sub = models.loc[models["cell"].isin(list(cell_ids)), ["cell", "seed"]].assign(v=numeric(
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
    point = float(stat(nanmedian(T, axis=1)))
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, S, S) for _ in range(n_boot)])  # (B, S)
    med = nanmedian(T[:, idx], axis=2)                              # (K, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.array([stat(med[:, b]) for b in range(n_boot)], dtype="float64")
    ok = samples[np.isfinite(samples)]
    lo, hi = np.percentile(ok, [2.5, 97.5]) if ok.size else (np.nan, np.nan)
    return point, float(lo), float(hi), samples


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
    f = f.assign(delay_from_fork=numeric(f["t_grok"]) - numeric(f["fork_step"]))
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
                   "delay_from_fork": float(nanmedian(ga["delay_from_fork"].to_numpy())),
                   "ratio": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_both": np.nan}
            if a != "same" and "same" in cell_of:
                D, _ = seed_matrix(g, [cell_of[a], cell_of["same"]], col="delay_from_fork")
                row["ratio"], row["ci_low"], row["ci_high"], row["n_both"] = fork_ratio(D, n_boot=n_boot, seed=seed)
            rows.append(row)
    return pd.DataFrame(rows)


def varying_setting_cols(cells: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[str]:
    """The setting columns (and `extra`) whose values differ between the cells: the ones that tell
    the run's settings apart."""
    return [k for k in (*SETTING_COLS, *extra)
            if k in cells.columns and cells[k].nunique(dropna=False) > 1]
