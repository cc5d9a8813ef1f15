"""report.py, figures.py and terminal.py: a synthetic run directory in the trainer's schema goes through
analyze_dir and write_report; the figures exist and every number in report.md is the returned tables' number."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fastgrok import store
from fastgrok.analysis import figures
from fastgrok.analysis import report as R
from fastgrok.analysis.terminal import column_groups, column_width, render_terminal

from report_tables import check_tables, parse_tables

STEPS = np.arange(0, 4001, 25)          # evaluation steps
LOG_STEPS = np.arange(0, 4001, 200)     # logit_scale steps
W_C = 54.5
OFFSETS = (-50, 0, 25, 75, -25, 50)     # per-seed shifts of T_grok (multiples of 25)


def _write_run(d, cells, n_seeds, extra=None):
    """Write models.parquet / curves.parquet / config.json for cells = list of dicts with the
    describing columns plus T (grok centre), L (logit scale near grok), Tm (memorization)."""
    models, curves, mid = [], [], 0
    for c, spec in enumerate(cells):
        for s in range(n_seeds):
            tg = spec["T"] + OFFSETS[s] * (1 + c % 3)  # cell-dependent spread: a non-trivial CI
            if spec.get("no_grok") in (s, "all"):      # one seed's index, or "all" seeds
                tg = None
            tm = spec["Tm"] + 25 * (s % 2)
            rho = spec.get("rho")
            nt = spec.get("norm_target", rho * W_C if rho is not None else None)
            models.append(dict(
                model=mid, cell=c, seed=s, tau=spec["tau"], norm_target=nt, rho=rho, t_mem=tm,
                t_grok=tg, logit_scale_at_grok=spec["L"] if tg else None, sc_rate=0.01 * s,
                train_acc=1.0, test_acc=0.95 if tg else 0.3, weight_norm=nt or 60.0 + s,
                diverged=False, steps=int(STEPS[-1]),
                **{k: v for k, v in spec.items() if k not in ("T", "L", "Tm", "no_grok", "rho",
                                                                 "tau", "norm_target")}))
            t_end = tg if tg else 10**9
            for metric, vals in (
                    ("train_loss", np.exp(-STEPS / 500)),
                    ("train_acc", np.where(STEPS >= tm, 1.0, STEPS / tm * 0.9)),
                    ("test_acc", np.where(STEPS >= t_end, 0.95, 0.1)),
                    ("sc_rate", np.where(STEPS >= tm, 0.01 * s, 0.0)),
                    ("weight_norm", (nt or 60.0 + s) + 0 * STEPS)):
                curves.append(pd.DataFrame(dict(model=mid, step=STEPS, metric=metric, value=vals)))
            # L rises through the cell's L near its T_grok; seeds differ by ±0.5 (mean unchanged)
            L = spec["L"] + (LOG_STEPS - spec["T"]) / 1000 + (0.5 if s % 2 else -0.5)
            curves.append(pd.DataFrame(dict(model=mid, step=LOG_STEPS, metric="logit_scale", value=L)))
            mid += 1
    m = pd.DataFrame(models)
    for col in ("t_mem", "t_grok"):
        m[col] = m[col].astype("Int64")
    m.to_parquet(d / "models.parquet")
    pd.concat(curves, ignore_index=True).to_parquet(d / "curves.parquet")
    (d / "config.json").write_text(json.dumps(extra or {"p": 59, "op": "add", "loss": "ce"}))


MEDIATION = [dict(rho=1.0, tau=1.0, T=1000, L=20.0, Tm=175),
             dict(rho=1.15, tau=1.0, T=3000, L=30.0, Tm=175),
             dict(rho=1.15, tau=1.15, T=2400, L=27.0, Tm=175),
             dict(rho=1.15, tau=1.3, T=2000, L=24.0, Tm=200, no_grok=3),
             dict(rho=1.15, tau=1.5, T=1400, L=21.0, Tm=175),
             dict(rho=1.15, tau=1.7, T=900, L=18.0, Tm=200)]


def test_analyze_then_report_reads_the_run_once(tmp_path, monkeypatch):
    """write_report of analyze_dir's result reuses the run analyze_dir read (each results file's bytes read
    and its seal checked once, not twice), and writes the report.md a fresh read of the directory writes."""
    _write_run(tmp_path, MEDIATION, n_seeds=4)
    reads, real = [], store.read_verified
    monkeypatch.setattr(store, "read_verified", lambda p: reads.append(Path(p).name) or real(p))
    result = R.analyze_dir(tmp_path, n_boot=200)
    text = R.write_report(tmp_path, result).read_text()
    assert reads.count("models.parquet") == 1 and reads.count("curves.parquet") == 1
    monkeypatch.undo()
    fresh = {k: v for k, v in result.items() if k != "run"}          # write_report reads the directory
    assert R.write_report(tmp_path, fresh, out=tmp_path / "again").read_text() == text


def test_mediation_run_report(tmp_path):
    _write_run(tmp_path, MEDIATION, n_seeds=4)
    result = R.analyze_dir(tmp_path)
    assert {"cells", "mediation", "memorization"} <= set(result)
    assert "collapse" not in result and "forks" not in result and "dose_law" not in result
    med = result["mediation"].iloc[0]
    # T_grok offsets (-50, 0, 25, 75) * (1 + cell % 3) -> median T + 12.5 * (1 + cell % 3);
    # the tau=1.3 cell (cell 3) lost seed 3 -> median of (-50, 0, 25) -> T + 0
    assert (med["T0"], med["T1"]) == (1012.5, 3025)
    assert med["ci_low"] < med["recovery"] < med["ci_high"]
    cells = result["cells"].set_index("cell")
    assert cells.loc[3, "n_grokked"] == 3 and cells.loc[3, "T_grok"] == 2000

    path = R.write_report(tmp_path, result)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for name in ("mediation", "curves"):
        for ext in ("png", "pdf"):
            f = tmp_path / "figures" / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 0
        assert f"figures/{name}.png" in text
    check_tables(result, text)
    assert R.format_value(med["recovery"]) in text

    buf = io.StringIO()
    from rich.console import Console
    render_terminal(result, console=Console(file=buf, width=250))
    assert R.format_value(med["recovery"]) in buf.getvalue()


def test_grid_run_with_forks_report(tmp_path):
    grid = [dict(experiment="collapse", p=59, loss="ce", rho=rho, tau=tau,
                 T=int(round(np.exp(4 + 0.1 * L) / 25)) * 25, L=L, Tm=175)
            for rho in (1.0, 1.05, 1.10) for tau in (1.0, 1.7)
            for L in [20 * rho * (1.3 / tau) ** 0.5]]
    forks = [dict(experiment="forks", p=59, loss="ce", tau=1.0, arm=arm, fork_step=800,
                  norm_target=f and W_C * f, T=T, L=25.0, Tm=175)
             for arm, f, T in (("same", 1.0, 2000), ("raised", 1.15, 3500), ("free", None, 1500))]
    _write_run(tmp_path, grid + forks, n_seeds=2, extra={"experiment": "grid"})
    result = R.analyze_dir(tmp_path, n_boot=500)
    assert {"collapse", "dose_law", "memorization", "forks"} <= set(result)
    # rho 1.05 and 1.10 both have a tau sweep (1.0, 1.7) and there is no 1.15: the largest, noted
    assert list(result["mediation"]["rho_high"]) == [1.10]
    assert any("rho_high = 1.1, chosen among" in n and "(1.05, 1.1)" in n for n in result["notes"])
    col = result["collapse"].iloc[0]
    assert col["n_cells"] == 6 and 0 <= col["r2_L"] <= 1
    f = result["forks"].set_index("arm")
    # two seeds at offsets (-50, 0) * (1 + cell % 3): same is cell 6 (median -25), raised cell 7 (-50)
    assert f.loc["raised", "ratio"] == pytest.approx((3500 - 50 - 800) / (2000 - 25 - 800))
    # the study's collapse-free fit (tau 1, rho 1.0-1.10: no L jump) and the whole grid per tau
    assert list(zip(result["dose_law"]["fit"], result["dose_law"]["tau"])) == [
        ("collapse-free", 1.0), ("whole grid", 1.0), ("whole grid", 1.7)]

    text = R.write_report(tmp_path, result).read_text()
    for name in ("collapse", "forks", "curves"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0
    check_tables(result, text)


# ---------------------------------------------------------------------------------------------
# The terminal at 80 columns, rho_high, skipped mediation, calibration and unfinished grids
# ---------------------------------------------------------------------------------------------
def _terminal_text(result, width):
    from rich.console import Console
    buf = io.StringIO()
    render_terminal(result, console=Console(file=buf, width=width))
    return buf.getvalue()


def _words(text):
    """text with every run of whitespace (line breaks of a wrapped note included) as one space."""
    return " ".join(text.split())


def test_terminal_at_80_columns_shows_every_value_whole(tmp_path):
    _write_run(tmp_path, MEDIATION, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=500)
    text = _terminal_text(result, width=80)
    shown = set(re.split(r"[\s│┃;]+", text))           # every value printed, as a whole token
    med = result["mediation"].iloc[0]
    for col in ("recovery", "ci_low", "ci_high", "T0", "T1", "T2"):   # the one-row table
        assert R.format_value(med[col]) in shown, col
    for col in result["cells"].columns:                                # the wide multi-row table
        for v in result["cells"][col]:
            assert R.format_value(v) in shown, col
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_column_groups_fit_the_width_and_repeat_the_label():
    df = pd.DataFrame({"cell": [0, 1], **{f"column_{i}": [1234.5, 0.06198] for i in range(12)}})
    groups = column_groups(df, 80)
    assert len(groups) > 1 and all(g[0] == "cell" for g in groups)
    assert [c for g in groups for c in g[1:]] == list(df.columns[1:])
    for g in groups:
        assert 1 + sum(column_width(df, c) for c in g) <= 80
    assert column_groups(df, 10_000) == [list(df.columns)]


def _with_rho(cells, old, new):
    return [{**c, "rho": new} if c["rho"] == old else c for c in cells]


SWEEP_AT_1_3 = [dict(rho=1.3, tau=1.0, T=3500, L=33.0, Tm=175),     # cell 6 when after MEDIATION:
                dict(rho=1.3, tau=1.5, T=1500, L=22.0, Tm=175)]     # median T_grok 3500 + 12.5


@pytest.mark.parametrize("cells, rho_high, T1, note", [
    (_with_rho(MEDIATION, 1.15, 1.3), 1.3, 3025, None),             # the one swept rho, not 1.15
    (MEDIATION + SWEEP_AT_1_3, 1.15, 3025, "(1.15, 1.3)"),          # several: the study's 1.15
    (_with_rho(MEDIATION, 1.15, 1.1) + SWEEP_AT_1_3, 1.3, 3512.5,
     "(1.1, 1.3)"),                                                 # several, no 1.15: the largest
])
def test_rho_high_picked_from_the_tau_sweeps(tmp_path, cells, rho_high, T1, note):
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    med = result["mediation"].iloc[0]
    assert med["rho_high"] == rho_high and (med["T0"], med["T1"]) == (1012.5, T1)
    chosen = [n for n in result["notes"] if "chosen among" in n]
    assert (chosen == []) if note is None else (note in chosen[0])
    if note is not None:
        text = R.write_report(tmp_path, result).read_text()
        assert f"Note: {chosen[0]}" in text
        assert chosen[0] in _words(_terminal_text(result, width=80))


@pytest.mark.parametrize("cells, why", [
    (MEDIATION[1:], "no baseline cell (rho, tau) = (1, 1)"),
    (MEDIATION[:1] + [{**MEDIATION[0], "tau": 1.3}, MEDIATION[1]],    # taus swept at rho 1 only
     "no rho above the baseline's (1) has a tau sweep"),
    ([{**c, "no_grok": "all"} if c["rho"] == 1.15 and c["tau"] > 1 else c for c in MEDIATION],
     "the tau sweep at rho = 1.15 has 1 cell(s) with an L at grok (needs >= 2)"),
])
def test_skipped_mediation_says_why(tmp_path, cells, why):
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert "mediation" not in result
    notes = [n for n in result["notes"] if n.startswith("Mediation skipped")]
    assert len(notes) == 1 and why in notes[0]
    assert f"Note: {notes[0]}" in R.write_report(tmp_path, result).read_text()
    assert f"note: {notes[0]}" in _words(_terminal_text(result, width=80))


def test_skipped_mediation_names_the_setting(tmp_path):
    cells = [{**c, "p": 59} for c in MEDIATION] + [{**c, "p": 97} for c in MEDIATION[1:]]
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert list(result["mediation"]["p"]) == [59]
    assert [n for n in result["notes"] if n.startswith("Mediation skipped")] == [
        "Mediation skipped for p=97: no baseline cell (rho, tau) = (1, 1)."]


def _write_calibration(d, key, t_grok):
    """calibration.json through the grid's own writer: 3 seeds, ‖W‖ = 40, 41, 42 at every step."""
    from fastgrok.grid import rundir
    models = pd.DataFrame({"model": [0, 1, 2], "t_grok": t_grok, "weight_norm": [40.0, 41.0, 42.0],
                           "steps": 300})
    curves = pd.DataFrame([dict(model=m, step=s, metric="weight_norm", value=40.0 + m)
                           for m in range(3) for s in (0, 100, 200, 300)])
    return rundir.record_calibration(d, key, models, curves)


