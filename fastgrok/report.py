"""Figures and a one-page Markdown report for a run directory, and the same tables in the terminal.

`analyze_dir(dir)` computes every analysis whose cells are present in the run (see analysis.py);
`write_report(dir)` writes DIR/report.md and DIR/figures/*.png|pdf; `render_terminal(result)`
prints the tables with rich. Every number shown, in Markdown or in the terminal, goes through
`format_value`, so the report shows exactly the values of the returned tables.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (also safe on headless workers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fastgrok import analysis as A  # noqa: E402

TABLES = (("cells", "Cells"), ("mediation", "Mediation: τ sweep at ρ_high"),
          ("collapse", "Collapse grid: ln T_grok on L and ρ"), ("dose_law", "Dose law: ln T = c + α‖W‖"),
          ("memorization", "Memorization control"), ("forks", "Same-state forks"))
"""Result keys that hold tables, in report order, with their section titles."""
LABEL_COLS = ("experiment", "p", "loss", "arch", "dtype", "arm", "rho", "tau", "norm_target")
"""Describing columns used to label cells in figures (those that vary)."""
CONFIG_KEYS = ("experiment", "p", "op", "model", "loss", "taus", "norm_targets", "seeds", "steps",
               "lr", "wd", "train_frac", "dtype")
"""Config entries shown in the report's header (when present)."""


# ---------------------------------------------------------------------------------------------
# Formatting: the one function every printed number goes through
# ---------------------------------------------------------------------------------------------
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
    """Split a table for display: with several rows, columns holding one value in every row (or
    null in every row) move to a constants dict; the rest is shown as is."""
    if len(df) <= 1:
        return {}, df
    consts, shown = {}, []
    for c in df.columns:
        col = df[c]
        if col.isna().all() or (col.notna().all() and col.nunique() == 1):
            consts[c] = col.iloc[0]
        else:
            shown.append(c)
    return consts, df[shown]


def markdown_table(df: pd.DataFrame) -> str:
    """A Markdown table (with a leading 'All rows:' line for the constant columns)."""
    consts, shown = display_table(df)
    lines = []
    if consts:
        lines += ["All rows: " + "; ".join(f"{k} = {format_value(v)}" for k, v in consts.items()), ""]
    lines.append("| " + " | ".join(str(c) for c in shown.columns) + " |")
    lines.append("|" + "---|" * len(shown.columns))
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(format_value(v) for v in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Analysis of a directory
# ---------------------------------------------------------------------------------------------
def analyze_dir(run_dir, *, rho_high: float = 1.15, baseline=(1.0, 1.0),
                n_boot: int = A.N_BOOT) -> dict:
    """All analyses that apply to the run's cells. Keys: dir, config, notes, cells, and when their
    cells are present mediation, collapse, dose_law, memorization, forks (DataFrames)."""
    models, curves, config = A.load_run(run_dir)
    cells = A.cell_table(models, curves)
    out = {"dir": Path(run_dir), "config": config, "notes": [], "cells": cells}
    plain = cells.loc[~A.is_fork(cells)]
    has_rho = "rho" in plain.columns and plain["rho"].notna().any()
    taus_vary = "tau" in plain.columns and any(
        g["tau"].nunique() > 1 for _, g in A.setting_groups(plain))

    if has_rho:
        med = A.mediation_table(cells, models, rho_high=rho_high, baseline=baseline, n_boot=n_boot)
        if len(med):
            out["mediation"] = med
        # A collapse grid: >= 3 doses and >= 2 temperatures among the counting cells of a setting.
        grid = [g for _, g in A.setting_groups(A.counting_cells(plain))
                if g["rho"].round(6).nunique() >= 3 and g["tau"].round(6).nunique() >= 2]
        if grid:
            col = A.collapse_r2(pd.concat(grid))
            if len(col):
                out["collapse"] = col
    elif taus_vary:
        out["notes"].append("No rho values: mediation and the collapse regression need the "
                            "clamp dose rho of each cell.")
    dose = A.dose_law(cells)
    if len(dose):
        out["dose_law"] = dose
    if taus_vary:
        out["memorization"] = A.memorization_table(cells)
    if "arm" in models.columns and models["arm"].notna().any():
        out["forks"] = A.fork_table(models, n_boot=n_boot)
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _select(df: pd.DataFrame, keys: dict) -> pd.DataFrame:
    """Rows of df whose columns equal keys (NaN matching NaN)."""
    mask = np.ones(len(df), bool)
    for k, v in keys.items():
        col = df[k]
        mask &= (col.isna() if pd.isna(v) else (col == v)).to_numpy()
    return df.loc[mask]


def _keys(row: pd.Series) -> dict:
    return {k: row[k] for k in A.SETTING_COLS if k in row.index}


def _title(keys: dict, width: int = 45) -> str:
    """The setting as `k=v` pairs, wrapped to lines of about `width` characters (a figure's width)."""
    text = ", ".join(f"{k}={format_value(v)}" for k, v in keys.items() if not pd.isna(v)) or "run"
    return "\n".join(textwrap.wrap(text, width))


def _save(fig, stem: Path) -> list[Path]:
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _panels(n: int, w: float = 4.5, h: float = 3.5):
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False)
    return fig, axes[0]


