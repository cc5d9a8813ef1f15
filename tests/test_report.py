"""report.py: a synthetic run directory in the trainer's schema goes through analyze_dir and
write_report; the figures exist and every number in report.md is the returned tables' number."""
import io
import json

import numpy as np
import pandas as pd
import pytest

from fastgrok import report as R

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
            if spec.get("no_grok") == s:
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


def _parse_tables(text):
    """{key: (constants {col: str}, header [col], rows [[str]])} from the report's tables."""
    lines, out = text.splitlines(), {}
    for i, line in enumerate(lines):
        if not line.startswith("<!-- table: "):
            continue
        key, j, consts = line[len("<!-- table: "):-len(" -->")], i + 1, {}
        if lines[j].startswith("All rows: "):
            consts = dict(kv.split(" = ", 1) for kv in lines[j][len("All rows: "):].split("; "))
            j += 2
        header = [h.strip() for h in lines[j].strip("|").split("|")]
        rows = []
        for row in lines[j + 2:]:
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        out[key] = (consts, header, rows)
    return out


def _same_number(s, v):
    """s (as printed) is v: the exact format_value string, and it parses back to v."""
    assert s == R.format_value(v)
    if s == "—":
        assert pd.isna(v)
    elif s in ("yes", "no"):
        assert bool(v) is (s == "yes")
    else:
        try:
            x = float(s)
        except ValueError:
            assert s == str(v)
            return
        tol = 0.0501 if abs(v) >= 100 else 5e-4 * abs(v)
        assert abs(x - v) <= tol


def _check_tables(result, text):
    tables = _parse_tables(text)
    shown = [k for k, _ in R.TABLES if k in result]
    assert list(tables) == shown
    for key, (consts, header, rows) in tables.items():
        df = result[key].reset_index(drop=True)
        assert len(rows) == len(df)
        for col, s in consts.items():
            for v in df[col]:
                _same_number(s, v)
        for i, row in enumerate(rows):
            assert len(row) == len(header)
            for col, s in zip(header, row):
                _same_number(s, df[col].iloc[i])
        # every column is printed
        assert set(df.columns) == set(header) | set(consts)


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
    _check_tables(result, text)
    assert R.format_value(med["recovery"]) in text

    buf = io.StringIO()
    from rich.console import Console
    R.render_terminal(result, console=Console(file=buf, width=250))
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
    assert "mediation" not in result
    col = result["collapse"].iloc[0]
    assert col["n_cells"] == 6 and 0 <= col["r2_L"] <= 1
    f = result["forks"].set_index("arm")
    # two seeds at offsets (-50, 0) * (1 + cell % 3): same is cell 6 (median -25), raised cell 7 (-50)
    assert f.loc["raised", "ratio"] == pytest.approx((3500 - 50 - 800) / (2000 - 25 - 800))
    assert list(result["dose_law"]["tau"]) == [1.0, 1.7]

    text = R.write_report(tmp_path, result).read_text()
    for name in ("collapse", "forks", "curves"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0
    _check_tables(result, text)