@pytest.mark.parametrize("t_grok, grokked", [([100, 300, None], 2), ([None, None, None], 0)])
def test_report_states_the_calibration(tmp_path, t_grok, grokked):
    _write_run(tmp_path, MEDIATION, n_seeds=4)
    key = "p=59-op=add-model=mlp-loss=ce-lr=0.001-wd=1.0-train_frac=0.4"
    cal = _write_calibration(tmp_path, key, t_grok)
    assert cal["n_grokked"] == grokked and cal["source"] == "budget" and cal["step"] == 300
    result = R.analyze_dir(tmp_path, n_boot=200)
    row = result["calibration"].iloc[0]
    assert (row["key"], row["w_c"], row["n_grokked"], row["seeds"], row["source"]) == (
        key, cal["w_c"], grokked, 3, cal["source"])
    text = R.write_report(tmp_path, result).read_text()
    check_tables(result, text)
    assert "## Clamp calibration" in text and key in text and R.format_value(cal["w_c"]) in text
    terminal = _words(_terminal_text(result, width=80))
    warned = "no calibration seed grokked for " + key
    if grokked:
        assert result["warnings"] == [] and "Warning" not in text and warned not in terminal
    else:
        assert f"> **Warning:** {warned}" in text and "meaningless w_c" in text
        assert f"warning: {warned}" in terminal


