"""A batch's results as tables, from its Records: the models table (a row per model) and the curves (a row
per model, evaluation and metric). Pure functions of the records, the models' table rows and their
budgets: the trainer writes them at each checkpoint, a grid's job returns them.

Every evaluation is recorded for the whole batch, but it counts for a model (its T_mem/T_grok, its final
values, its curves) only where it is one of the model's own: every eval_every steps and at its own
budget, so a model's results do not depend on the budgets of the cells it is packed with.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fastgrok.config import PER_MODEL
from fastgrok.core.step import EVAL_METRICS
from fastgrok.train.state import Records

I_LOGIT, I_TEST_LOSS = EVAL_METRICS.index("logit_scale"), EVAL_METRICS.index("test_loss")
ROW_ONLY = ("t_clamp", "budget", "layer_fracs", "cell_seed0", "cell_seeds")
"""Table-row keys the trainer consumes and does not copy into the models table."""


def scheduled(steps, eval_every: int, budget: np.ndarray) -> np.ndarray:
    """(T, M) whether each step is one of each model's own evaluations: every eval_every steps and at its
    own budget."""
    steps = np.asarray(steps)
    return (steps % eval_every == 0)[:, None] | (steps[:, None] == budget[None, :])


def ends(records: Records, eval_every: int, budget: np.ndarray) -> np.ndarray:
    """(M,) each model's last evaluated step: where it stopped, else its latest own evaluation."""
    steps = np.asarray(records.steps)
    own = scheduled(steps, eval_every, budget)                      # (T, M); step 0 is everyone's
    latest = steps[own.shape[0] - 1 - np.argmax(own[::-1], axis=0)]
    return np.where(records.stop >= 0, records.stop, latest)


def models_table(records: Records, table: list[dict], per: dict[str, list], budget: np.ndarray,
                 eval_every: int) -> pd.DataFrame:
    """A row per model: its table row (less ROW_ONLY), its per-model settings, T_mem, T_grok, the logit
    scale and test loss at its T_grok, its metrics at its last step, whether it diverged, its steps."""
    r = records
    ev = np.stack(r.evals)                                  # (T, M, N_EVAL)
    steps = np.asarray(r.steps)
    last_step = ends(r, eval_every, budget)
    rows = []
    for i, row in enumerate(table):
        tg = int(r.t_grok[i])
        last = ev[np.searchsorted(steps, last_step[i])]     # (M, N_EVAL) at this model's last step
        # L at grok: the model's own evaluation at T_grok (every evaluation computes L), so it does not
        # depend on how long the batch ran; the study's cell-level rule (L at the logged step nearest the
        # cell's median T_grok) is analysis.statistics.cell_logit_scale's, from the curves
        at_grok = ev[np.searchsorted(steps, tg), i] if tg >= 0 else np.full(ev.shape[2], np.nan)  # (N_EVAL,)
        rows.append({**{k: v for k, v in row.items() if k not in ROW_ONLY},
                     **{k: per[k][i] for k in PER_MODEL}, "rho": row.get("rho"),
                     "t_mem": int(r.t_mem[i]) if r.t_mem[i] >= 0 else None,
                     "t_grok": tg if tg >= 0 else None, "logit_scale_at_grok": float(at_grok[I_LOGIT]),
                     "test_loss_at_grok": float(at_grok[I_TEST_LOSS]),
                     **{m: float(last[i, k]) for k, m in enumerate(EVAL_METRICS) if m != "logit_scale"},
                     "diverged": bool(r.diverged[i]), "steps": int(last_step[i])})
    df = pd.DataFrame(rows)
    for c in ("t_mem", "t_grok"):
        df[c] = df[c].astype("Int64")
    for c in ("norm_target", "rho"):
        df[c] = df[c].astype("float64")
    return df


def curves_table(records: Records, table: list[dict], metrics: list[str], budget: np.ndarray,
                 eval_every: int, logit_every: int) -> pd.DataFrame:
    """Long: model, step, metric, value at each of a model's own evaluations up to its last step (the
    logit scale only every logit_every steps)."""
    r = records
    ev = np.stack(r.evals)                                  # (T, M, N_EVAL)
    T, M, K_ = ev.shape
    steps = np.repeat(np.asarray(r.steps), M * K_).reshape(T, M, K_)
    ids = np.array([row["model"] for row in table])
    model = np.broadcast_to(ids[None, :, None], (T, M, K_))
    metric = np.broadcast_to(np.arange(K_)[None, None, :], (T, M, K_))
    own = scheduled(r.steps, eval_every, budget)[:, :, None]                # (T, M, 1)
    keep = ((metric != I_LOGIT) | (steps % logit_every == 0)) & \
        (steps <= ends(r, eval_every, budget)[None, :, None]) & own
    return pd.DataFrame({"model": model[keep], "step": steps[keep],
                         "metric": np.asarray(metrics)[metric[keep]], "value": ev[keep]})