def fig_mediation(med: pd.DataFrame, cells: pd.DataFrame, stem: Path) -> list[Path]:
    """Median T_grok vs L over the τ sweep per setting, with T0, T1 and the interpolated T2."""
    fig, axes = _panels(len(med))
    for ax, (_, r) in zip(axes, med.iterrows()):
        c = _select(cells.loc[~A.is_fork(cells)], _keys(r))
        sw = c.loc[A.match_value(c["rho"], r["rho_high"])].sort_values("L_grok")
        ax.plot(sw["L_grok"], sw["T_grok"], "o-", color="C0", label=f"ρ={format_value(r['rho_high'])} τ sweep")
        for _, s in sw.iterrows():
            ax.annotate(f"τ={format_value(s['tau'])}", (s["L_grok"], s["T_grok"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.plot([r["L0"]], [r["T0"]], "*", ms=12, color="C2", label="T0 baseline")
        ax.plot([r["L1"]], [r["T1"]], "s", ms=8, mfc="none", color="C3", label="T1")
        ax.plot([r["L0"]], [r["T2"]], "D", color="C1", label="T2 at L0")
        ax.axvline(r["L0"], ls=":", color="gray")
        ax.set(xlabel="L at grok", ylabel="median T_grok", title=f"{_title(_keys(r))}\nrecovery "
               f"{format_value(r['recovery'])} [{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]")
        ax.legend(fontsize=7)
    return _save(fig, stem)


def fig_collapse(col: pd.DataFrame, cells: pd.DataFrame, stem: Path) -> list[Path]:
    """log T_grok vs L, one point per counting cell, coloured by ρ."""
    fig, axes = _panels(len(col))
    pts = A.counting_cells(cells)
    for ax, (_, r) in zip(axes, col.iterrows()):
        c = _select(pts, _keys(r))
        sc = ax.scatter(c["L_grok"], c["T_grok"], c=c["rho"], cmap="viridis")
        ax.set_yscale("log")
        fig.colorbar(sc, ax=ax, label="ρ")
        ax.set(xlabel="L at grok", ylabel="median T_grok", title=f"{_title(_keys(r))}\nR² L "
               f"{format_value(r['r2_L'])}, ρ {format_value(r['r2_rho'])}, both {format_value(r['r2_both'])}")
    return _save(fig, stem)


def _labels(cells: pd.DataFrame) -> dict:
    vary = [c for c in LABEL_COLS if c in cells.columns and cells[c].nunique() > 1]
    return {r["cell"]: " ".join(f"{c}={format_value(r[c])}" for c in vary) or f"cell {r['cell']}"
            for _, r in cells.iterrows()}


def fig_curves(curves_c: pd.DataFrame, cells: pd.DataFrame, stem: Path) -> list[Path]:
    """Train and test accuracy vs step, one line per cell (mean over seeds)."""
    fig, axes = _panels(2, w=5.5)
    labels, cmap = _labels(cells), plt.get_cmap("viridis")
    ids = list(cells["cell"])
    for ax, metric in zip(axes, ("train_acc", "test_acc")):
        m = curves_c.loc[(curves_c["metric"] == metric) & (curves_c["step"] > 0)]
        for i, cell in enumerate(ids):
            g = m.loc[m["cell"] == cell]
            ax.plot(g["step"], g["value"], color=cmap(i / max(len(ids) - 1, 1)), lw=1,
                    label=labels[cell])
        ax.set(xscale="log", xlabel="step", ylabel=metric, ylim=(-0.02, 1.02))
    if len(ids) <= 12:
        axes[1].legend(fontsize=6)
    return _save(fig, stem)


def fig_forks(forks: pd.DataFrame, curves_c: pd.DataFrame, stem: Path) -> list[Path]:
    """Test accuracy vs step per arm of each same-state fork (mean over seeds)."""
    gkeys = [k for k in (*A.SETTING_COLS, "tau", "fork_step") if k in forks.columns]
    groups = [g for _, g in forks.groupby(gkeys, dropna=False)] if gkeys else [forks]
    fig, axes = _panels(len(groups))
    test = curves_c.loc[curves_c["metric"] == "test_acc"]
    for ax, g in zip(axes, groups):
        for _, r in g.iterrows():
            c = test.loc[test["cell"] == r["cell"]]
            ax.plot(c["step"], c["value"], lw=1, label=f"{r['arm']} (delay {format_value(r['delay_from_fork'])})")
        ax.axvline(g["fork_step"].iloc[0], ls=":", color="gray")
        ax.set(xlabel="step", ylabel="test_acc", title=_title(_keys(g.iloc[0])))
        ax.legend(fontsize=7)
    return _save(fig, stem)


# ---------------------------------------------------------------------------------------------
# Report and terminal
# ---------------------------------------------------------------------------------------------
def _config_line(config: dict) -> str:
    """Scalar entries and short lists of scalars of the run's config, for the report's header."""
    def show(v):
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(format_value(x) for x in v) + "]"
        return format_value(v)
    items = [(k, v) for k, v in config.items() if v is not None and (
        isinstance(v, (int, float, str, bool)) or (isinstance(v, (list, tuple)) and len(v) <= 8
                                                   and all(isinstance(x, (int, float, str)) for x in v)))]
    key = [k for k, _ in items if k in CONFIG_KEYS]
    items = sorted((kv for kv in items if kv[0] in key), key=lambda kv: CONFIG_KEYS.index(kv[0])) \
        if key else items[:12]
    return "; ".join(f"{k} = {show(v)}" for k, v in items)


def write_report(run_dir, result: dict | None = None) -> Path:
    """Write DIR/figures/*.png|pdf and DIR/report.md; return the report's path."""
    d = Path(run_dir)
    result = result if result is not None else analyze_dir(d)
    models, curves, _ = A.load_run(d)
    cells, figs = result["cells"], {}
    (d / "figures").mkdir(exist_ok=True)
    curves_c = A.cell_curves(models, curves)
    if "mediation" in result:
        figs["mediation"] = fig_mediation(result["mediation"], cells, d / "figures" / "mediation")
    if "collapse" in result:
        figs["collapse"] = fig_collapse(result["collapse"], cells, d / "figures" / "collapse")
    if "forks" in result:
        figs["forks"] = fig_forks(result["forks"], curves_c, d / "figures" / "forks")
    if not curves_c.empty:
        plain = cells.loc[~A.is_fork(cells)]
        if len(plain):
            figs["curves"] = fig_curves(curves_c, plain, d / "figures" / "curves")

    lines = [f"# fastgrok report: {d.name}", ""]
    if result["config"]:
        lines += [f"Config: {_config_line(result['config'])}", ""]
    lines += [f"Note: {n}" for n in result["notes"]]
    for key, title in TABLES:
        if key not in result:
            continue
        lines += ["", f"## {title}", "", f"<!-- table: {key} -->", markdown_table(result[key]), ""]
        if key in figs:
            lines += [f"![{key}](figures/{figs[key][0].name}) ([PDF](figures/{figs[key][1].name}))"]
    if "curves" in figs:
        lines += ["", "## Learning curves", "", f"![curves](figures/{figs['curves'][0].name}) "
                  f"([PDF](figures/{figs['curves'][1].name}))"]
    path = d / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def render_terminal(result: dict, console=None) -> None:
    """Print the result's tables with rich (numbers via format_value, as in report.md)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]fastgrok analysis[/bold] {result['dir']}")
    for n in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")
    for key, title in TABLES:
        if key not in result:
            continue
        consts, shown = display_table(result[key])
        caption = "; ".join(f"{k} = {format_value(v)}" for k, v in consts.items()) or None
        table = Table(title=title, caption=caption)
        for c in shown.columns:
            table.add_column(str(c), justify="right")
        for row in shown.itertuples(index=False):
            table.add_row(*(format_value(v) for v in row))
        console.print(table)
