"""The analysis of a run directory and its one-page Markdown report.

`analyze_dir(dir)` computes every analysis whose cells are present in the run (the statistics:
analysis.py, mediation.py, regressions.py, phases.py, interventions.py), with warnings (an
unfinished grid, a calibration in which no seed grokked) and notes (how the mediation's rho_high was
chosen; why an analysis the run was laid out for is missing: a skipped mediation, a dose law or
collapse regression with too few grokked cells, nothing grokked at all); `write_report(dir)` writes
DIR/report.md and DIR/figures/*.png|pdf (figures.py); `terminal.render_terminal(result)` prints the
same with rich. Every number shown, in Markdown or in the terminal, goes through
`display.format_value`, so the report shows exactly the values of the returned tables.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fastgrok.analysis import statistics as A
from fastgrok.analysis import interventions, mediation, phases, regressions
from fastgrok import store
from fastgrok.analysis.display import TABLES, display_table, for_setting, format_value
from fastgrok.analysis.figures import fig_collapse, fig_curves, fig_forks, fig_interventions, fig_mediation, fig_phase

CONFIG_KEYS = ("experiment", "p", "op", "model", "loss", "taus", "norm_targets", "seeds", "steps",
               "lr", "wd", "train_frac", "dtype")
"""Config entries shown in the report's header (when present)."""


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
def load_checked(d: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """`analysis.open_run`, with a file it cannot use (torn, foreign, missing columns, no or repeated
    rows) reported as one StateError naming the file."""
    try:
        return A.open_run(d)
    except ValueError as e:                     # analysis.check_models: no rows, repeated models
        raise store.state_error(d / store.MODELS, str(e)) from None


def analyze_dir(run_dir, *, rho_high: float | None = None, baseline=(1.0, 1.0),
                n_boot: int = A.N_BOOT) -> dict:
    """All analyses that apply to the run's cells. Keys: dir, config, warnings, notes, cells, and
    when present calibration, mediation, collapse, dose_law, memorization, forks (DataFrames); "run", the
    models table and store.Results it read (every part's seal checked once), which `write_report` reuses.
    rho_high: the mediation's raised dose; None picks it from the cells (`mediation.choose_rho_high`)."""
    d = Path(run_dir)
    models, curves, config = load_checked(d)
    cells = A.cell_table(models, curves)
    calibration = calibration_table(d)
    out = {"dir": d, "config": config, "run": (models, curves),
           "warnings": grid_progress_warnings(d, models) + calibration_warnings(calibration),
           "notes": [], "cells": cells}
    if len(calibration):
        out["calibration"] = calibration
    plain = cells.loc[~A.is_fork(cells)]
    swept = mediation.some_setting_sweeps_tau(plain)
    if A.has_values(plain, "rho"):
        add_mediation(out, cells, models, rho_high=rho_high, baseline=baseline, n_boot=n_boot)
        collapse = collapse_table(plain)
        if len(collapse):
            out["collapse"] = collapse
    elif swept:
        out["notes"].append("No rho values: mediation and the collapse regression need the "
                            "clamp dose rho of each cell.")
    dose = regressions.dose_law(cells)
    if len(dose):
        out["dose_law"] = dose
    out["notes"] += missing_fit_notes(cells)
    if swept:
        out["memorization"] = A.memorization_table(cells)
    if "arm" in models.columns and models["arm"].notna().any():
        out["forks"] = A.fork_table(models, n_boot=n_boot)
        out["notes"] += fork_caution_notes(out["forks"])
    add_phases(out, models)
    if interventions.has_interventions(models):
        out["interventions"] = interventions.interventions_table(cells)
        out.setdefault("texts", {})["interventions"] = INTERVENTIONS_TEXT
        claims = interventions.claims_table(models)
        if len(claims):
            out["claims"] = claims
            out["texts"]["claims"] = CLAIMS_TEXT
    return out


CLAIMS_TEXT = (
    "One row per intervention cell of a run whose blocks name their regime (each paper's own setting): the "
    "paper's claim, the test applied, and the medians over seeds of T_grok for the intervention, its baseline "
    "(the same regime and lr without the intervention; for StableMax, softmax CE) and the lr-matched control "
    "(the same without the intervention at the regime's other lr nearest 1.40x the intervention's: Grokfast's step under Adam). A seed that never groks counts as "
    "later than its budget, so a median written '> N' is a lower bound. 'undetermined' says which cell or "
    "budget the test lacked.")


INTERVENTIONS_TEXT = (
    "Each arm is a cell of the same seeds and splits, trained in one batch: T_mem and T_grok are medians "
    "over the seeds that reached them, delay = T_grok − T_mem, sc_rate the mean over seeds of the final "
    "fraction of train rows whose softmax(z/τ)_y is exactly 1 (the softmax readout for every loss: a "
    "StableMax model with large logits reads as collapsed although its own probabilities are not), "
    "test_loss the median final loss over the test rows. The figure: mean test accuracy and SC rate over "
    "the seeds against the step, one line per arm (of more than 200 arms, 200 evenly spaced).")


def run_thresholds(run_dir, config: dict) -> dict:
    """The mem_threshold and grok_threshold a run's T_mem and T_grok were recorded at: a grid's spec
    (spec.json's [train]), else a train run's config.json, else TrainConfig's defaults."""
    from fastgrok.config import TrainConfig

    spec = Path(run_dir) / store.SPEC_JSON
    train = store.read_json(spec).get("train", {}) if spec.exists() else config
    train = train if isinstance(train, dict) else {}
    return {k: float(train.get(k, getattr(TrainConfig, k))) for k in ("mem_threshold", "grok_threshold")}


def phase_rule(mem_threshold: float, grok_threshold: float, ratio: float = phases.COMPREHENSION_RATIO) -> str:
    """The phase classification (`phases.seed_phases`, `phases.majority_phase`) in words, with the run's thresholds."""
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
    run's cells span a phase diagram (`phases.phase_diagrams`: lr x wd or train_frac x wd)."""
    th = run_thresholds(out["dir"], out["config"])
    table = phases.phase_table(models, **th)
    diagrams = phases.phase_diagrams(table)
    if not diagrams:
        return
    out["phase"] = table
    out["phase_diagrams"] = diagrams
    counts = ", ".join(f"{(table['phase'] == p).sum()} {p}" for p in phases.PHASES)
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
    """`regressions.collapse_r2` over the settings whose counting cells span a collapse grid (>= 3 rhos,
    >= 2 taus; `regressions.collapse_grid`); empty when none does."""
    grid = regressions.collapse_grid(A.counting_cells(cells))
    return regressions.collapse_r2(grid) if len(grid) else pd.DataFrame()


def add_mediation(out: dict, cells: pd.DataFrame, models: pd.DataFrame, *, rho_high, baseline,
                  n_boot: int) -> None:
    """Put the mediation table (when some setting has what it needs) and its notes into `out`.
    rho_high None: picked from the cells (`mediation.choose_rho_high`), and a skipped mediation is noted only
    where a tau sweep was attempted (a setting with several taus); a rho_high the caller asked for
    gets a note for every setting it cannot be computed for."""
    asked = rho_high is not None
    if not asked:
        rho_high, note = mediation.choose_rho_high(cells, baseline_rho=baseline[0])
        if note and mediation.some_setting_sweeps_tau(cells):
            out["notes"].append(note)
    if rho_high is None:
        return
    med = mediation.mediation_table(cells, models, rho_high=rho_high, baseline=baseline, n_boot=n_boot)
    if len(med):
        out["mediation"] = med
        out["notes"] += mediation.mediation_caution_notes(med, cells, n_boot=n_boot)
    out["notes"] += mediation.mediation_skip_notes(cells, rho_high=rho_high, baseline=baseline,
                                         only_swept=not asked)


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
    counting cells give no regression (`regressions.collapse_r2` needs >= 4 with an L at grok, spanning the
    grid)."""
    plain = cells.loc[~A.is_fork(cells)]
    if not (A.has_values(plain, "rho") and A.has_values(plain, "tau")):    # no setting spans one
        return []
    names = A.varying_setting_cols(plain)
    notes = []
    for keys, g in A.setting_groups(plain):
        if regressions.spans_collapse_grid(g) and len(collapse_table(g)) == 0:
            notes.append(f"Collapse regression missing{for_setting(keys, names)}: "
                         f"{_counting_line(g)}; it needs >= 4 of them with an L at grok, at >= 3 "
                         "rhos and >= 2 taus.")
    return notes


def dose_law_skip_notes(cells: pd.DataFrame) -> list[str]:
    """A note per setting and tau whose cells span >= 3 distinct ‖W‖ (`regressions.dose_groups`) but whose
    counting cells do not, so `regressions.dose_law` leaves it out."""
    plain = cells.loc[~A.is_fork(cells)]
    names = A.varying_setting_cols(plain, extra=("tau",))
    return [f"Dose law missing{for_setting(keys, names)}: {_counting_line(g)}; the fit needs >= 3 "
            "distinct ‖W‖ among them."
            for keys, g in regressions.dose_groups(plain) if len(regressions.dose_law(g)) == 0]


def calibration_table(run_dir) -> pd.DataFrame:
    """The run's clamp calibration (DIR/calibration.json, written by `grid.rundir.record_calibration`): per
    calibration key, w_c, n_grokked of seeds, the step its norms were read at and its source ("last
    grok": every seed grokked, the median ‖W‖ at the step the last one did, the study's rule; "budget":
    the control ran to its budget, the median ‖W‖ there). Empty when the run has none."""
    cal = store.read_calibration(run_dir)
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
    the finished batches only (the batches' parts, which `grid.rundir.status_table` counts, may be gone
    from a copied run directory)."""
    path = Path(run_dir) / store.PLAN
    if not path.exists():
        return None
    plan = store.read_plan(run_dir)
    return len(store.cells_complete(models, plan)), len(plan["cells"])


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
# The Markdown report
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
    # the run analyze_dir read (its parts' seals checked, models read once); a result of another
    # directory, or one without it, is read again
    models, curves = (result["run"] if "run" in result and Path(result["dir"]) == src
                      else A.open_run(src)[:2])
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

