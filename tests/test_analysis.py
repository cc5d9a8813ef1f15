"""analysis.py and the analyses on it (mediation.py, regressions.py, phases.py, interventions.py): every
statistic against values worked out by hand on small synthetic per-seed data, and the bootstrap against a
plain re-implementation of the study's procedure."""
import numpy as np
import pandas as pd
import pytest

from fastgrok.analysis import statistics as A
from fastgrok.analysis.interventions import has_interventions, interventions_table
from fastgrok.analysis.mediation import (interp_t2, mediation, mediation_from_run, mediation_gap, mediation_gaps, pick_rho_high,
                                tau_sweep_rhos)
from fastgrok.analysis.phases import majority_phase, phase_diagrams, phase_table, seed_phases
from fastgrok.analysis.regressions import (collapse_grid, collapse_r2, dose_groups, dose_law, ols_r2, spans_collapse_grid,
                                  with_norm)

NA = None


def _models(rows, **extra_cols):
    """models table from (cell, seed, tau, rho, t_mem, t_grok) tuples; model ids 0..N-1."""
    df = pd.DataFrame(rows, columns=["cell", "seed", "tau", "rho", "t_mem", "t_grok"])
    df.insert(0, "model", np.arange(len(df)))
    df["t_mem"] = df["t_mem"].astype("Int64")
    df["t_grok"] = df["t_grok"].astype("Int64")
    for k, v in extra_cols.items():
        df[k] = v
    return df


def _logit_curves(models, L_of_cell, steps=range(0, 6001, 200)):
    """logit_scale rows: the model of seed k reads L_cell + (-1)^k * 0.5, so the cell mean is L_cell
    (with seeds 0..S-1, S even)."""
    rows = []
    for m, c, seed in zip(models["model"], models["cell"], models["seed"]):
        for s in steps:
            rows.append((m, s, "logit_scale", L_of_cell[c] + (0.5 if seed % 2 else -0.5)))
    return pd.DataFrame(rows, columns=["model", "step", "metric", "value"])


# ---------------------------------------------------------------------------------------------
# cell_table
# ---------------------------------------------------------------------------------------------
def test_cell_medians_skip_non_grokked_seeds():
    # cell 0: t_grok (100, 200, -, 400) -> median of {100, 200, 400} = 200; 3 of 4 grokked -> counts
    #         t_mem  (25, 50, 75, -)    -> median of {25, 50, 75} = 50; delay = 200 - 50 = 150
    # cell 1: t_grok (300, -, -, 500)   -> median 400, 2 of 4: exactly half counts (the study's
    #         n_grokked >= 0.5 n; a strict majority would not)
    #         t_mem  (25, 25, 50, 100)  -> median (25 + 50) / 2 = 37.5; delay = 362.5
    m = _models([(0, 0, 1.0, 1.0, 25, 100), (0, 1, 1.0, 1.0, 50, 200), (0, 2, 1.0, 1.0, 75, NA),
                 (0, 3, 1.0, 1.0, NA, 400), (1, 0, 1.3, 1.0, 25, 300), (1, 1, 1.3, 1.0, 25, NA),
                 (1, 2, 1.3, 1.0, 50, NA), (1, 3, 1.3, 1.0, 100, 500)],
                sc_rate=[0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.5, 0.5],
                diverged=[False, False, True, False, False, False, False, False],
                weight_norm=[10.0, 20.0, 30.0, 40.0, 1.0, 2.0, 3.0, 4.0])
    c = A.cell_table(m).set_index("cell")
    assert c.loc[0, "T_grok"] == 200 and c.loc[0, "T_mem"] == 50 and c.loc[0, "delay"] == 150
    assert c.loc[1, "T_grok"] == 400 and c.loc[1, "T_mem"] == 37.5 and c.loc[1, "delay"] == 362.5
    assert list(c["n_seeds"]) == [4, 4] and list(c["n_grokked"]) == [3, 2]
    assert list(c["counts"]) == [True, True]
    assert list(c["n_diverged"]) == [1, 0]
    assert c.loc[0, "sc_rate"] == pytest.approx(0.25)   # mean of 0.1..0.4 over all seeds
    assert c.loc[0, "W_final"] == 25.0                  # median of 10, 20, 30, 40
    assert c.loc[1, "tau"] == 1.3 and c.loc[1, "rho"] == 1.0
    assert np.isnan(c.loc[0, "L_grok"])                 # no curves given


@pytest.mark.parametrize("t_grok, expected", [
    ((100, 200, 300), True),     # 3 of 3
    ((100, 200, NA), True),      # 2 of 3 > 1.5
    ((100, NA, NA), False),      # 1 of 3
])
def test_majority_rule_odd(t_grok, expected):
    m = _models([(0, s, 1.0, 1.0, 25, t) for s, t in enumerate(t_grok)])
    assert bool(A.cell_table(m)["counts"].iloc[0]) is expected


