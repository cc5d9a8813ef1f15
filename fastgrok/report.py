"""Figures and a one-page Markdown report for a run directory, and the same tables in the terminal.

`analyze_dir(dir)` computes every analysis whose cells are present in the run (see analysis.py),
with warnings (an unfinished grid, a calibration in which no seed grokked) and notes (how the
mediation's rho_high was chosen; why an analysis the run was laid out for is missing: a skipped
mediation, a dose law or collapse regression with too few grokked cells, nothing grokked at all);
`write_report(dir)` writes DIR/report.md and DIR/figures/*.png|pdf; `render_terminal(result)` prints
the same with rich, every value whole at any terminal width. Every number shown, in Markdown or in the terminal, goes through
`format_value`, so the report shows exactly the values of the returned tables.
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

from fastgrok import analysis as A  # noqa: E402
from fastgrok import store  # noqa: E402

TABLES = (("calibration", "Clamp calibration: w_c per setting"), ("cells", "Cells"),
          ("mediation", "Mediation: τ sweep at ρ_high"),
          ("collapse", "Collapse grid: ln T_grok on L and ρ"), ("dose_law", "Dose law: ln T = c + α‖W‖"),
          ("memorization", "Memorization control"),
          ("phase", "Phase diagrams: comprehension, grokking, memorization, confusion"),
          ("interventions", "Interventions side by side"),
          ("forks", "Same-state forks"))
"""Result keys that hold tables, in report order, with their section titles."""
LABEL_COLS = ("experiment", "p", "loss", "arch", "dtype", "arm", "rho", "tau", "norm_target",
              "layer_fracs")
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
    """Split a table for display: with several rows, columns null in every row are left out (they
    say nothing, e.g. `arm` outside a fork experiment), columns holding one value in every row move
    to a constants dict; the rest is shown as is."""
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
RESULT_COLUMNS = {store.MODELS: ("model", "cell", "seed", "t_mem", "t_grok"),
                  store.CURVES: ("model", "step", "metric", "value")}


def load_checked(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """`analysis.load_run`, with a file it cannot use (torn, foreign, missing columns, no or repeated
    rows) reported as one StateError naming the file."""
    for name, cols in RESULT_COLUMNS.items():
        if (d / name).exists():
            names = set(store.read_parquet_schema(d / name))
            missing = [c for c in cols if c not in names]
            if missing:
                raise store.state_error(d / name, f"lacks column(s) {', '.join(missing)}: not a fastgrok results table")
    if (d / store.CONFIG).exists():
        store.read_json(d / store.CONFIG)
    try:
        return A.load_run(d)
    except ValueError as e:                     # analysis.check_models: no rows, repeated models
        raise store.state_error(d / store.MODELS, str(e)) from None


def analyze_dir(run_dir, *, rho_high: float | None = None, baseline=(1.0, 1.0),
                n_boot: int = A.N_BOOT) -> dict:
    """All analyses that apply to the run's cells. Keys: dir, config, warnings, notes, cells, and
    when present calibration, mediation, collapse, dose_law, memorization, forks (DataFrames).
    rho_high: the mediation's raised dose; None picks it from the cells (`choose_rho_high`)."""
    d = Path(run_dir)
    models, curves, config = load_checked(d)
    cells = A.cell_table(models, curves)
    calibration = calibration_table(d)
    out = {"dir": d, "config": config,
           "warnings": grid_progress_warnings(d, models) + calibration_warnings(calibration),
           "notes": [], "cells": cells}
    if len(calibration):
        out["calibration"] = calibration
    plain = cells.loc[~A.is_fork(cells)]
    swept = some_setting_sweeps_tau(plain)
    if A.has_values(plain, "rho"):
        add_mediation(out, cells, models, rho_high=rho_high, baseline=baseline, n_boot=n_boot)
        collapse = collapse_table(plain)
        if len(collapse):
            out["collapse"] = collapse
    elif swept:
        out["notes"].append("No rho values: mediation and the collapse regression need the "
                            "clamp dose rho of each cell.")
    dose = A.dose_law(cells)
    if len(dose):
        out["dose_law"] = dose
    out["notes"] += missing_fit_notes(cells)
    if swept:
        out["memorization"] = A.memorization_table(cells)
    if "arm" in models.columns and models["arm"].notna().any():
        out["forks"] = A.fork_table(models, n_boot=n_boot)
        out["notes"] += fork_caution_notes(out["forks"])
    add_phases(out, models)
    if A.has_interventions(models):
        out["interventions"] = A.interventions_table(cells)
        out.setdefault("texts", {})["interventions"] = INTERVENTIONS_TEXT
    return out


