"""Bytes per curve value on disk and in RAM (pandas), small parts (4 models) beside large ones (84 models),
for each way curves parts have been written (issue 29, item 2).

    python benchmarks/curves_bytes.py --small /tmp/fg_growth_before/run --json benchmarks/results/curves_bytes.json

The curves are real ones: the small parts are those of a `benchmarks/store_growth.py` run (250 batches of 4
models, p = 11; any layout), the large part is docs/mediation_p31's curves (84 models, p = 31, one table).
Each source table is written again, through the store's own sealing (`store.atomic_write`), by every writer:

    long          the long table (model, step, metric, value) as store.write_parquet wrote it until
                  2026-12-07: the parts of before (pandas metadata and ARROW:schema, pyarrow's defaults:
                  snappy, dictionaries, statistics)
    wide_stats    wide, zstd, min/max statistics on every column (the first wide parts, 2026-12-07)
    wide_keys     wide, zstd, statistics on model and step only (main at b2e5809)
    wide_now      store.write_curves_part: today's writer (store.CURVES_WRITE)

Every file is read back through the checked path (seal, then `store.curves_to_long`) and must equal its
source bit for bit. Per value = bytes / recorded values (the long table's rows). A breakdown of one small
part and the large part says where the bytes go: the footer (Thrift FileMetaData: schema, column chunks,
statistics, key-value metadata), of which the ARROW:schema copy, the pandas metadata and the seal,
fingerprint and layout keys; the dictionary pages; the data pages.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fastgrok import store

FP = "f" * 64                      # a fingerprint of the length the run's (sha256 hex)
REPO = Path(__file__).resolve().parent.parent


def _old_wide(path: Path, long: pd.DataFrame, **kw) -> None:
    import pyarrow.parquet as pq
    table = store.curves_to_wide(long)
    meta = {store.SEAL_KEY.encode(): store.SEAL_PLACEHOLDER.encode(), b"fastgrok.layout": b"wide",
            store.FINGERPRINT_KEY: FP.encode()}
    table = table.replace_schema_metadata(meta)
    store.atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", **kw), seal=True)


def _old_long(path: Path, long: pd.DataFrame) -> None:
    """store.write_parquet as it was until 2026-12-07 (pyarrow's defaults, ARROW:schema kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(long, preserve_index=False)
    meta = {**table.schema.metadata, store.SEAL_KEY.encode(): store.SEAL_PLACEHOLDER.encode(),
            store.FINGERPRINT_KEY: FP.encode()}
    table = table.replace_schema_metadata(meta)
    store.atomic_write(path, lambda tmp: pq.write_table(table, tmp), seal=True)


WRITERS = {
    "long": _old_long,
    "wide_stats": lambda path, long: _old_wide(path, long),
    "wide_keys": lambda path, long: _old_wide(path, long, write_statistics=list(store.CURVE_KEYS)),
    "wide_now": lambda path, long: store.write_curves_part(path, long, fingerprint=FP),
}


def read_back(path: Path, writer: str) -> pd.DataFrame:
    import pyarrow.parquet as pq
    data = store.read_verified(path)                    # the seal checked
    if writer == "long":
        return pd.read_parquet(store._buffer(data))
    return store.curves_to_long(pq.read_table(store._buffer(data)))


def same_bits(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    key = ["model", "step", "metric"]
    a = a.sort_values(key, kind="stable").reset_index(drop=True)
    b = b.sort_values(key, kind="stable").reset_index(drop=True)
    return (len(a) == len(b) and all(np.array_equal(a[c].to_numpy(), b[c].to_numpy()) for c in ("model", "step"))
            and list(a["metric"].astype(str)) == list(b["metric"].astype(str))
            and np.array_equal(a["value"].to_numpy("float64").view("u8"), b["value"].to_numpy("float64").view("u8")))


def breakdown(path: Path) -> dict:
    """Where a parquet file's bytes go."""
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    md = f.metadata
    kv = md.metadata or {}
    size = path.stat().st_size
    dict_b = data_b = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for i in range(rg.num_columns):
            c = rg.column(i)
            d = (c.data_page_offset - c.dictionary_page_offset) if c.has_dictionary_page else 0
            dict_b += d
            data_b += c.total_compressed_size - d
    stats = sum(1 for g in range(md.num_row_groups) for i in range(md.num_columns)
                if md.row_group(g).column(i).is_stats_set)
    return {"file": size, "footer": md.serialized_size,
            "kv_metadata": sum(len(k) + len(v) for k, v in kv.items()),
            "arrow_schema": len(kv.get(b"ARROW:schema", b"")), "pandas_metadata": len(kv.get(b"pandas", b"")),
            "fastgrok_keys": sum(len(k) + len(v) for k, v in kv.items() if k.startswith(b"fastgrok.")),
            "columns_with_statistics": stats, "columns": md.num_columns, "row_groups": md.num_row_groups,
            "dictionary_pages": dict_b, "data_pages": data_b, "magic_and_length": 12}


def measure(name: str, sources: list[pd.DataFrame], tmp: Path) -> dict:
    n = sum(len(s) for s in sources)
    out = {"source": name, "tables": len(sources), "models_per_table": round(float(np.mean(
        [s["model"].nunique() for s in sources])), 1), "values": n}
    for w, write in WRITERS.items():
        d = tmp / f"{name}-{w}"
        d.mkdir()
        t0 = time.perf_counter()
        for i, s in enumerate(sources):
            write(d / f"{i:04d}.parquet", s)
        wall = time.perf_counter() - t0
        files = sorted(d.iterdir())
        back = [read_back(p, w) for p in files]
        assert all(same_bits(s, b) for s, b in zip(sources, back)), f"{w}: not lossless"
        out[f"disk_{w}"] = round(sum(p.stat().st_size for p in files) / n, 2)
        out[f"write_ms_per_table_{w}"] = round(1e3 * wall / len(sources), 2)
        out[f"breakdown_{w}"] = breakdown(files[0])
    import pyarrow.parquet as pq
    wide = pd.concat([pq.read_table(p).to_pandas() for p in sorted((tmp / f"{name}-wide_now").iterdir())],
                     ignore_index=True)
    long = pd.concat(sources, ignore_index=True)
    out["ram_long_pandas"] = round(long.memory_usage(deep=True).sum() / n, 2)
    out["ram_wide_pandas"] = round(wide.memory_usage(deep=True).sum() / n, 2)
    return out


def small_sources(run_dir: Path) -> list[pd.DataFrame]:
    """A grid run's curves, one long table per part (either layout)."""
    import pyarrow.parquet as pq
    out = []
    for p in store.part_files(run_dir, "curves").values():
        data = store.read_verified(p)
        t = pq.read_table(store._buffer(data))
        out.append(store.curves_to_long(t) if (t.schema.metadata or {}).get(b"fastgrok.layout") == b"wide"
                   else t.to_pandas())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=Path, required=True, help="a store_growth.py run directory (its run/)")
    ap.add_argument("--large", type=Path, default=REPO / "docs" / "mediation_p31" / "curves.parquet")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure("small_parts", small_sources(args.small), Path(tmp)),
                measure("large_part", [pd.read_parquet(args.large)], Path(tmp))]
    import pyarrow
    report = {"bench": "curves_bytes", "rows": rows, "pyarrow": pyarrow.__version__, "host": platform.node(),
              "date": time.strftime("%Y-%m-%d")}
    for r in rows:
        print(f"{r['source']:12s} {r['tables']:4d} table(s) of {r['models_per_table']:5.1f} models, "
              f"{r['values']:,} values; disk B/value: " +
              ", ".join(f"{w} {r[f'disk_{w}']}" for w in WRITERS) +
              f"; RAM B/value: long {r['ram_long_pandas']}, wide {r['ram_wide_pandas']}")
    for r in rows:
        for w in ("wide_keys", "wide_now"):
            print(f"  {r['source']} {w}, first file: {json.dumps(r[f'breakdown_{w}'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
