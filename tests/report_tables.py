"""Reading report.md's tables back: every number printed is the analysis table's number (shared by the report
tests)."""
import pandas as pd

from fastgrok.analysis import report as R
from fastgrok.config import AXIS_ADDED_DEFAULTS


def parse_tables(text):
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


def same_number(s, v):
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


def check_tables(result, text):
    tables = parse_tables(text)
    shown = [k for k, _ in R.TABLES if k in result]
    assert list(tables) == shown
    for key, (consts, header, rows) in tables.items():
        df = result[key].reset_index(drop=True)
        assert len(rows) == len(df)
        for col, s in consts.items():
            for v in df[col]:
                same_number(s, v)
        for i, row in enumerate(rows):
            assert len(row) == len(header)
            for col, s in zip(header, row):
                same_number(s, df[col].iloc[i])
        # every column is printed, but those null in every row of a multi-row table and the settings added
        # since the study at their default in every row (display.display_table)
        empty = {c for c in df.columns if len(df) > 1 and df[c].isna().all()}
        at_default = {c for c in df.columns if c in AXIS_ADDED_DEFAULTS and (
            df[c].isna().all() if AXIS_ADDED_DEFAULTS[c] is None else (df[c] == AXIS_ADDED_DEFAULTS[c]).all())}
        assert not (empty | at_default) & (set(header) | set(consts))
        assert set(df.columns) == set(header) | set(consts) | empty | at_default