INTERVENTIONS_TEXT = (
    "Each arm is a cell of the same seeds and splits, trained in one batch: T_mem and T_grok are medians "
    "over the seeds that reached them, delay = T_grok − T_mem, sc_rate the mean over seeds of the final "
    "fraction of train rows whose softmax(z/τ)_y is exactly 1 (the softmax readout for every loss: a "
    "StableMax model with large logits reads as collapsed although its own probabilities are not), "
    "test_loss the median final loss over the test rows. The figure: mean test accuracy and SC rate over "
    "the seeds against the step, one line per arm.")


def run_thresholds(run_dir, config: dict) -> dict:
    """The mem_threshold and grok_threshold a run's T_mem and T_grok were recorded at: a grid's spec
    (spec.json's [train]), else a train run's config.json, else TrainConfig's defaults."""
    from fastgrok.config import TrainConfig

    spec = Path(run_dir) / store.SPEC_JSON
    train = store.read_json(spec).get("train", {}) if spec.exists() else config
    train = train if isinstance(train, dict) else {}
    return {k: float(train.get(k, getattr(TrainConfig, k))) for k in ("mem_threshold", "grok_threshold")}


def phase_rule(mem_threshold: float, grok_threshold: float, ratio: float = A.COMPREHENSION_RATIO) -> str:
    """The phase classification (`A.seed_phases`, `A.majority_phase`) in words, with the run's thresholds."""
    f = format_value
    return (f"Each seed's phase, after Liu et al. (2022), from its T_mem (train accuracy >= {f(mem_threshold)}), "
            f"its T_grok (test accuracy >= {f(grok_threshold)}), both the run's own thresholds, and its final "
            f"train accuracy: **comprehension** when it grokked with T_grok <= {f(ratio)} × T_mem (a delay "
            "no longer than the time it took to memorize) or before it memorized; **grokking** when it "
            "grokked later than that; **memorization** when it never grokked but ends with train accuracy "
            f">= {f(mem_threshold)}; **confusion** when it never grokked and ends below that (or diverged). "
            "A cell takes the phase of most of its seeds; a tie goes to the first tied phase of grokking, "
            "memorization, comprehension, confusion. In the figure: the colour is the cell's median T_grok "
            "over the seeds that grokked (hatched grey: fewer than half of its seeds grokked), the letter its "
            "phase (C comprehension, G grokking, M memorization, X confusion), and black lines separate cells "
            "of different phase. delay: the median over the seeds with both of T_grok − T_mem.")


def add_phases(out: dict, models: pd.DataFrame) -> None:
    """The per-cell phase table (key "phase") and the rule in words (out["texts"]["phase"]) when the
    run's cells span a phase diagram (`A.phase_diagrams`: lr x wd or train_frac x wd)."""
    th = run_thresholds(out["dir"], out["config"])
    table = A.phase_table(models, **th)
    diagrams = A.phase_diagrams(table)
    if not diagrams:
        return
    out["phase"] = table
    out["phase_diagrams"] = diagrams
    counts = ", ".join(f"{(table['phase'] == p).sum()} {p}" for p in A.PHASES)
    out.setdefault("texts", {})["phase"] = f"{phase_rule(**th)}\n\nCells: {counts}."


