"""The report's figures: one function per figure (`fig_*`), each writing STEM.png and STEM.pdf.

Matplotlib draws to files only (the Agg backend, set on import; safe on headless workers), and a PDF
carries no timestamp, so the same run gives the same bytes. Every number on a figure goes through
`display.format_value`, as in report.md. `report.write_report` calls these.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (also safe on headless workers)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fastgrok.analysis import statistics as A  # noqa: E402
from fastgrok.analysis.display import format_value  # noqa: E402

LABEL_COLS = ("experiment", "p", "loss", "arch", "dtype", "arm", "rho", "tau", "norm_target",
              "layer_fracs")
"""Describing columns used to label cells in figures (those that vary)."""


def _select(df: pd.DataFrame, keys: dict) -> pd.DataFrame:
    """Rows of df whose columns equal keys (NaN matching NaN)."""
    mask = np.ones(len(df), bool)
    for k, v in keys.items():
        col = df[k]
        mask &= (col.isna() if pd.isna(v) else (col == v)).to_numpy()
    return df.loc[mask]


def _keys(row: pd.Series) -> dict:
    return {k: row[k] for k in A.SETTING_COLS if k in row.index}


def _title(keys: dict, width: int = 50) -> str:
    """The setting as `k=v` pairs, wrapped to lines of about `width` characters (a figure's width)."""
    text = ", ".join(f"{k}={format_value(v)}" for k, v in keys.items() if not pd.isna(v)) or "run"
    return "\n".join(textwrap.wrap(text, width))


def _save(fig, stem: Path) -> list[Path]:
    for ax in fig.axes:                             # settings' titles are long: keep them inside the panel
        ax.title.set_fontsize(9)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1], metadata={"CreationDate": None})   # no timestamp: the same run gives the same bytes
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


def cell_labels(cells: pd.DataFrame) -> dict:
    """Each cell's label for figure legends: its LABEL_COLS that vary between the cells as `k=v`
    (e.g. the layer_fracs of the alloc experiment's cells), else "cell <id>"."""
    vary = [c for c in LABEL_COLS if c in cells.columns and cells[c].nunique() > 1]
    return {r["cell"]: " ".join(f"{c}={format_value(r[c])}" for c in vary) or f"cell {r['cell']}"
            for _, r in cells.iterrows()}


MAX_LINES = 200
"""The most cells `fig_curves` draws."""


def fig_curves(curves_c: pd.DataFrame, cells: pd.DataFrame, stem: Path) -> list[Path]:
    """Train and test accuracy vs step, one line per cell (mean over seeds); of a grid of more than
    MAX_LINES cells, MAX_LINES evenly spaced ones (more lines are unreadable and slow to draw)."""
    fig, axes = _panels(2, w=5.5)
    if len(cells) > MAX_LINES:
        cells = cells.iloc[np.linspace(0, len(cells) - 1, MAX_LINES).round().astype(int)]
    labels, cmap = cell_labels(cells), plt.get_cmap("viridis")
    ids = list(cells["cell"])
    empty = curves_c.iloc[:0]
    for ax, metric in zip(axes, ("train_acc", "test_acc")):
        m = curves_c.loc[(curves_c["metric"] == metric) & (curves_c["step"] > 0)]
        by_cell = dict(tuple(m.groupby("cell", sort=False)))            # one pass, not a scan per cell
        for i, cell in enumerate(ids):
            g = by_cell.get(cell, empty)
            ax.plot(g["step"], g["value"], color=cmap(i / max(len(ids) - 1, 1)), lw=1,
                    label=labels[cell])
        ax.set(xscale="log", xlabel="step", ylabel=metric, ylim=(-0.02, 1.02))
        ax.xaxis.set_minor_formatter(NullFormatter())       # minor labels overlap on a short log range
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


PHASE_LETTERS = {"comprehension": "C", "grokking": "G", "memorization": "M", "confusion": "X"}
AXIS_NAMES = {"lr": "learning rate lr", "wd": "weight decay wd", "train_frac": "train fraction"}


MAX_PANELS = 8
"""The most phase diagrams `fig_phase` draws (the report's phase table holds every cell)."""
MAX_LETTERS = 900
"""A figure of phase diagrams with more cells than this (30 x 30) shows its phases by the boundaries alone: a
letter per cell would be too small to read, and slow to draw (about 3 ms a letter)."""


MAX_TICKS = 10
"""The most tick labels on a phase diagram's axis (every k-th value beyond)."""


