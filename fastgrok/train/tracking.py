"""Tracking in Weights & Biases or TensorBoard (`fastgrok train --track wandb|tensorboard`, a spec's
`[engine] track = "wandb"` for `fastgrok run`).

One small interface (`Tracker`: scalars at a step, a summary, a table, close) and two back ends. What
is logged is sized for a grid of thousands of models, one tracked run per `fastgrok train`:

- at each evaluation, per cell and curve (CURVES: test/train accuracy and loss, ||W||, the logit scale
  L, the SC rate), the quartiles over the cell's models that evaluation counts for (those whose
  curves.parquet rows hold this step: running, at one of their own evaluation steps; L only at its
  logit_every steps, as in curves.parquet): `cell{C}/{curve}/q25`, `/median`, `/q75`, 21 series a cell;
- per model as well (`model{K}/{curve}`) only when the run has at most PER_MODEL_MAX models;
- at the end, per cell, its models' T_mem and T_grok (median, and the fraction that grokked) as a
  summary, and the cell table (models.parquet's per-cell medians) as a table.

A grid of 200 models in 10 cells logs 210 series. A grid (`fastgrok run`) logs each batch's cells when
the batch finishes (the driver, from the batch's results: the same series), the summary and cell table
when the grid is done; one tracked run per grid run directory, continued by a rerun. W&B: one run per `fastgrok train`, its id kept in
DIR/tracking.json, so a resumed run (`--resume DIR`, which tracks again without --track) continues it;
WANDB_MODE=offline writes it under DIR/wandb/ for `wandb sync` later. A resume logs again the
evaluations between its checkpoint and the stop (the same values: training is deterministic). TensorBoard: event files under
DIR/tensorboard/. A tracker error never stops training: it is one warning line, then tracking is off.
"""
from __future__ import annotations

import atexit
import json
import sys
import uuid
from pathlib import Path

import numpy as np

from fastgrok.config import ConfigError

BACKENDS = ("wandb", "tensorboard")
CURVES = ("test_acc", "train_acc", "test_loss", "train_loss", "weight_norm", "logit_scale", "sc_rate")
QUARTILES = (("q25", 25), ("median", 50), ("q75", 75))
PER_MODEL_MAX = 16
"""Runs of at most this many models also log each model's curves (7 series a model)."""
STATE = "tracking.json"
EXTRA = {"wandb": "wandb", "tensorboard": "tensorboard"}


def need(module: str, extra: str):
    """Import an optional library, or a one-line ConfigError naming the pip extra that installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"{module} is not installed: pip install 'fastgrok[{extra}]'") from None


def check(backend: str) -> None:
    """Before training: the back end's library is there (one line naming the extra otherwise)."""
    need("wandb" if backend == "wandb" else "torch.utils.tensorboard", EXTRA[backend])