def _write_plan(d, n_cells, seeds):
    plan = {"cells": [{"cell": c, "seeds": seeds} for c in range(n_cells)],
            "batches": [{"id": "b000", "cells": list(range(n_cells))}], "calibrations": []}
    (d / "plan.json").write_text(json.dumps(plan))


@pytest.mark.parametrize("cells, n_planned, warning", [
    (MEDIATION[:1], 3, "partial: 1/3 cells done"),
    (MEDIATION, 8, "partial: 6/8 cells done"),
    (MEDIATION, 6, None),
])
def test_unfinished_grid_says_partial(tmp_path, cells, n_planned, warning):
    _write_run(tmp_path, cells, n_seeds=4)
    _write_plan(tmp_path, n_planned, seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    text, terminal = R.write_report(tmp_path, result).read_text(), _terminal_text(result, width=80)
    if warning is None:
        assert result["warnings"] == [] and "partial" not in text and "partial" not in terminal
    else:
        assert f"> **Warning:** {warning}" in text and f"warning: {warning}" in terminal


def test_copied_grid_without_parts_counts_as_done():
    # docs/mediation_p31 is a finished grid whose parts/ were not kept: done by models.parquet
    from pathlib import Path
    run = Path(__file__).resolve().parents[1] / "docs" / "mediation_p31"
    models = pd.read_parquet(run / "models.parquet")
    assert not (run / "parts").exists() and R.grid_progress(run, models) == (6, 6)
    assert R.grid_progress_warnings(run, models) == []


# ---------------------------------------------------------------------------------------------
# What a grid run's cells are told apart by, and the notes of a run without a tau sweep
# ---------------------------------------------------------------------------------------------
GRID_COLS = dict(experiment="x", arm=None, fork_step=None, layer_fracs=None)
"""Columns a grid run writes for every experiment, null outside forks and the alloc experiment."""
ALLOC = [dict(GRID_COLS, experiment="alloc", rho=1.0, tau=1.0, T=T, L=L, Tm=175, layer_fracs=f)
         for f, T, L in (("0.4,0.5,0.1", 1000, 20.0), ("0.25,0.5,0.25", 1400, 22.0),
                         ("0.1,0.5,0.4", 2000, 25.0))]


def test_alloc_cells_are_told_apart_by_layer_fracs(tmp_path):
    _write_run(tmp_path, ALLOC, n_seeds=4, extra={"experiment": "alloc"})
    result = R.analyze_dir(tmp_path, n_boot=200)
    cells = result["cells"]
    assert list(cells["layer_fracs"]) == ["0.4,0.5,0.1", "0.25,0.5,0.25", "0.1,0.5,0.4"]
    assert "arm" not in cells and "fork_step" not in cells        # null for every model
    assert figures.cell_labels(cells) == {0: "layer_fracs=0.4,0.5,0.1", 1: "layer_fracs=0.25,0.5,0.25",
                                          2: "layer_fracs=0.1,0.5,0.4"}
    assert result["notes"] == []                                  # no sweep: nothing to excuse

    text = R.write_report(tmp_path, result).read_text()
    check_tables(result, text)
    consts, header, rows = parse_tables(text)["cells"]
    assert header[:2] == ["cell", "layer_fracs"] and [r[1] for r in rows] == list(cells["layer_fracs"])
    assert "arm" not in consts and "fork_step" not in consts
    terminal = _terminal_text(result, width=250)
    assert "0.25,0.5,0.25" in terminal and "arm =" not in terminal and "fork_step" not in terminal


def test_curves_legend_names_the_layer_fracs(tmp_path, monkeypatch):
    _write_run(tmp_path, ALLOC, n_seeds=2)
    legends = []
    real_save = figures._save

    def save(fig, stem):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend()
                       for t in ax.get_legend().get_texts())
        return real_save(fig, stem)
    monkeypatch.setattr(figures, "_save", save)
    R.write_report(tmp_path, R.analyze_dir(tmp_path, n_boot=200))
    assert legends == ["layer_fracs=0.4,0.5,0.1", "layer_fracs=0.25,0.5,0.25",
                       "layer_fracs=0.1,0.5,0.4"]


