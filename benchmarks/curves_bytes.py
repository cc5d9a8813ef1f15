"""Bytes per curve value on disk and in RAM (pandas), the long layout of before against the wide parts
(issue 29, item 2), for the same grid run by both (benchmarks/store_growth.py's before and after dirs).

    python benchmarks/curves_bytes.py BEFORE_DIR AFTER_DIR

Per value: bytes / (number of recorded values, i.e. rows of the long table).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from fastgrok import store


def main() -> None:
    before, after = Path(sys.argv[1]), Path(sys.argv[2])
    old = pd.read_parquet(before / "curves.parquet")
    n = len(old)
    wide = pd.read_parquet(after / "parts" / "curves")
    new_long = store.Results(after).curves()
    assert len(new_long) == n, (len(new_long), n)
    old_parts = sum(p.stat().st_size for p in (before / "parts").glob("*.curves.parquet"))
    row = {"values": n, "metrics": int(old["metric"].nunique()),
           "disk_long_consolidated": round((before / "curves.parquet").stat().st_size / n, 2),
           "disk_long_parts": round(old_parts / n, 2),
           "disk_wide_parts": round(sum(p.stat().st_size for p in (after / "parts" / "curves").iterdir()) / n, 2),
           "ram_long_pandas": round(old.memory_usage(deep=True).sum() / n, 2),
           "ram_wide_pandas": round(wide.memory_usage(deep=True).sum() / n, 2)}
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