def fork_caution_notes(forks: pd.DataFrame) -> list[str]:
    """A note per fork whose "same" arm, the ratios' denominator, does not count (a minority of its seeds
    grokked after the fork): its median delay is over those few."""
    notes = []
    same = forks.loc[forks["arm"] == "same"]
    for _, r in same.iterrows():
        if 2 * int(r["n_grokked"]) < int(r["n_seeds"]):     # does not count: fewer than half grokked
            where = ", ".join(f"{k}={format_value(r[k])}" for k in ("p", "tau", "fork_step") if k in r)
            notes.append(f"Forks ({where}): only {int(r['n_grokked'])}/{int(r['n_seeds'])} seeds of the "
                         "\"same\" arm grokked, so the ratios against it rest on those few; read them with care.")
    return notes


def collapse_table(cells: pd.DataFrame) -> pd.DataFrame:
    """`A.collapse_r2` over the settings whose counting cells span a collapse grid (>= 3 rhos,
    >= 2 taus; `A.collapse_grid`); empty when none does."""
    grid = A.collapse_grid(A.counting_cells(cells))
    return A.collapse_r2(grid) if len(grid) else pd.DataFrame()


def several_taus(cells: pd.DataFrame) -> bool:
    """Whether the cells have more than one tau."""
    return "tau" in cells.columns and cells["tau"].nunique() > 1


def some_setting_sweeps_tau(cells: pd.DataFrame) -> bool:
    """Whether some setting's non-fork cells have several taus: a tau sweep was attempted."""
    return any(several_taus(g) for _, g in A.setting_groups(cells.loc[~A.is_fork(cells)]))


def add_mediation(out: dict, cells: pd.DataFrame, models: pd.DataFrame, *, rho_high, baseline,
                  n_boot: int) -> None:
    """Put the mediation table (when some setting has what it needs) and its notes into `out`.
    rho_high None: picked from the cells (`choose_rho_high`), and a skipped mediation is noted only
    where a tau sweep was attempted (a setting with several taus); a rho_high the caller asked for
    gets a note for every setting it cannot be computed for."""
    asked = rho_high is not None
    if not asked:
        rho_high, note = choose_rho_high(cells, baseline_rho=baseline[0])
        if note and some_setting_sweeps_tau(cells):
            out["notes"].append(note)
    if rho_high is None:
        return
    med = A.mediation_table(cells, models, rho_high=rho_high, baseline=baseline, n_boot=n_boot)
    if len(med):
        out["mediation"] = med
        out["notes"] += mediation_caution_notes(med, cells, n_boot=n_boot)
    out["notes"] += mediation_skip_notes(cells, rho_high=rho_high, baseline=baseline,
                                         only_swept=not asked)


def choose_rho_high(cells: pd.DataFrame, *, baseline_rho: float = 1.0) -> tuple[float | None, str | None]:
    """The mediation's raised dose picked from the cells (`A.tau_sweep_rhos`, `A.pick_rho_high`) and
    a note when the choice needs one: none to pick (the mediation is skipped) or several."""
    rhos = A.tau_sweep_rhos(cells, baseline_rho=baseline_rho)
    rho_high = A.pick_rho_high(rhos)
    if rho_high is None:
        return None, (f"Mediation skipped: no rho above the baseline's ({format_value(baseline_rho)}) "
                      "has a tau sweep (>= 2 taus, tau = 1 among them).")
    if len(rhos) > 1:
        return rho_high, (f"Mediation at rho_high = {format_value(rho_high)}, chosen among the rhos "
                          f"with a tau sweep ({', '.join(format_value(r) for r in rhos)}): the "
                          f"study's {format_value(A.STUDY_RHO_HIGH)} if present, else the largest; "
                          "analyze_dir(rho_high=...) picks another.")
    return rho_high, None


def mediation_caution_notes(med: pd.DataFrame, cells: pd.DataFrame, *, n_boot: int) -> list[str]:
    """Notes on mediation rows to read with care: a cell in it that does not count (a minority of its
    seeds grokked: its median is over those few), L0 outside the sweep's L (T2 extrapolated), bootstrap
    resamples without a recovery (T1 = T0 in them, or no grokked seed in a cell)."""
    names = varying_setting_cols(cells.loc[~A.is_fork(cells)])
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
    plain = cells.loc[~A.is_fork(cells)]
    names = varying_setting_cols(plain)
    notes = []
    for keys, g in A.setting_groups(plain):
        if only_swept and not several_taus(g):
            continue
        gap = A.mediation_gap(g, rho_high=rho_high, baseline=baseline)
        if gap is not None:
            notes.append(f"Mediation skipped{for_setting(keys, names)}: {gap}.")
    return notes