def test_other_experiments_look_as_before(tmp_path):
    _write_run(tmp_path, [dict(GRID_COLS, **c) for c in MEDIATION], n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert not {"layer_fracs", "arm", "fork_step"} & set(result["cells"].columns)
    assert set(figures.cell_labels(result["cells"].loc[result["cells"]["cell"] < 2]).values()) == {
        "rho=1 norm_target=54.5", "rho=1.15 norm_target=62.67"}
    text = R.write_report(tmp_path, result).read_text()
    check_tables(result, text)
    terminal = _terminal_text(result, width=250)
    for name in ("layer_fracs", "arm", "fork_step"):                     # (whole words: "warmup" holds "arm")
        assert not re.search(rf"\b{name}\b", text) and not re.search(rf"\b{name}\b", terminal)


def test_display_leaves_out_columns_null_in_every_row():
    df = pd.DataFrame({"cell": [0, 1], "arm": [None, None], "p": [59, 59], "T": [1.0, np.nan]})
    consts, shown = R.display_table(df)
    assert consts == {"p": 59} and list(shown.columns) == ["cell", "T"]
    one_row = df.iloc[:1]
    assert R.display_table(one_row) == ({}, one_row)


@pytest.mark.parametrize("cells", [
    MEDIATION[:2],                                                      # one tau per setting
    [dict(c, dtype=d) for d in ("float32", "float64") for c in MEDIATION[:2]],   # float64 audit
    ALLOC,
])
def test_no_mediation_note_without_a_tau_sweep(tmp_path, cells):
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert "mediation" not in result and result["notes"] == []
    assert "Note:" not in R.write_report(tmp_path, result).read_text()
    assert "note:" not in _terminal_text(result, width=250)


def test_asked_rho_high_notes_a_skipped_mediation_without_a_sweep(tmp_path):
    _write_run(tmp_path, MEDIATION[:2], n_seeds=4)
    result = R.analyze_dir(tmp_path, rho_high=1.15, n_boot=200)
    assert result["notes"] == ["Mediation skipped: the tau sweep at rho = 1.15 has 1 cell(s) with "
                               "an L at grok (needs >= 2)."]


def test_mediation_note_only_for_the_settings_that_swept_tau(tmp_path):
    # p = 59 sweeps tau but lacks a baseline; p = 97 has one tau (a plain dose check): no note for it
    cells = [{**c, "p": 59} for c in MEDIATION[1:]] + [{**c, "p": 97} for c in MEDIATION[:2]]
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert result["notes"] == ["Mediation skipped for p=59: no baseline cell (rho, tau) = (1, 1)."]


DOSE = [dict(rho=rho, tau=1.0, T=T, L=20.0 * rho, Tm=175)
        for rho, T in ((0.9, 800), (1.0, 1000), (1.1, 1500), (1.2, 2300))]


def _no_grok(cells, which):
    return [{**c, "no_grok": "all"} if i in which else c for i, c in enumerate(cells)]


@pytest.mark.parametrize("cells, table, note", [
    (DOSE, "dose_law", None),
    (_no_grok(DOSE, {1, 2, 3}), "dose_law",
     "Dose law missing: 1 of its 4 cells count (at least half their seeds grokked); the fit needs >= 3 "
     "distinct ‖W‖ among them."),
    ([{**c, "p": p} for p in (59, 97) for c in _no_grok(DOSE, {0, 1} if p == 97 else set())],
     "dose_law", "Dose law missing for p=97: 2 of its 4 cells count"),
    (_no_grok(DOSE, {0, 1, 2, 3}), "dose_law",
     "Nothing grokked: none of the 16 models reached T_grok, so no table built on T_grok"),
    ([dict(rho=rho, tau=tau, T=1000 + int(rho * 1000) // 25 * 25, L=20 * rho / tau, Tm=175)
      for rho in (1.0, 1.05, 1.1) for tau in (1.0, 1.7)], "collapse", None),
    (_no_grok([dict(rho=rho, tau=tau, T=1000 + int(rho * 1000) // 25 * 25, L=20 * rho / tau,
                    Tm=175) for rho in (1.0, 1.05, 1.1) for tau in (1.0, 1.7)], {0, 2, 4}),
     "collapse", "Collapse regression missing: 3 of its 6 cells count (at least half their "
                 "seeds grokked); it needs >= 4 of them with an L at grok, at >= 3 rhos and >= 2 taus."),
])
def test_a_missing_fit_says_why(tmp_path, cells, table, note):
    _write_run(tmp_path, cells, n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    missing = [n for n in result["notes"] if n.startswith(("Dose law", "Collapse", "Nothing"))]
    if note is None:
        assert table in result and missing == []
        return
    missing = [n for n in missing if n.startswith(note)]
    assert len(missing) == 1
    if "for p=97" not in note:
        assert table not in result
    text = R.write_report(tmp_path, result).read_text()
    check_tables(result, text)
    assert f"Note: {missing[0]}" in text
    assert f"note: {missing[0]}" in _words(_terminal_text(result, width=80))


def test_curves_log_axis_has_no_minor_labels(tmp_path, monkeypatch):
    """A short log range (a few hundred steps) labels only the decades: minor labels would overlap."""
    seen = []
    real_save = figures._save

    def save(fig, stem):
        fig.canvas.draw()                        # tick labels are set at draw time
        seen.append([t.get_text() for ax in fig.axes for t in ax.xaxis.get_minorticklabels()])
        return real_save(fig, stem)
    monkeypatch.setattr(figures, "_save", save)
    curves = pd.DataFrame({"cell": 0, "metric": np.repeat(["train_acc", "test_acc"], 5),
                           "step": np.tile([30, 60, 90, 120, 150], 2), "value": np.linspace(0.1, 0.9, 10)})
    figures.fig_curves(curves, pd.DataFrame({"cell": [0]}), tmp_path / "curves")
    assert (tmp_path / "curves.png").exists() and len(seen) == 1
    assert seen[0] and all(text == "" for text in seen[0])


def test_mediation_caution_notes():
    """A mediation row with a non-counting cell, an extrapolated T2 or failed resamples gets a note each;
    a clean row none."""
    from fastgrok.analysis.mediation import mediation_caution_notes
    cells = pd.DataFrame({"cell": [0, 1, 2, 3], "p": [59, 59, 97, 97], "rho": [1.0, 1.15] * 2, "tau": [1.0] * 4})
    clean = dict(p=59, L0=20.0, all_count=True, extrapolated=False, n_boot_ok=4000)
    assert mediation_caution_notes(pd.DataFrame([clean]), cells, n_boot=4000) == []
    bad = {**clean, "p": 97, "all_count": False, "extrapolated": True, "n_boot_ok": 3990}
    notes = mediation_caution_notes(pd.DataFrame([clean, bad]), cells, n_boot=4000)
    assert len(notes) == 3 and all(n.startswith("Mediation for p=97") for n in notes)
    assert "do not count" in notes[0] and "L0 = 20 lies outside" in notes[1] and "10 of 4000" in notes[2]
    # what is missing when there is no recovery: T1 (no seed of the rho_high, tau 1 cell grokked), or T1 = T0
    full = {**clean, "rho_high": 1.15, "T0": 3675.0, "T1": 12600.0}
    assert mediation_caution_notes(pd.DataFrame([full]), cells, n_boot=4000) == []
    no_t1 = mediation_caution_notes(pd.DataFrame([{**full, "T1": float("nan")}]), cells, n_boot=4000)
    assert len(no_t1) == 1 and "no recovery, T1 is missing: no seed of the ρ = 1.15, τ = 1 cell" in no_t1[0], no_t1
    same = mediation_caution_notes(pd.DataFrame([{**full, "T1": 3675.0}]), cells, n_boot=4000)
    assert len(same) == 1 and "T1 = T0" in same[0]


def test_fork_caution_note_when_the_same_arm_does_not_count():
    from fastgrok.analysis.report import fork_caution_notes
    forks = pd.DataFrame({"p": [17] * 4, "tau": [1.0] * 4, "fork_step": [100] * 4,
                          "arm": ["same", "raised", "same", "raised"], "n_seeds": [3, 3, 4, 4],
                          "n_grokked": [1, 3, 3, 1]})
    notes = fork_caution_notes(forks)
    assert len(notes) == 1 and "only 1/3 seeds" in notes[0] and "p=17" in notes[0]
    assert fork_caution_notes(forks.iloc[2:]) == []              # 3 of 4 grokked: it counts


def test_analyzing_the_docs_run_rewrites_it_byte_for_byte(tmp_path):
    """docs/mediation_p31 is today's code's output: its analysis, rerun, gives the same report byte for
    byte, and figures without a date (the same matplotlib then writes the same bytes, so analyzing the
    docs run in place leaves the repository unchanged)."""
    import shutil
    from pathlib import Path

    from fastgrok.cli import main
    docs = Path(__file__).resolve().parents[1] / "docs" / "mediation_p31"
    run = tmp_path / "mediation_p31"
    shutil.copytree(docs, run)
    assert main(["analyze", str(run)]) == 0
    assert (run / "report.md").read_bytes() == (docs / "report.md").read_bytes()
    for f in ("figures/curves.pdf", "figures/mediation.pdf"):
        assert b"/CreationDate" not in (run / f).read_bytes(), f


# ------------------------------------------------------------------------------------------ phases
PHASE_SEEDS = {   # per cell: (t_mem, t_grok, final train_acc) of its 3 seeds
    "C": [(100, 150, 1.0), (100, 180, 1.0), (120, 200, 1.0)],
    "G": [(100, 900, 1.0), (100, 1200, 1.0), (120, 150, 1.0)],
    "M": [(100, None, 1.0), (120, None, 1.0), (100, 2000, 1.0)],
    "X": [(None, None, 0.3), (None, None, 0.5), (None, None, 0.96)],
}
PHASE_NAMES = {"C": "comprehension", "G": "grokking", "M": "memorization", "X": "confusion"}
LR_WD = {(1e-3, 0.5): "M", (1e-3, 2.0): "G", (1e-2, 0.5): "G", (1e-2, 2.0): "C", (1e-1, 0.5): "X", (1e-1, 2.0): "X"}
TF_WD = {(0.3, 0.5): "M", (0.3, 2.0): "M", (0.8, 0.5): "G", (0.8, 2.0): "C"}    # at lr 1e-2; tf 0.5 from LR_WD


def _write_phase_run(d, train=None):
    """A grid run's models.parquet with lr x wd cells at train_frac 0.5 and train_frac x wd cells at lr 1e-2,
    each cell's seeds from PHASE_SEEDS; spec.json with [train] = train (the run's thresholds)."""
    cells = [(lr, wd, 0.5, ph) for (lr, wd), ph in LR_WD.items()]
    cells += [(1e-2, wd, tf, ph) for (tf, wd), ph in TF_WD.items()]
    rows = []
    for c, (lr, wd, tf, ph) in enumerate(cells):
        for s, (tm, tg, train_acc) in enumerate(PHASE_SEEDS[ph]):
            rows.append(dict(model=len(rows), cell=c, seed=s, tau=1.0, norm_target=None, rho=None, t_mem=tm,
                             t_grok=tg, train_acc=train_acc, test_acc=0.95 if tg else 0.1, sc_rate=0.0,
                             weight_norm=20.0, diverged=False, steps=3000, lr=lr, wd=wd, train_frac=tf,
                             p=23, op="add", arch="mlp", loss="ce", dtype="float32", **GRID_COLS))
    m = pd.DataFrame(rows)
    for col in ("t_mem", "t_grok"):
        m[col] = m[col].astype("Int64")
    m["rho"] = m["rho"].astype("float64")
    m["norm_target"] = m["norm_target"].astype("float64")
    m.to_parquet(d / "models.parquet")
    (d / "config.json").write_text(json.dumps({"experiment": "x", "p": [23]}))
    (d / "spec.json").write_text(json.dumps({"name": "x", "train": train or {}}))
    return cells


def test_phase_run_report(tmp_path):
    cells = _write_phase_run(tmp_path)
    result = R.analyze_dir(tmp_path, n_boot=200)
    t = result["phase"].set_index("cell")
    # the cells of a confusion cell: 0.3, 0.5, 0.96 < 0.99 -> confusion by 3 seeds; M cell: 2 memorization and
    # a seed that grokked late; G cell: 2 grokking (900 > 200, 1200 > 200) and a comprehension (150 <= 240)
    assert list(t["phase"]) == [PHASE_NAMES[ph] for *_, ph in cells]
    assert [len(d["cells"]) for d in result["phase_diagrams"]] == [6, 6]
    text = R.write_report(tmp_path, result).read_text()
    check_tables(result, text)                        # every number shown is the table's
    assert "## Phase diagrams" in text and "figures/phase.png" in text
    assert "train accuracy >= 0.99" in text and "test accuracy >= 0.9" in text      # TrainConfig's defaults
    assert "Cells: 2 comprehension, 3 grokking, 3 memorization, 2 confusion." in text
    for ext in ("png", "pdf"):
        assert (tmp_path / "figures" / f"phase.{ext}").stat().st_size > 0
    pdf = (tmp_path / "figures" / "phase.pdf").read_bytes()
    assert b"/CreationDate" not in pdf
    R.write_report(tmp_path, result)
    assert (tmp_path / "figures" / "phase.pdf").read_bytes() == pdf        # the same run, the same bytes
    assert "Phase diagrams" in _terminal_text(result, width=250)


def test_phase_thresholds_are_the_runs(tmp_path):
    """A run whose spec set mem_threshold 0.95: the confusion cells' seed at final train accuracy 0.96 is a
    memorizer there, and the report states the run's thresholds."""
    _write_phase_run(tmp_path, train={"mem_threshold": 0.95, "grok_threshold": 0.8})
    result = R.analyze_dir(tmp_path, n_boot=200)
    t = result["phase"]
    assert (t["mem_threshold"] == 0.95).all() and (t["grok_threshold"] == 0.8).all()
    x = t.loc[(t["lr"] == 1e-1)]
    assert (x["n_memorization"] == 1).all() and (x["phase"] == "confusion").all()
    text = R.write_report(tmp_path, result).read_text()
    assert "train accuracy >= 0.95" in text and "test accuracy >= 0.8" in text
    # a train run keeps its thresholds in config.json
    (tmp_path / "spec.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"p": 23, "mem_threshold": 0.5, "grok_threshold": 0.7}))
    assert R.run_thresholds(tmp_path, json.loads((tmp_path / "config.json").read_text())) == \
        {"mem_threshold": 0.5, "grok_threshold": 0.7}


def test_no_phase_section_without_a_diagram(tmp_path):
    """The mediation grid (one lr, wd and train_frac) has no phase section; nor has a single lr x wd line."""
    _write_run(tmp_path, [dict(GRID_COLS, lr=1e-3, wd=1.0, train_frac=0.4, **c) for c in MEDIATION], n_seeds=4)
    result = R.analyze_dir(tmp_path, n_boot=200)
    assert "phase" not in result and "phase_diagrams" not in result
    text = R.write_report(tmp_path, result).read_text()
    assert "Phase diagram" not in text and not (tmp_path / "figures" / "phase.png").exists()
    assert "Phase diagram" not in _terminal_text(result, width=250)