def fig_phase(diagrams: list[dict], stem: Path) -> list[Path]:
    """One panel per phase diagram (`phases.phase_diagrams`): cells on categorical axes (the values in
    ascending order, log-spaced in the built-in spec), coloured by median T_grok on a log scale, hatched
    grey where fewer than half the seeds grokked (the study's rule for a cell to count), a letter per cell
    for its phase (when the panels hold at most MAX_LETTERS cells in all), black lines between cells of
    different phase. Of more than MAX_PANELS diagrams, MAX_PANELS evenly spaced ones."""
    from matplotlib.collections import LineCollection, PatchCollection
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    if len(diagrams) > MAX_PANELS:
        diagrams = [diagrams[i] for i in np.linspace(0, len(diagrams) - 1, MAX_PANELS).round().astype(int)]
    fig, axes = _panels(len(diagrams), w=5.2, h=4.6)
    letters = sum(len(dg["cells"]) for dg in diagrams) <= MAX_LETTERS
    for ax, dg in zip(axes, diagrams):
        c, y, x = dg["cells"], dg["y"], dg["x"]
        ys, xs = sorted(c[y].unique()), sorted(c[x].unique())
        T = np.full((len(ys), len(xs)), np.nan)                        # (Y, X) median T_grok
        phase = np.full((len(ys), len(xs)), None, dtype=object)       # (Y, X) the cell's phase
        i = pd.Index(ys).get_indexer(c[y])                              # each cell's row and column
        j = pd.Index(xs).get_indexer(c[x])
        counts = 2 * c["n_grok"].to_numpy() >= c["n"].to_numpy()        # the study's rule for a cell's T_grok
        T[i, j] = np.where(counts, c["T_grok"].to_numpy(dtype="float64"), np.nan)
        phase[i, j] = c["phase"].to_numpy(dtype=object)
        ok = np.isfinite(T) & (T > 0)
        if ok.any():
            im = ax.imshow(np.where(ok, T, np.nan), origin="lower", aspect="auto", cmap="viridis",
                           norm=LogNorm(vmin=T[ok].min(), vmax=max(T[ok].max(), T[ok].min() * 1.01)))
            fig.colorbar(im, ax=ax, label="median T_grok")
        else:
            ax.imshow(np.full(T.shape, np.nan), origin="lower", aspect="auto")
        has = phase != None                                             # noqa: E711 (elementwise)
        hi, hj = np.nonzero(has & ~ok)
        if len(hi):
            ax.add_collection(PatchCollection([Rectangle((b - 0.5, a - 0.5), 1, 1) for a, b in zip(hi, hj)],
                                              facecolor="0.85", hatch="//", edgecolor="0.6", lw=0))
        if letters:
            for a, b in zip(*np.nonzero(has)):
                ax.text(b, a, PHASE_LETTERS[phase[a, b]], ha="center", va="center", fontsize=9,
                        fontweight="bold", path_effects=[withStroke(linewidth=2.5, foreground="white")])
        # boundaries: to the right and above, where the neighbouring cell's phase differs
        right = has[:, :-1] & has[:, 1:] & (phase[:, :-1] != phase[:, 1:])
        above = has[:-1, :] & has[1:, :] & (phase[:-1, :] != phase[1:, :])
        segs = [[(b + 0.5, a - 0.5), (b + 0.5, a + 0.5)] for a, b in zip(*np.nonzero(right))]
        segs += [[(b - 0.5, a + 0.5), (b + 0.5, a + 0.5)] for a, b in zip(*np.nonzero(above))]
        if segs:
            ax.add_collection(LineCollection(segs, colors="black", linewidths=2))
        for set_ticks, vals in ((ax.set_xticks, xs), (ax.set_yticks, ys)):     # at most MAX_TICKS labels an axis
            k = -(-len(vals) // MAX_TICKS)
            set_ticks(range(0, len(vals), k), [format_value(v) for v in vals[::k]])
        if len(xs) > MAX_TICKS:
            ax.tick_params(axis="x", labelrotation=45)
        ax.set(xlim=(-0.5, len(xs) - 0.5), ylim=(-0.5, len(ys) - 0.5), xlabel=AXIS_NAMES.get(x, x),
               ylabel=AXIS_NAMES.get(y, y))
        fixed, v = dg["fixed"]
        ax.set_title(f"{_title(dg['keys'])}\n{y} × {x} at {fixed}={format_value(v)}")
    return _save(fig, stem)


MAX_REGIME_ROWS = 8
"""The interventions figure's most rows of panels, one per regime (more regimes: one row of every arm)."""


def regime_rows(table: pd.DataFrame, models: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The interventions figure's rows: (regime, its arms with a `label` column: the arm without the regime)
    per regime in the table's order when the run names 2 to MAX_REGIME_ROWS, else one row ("", every arm)."""
    regime = (models.drop_duplicates("cell").set_index("cell")["regime"].reindex(table["cell"]).fillna("")
              if "regime" in models else pd.Series("", index=table["cell"])).to_numpy()
    names = list(dict.fromkeys(regime)) if 1 < len(set(regime)) <= MAX_REGIME_ROWS else [""]
    rows = []
    for name in names:
        t = table.loc[regime == name].copy() if name else table.copy()
        arms = [a.removeprefix(name).removeprefix(", ") if name else a for a in t["arm"]]
        t["label"] = [a or f"cell {c}" for a, c in zip(arms, t["cell"])]
        rows.append((name, t))
    return rows


def fig_interventions(table: pd.DataFrame, models: pd.DataFrame, curves: pd.DataFrame, stem: Path) -> list[Path]:
    """Mean test accuracy and SC rate over each arm's seeds against the step, one line per arm; of more than
    MAX_LINES arms (an atlas's cells), MAX_LINES evenly spaced ones, and a legend for at most 12 a row. A run
    whose blocks name regimes (the papers' settings, each with its own step budget) gets one row of panels
    per regime, titled by it, its arms labelled without it."""
    if len(table) > MAX_LINES:
        table = table.iloc[np.linspace(0, len(table) - 1, MAX_LINES).round().astype(int)]
    c = A.cell_curves(models.loc[models["cell"].isin(table["cell"])], curves, metrics=("test_acc", "sc_rate"))
    by = dict(tuple(c.groupby(["cell", "metric"], sort=False)))       # one pass, not a scan per arm
    empty = c.iloc[:0]
    rows = regime_rows(table, models)
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.0, 3.5 * len(rows)), squeeze=False)
    for (name, t), pair in zip(rows, axes):
        for ax, metric, label in zip(pair, ("test_acc", "sc_rate"), ("test accuracy", "SC rate (softmax readout)")):
            for row in t.itertuples():
                x = by.get((row.cell, metric), empty).sort_values("step")
                ax.plot(x["step"], x["value"], label=row.label)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
        if name:
            pair[0].set_title(name, loc="left")
        if len(t) <= 12:
            pair[0].legend(fontsize=7)
    return _save(fig, stem)
