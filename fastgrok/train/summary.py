"""The end-of-run summary table (one row per cell), printed with rich."""
from __future__ import annotations

import pandas as pd

from fastgrok.config import PER_MODEL, TrainConfig


def cell_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: seeds grokked/diverged, median T_mem and T_grok over the seeds that reached them."""
    g = df.groupby("cell", sort=True)
    per = {k: (k, "first") for k in PER_MODEL if k in df.columns}
    out = g.agg(**per, tau=("tau", "first"), norm_target=("norm_target", "first"), seeds=("seed", "size"),
                grokked=("t_grok", lambda s: int(s.notna().sum())), diverged=("diverged", "sum"),
                t_mem=("t_mem", lambda s: s.dropna().median() if s.notna().any() else float("nan")),
                t_grok=("t_grok", lambda s: s.dropna().median() if s.notna().any() else float("nan")),
                test_acc=("test_acc", "mean"))
    return out.reset_index()


def print_summary(cfg: TrainConfig, df: pd.DataFrame, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table
    fmt = lambda v: "-" if pd.isna(v) else v if isinstance(v, str) else f"{v:g}"    # noqa: E731
    t = Table(title=f"fastgrok train: p={cfg.p} {'/'.join(cfg.values('op'))} {cfg.model} {'/'.join(cfg.values('loss'))}, {len(df)} models, {seconds:.1f} s")
    varying = [k for k in PER_MODEL if len(cfg.values(k)) > 1]       # the per-model fields given several values
    cells = cell_summary(df)
    # (header, value of a cell row); tau and norm target only when they vary or are set, diverged when any did
    cols = [("cell", lambda r: str(r.cell))] + [(k.replace("_", " "), lambda r, k=k: fmt(getattr(r, k)))
                                                for k in varying]
    if len(cfg.taus) > 1 or cfg.taus != (1.0,):
        cols.append(("tau", lambda r: fmt(r.tau)))
    if cfg.norm_targets:
        cols.append(("norm target", lambda r: fmt(r.norm_target)))
    cols.append(("grokked", lambda r: f"{r.grokked}/{r.seeds}"))
    if cells["diverged"].any():
        cols.append(("diverged", lambda r: str(int(r.diverged))))
    cols += [("median T_mem", lambda r: fmt(r.t_mem)), ("median T_grok", lambda r: fmt(r.t_grok)),
             ("mean test acc", lambda r: f"{r.test_acc:.3f}")]
    for name, _ in cols:
        t.add_column(name, justify="right")
    for r in cells.itertuples():
        t.add_row(*(value(r) for _, value in cols))
    Console().print(t)