def varying_setting_cols(cells: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[str]:
    """The setting columns (and `extra`) whose values differ between the cells: the ones that tell
    the run's settings apart."""
    return [k for k in (*A.SETTING_COLS, *extra)
            if k in cells.columns and cells[k].nunique(dropna=False) > 1]


def for_setting(keys: dict, names: list[str]) -> str:
    """" for k=v, ..." naming a setting by the columns `names` (from `varying_setting_cols`); empty
    when none varies (the run has one setting)."""
    text = ", ".join(f"{k}={format_value(keys[k])}" for k in names if k in keys)
    return f" for {text}" if text else ""


def missing_fit_notes(cells: pd.DataFrame) -> list[str]:
    """Why a fit on T_grok the run's cells were laid out for is missing: one note when no seed of the
    run grokked, else one per setting whose collapse regression or dose law has too few counting
    cells (see `collapse_skip_notes`, `dose_law_skip_notes`)."""
    if int(cells["n_grokked"].sum()) == 0:
        return [f"Nothing grokked: none of the {int(cells['n_seeds'].sum())} models reached T_grok, "
                "so no table built on T_grok (mediation, collapse regression, dose law) can be "
                "computed."]
    return collapse_skip_notes(cells) + dose_law_skip_notes(cells)


def _counting_line(cells: pd.DataFrame) -> str:
    return (f"{len(A.counting_cells(cells))} of its {len(cells)} cells count (at least half their "
            "seeds grokked)")


def collapse_skip_notes(cells: pd.DataFrame) -> list[str]:
    """A note per setting whose cells span a collapse grid (>= 3 rhos, >= 2 taus) but whose
    counting cells give no regression (`A.collapse_r2` needs >= 4 with an L at grok, spanning the
    grid)."""
    plain = cells.loc[~A.is_fork(cells)]
    names = varying_setting_cols(plain)
    notes = []
    for keys, g in A.setting_groups(plain):
        if A.spans_collapse_grid(g) and len(collapse_table(g)) == 0:
            notes.append(f"Collapse regression missing{for_setting(keys, names)}: "
                         f"{_counting_line(g)}; it needs >= 4 of them with an L at grok, at >= 3 "
                         "rhos and >= 2 taus.")
    return notes


def dose_law_skip_notes(cells: pd.DataFrame) -> list[str]:
    """A note per setting and tau whose cells span >= 3 distinct ‖W‖ (`A.dose_groups`) but whose
    counting cells do not, so `A.dose_law` leaves it out."""
    plain = cells.loc[~A.is_fork(cells)]
    names = varying_setting_cols(plain, extra=("tau",))
    return [f"Dose law missing{for_setting(keys, names)}: {_counting_line(g)}; the fit needs >= 3 "
            "distinct ‖W‖ among them."
            for keys, g in A.dose_groups(plain) if len(A.dose_law(g)) == 0]


def calibration_table(run_dir) -> pd.DataFrame:
    """The run's clamp calibration (DIR/calibration.json, written by `rundir.record_calibration`): per
    calibration key, w_c, n_grokked of seeds, the step its norms were read at and its source ("last
    grok": every seed grokked, the median ‖W‖ at the step the last one did, the study's rule; "budget":
    the control ran to its budget, the median ‖W‖ there). Empty when the run has none."""
    from fastgrok import rundir  # here, not at the top: it imports torch (plan.py), which no table needs

    cal = rundir.read_calibration(run_dir)
    cols = ["key", "w_c", "n_grokked", "seeds", "step", "source"]
    return pd.DataFrame([{"key": k, **{c: v.get(c) for c in cols[1:]}} for k, v in cal.items()],
                        columns=cols)


def calibration_warnings(calibration: pd.DataFrame) -> list[str]:
    """A warning per calibration in which no seed grokked: its w_c is not a critical norm, so every
    rho of that setting is relative to a meaningless w_c."""
    return [f"no calibration seed grokked for {r.key} (0/{format_value(r.seeds)}): w_c = "
            f"{format_value(r.w_c)} is the median ‖W‖ at the budget's end, not where grokking ended, so every rho of this "
            "setting is relative to a meaningless w_c."
            for r in calibration.itertuples() if r.n_grokked == 0]


def grid_progress(run_dir, models: pd.DataFrame) -> tuple[int, int] | None:
    """(cells done, cells planned) of a grid run (DIR/plan.json); None when the run has no plan. A
    planned cell is done when models.parquet holds all its seeds: the grid writes that table from
    the finished batches only (the batches' parts, which `rundir.status_table` counts, may be gone
    from a copied run directory)."""
    from fastgrok import rundir  # here, not at the top: it imports torch (plan.py), which no table needs

    path = Path(run_dir) / rundir.PLAN
    if not path.exists():
        return None
    plan = rundir.read_plan(run_dir)
    return len(rundir.cells_complete(models, plan)), len(plan["cells"])


def grid_progress_warnings(run_dir, models: pd.DataFrame) -> list[str]:
    """The warning "partial: k/n cells done" when the run's grid plan has cells not done yet (see
    `grid_progress`); for a `fastgrok train` run (no plan) stopped before its end, "unfinished: stopped at
    step s of n". None for a finished run."""
    progress = grid_progress(run_dir, models)
    if progress is None:
        path = Path(run_dir) / "progress.json"            # store.PROGRESS, written by every Trainer
        if not path.exists():
            return []
        p = store.read_progress(path)
        if p.get("done", True):
            return []
        at = p.get("checkpoint") or p.get("step")     # the results are the last checkpoint's
        n = [f"{x:,}" if isinstance(x, int) else "?" for x in (at, p.get("steps"))]
        return [f"unfinished: this run stopped at step {n[0]} of {n[1]}; the "
                f"tables cover the steps trained so far (continue it: fastgrok train --resume {run_dir})."]
    if progress[0] == progress[1]:
        return []
    return [f"partial: {progress[0]}/{progress[1]} cells done; the tables cover the finished "
            "cells only."]


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


def fig_curves(curves_c: pd.DataFrame, cells: pd.DataFrame, stem: Path) -> list[Path]:
    """Train and test accuracy vs step, one line per cell (mean over seeds)."""
    fig, axes = _panels(2, w=5.5)
    labels, cmap = cell_labels(cells), plt.get_cmap("viridis")
    ids = list(cells["cell"])
    for ax, metric in zip(axes, ("train_acc", "test_acc")):
        m = curves_c.loc[(curves_c["metric"] == metric) & (curves_c["step"] > 0)]
        for i, cell in enumerate(ids):
            g = m.loc[m["cell"] == cell]
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


def fig_phase(diagrams: list[dict], stem: Path) -> list[Path]:
    """One panel per phase diagram (`A.phase_diagrams`): cells on categorical axes (the values in
    ascending order, log-spaced in the built-in spec), coloured by median T_grok on a log scale, hatched
    grey where fewer than half the seeds grokked (the study's rule for a cell to count), a letter per cell
    for its phase, black lines between cells of different phase."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    fig, axes = _panels(len(diagrams), w=5.2, h=4.6)
    for ax, dg in zip(axes, diagrams):
        c, y, x = dg["cells"], dg["y"], dg["x"]
        ys, xs = sorted(c[y].unique()), sorted(c[x].unique())
        T = np.full((len(ys), len(xs)), np.nan)                        # (Y, X) median T_grok
        phase = np.full((len(ys), len(xs)), None, dtype=object)       # (Y, X) the cell's phase
        for _, r in c.iterrows():
            i, j = ys.index(r[y]), xs.index(r[x])
            counts = 2 * r["n_grok"] >= r["n"]                         # the study's rule for a cell's T_grok
            T[i, j], phase[i, j] = r["T_grok"] if counts else np.nan, r["phase"]
        ok = np.isfinite(T) & (T > 0)
        if ok.any():
            im = ax.imshow(np.where(ok, T, np.nan), origin="lower", aspect="auto", cmap="viridis",
                           norm=LogNorm(vmin=T[ok].min(), vmax=max(T[ok].max(), T[ok].min() * 1.01)))
            fig.colorbar(im, ax=ax, label="median T_grok")
        else:
            ax.imshow(np.full(T.shape, np.nan), origin="lower", aspect="auto")
        for i in range(len(ys)):
            for j in range(len(xs)):
                if phase[i, j] is None:
                    continue
                if not ok[i, j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="//",
                                           edgecolor="0.6", lw=0))
                ax.text(j, i, PHASE_LETTERS[phase[i, j]], ha="center", va="center", fontsize=9,
                        fontweight="bold", path_effects=[withStroke(linewidth=2.5, foreground="white")])
                # boundaries: to the right and above, where the neighbouring cell's phase differs
                if j + 1 < len(xs) and phase[i, j + 1] is not None and phase[i, j + 1] != phase[i, j]:
                    ax.plot([j + 0.5, j + 0.5], [i - 0.5, i + 0.5], color="black", lw=2)
                if i + 1 < len(ys) and phase[i + 1, j] is not None and phase[i + 1, j] != phase[i, j]:
                    ax.plot([j - 0.5, j + 0.5], [i + 0.5, i + 0.5], color="black", lw=2)
        ax.set_xticks(range(len(xs)), [format_value(v) for v in xs])
        ax.set_yticks(range(len(ys)), [format_value(v) for v in ys])
        ax.set(xlim=(-0.5, len(xs) - 0.5), ylim=(-0.5, len(ys) - 0.5), xlabel=AXIS_NAMES.get(x, x),
               ylabel=AXIS_NAMES.get(y, y))
        fixed, v = dg["fixed"]
        ax.set_title(f"{_title(dg['keys'])}\n{y} × {x} at {fixed}={format_value(v)}")
    return _save(fig, stem)


def fig_interventions(table: pd.DataFrame, models: pd.DataFrame, curves: pd.DataFrame, stem: Path) -> list[Path]:
    """Mean test accuracy and SC rate over each arm's seeds against the step, one line per arm."""
    c = A.cell_curves(models, curves, metrics=("test_acc", "sc_rate"))
    fig, axes = _panels(2)
    for ax, metric, label in zip(axes, ("test_acc", "sc_rate"), ("test accuracy", "SC rate (softmax readout)")):
        for row in table.itertuples():
            x = c[(c["cell"] == row.cell) & (c["metric"] == metric)].sort_values("step")
            ax.plot(x["step"], x["value"], label=row.arm or f"cell {row.cell}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
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


def write_report(run_dir, result: dict | None = None, out=None) -> Path:
    """Write OUT/figures/*.png|pdf and OUT/report.md (OUT: the run directory unless given, so a run kept
    read-only, such as the repository's docs/ run, can be analyzed elsewhere); return the report's path."""
    src = Path(run_dir)
    d = Path(out) if out is not None else src
    result = result if result is not None else analyze_dir(src)
    models, curves, _ = A.load_run(src)
    cells, figs = result["cells"], {}
    (d / "figures").mkdir(parents=True, exist_ok=True)
    curves_c = A.cell_curves(models, curves)
    if "mediation" in result:
        figs["mediation"] = fig_mediation(result["mediation"], cells, d / "figures" / "mediation")
    if "collapse" in result:
        figs["collapse"] = fig_collapse(result["collapse"], cells, d / "figures" / "collapse")
    if "forks" in result:
        figs["forks"] = fig_forks(result["forks"], curves_c, d / "figures" / "forks")
    if "phase_diagrams" in result:
        figs["phase"] = fig_phase(result["phase_diagrams"], d / "figures" / "phase")
    if "interventions" in result and not curves.empty:
        figs["interventions"] = fig_interventions(result["interventions"], models, curves,
                                                  d / "figures" / "interventions")
    if not curves_c.empty:
        plain = cells.loc[~A.is_fork(cells)]
        if len(plain):
            figs["curves"] = fig_curves(curves_c, plain, d / "figures" / "curves")

    lines = [f"# fastgrok report: {src.name}", ""]
    for w in result["warnings"]:
        lines += [f"> **Warning:** {w}", ""]
    if result["config"]:
        lines += [f"Config: {_config_line(result['config'])}", ""]
    for n in result["notes"]:
        lines += [f"Note: {n}", ""]
    for key, title in TABLES:
        if key not in result:
            continue
        lines += ["", f"## {title}", ""]
        if key in result.get("texts", {}):
            lines += [result["texts"][key], ""]
        if key == "phase" and key in figs:          # the diagrams first: the table is long
            lines += [f"![{key}](figures/{figs[key][0].name}) ([PDF](figures/{figs[key][1].name}))", ""]
        lines += [f"<!-- table: {key} -->", markdown_table(result[key]), ""]
        if key == "phase":
            continue
        if key in figs:
            lines += [f"![{key}](figures/{figs[key][0].name}) ([PDF](figures/{figs[key][1].name}))"]
    if "curves" in figs:
        lines += ["", "## Learning curves", "", f"![curves](figures/{figs['curves'][0].name}) "
                  f"([PDF](figures/{figs['curves'][1].name}))"]
    path = d / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def render_terminal(result: dict, console=None) -> None:
    """Print the result's warnings, notes and tables with rich (numbers via format_value, as in
    report.md), every value whole at the console's width (see `terminal_tables`)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    console.print(f"[bold]fastgrok analysis[/bold] {escape(str(result['dir']))}")
    for w in result["warnings"]:
        console.print(f"[bold red]warning:[/bold red] {escape(w)}")
    for n in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    for key, title in TABLES:
        if key in result:
            if key in result.get("texts", {}):
                console.print(escape(result["texts"][key].replace("**", "")))
            for table in terminal_tables(result[key], title, console.width):
                console.print(table)


def terminal_tables(df: pd.DataFrame, title: str, width: int) -> list:
    """rich renderables that show df whole in `width` terminal cells: a one-row table as
    field/value rows; otherwise its varying columns (`display_table`) in as many tables as it takes
    to fit (`column_groups`), then a line with the constant ones. A value wider than the terminal
    folds onto the next line; none is cut to an ellipsis."""
    from rich.text import Text

    if len(df) == 1:
        return [field_value_table(df.iloc[0], title)]
    consts, shown = display_table(df)
    groups = column_groups(shown, width)
    out = [rich_table(shown[cols], title if len(groups) == 1 else f"{title} ({i}/{len(groups)})")
           for i, cols in enumerate(groups, start=1)]
    if consts:
        out.append(Text("all rows: " + "; ".join(f"{k} = {format_value(v)}" for k, v in consts.items())))
    return out


def field_value_table(row: pd.Series, title: str):
    """One table row as a rich table of field / value rows, which fits any terminal width."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    table.add_column("field", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    for field, v in row.items():
        table.add_row(Text(str(field)), Text(format_value(v)))
    return table


def rich_table(df: pd.DataFrame, title: str):
    """df as a rich table, values right-justified, folded (never cut) when a column must narrow."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for c in df.columns:
        table.add_column(str(c), justify="right", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*(Text(format_value(v)) for v in row))
    return table


def column_width(df: pd.DataFrame, col) -> int:
    """Terminal cells a column of df takes in a rich table: its widest entry (header or value) plus
    the padding on either side and one border."""
    from rich.cells import cell_len

    return 3 + max([cell_len(str(col))] + [cell_len(format_value(v)) for v in df[col]])


def column_groups(df: pd.DataFrame, width: int) -> list[list]:
    """df's columns split into groups whose rich tables each fit `width` terminal cells; the first
    column (the rows' label, e.g. cell) leads every group. One group when the whole table fits."""
    if df.shape[1] == 0:
        return [[]]
    label, *rest = df.columns
    start = 1 + column_width(df, label)                 # the left border, then the label column
    groups, used = [[label]], start
    for c in rest:
        w = column_width(df, c)
        if len(groups[-1]) > 1 and used + w > width:
            groups.append([label])
            used = start
        groups[-1].append(c)
        used += w
    return groups