def test_nearest_step_lookup_of_L_at_grok():
    # Two models per cell read L = 0.01 * step + 1 and + 3, so the cell's L(step) = 0.01*step + 2:
    # L(0) = 2, L(200) = 4, L(400) = 6.
    # cell 0: median T_grok 275 -> nearest logged step 200 (75 away vs 125) -> L = 4
    # cell 1: median T_grok 350 -> 400 -> L = 6
    # cell 2: median T_grok (250 + 350) / 2 = 300, equidistant from 200 and 400 -> the earlier, 4
    m = _models([(0, 0, 1.0, 1.0, 25, 275), (0, 1, 1.0, 1.0, 25, 275),
                 (1, 0, 1.3, 1.0, 25, 350), (1, 1, 1.3, 1.0, 25, 350),
                 (2, 0, 1.7, 1.0, 25, 250), (2, 1, 1.7, 1.0, 25, 350)])
    rows = [(mid, s, "logit_scale", 0.01 * s + (1 if mid % 2 == 0 else 3))
            for mid in m["model"] for s in (400, 0, 200)]  # unsorted on purpose
    # weight_norm at every eval step: 50 + step / 100 -> at the seeds' own T_grok
    rows += [(mid, s, "weight_norm", 50 + s / 100) for mid in m["model"] for s in range(0, 401, 25)]
    curves = pd.DataFrame(rows, columns=["model", "step", "metric", "value"])
    c = A.cell_table(m, curves).set_index("cell")
    assert list(c["L_grok"]) == pytest.approx([4.0, 6.0, 4.0])
    # W_grok, cell 2: median of 50 + 250/100 = 52.5 and 50 + 350/100 = 53.5 -> 53.0
    assert list(c["W_grok"]) == pytest.approx([52.75, 53.5, 53.0])
    assert A.nearest_step_value([400, 0, 200], [6.0, 2.0, 4.0], 290) == 4.0
    assert np.isnan(A.nearest_step_value([0, 200], [1.0, 2.0], np.nan))


def test_memorization_table():
    m = _models([(0, 0, 1.0, 1.15, 175, 3000), (0, 1, 1.0, 1.15, 175, 3100),
                 (1, 0, 1.7, 1.15, 175, 900), (1, 1, 1.7, 1.15, 200, 1000)])
    t = A.memorization_table(A.cell_table(m))
    assert list(t["tau"]) == [1.0, 1.7]
    assert list(t["T_mem"]) == [175, 187.5] and list(t["T_grok"]) == [3050, 950]
    assert list(t["delay"]) == [2875, 762.5]


def test_cell_table_tells_alloc_cells_apart_and_drops_empty_describing_columns():
    # three cells at the same (rho, tau) differing only in the per-matrix clamp shares; the grid
    # writes arm, fork_step and layer_fracs for every experiment, null where they do not apply
    rows = [(c, s, 1.0, 1.0, 25, 100 * (c + 1)) for c in range(3) for s in range(2)]
    fracs = ["0.4,0.5,0.1", "0.25,0.5,0.25", "0.1,0.5,0.4"]
    m = _models(rows, layer_fracs=pd.array([fracs[c] for c, *_ in rows], dtype="string"),
                arm=pd.array([None] * 6, dtype="string"), fork_step=pd.array([None] * 6, dtype="Int64"))
    c = A.cell_table(m)
    assert list(c["layer_fracs"]) == fracs
    assert "arm" not in c and "fork_step" not in c
    assert list(c.columns[:4]) == ["cell", "rho", "tau", "layer_fracs"]
    plain = A.cell_table(m.assign(layer_fracs=pd.array([None] * 6, dtype="string")))
    assert "layer_fracs" not in plain


def test_memorization_table_keeps_the_layer_fracs():
    m = _models([(c, s, tau, 1.0, 175, 1000 + 100 * c) for c, tau in enumerate((1.0, 1.0, 1.7))
                 for s in range(2)], layer_fracs=["0.4,0.6"] * 2 + ["0.6,0.4"] * 2 + ["0.4,0.6"] * 2)
    t = A.memorization_table(A.cell_table(m))
    assert "layer_fracs" in t and list(zip(t["layer_fracs"], t["tau"])) == [
        ("0.4,0.6", 1.0), ("0.4,0.6", 1.7), ("0.6,0.4", 1.0)]


def test_mediation_gap_without_tau():
    cells = pd.DataFrame({"cell": [0, 1], "rho": [1.0, 1.15], "L_grok": [20.0, 30.0]})
    assert mediation_gap(cells) == "no tau values (the temperature of each cell)"
    assert A.has_values(cells, "rho") and not A.has_values(cells.assign(rho=np.nan), "rho")
    assert not A.has_values(cells, "tau")


