"""The end-of-run summary table (one row per cell), printed with rich."""
from __future__ import annotations

import pandas as pd

from .config import PER_MODEL, TrainConfig


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
    t = Table(title=f"fastgrok train: p={cfg.p} {'/'.join(cfg.values('op'))} {cfg.model} {'/'.join(cfg.values('loss'))}, {len(df)} models, {seconds:.1f} s")
    varying = [k for k in PER_MODEL if len(cfg.values(k)) > 1]       # the per-model fields given several values
    for col in ("cell", *varying, "tau", "norm target", "grokked", "diverged", "median T_mem", "median T_grok",
                "mean test acc"):
        t.add_column(col, justify="right")
    fmt = lambda v: "-" if pd.isna(v) else v if isinstance(v, str) else f"{v:g}"
    for r in cell_summary(df).itertuples():
        t.add_row(str(r.cell), *(fmt(getattr(r, k)) for k in varying), fmt(r.tau), fmt(r.norm_target),
                  f"{r.grokked}/{r.seeds}", str(int(r.diverged)), fmt(r.t_mem), fmt(r.t_grok), f"{r.test_acc:.3f}")
    Console().print(t)