class Tracker:
    """The interface; a back end implements these four."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def summary(self, values: dict[str, float]) -> None: ...

    def table(self, name: str, df) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, state: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.w, self.step = SummaryWriter(str(Path(run_dir) / "tensorboard")), 0

    def scalars(self, step, values):
        self.step = max(self.step, step)
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def summary(self, values):
        for k, v in values.items():
            self.w.add_scalar(f"summary/{k}", v, self.step)

    def table(self, name, df):
        rows = [list(df.columns)] + df.astype(object).where(df.notna(), "").values.tolist()
        lines = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        self.w.add_text(name, "\n".join(lines[:1] + ["|" + "---|" * len(df.columns)] + lines[1:]), self.step)

    def close(self):
        self.w.close()


class WandB(Tracker):
    def __init__(self, run_dir: Path, state: dict, config: dict | None = None):
        import wandb
        state.setdefault("id", uuid.uuid4().hex[:12])
        self.run = wandb.init(project=state.get("project", "fastgrok"), id=state["id"], resume="allow",
                              dir=str(run_dir), name=Path(run_dir).name, config=config, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")       # steps may repeat after a resume

    def scalars(self, step, values):
        self.run.log({"step": step, **values})

    def summary(self, values):
        self.run.summary.update(values)

    def table(self, name, df):
        import wandb
        self.run.log({name: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})

    def close(self):
        self.run.finish()


class Safe:
    """A back end whose errors never reach training: the first is one warning line, then it is off."""

    def __init__(self, backend: str, run_dir: Path, config: dict | None = None):
        self.backend, self.run_dir, self.t = backend, Path(run_dir), None
        path = self.run_dir / STATE
        state = json.loads(path.read_text()) if path.exists() else {}
        state["backend"] = backend
        self._call(lambda: setattr(self, "t", (WandB(self.run_dir, state, config) if backend == "wandb"
                                               else TensorBoard(self.run_dir, state))))
        if self.t is not None:
            self._call(lambda: path.write_text(json.dumps(state)))
            atexit.register(self.close)             # an interrupted grid driver: the events are flushed

    def _call(self, f):
        try:
            return f()
        except Exception as e:          # noqa: BLE001 (any error of a tracker: training goes on)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"fastgrok: warning: tracking ({self.backend}) failed: {first}; training goes on untracked",
                  file=sys.stderr)
            self.t = None

    def evaluation(self, step: int, models: list[int], cells: np.ndarray, counts: np.ndarray, metrics, out,
                   logit_due: bool) -> None:
        """One evaluation: out (M, K) over the table's rows, metrics its columns; counts (M,) bool the
        models this step counts for (their curves' rows), cells (M,) their cells."""
        if self.t is not None:
            self._call(lambda: self.t.scalars(step, evaluation_scalars(models, cells, counts, metrics, out, logit_due)))

    def finish(self, models_df) -> None:
        """The run's end: each cell's T_mem/T_grok summary and the cell table."""
        if self.t is not None:
            self._call(lambda: (self.t.summary(cell_summary(models_df)), self.t.table("cells", cell_table(models_df))))

    def results(self, models, curves, n_models: int) -> None:
        """A finished grid batch: its cells' series at each of their evaluations."""
        if self.t is not None:
            self._call(lambda: [self.t.scalars(s, v) for s, v in sorted(results_scalars(models, curves, n_models).items())])

    def close(self) -> None:
        if self.t is not None:
            self._call(self.t.close)
            self.t = None


def open_tracker(backend: str | None, run_dir: Path, config: dict | None = None) -> Safe | None:
    """The run's tracker: `backend`, else the one DIR/tracking.json names (a resumed tracked run), else None."""
    path = Path(run_dir) / STATE
    if backend is None and path.exists():
        backend = json.loads(path.read_text()).get("backend")
    return Safe(backend, run_dir, config) if backend else None


def _quartiles(vals: dict, key: str, x: np.ndarray) -> None:
    x = x[np.isfinite(x)]
    if len(x):
        for name, q in QUARTILES:
            vals[f"{key}/{name}"] = float(np.percentile(x, q))


def evaluation_scalars(models, cells, counts, metrics, out, logit_due: bool) -> dict[str, float]:
    """One evaluation's series (see `Safe.evaluation`)."""
    col = {m: metrics.index(m) for m in CURVES if m in metrics and (logit_due or m != "logit_scale")}
    vals = {}
    for c in np.unique(cells[counts]):
        rows = out[counts & (cells == c)]
        for m, k in col.items():
            _quartiles(vals, f"cell{int(c)}/{m}", rows[:, k])
    if len(models) <= PER_MODEL_MAX:
        for i in np.nonzero(counts)[0]:
            vals.update({f"model{models[i]}/{m}": float(out[i, k]) for m, k in col.items() if np.isfinite(out[i, k])})
    return vals


def results_scalars(models, curves, n_models: int) -> dict[int, dict[str, float]]:
    """{step: series} from a grid batch's results (its models and curves parts): the same series as
    `evaluation_scalars` gives at each evaluation (per model when the grid has at most PER_MODEL_MAX)."""
    c = curves[curves["metric"].isin(CURVES)].merge(models[["model", "cell"]], on="model")
    out: dict[int, dict[str, float]] = {}
    for (step, cell, metric), g in c.groupby(["step", "cell", "metric"]):
        _quartiles(out.setdefault(int(step), {}), f"cell{int(cell)}/{metric}", g["value"].to_numpy(float))
    if n_models <= PER_MODEL_MAX:
        for r in c.itertuples():
            out[int(r.step)][f"model{r.model}/{r.metric}"] = float(r.value)
    return out


def cell_summary(df) -> dict[str, float]:
    out = {}
    for c, g in df.groupby("cell"):
        out[f"cell{int(c)}/t_mem_median"] = float(g["t_mem"].astype("float64").median())
        out[f"cell{int(c)}/t_grok_median"] = float(g["t_grok"].astype("float64").median())
        out[f"cell{int(c)}/grokked"] = float(g["t_grok"].notna().mean())
    return out


def cell_table(df):
    """One row per cell: its settings (the columns that hold one value in the cell) and the median of
    each result."""
    import pandas as pd
    results = ["t_mem", "t_grok", "test_acc", "train_acc", "test_loss", "logit_scale_at_grok", "weight_norm", "steps"]
    rows = []
    for c, g in df.groupby("cell"):
        same = {k: g[k].iloc[0] for k in g.columns if k not in results + ["model", "seed", "cell"]
                and g[k].nunique(dropna=False) == 1}
        rows.append({"cell": int(c), **same, "models": len(g), "grokked": int(g["t_grok"].notna().sum()),
                     **{f"{k}_median": float(g[k].astype("float64").median()) for k in results if k in g}})
    return pd.DataFrame(rows)