# ---------------------------------------------------------------------------------------------
# Mediation
# ---------------------------------------------------------------------------------------------
# Hand case: baseline (rho 1, tau 1): T0 = 1000 at L0 = 20. Sweep at rho 1.15:
#   tau 1.0: T = 3000, L = 30 (this is T1)   tau 1.3: T = 2000, L = 24   tau 1.7: T = 900, L = 18
# Sorted by L: L = (18, 24, 30), T = (900, 2000, 3000). L0 = 20 lies in [18, 24]:
#   T2 = 900 + (20 - 18) / (24 - 18) * (2000 - 900) = 900 + 1100 / 3 = 3800 / 3
#   recovery = (3000 - 3800/3) / (3000 - 1000) = (5200/3) / 2000 = 13/15
HAND = {0: (1.0, 1.0, 1000, 20.0), 1: (1.15, 1.0, 3000, 30.0), 2: (1.15, 1.3, 2000, 24.0),
        3: (1.15, 1.7, 900, 18.0)}


def _hand_run():
    # three seeds per cell at T - 100, T, T + 100: the median is T
    rows = [(c, s, tau, rho, 175, T + d) for c, (rho, tau, T, _) in HAND.items()
            for s, d in enumerate((-100, 0, 100))]
    rows += [(c, 3, tau, rho, 175, HAND[c][2]) for c, (rho, tau, _, _) in HAND.items()]  # 4 seeds
    m = _models(rows)
    return m, _logit_curves(m, {c: v[3] for c, v in HAND.items()})


def test_interp_t2_by_hand():
    assert interp_t2(20.0, [30, 24, 18], [3000, 2000, 900]) == pytest.approx(3800 / 3)
    assert interp_t2(40.0, [30, 24, 18], [3000, 2000, 900]) == 3000  # np.interp holds the end


def test_mediation_point_estimate_by_hand():
    m, curves = _hand_run()
    r = mediation_from_run(m, curves).iloc[0]
    assert (r["T0"], r["T1"], r["L0"], r["L1"]) == (1000, 3000, 20, 30)
    assert r["T2"] == pytest.approx(3800 / 3)
    assert r["recovery"] == pytest.approx(13 / 15)
    assert r["n_sweep"] == 3 and r["n_seeds"] == 4 and not r["extrapolated"] and r["all_count"]
    assert r["ci_low"] <= r["recovery"] <= r["ci_high"]


def _naive_ci(T_by_cell, L0, L_by_sweep_cell, n_boot=4000):
    """The study's procedure written plainly: T_by_cell maps 'base', 't1' and sweep names to
    per-seed arrays aligned by seed id."""
    S = len(T_by_cell["base"])
    names = sorted(L_by_sweep_cell, key=L_by_sweep_cell.get)   # sweep sorted by L ascending
    L_sorted = [L_by_sweep_cell[k] for k in names]
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(n_boot):
        idx = rng.integers(0, S, S)
        med = {k: np.nanmedian(v[idx]) for k, v in T_by_cell.items()}
        t2 = np.interp(L0, L_sorted, [med[k] for k in names])
        recs.append((med["t1"] - t2) / (med["t1"] - med["base"]))
    recs = np.array(recs)
    return np.percentile(recs[np.isfinite(recs)], [2.5, 97.5])


def test_bootstrap_matches_plain_reimplementation_and_is_deterministic():
    g = np.random.default_rng(123)
    spec = {0: (1.0, 1.0, 1000, 20.0), 1: (1.15, 1.0, 3000, 30.0), 2: (1.15, 1.3, 2000, 24.0),
            3: (1.15, 1.7, 900, 18.0)}
    S = 8
    per_cell = {c: (T + g.integers(-400, 400, S) // 25 * 25).astype(float) for c, (_, _, T, _) in spec.items()}
    per_cell[0][2] = np.nan   # one baseline seed never grokked
    rows = [(c, s, spec[c][1], spec[c][0], 175, None if np.isnan(t) else int(t))
            for c, ts in per_cell.items() for s, t in enumerate(ts)]
    m = _models(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)  # row order scrambled
    m["model"] = np.arange(len(m))
    curves = _logit_curves(m, {c: v[3] for c, v in spec.items()})
    r1 = mediation_from_run(m, curves).iloc[0]
    r2 = mediation_from_run(m, curves).iloc[0]
    assert r1.equals(r2)   # deterministic
    lo, hi = _naive_ci({"base": per_cell[0], "t1": per_cell[1], 1: per_cell[1], 2: per_cell[2],
                        3: per_cell[3]}, 20.0, {1: 30.0, 2: 24.0, 3: 18.0})
    assert (r1["ci_low"], r1["ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert r1["ci_low"] < r1["recovery"] < r1["ci_high"]
    # the point estimate from the seeds' medians
    med = {c: np.nanmedian(v) for c, v in per_cell.items()}
    t2 = np.interp(20.0, [18, 24, 30], [med[3], med[2], med[1]])
    assert r1["recovery"] == pytest.approx((med[1] - t2) / (med[1] - med[0]))


def test_mediation_per_setting_and_errors():
    m, curves = _hand_run()
    m2 = m.assign(model=m["model"] + len(m), cell=m["cell"] + 10, p=97)
    both = pd.concat([m.assign(p=59), m2], ignore_index=True)
    c2 = curves.assign(model=curves["model"] + len(m))
    t = mediation_from_run(both, pd.concat([curves, c2]), n_boot=200)
    assert list(t["p"]) == [59, 97] and list(t["recovery"]) == pytest.approx([13 / 15] * 2)
    cells = A.cell_table(both, pd.concat([curves, c2]))
    with pytest.raises(ValueError, match="2 cells"):
        mediation(cells, both)   # two settings mixed: (rho, tau) is ambiguous
    with pytest.raises(ValueError, match="rho"):
        mediation_from_run(m.drop(columns="rho"), curves)
    with pytest.raises(ValueError, match="rho"):
        mediation_from_run(m.assign(rho=np.nan), curves)


def test_mediation_gap_names_what_is_missing():
    m, curves = _hand_run()
    cells = A.cell_table(m, curves)
    assert mediation_gap(cells) is None
    assert mediation_gap(cells.loc[cells["cell"] != 0]) == "no baseline cell (rho, tau) = (1, 1)"
    assert mediation_gap(cells.loc[cells["cell"] != 1]) == "no T1 cell (rho, tau) = (1.15, 1)"
    no_L = cells.assign(L_grok=np.where(cells["cell"] >= 2, np.nan, cells["L_grok"]))
    assert mediation_gap(no_L) == ("the tau sweep at rho = 1.15 has 1 cell(s) with an L at grok "
                                   "(needs >= 2)")
    assert mediation_gap(cells, rho_high=1.3) == "no T1 cell (rho, tau) = (1.3, 1)"
    both = pd.concat([cells, cells.assign(cell=cells["cell"] + 10)])
    assert mediation_gap(both).startswith("2 cells with (rho, tau) = (1, 1)")
    assert mediation_gaps(cells) == [] and mediation_gaps(cells, rho_high=1.3) == [
        ({}, "no T1 cell (rho, tau) = (1.3, 1)")]
    with pytest.raises(ValueError, match="no baseline cell"):
        mediation(cells.loc[cells["cell"] != 0], m)


def test_tau_sweep_rhos_and_pick_rho_high():
    # (rho, tau) cells: baseline (1, 1); 1.05 with tau 1 only (no sweep); 1.1 swept without tau = 1
    # (no sweep); 1.15 and 1.3 swept with tau = 1
    grid = [(1.0, 1.0), (1.0, 1.7), (1.05, 1.0), (1.1, 1.3), (1.1, 1.7), (1.15, 1.0), (1.15, 1.5),
            (1.3, 1.0), (1.3, 1.7)]
    cells = pd.DataFrame({"cell": range(len(grid)), "rho": [r for r, _ in grid],
                          "tau": [t for _, t in grid]})
    assert tau_sweep_rhos(cells) == [1.15, 1.3]
    assert tau_sweep_rhos(cells, baseline_rho=1.2) == [1.3]
    assert tau_sweep_rhos(cells.drop(columns="rho")) == []
    assert pick_rho_high([1.15, 1.3]) == 1.15      # several: the study's 1.15
    assert pick_rho_high([1.1, 1.3, 1.2]) == 1.3   # several, no 1.15: the largest
    assert pick_rho_high([1.3]) == 1.3             # the only one
    assert pick_rho_high([]) is None


# ---------------------------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------------------------
def test_ols_r2_by_hand():
    # y = (0, 2, 1) on x = (0, 1, 2): slope Sxy/Sxx = 1/2, intercept 1 - 1/2 = 1/2,
    # fitted (0.5, 1, 1.5), residuals (-0.5, 1, -0.5): SSres = 1.5, SStot = 2 -> R² = 0.25
    assert ols_r2([0, 2, 1], [0, 1, 2]) == pytest.approx(0.25)
    assert ols_r2([1, 3, 5, 7], [0, 1, 2, 3]) == pytest.approx(1.0)


def test_collapse_r2_by_hand():
    # ln T = L exactly -> R²(L) = 1 = R²(both), ΔR² = 0.
    # On rho = (1, 1, 2, 2): fitted values are the group means 1.5, 3.5, residuals ±0.5:
    # SSres = 4 * 0.25 = 1, SStot = 2.25 + 0.25 + 0.25 + 2.25 = 5 -> R²(rho) = 0.8
    L = np.array([1.0, 2.0, 3.0, 4.0])
    cells = pd.DataFrame({"cell": range(4), "rho": [1, 1, 2, 2], "tau": [1, 1.3, 1, 1.3],
                          "L_grok": L, "T_grok": np.exp(L), "counts": True})
    r = collapse_r2(cells).iloc[0]
    assert (r["r2_L"], r["r2_rho"], r["r2_both"], r["delta_r2"]) == pytest.approx((1, 0.8, 1, 0))
    assert r["n_cells"] == 4


def test_collapse_grid_needs_three_rhos_and_two_taus():
    grid = [(r, t) for r in (1.0, 1.05, 1.1) for t in (1.0, 1.7)]
    cells = pd.DataFrame({"cell": range(6), "p": 59, "rho": [r for r, _ in grid],
                          "tau": [t for _, t in grid]})
    other = cells.assign(cell=cells["cell"] + 10, p=97).iloc[:4]          # rho 1.0 and 1.05 only
    both = pd.concat([cells, other], ignore_index=True)
    assert spans_collapse_grid(cells) and not spans_collapse_grid(other)
    assert list(collapse_grid(both)["cell"]) == list(range(6))
    assert collapse_grid(other).empty and not spans_collapse_grid(cells.drop(columns="tau"))


def test_dose_groups_need_three_norms_per_setting_and_tau():
    # p 59: norm targets 50, 55, 60 (a group); p 97: 50, 55 and an unclamped cell whose W_final is
    # 55 again (two distinct norms: no group); a cell with neither norm is left out
    cells = pd.DataFrame({"cell": range(7), "p": [59] * 3 + [97] * 3 + [59], "tau": 1.0,
                          "norm_target": [50.0, 55.0, 60.0, 50.0, 55.0, np.nan, np.nan],
                          "W_final": [50.0, 55.0, 60.0, 50.0, 55.0, 55.0, np.nan]})
    assert list(with_norm(cells)["W"]) == [50.0, 55.0, 60.0, 50.0, 55.0, 55.0]
    groups = list(dose_groups(cells))
    assert [keys for keys, _ in groups] == [{"p": 59, "tau": 1.0}]
    assert list(groups[0][1]["cell"]) == [0, 1, 2]


def test_dose_law_on_exact_exponentials():
    # p = 59: T = exp(2 + 0.1 W); p = 97: T = exp(1 + 0.05 W). The unclamped p = 59 cell uses its
    # median final norm W_final = 45; the non-counting cell would break the exact fit if used.
    W = [50.0, 55.0, 60.0, 65.0]
    rows = [dict(cell=i, p=59, tau=1.0, norm_target=w, W_final=w, T_grok=np.exp(2 + 0.1 * w),
                 counts=True) for i, w in enumerate(W)]
    rows += [dict(cell=10 + i, p=97, tau=1.0, norm_target=w, W_final=w,
                  T_grok=np.exp(1 + 0.05 * w), counts=True) for i, w in enumerate(W)]
    rows += [dict(cell=20, p=59, tau=1.0, norm_target=np.nan, W_final=45.0,
                  T_grok=np.exp(2 + 4.5), counts=True),
             dict(cell=21, p=59, tau=1.0, norm_target=70.0, W_final=70.0, T_grok=10.0, counts=False)]
    d = dose_law(pd.DataFrame(rows)).set_index("p")
    assert d.loc[59, "c"] == pytest.approx(2) and d.loc[59, "alpha"] == pytest.approx(0.1)
    assert d.loc[97, "c"] == pytest.approx(1) and d.loc[97, "alpha"] == pytest.approx(0.05)
    assert list(d["r2"]) == pytest.approx([1, 1]) and list(d["n_cells"]) == [5, 4]
    assert d.loc[59, "W_min"] == 45.0


def _dose_cells(rhos, L, T, W=None, counts=True):
    return pd.DataFrame({"cell": range(len(rhos)), "p": 59, "tau": 1.0, "rho": rhos,
                         "norm_target": [50.0 * r for r in rhos], "W_final": np.nan,
                         "W_grok": W if W is not None else [50.0 * r for r in rhos],
                         "L_grok": L, "T_grok": T, "counts": counts})


def test_dose_law_collapse_free_range_cut_at_the_l_jump():
    # rho 0.85..1.25 at tau 1, W = 50 rho. Up to rho 1.00 T = exp(1 + 0.1 W) exactly; at 1.05 L jumps
    # 3x (> 2.5x: the collapse onset) and T explodes. The study's fit keeps 0.85-1.00 (4 cells):
    # alpha = 0.1 exactly; the whole grid, every cell, gives another slope.
    rhos = [0.85, 0.90, 0.95, 1.00, 1.05, 1.10, 1.15, 1.20, 1.25]
    L = [20.0, 21.0, 22.0, 23.0, 69.0, 70.0, 71.0, 72.0, 73.0]
    T = [float(np.exp(1 + 0.1 * 50 * r)) if r <= 1.0 else float(np.exp(1 + 0.1 * 50 * r) * 40) for r in rhos]
    d = dose_law(_dose_cells(rhos, L, T)).set_index("fit")
    free, whole = d.loc["collapse-free"], d.loc["whole grid"]
    assert free["n_cells"] == 4 and free["alpha"] == pytest.approx(0.1) and free["c"] == pytest.approx(1.0)
    assert free["W_max"] == pytest.approx(50.0) and free["r2"] == pytest.approx(1.0)
    assert whole["n_cells"] == 9 and abs(whole["alpha"] - 0.1) > 0.01
    # a jump of exactly 2.5x is no onset; then rho <= 1.15 cuts: 0.85..1.15 (7 cells)
    L2 = [20.0, 21.0, 22.0, 23.0, 57.5, 58.0, 59.0, 60.0, 61.0]
    assert dose_law(_dose_cells(rhos, L2, T)).set_index("fit").loc["collapse-free", "n_cells"] == 7


def test_dose_law_collapse_free_needs_three_cells_and_uses_w_at_grok():
    # the onset at the third cell leaves two: no collapse-free fit, the whole grid still fits
    rhos, L = [0.9, 1.0, 1.05, 1.1], [20.0, 21.0, 60.0, 61.0]
    T = [100.0, 200.0, 900.0, 1000.0]
    d = dose_law(_dose_cells(rhos, L, T))
    assert list(d["fit"]) == ["whole grid"]
    # W is the median norm at grok (W_grok) where known: T = exp(0.2 W_grok), norm targets elsewhere
    rhos, L = [0.9, 1.0, 1.1], [20.0, 21.0, 22.0]
    Wg = [40.0, 41.0, 43.0]
    d = dose_law(_dose_cells(rhos, L, [float(np.exp(0.2 * w)) for w in Wg], W=Wg)).set_index("fit")
    assert d.loc["collapse-free", "alpha"] == pytest.approx(0.2)
    # a non-counting cell (fewer than half grokked) is left out before the cut
    cells = _dose_cells([0.9, 1.0, 1.05, 1.1], [20.0, 60.0, 21.0, 22.0], [100.0, 1e6, 200.0, 300.0],
                        counts=[True, False, True, True])
    assert dose_law(cells).set_index("fit").loc["collapse-free", "n_cells"] == 3


def test_cell_table_no_warning_for_all_nan_columns():
    m = _models([(0, 0, 1.0, 1.0, NA, NA), (0, 1, 1.0, 1.0, NA, NA)], sc_rate=[np.nan, np.nan],
                weight_norm=[np.nan, np.nan], diverged=[True, True])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = A.cell_table(m)
    assert np.isnan(c.loc[0, "sc_rate"]) and not c.loc[0, "counts"]


# ---------------------------------------------------------------------------------------------
# Same-state forks
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_fork_ratio_by_hand():
    # fork at 800. same: T_grok (1800, 2000, 2200, -) -> delays (1000, 1200, 1400) -> median 1200
    # raised: (3800, 4400, 5000, 5800) -> (3000, 3600, 4200, 5000) -> median 3900 (the arm's own row)
    # ratio, the study's way: over the seeds that grokked in BOTH arms (0, 1, 2): 3600 / 1200 = 3.0
    # (the medians over each arm's own grokked seeds would give 3900 / 1200 = 3.25)
    same, raised = [1800, 2000, 2200, None], [3800, 4400, 5000, 5800]
    m = _models([(0, s, 1.0, np.nan, 175, t) for s, t in enumerate(same)]
                + [(1, s, 1.0, np.nan, 175, t) for s, t in enumerate(raised)],
                arm=["same"] * 4 + ["raised"] * 4, fork_step=800)
    f = A.fork_table(m).set_index("arm")
    assert f.loc["same", "delay_from_fork"] == 1200 and f.loc["raised", "delay_from_fork"] == 3900
    assert f.loc["raised", "ratio"] == pytest.approx(3.0) and f.loc["raised", "n_both"] == 3
    assert np.isnan(f.loc["same", "ratio"])
    # CI: the study's resamples written plainly: b = rng.choice(idx, len(idx), True) over both arms
    d_same = np.array([1000, 1200, 1400, np.nan])
    d_raised = np.array([3000, 3600, 4200, 5000], float)
    idx = np.array([0, 1, 2])
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(4000):
        b = rng.choice(idx, len(idx), True)
        ratios.append(np.median(d_raised[b]) / np.median(d_same[b]))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    assert (f.loc["raised", "ci_low"], f.loc["raised", "ci_high"]) == pytest.approx((lo, hi))
    assert lo <= 3.0 <= hi


def test_load_run_roundtrip(tmp_path):
    m, curves = _hand_run()
    m.to_parquet(tmp_path / "models.parquet")
    curves.to_parquet(tmp_path / "curves.parquet")
    (tmp_path / "config.json").write_text('{"p": 59}')
    m2, c2, cfg = A.load_run(tmp_path)
    assert cfg == {"p": 59} and len(m2) == len(m) and len(c2) == len(curves)
    m.iloc[:2].assign(model=0).to_parquet(tmp_path / "models.parquet")
    with pytest.raises(ValueError, match="unique"):
        A.load_run(tmp_path)


# ---------------------------------------------------------------------------------------------
# Phases (Liu et al. 2022)
# ---------------------------------------------------------------------------------------------
def _seeds(rows, **cols):
    """Per-seed table from (cell, seed, t_mem, t_grok, train_acc, test_acc, diverged) tuples."""
    df = pd.DataFrame(rows, columns=["cell", "seed", "t_mem", "t_grok", "train_acc", "test_acc", "diverged"])
    df.insert(0, "model", np.arange(len(df)))
    for c in ("t_mem", "t_grok"):
        df[c] = df[c].astype("Int64")
    for k, v in cols.items():
        df[k] = v
    return df


def test_seed_phases_each_phase_by_hand():
    m = _seeds([
        (0, 0, 100, 200, 1.0, 0.95, False),    # T_grok = 2 T_mem exactly: comprehension
        (0, 1, 100, 210, 1.0, 0.95, False),    # one evaluation later: grokking
        (0, 2, NA, 150, 0.97, 0.92, False),    # generalized before it memorized: comprehension
        (0, 3, 300, 250, 1.0, 0.93, False),    # T_mem after T_grok: comprehension
        (0, 4, 100, NA, 1.0, 0.20, False),     # fits, never generalizes: memorization
        (0, 5, NA, NA, 0.40, 0.01, False),     # never fits: confusion
        (0, 6, 100, NA, 0.50, 0.02, False),    # memorized once, lost it by the end: confusion
        (0, 7, 100, NA, np.nan, np.nan, True),  # diverged: confusion
        (0, 8, 100, 1000, 1.0, 0.50, False),   # grokked, then forgot while its cell trained on: grokking
    ])
    assert list(seed_phases(m)) == ["comprehension", "grokking", "comprehension", "comprehension",
                                    "memorization", "confusion", "confusion", "confusion", "grokking"]
    # a wider comprehension window moves seed 1 (210 <= 2.5 x 100) and seed 8 stays (1000 > 250)
    assert list(seed_phases(m, ratio=2.5))[:2] == ["comprehension", "comprehension"]
    assert seed_phases(m, ratio=2.5)[8] == "grokking"


def test_seed_phases_use_the_runs_mem_threshold():
    m = _seeds([(0, 0, NA, NA, 0.95, 0.1, False), (0, 1, NA, NA, 0.995, 0.1, False)])
    assert list(seed_phases(m)) == ["confusion", "memorization"]                  # 0.99
    assert list(seed_phases(m, mem_threshold=0.9)) == ["memorization", "memorization"]
    assert list(seed_phases(m, mem_threshold=1.0)) == ["confusion", "confusion"]


@pytest.mark.parametrize("phases, expected", [
    (["grokking", "grokking", "memorization"], "grokking"),
    (["confusion", "confusion", "memorization"], "confusion"),            # a strict majority wins
    (["comprehension", "grokking"], "grokking"),                           # ties: the order PHASE_TIES
    (["comprehension", "memorization"], "memorization"),
    (["grokking", "memorization"], "grokking"),
    (["memorization", "confusion"], "memorization"),
    (["comprehension", "confusion"], "comprehension"),
    (["comprehension", "comprehension", "confusion", "confusion"], "comprehension"),
    (["comprehension", "grokking", "memorization", "confusion"], "grokking"),
])
def test_majority_phase_and_its_ties(phases, expected):
    assert majority_phase(np.array(phases)) == expected


def test_phase_table_by_hand():
    # cell 0 (lr 1e-2, wd 1): comprehension, grokking, grokking -> grokking; T_grok median of
    #   (150, 400, 600) = 400, T_mem of (100, 100, 200) = 100, delay median of (50, 300, 400) = 300
    # cell 1 (lr 1e-3, wd 1): memorization x2 (no T_grok, None and NA), confusion -> memorization
    rows = [(0, 0, 100, 150, 1.0, 0.91, False), (0, 1, 100, 400, 1.0, 0.95, False),
            (0, 2, 200, 600, 1.0, 0.97, False),
            (1, 0, 300, None, 1.0, 0.1, False), (1, 1, 400, NA, 1.0, 0.2, False),
            (1, 2, NA, NA, 0.6, 0.0, False)]
    m = _seeds(rows, lr=[1e-2] * 3 + [1e-3] * 3, wd=1.0, train_frac=0.5, p=23)
    t = phase_table(m, mem_threshold=0.99, grok_threshold=0.9).set_index("cell")
    assert list(t["phase"]) == ["grokking", "memorization"]
    r = t.loc[0]
    assert (r["n"], r["n_mem"], r["n_grok"], r["T_mem"], r["T_grok"], r["delay"]) == (3, 3, 3, 100, 400, 300)
    assert (r["n_comprehension"], r["n_grokking"], r["n_memorization"], r["n_confusion"]) == (1, 2, 0, 0)
    assert r["train_acc"] == 1.0 and r["test_acc"] == 0.95
    r = t.loc[1]
    assert (r["n_mem"], r["n_grok"], r["T_mem"]) == (2, 0, 350) and np.isnan(r["T_grok"]) and np.isnan(r["delay"])
    assert (r["n_memorization"], r["n_confusion"]) == (2, 1)
    assert r["train_acc"] == 1.0 and r["test_acc"] == pytest.approx(0.1)
    assert {"lr", "wd", "train_frac", "p"} <= set(t.columns)
    assert (t["mem_threshold"] == 0.99).all() and (t["grok_threshold"] == 0.9).all()
    # a lower mem_threshold (the run's) turns cell 1's third seed (final train accuracy 0.6) into memorization
    t = phase_table(m, mem_threshold=0.5).set_index("cell")
    assert t.loc[1, "n_memorization"] == 3 and t.loc[1, "mem_threshold"] == 0.5


def test_phase_table_leaves_out_fork_arms():
    m = _seeds([(0, 0, 100, 150, 1.0, 0.91, False), (1, 0, 100, NA, 1.0, 0.1, False)],
               lr=1e-3, wd=1.0, train_frac=0.5, arm=[None, "same"])
    assert list(phase_table(m)["cell"]) == [0]


def test_phase_diagrams_found_only_where_two_axes_vary():
    def table(cells):
        rows = [(i, 0, 100, 300, 1.0, 0.95, False) for i in range(len(cells))]
        lr, wd, tf = zip(*cells)
        return phase_table(_seeds(rows, lr=list(lr), wd=list(wd), train_frac=list(tf), p=23))
    # lr x wd at tf 0.5 (2 x 2) and tf x wd at lr 1e-2 (2 x 2), sharing the cell (1e-2, *, 0.5)
    cells = [(lr, wd, 0.5) for lr in (1e-3, 1e-2) for wd in (0.5, 1.0)] + [(1e-2, wd, 0.8) for wd in (0.5, 1.0)]
    d = phase_diagrams(table(cells))
    assert [(x["y"], x["x"], x["fixed"]) for x in d] == [("lr", "wd", ("train_frac", 0.5)),
                                                        ("train_frac", "wd", ("lr", 1e-2))]
    assert [len(x["cells"]) for x in d] == [4, 4] and d[0]["keys"]["p"] == 23
    assert phase_diagrams(table([(1e-3, 1.0, 0.5), (1e-2, 1.0, 0.5)])) == []      # one wd: a line, not a diagram
    assert phase_diagrams(table([(1e-3, 1.0, 0.5)])) == []
    no_axes = _seeds([(0, 0, 100, 300, 1.0, 0.95, False)])
    assert phase_diagrams(phase_table(no_axes)) == []                               # a train run's table


def test_interventions_table_names_each_arm_and_reads_its_cell():
    """The arms of an interventions run, named from the intervention columns that vary; the numbers are
    the cell table's (medians over seeds, SC rate the mean)."""
    rows = []
    arms = [dict(loss="ce", wd=1.0, orthograd=False, grokfast_lambda=0.0),
            dict(loss="stablemax", wd=0.0, orthograd=False, grokfast_lambda=0.0),
            dict(loss="ce", wd=0.0, orthograd=True, grokfast_lambda=0.0),
            dict(loss="ce", wd=1.0, orthograd=False, grokfast_lambda=2.0)]
    for cell, arm in enumerate(arms):
        for seed, (tm, tg) in enumerate([(100, 400 + 100 * cell), (150, None), (120, 600 + 100 * cell)]):
            rows.append({"model": 3 * cell + seed, "cell": cell, "seed": seed, "t_mem": tm, "t_grok": tg,
                         "sc_rate": 0.1 * cell, "test_loss": 1.0 + cell, "weight_norm": 30.0, "diverged": False,
                         "lr": 1e-3, **arm})
    models = pd.DataFrame(rows).astype({"t_grok": "Int64"})
    assert has_interventions(models) and not has_interventions(models[models.cell == 0])
    table = interventions_table(A.cell_table(models))
    assert list(table.arm) == ["CE, wd=1", "StableMax, wd=0", "CE, wd=0, ⊥Grad", "CE, wd=1, Grokfast λ=2"]
    assert list(table.n_grokked) == [2] * 4
    assert list(table.T_grok) == [500.0, 600.0, 700.0, 800.0]           # median of the two that grokked
    assert list(table.T_mem) == [120.0] * 4 and list(table.delay) == [380.0, 480.0, 580.0, 680.0]
    assert list(table.test_loss) == [1.0, 2.0, 3.0, 4.0] and table.sc_rate.tolist() == pytest.approx([0, .1, .2, .3])
