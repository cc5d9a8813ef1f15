"""A grid's run directory: its layout, the plan and spec it was started with, the calibration cache,
the parts of finished batches (the results), and `fastgrok status` of a grid.

    DIR/spec.toml, spec.json  the effective spec (overrides applied); a rerun must match it
    DIR/config.json           a summary of the spec for the report's header
    DIR/plan.json             cells (with their global model ids) and batches, fixed on the first run
    DIR/calibration.json      w_c per setting; DIR/calibration/<key>/ holds the free control's run
    DIR/batches/<id>/         the checkpoint of a running batch (removed once its part is written)
    DIR/parts/curves/<id>.parquet            a finished batch's curves, wide (a row per model and
                                             evaluation, a column per metric), written once
    DIR/parts/models/<id>.parquet            its models (a row each), written once, after its curves:
                                             the results are these parts, read as one dataset
                                             (store.Results); nothing rewrites them
    DIR/snapshots/<id>/step_*.npz            a batch's weight snapshots ([train] snapshots; written by the
                                             batch's trainer, kept when batches/<id> goes);
    DIR/snapshots/index.json                 all batches' so far, rewritten after each finished batch

A batch is done when its part exists; a rerun skips done batches and resumes the running ones from their
checkpoints, so nothing is lost and nothing runs twice.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fastgrok.train import snapshots
from fastgrok import store
from fastgrok.config import ConfigError
from fastgrok.grid.experiments import ExperimentSpec, to_toml

SPEC_JSON, PLAN = store.SPEC_JSON, store.PLAN
SPEC_TOML, CALIBRATION = "spec.toml", store.CALIBRATION


# ---------------------------------------------------------------------------------------------
# What a rerun reports of a changed spec; w_c from a calibration's results
# ---------------------------------------------------------------------------------------------
def _dict_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, one level into nested tables (train.compile, not train), each shown
    as key (saved -> now)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += _dict_diff(a, b, prefix=f"{k}.")
        else:
            out.append(f"{prefix}{k} ({a!r} -> {b!r})" if len(repr(a)) + len(repr(b)) < 60 else f"{prefix}{k}")
    return out


def calibrate_from(models: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """w_c, the study's rule: its free control run stops at the step its LAST seed groks, and w_c is the
    median over the seeds of ||W|| at THAT step (the study's `wn_at_grok`: each seed's norm at the end of
    the control run, not at its own T_grok). A control whose seeds did not all grok ran to its budget:
    the median of the norms there (source "budget"; none grokked is flagged by the report).
    A seed whose curve ends earlier (it diverged) gives its last norm."""
    w = curves.loc[curves["metric"] == "weight_norm"].sort_values("step")
    t_grok = pd.to_numeric(models["t_grok"], errors="coerce")
    n_grokked = int(t_grok.notna().sum())
    if n_grokked == len(models):
        end, source = int(t_grok.max()), "last grok"
    else:
        end, source = int(pd.to_numeric(models["steps"]).max()), "budget"
    upto = w.loc[w["step"] <= end].groupby("model")["value"].last()       # each seed's norm at `end`
    vals = upto.reindex(models["model"].to_numpy()).dropna().to_numpy(dtype="float64")
    return {"w_c": float(np.median(vals)), "source": source, "step": end, "n_grokked": n_grokked,
            "seeds": len(models)}


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------
def init_run_dir(spec: ExperimentSpec, run_dir: Path, device: str, *, check: bool = True) -> dict:
    """Write spec and plan on the first run; on a rerun check the spec matches and reuse the plan.
    check: `preflight` the batches on `device` first (where the batches will run)."""
    run_dir = Path(run_dir)
    d = spec.to_dict()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out: {run_dir} is a file; pick a directory for --out")
    if not (run_dir / SPEC_JSON).exists() and store.holds_train_run(run_dir):
        raise ConfigError(f"out: {run_dir} holds a `fastgrok train` run; pick another --out")
    if (run_dir / SPEC_JSON).exists():
        old = store.read_json(run_dir / SPEC_JSON)
        if old != d:
            diff = _dict_diff(old, d)
            raise ConfigError(f"out: {run_dir} holds a run of a different spec (differs in {', '.join(diff)}); "
                              "rerun with the same experiment and overrides to resume, or pick another --out")
        return store.read_plan(run_dir)
    from fastgrok.grid.plan import make_plan, preflight     # here: status and the readers import no torch
    plan = make_plan(spec, device)
    if check:
        preflight(spec, plan, device)                       # fails before the directory is touched
    store.write_json(run_dir / PLAN, {**plan, "run": store.spec_fingerprint(d)})
    store.atomic_write(run_dir / SPEC_TOML, lambda tmp: Path(tmp).write_text(to_toml(d)))
    first = plan["cells"][0]

    def values(a):                          # one value as itself, several (a packed axis swept) as a list
        v = sorted({c[a] for c in plan["cells"]})
        return v[0] if len(v) == 1 else v
    store.write_json(run_dir / store.CONFIG, {
        "experiment": spec.name, "p": sorted({c["p"] for c in plan["cells"]}), "op": values("op"),
        "model": first["model"], "loss": sorted({c["loss"] for c in plan["cells"]}),
        "taus": sorted({c["tau"] for c in plan["cells"]}), "seeds": spec.seeds, "lr": values("lr"),
        "wd": values("wd"), "train_frac": values("train_frac"), "dtype": sorted({c["dtype"] for c in plan["cells"]})})
    store.write_json(run_dir / SPEC_JSON, d)                 # last: its presence marks an initialised dir
    return plan


def record_calibration(run_dir: Path, key: str, models: pd.DataFrame, curves: pd.DataFrame) -> dict:
    cal = store.read_calibration(run_dir)
    cal[key] = calibrate_from(models, curves)
    store.write_json(Path(run_dir) / CALIBRATION, cal)
    return cal[key]


def done_batches(run_dir: Path) -> set[str]:
    """The batches whose models part is written (parts/models/<id>.parquet, or a part of before 2026-12-07,
    parts/<id>.models.parquet): the part that marks a batch done."""
    return set(store.part_files(run_dir, "models"))


def complete_in_results(run_dir: Path, plan: dict) -> set[str]:
    """The batches whose every cell is complete in a copied run's models.parquet (`cells_complete`)."""
    path = Path(run_dir) / store.MODELS
    if not path.exists():
        return set()
    done = store.cells_complete(store.read_parquet(path, required=("cell", "seed"), run_dir=run_dir), plan)
    return {b["id"] for b in plan["batches"] if all(c in done for c in b["cells"])}


def restore_parts(run_dir: Path, plan: dict) -> None:
    """Write the parts of batches complete in models.parquet (a run directory copied without parts/, or
    written before parts were the store) but without a part, so a rerun does not train them again."""
    run_dir = Path(run_dir)
    missing = complete_in_results(run_dir, plan) - done_batches(run_dir)
    if not missing:
        return
    models, curves = (store.read_parquet(run_dir / name, run_dir=run_dir) for name in (store.MODELS, store.CURVES))
    for b in plan["batches"]:
        if b["id"] in missing:
            m = models.loc[models["cell"].isin(b["cells"])]
            write_part(run_dir, b["id"], m.reset_index(drop=True),
                       curves.loc[curves["model"].isin(m["model"])].reset_index(drop=True))


def migrate(run_dir: Path, plan: dict) -> None:
    """A run directory written before parts were the store (2026-12-07), on its first rerun: the batches
    only models.parquet holds get parts, each part of the old layout (parts/<id>.<kind>.parquet, long
    curves) moves to parts/<kind>/<id>.parquet (wide curves), and models.parquet and curves.parquet, now
    copies of the parts that would go stale, go. Every step is atomic and repeatable: a kill midway leaves
    parts that readers take in either layout, and the next rerun finishes the job."""
    run_dir = Path(run_dir)
    restore_parts(run_dir, plan)
    fp = run_fingerprint(run_dir)
    cells = {b["id"]: set(b["cells"]) for b in plan["batches"]}
    for bid, old in store.part_files(run_dir, "curves").items():
        if old.parent.name == store.PARTS:
            new = store.part_path(run_dir, bid, "curves")
            if not new.exists():
                store.write_curves_part(new, read_part(run_dir, bid, "curves", fp, None), fp)
    for bid, old in store.part_files(run_dir, "models").items():
        if old.parent.name == store.PARTS:
            read_part(run_dir, bid, "models", fp, cells.get(bid))          # checked before it moves
            store.part_path(run_dir, bid, "models").parent.mkdir(parents=True, exist_ok=True)
            old.replace(store.part_path(run_dir, bid, "models"))
    for old in (run_dir / store.PARTS).glob("*.curves.parquet"):
        if store.part_path(run_dir, old.name.split(".")[0], "curves").exists():
            old.unlink()
    if (run_dir / store.MODELS).exists() and complete_in_results(run_dir, plan) <= done_batches(run_dir):
        for name in (store.CURVES, store.MODELS):                   # models.parquet last: it says what is done
            (run_dir / name).unlink(missing_ok=True)


def check_parts(run_dir: Path, plan: dict) -> store.Results:
    """Every part checked (seal, fingerprint, columns; each models part's cells are its batch's planned
    ones): the run's results, or a StateError naming the first bad part. A rerun calls it once, first."""
    res = store.Results(run_dir)
    planned = {b["id"]: set(b["cells"]) for b in plan["batches"]}
    if res.from_parts:
        for path, df in zip(res.model_files, res._frames):
            bid = path.stem if path.parent.name == "models" else path.name.split(".")[0]
            if not set(df["cell"].tolist()) <= planned.get(bid, set()):
                raise store.state_error(path, f"holds cells that batch {bid} does not plan: a part of another run")
    return res


def run_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of a grid run (store.spec_fingerprint of its spec.json; None: none yet). Every
    part, the plan and the results tables carry it."""
    p = Path(run_dir) / SPEC_JSON
    return store.spec_fingerprint(store.read_json(p)) if p.exists() else None


def write_part(run_dir: Path, batch_id: str, models: pd.DataFrame, curves: pd.DataFrame) -> None:
    """A finished batch's results, written once: its curves part (wide), then its models part (which marks
    the batch done), each atomic and sealed with the run's fingerprint; then its checkpoint directory goes.
    Nothing else is read or rewritten, so a batch costs the same however many are done."""
    run_dir = Path(run_dir)
    fp = run_fingerprint(run_dir)
    store.write_curves_part(store.part_path(run_dir, batch_id, "curves"), curves, fingerprint=fp)
    store.write_parquet(store.part_path(run_dir, batch_id, "models"), models, fingerprint=fp,
                        keys=("model", "cell", "seed"))
    snapshots.write_grid_index(run_dir / "snapshots")
    shutil.rmtree(run_dir / "batches" / batch_id, ignore_errors=True)


def read_part(run_dir: Path, batch_id: str, kind: str, fp: str | None, cells: set | None) -> pd.DataFrame:
    """A batch's `kind` part (either layout; curves in the long format), refused (StateError naming it) when
    it is unreadable, from another run (its fingerprint is not the run's; a part written before fingerprints
    has none and is accepted), or holds cells its batch does not plan."""
    path = store.part_files(run_dir, kind).get(batch_id, store.part_path(run_dir, batch_id, kind))
    if not path.exists():
        raise store.state_error(path, f"missing (its batch's {kind} part)")
    got = store.read_fingerprint(path)
    if fp is not None and got is not None and got != fp:
        raise store.state_error(path, "a part of another run (its fingerprint is not this run's spec.json)")
    if kind == "curves" and path.parent.name == "curves":
        import pyarrow.parquet as pq
        return store.curves_to_long(pq.read_table(store._buffer(store.read_verified(path))))
    df = store.read_parquet(path, required=("model", "cell", "seed") if kind == "models" else
                            ("model", "step", "metric", "value"))
    if kind == "models" and cells is not None and not set(df["cell"].tolist()) <= cells:
        raise store.state_error(path, f"holds cells that batch {batch_id} does not plan: a part of another run")
    return store.with_added_columns(df) if kind == "models" else df


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------
def _dose_label(cell: dict) -> str | float:
    """The cell's clamp: its rho, an absolute target ("||W|| 20"), or "free"."""
    if cell["rho"] is not None:
        return cell["rho"]
    return f"||W|| {cell['norm_target']:g}" if cell.get("norm_target") is not None else "free"


def status_table(run_dir: Path) -> pd.DataFrame:
    """Per cell: its parameters, models done / total, grokked, median T_grok so far, batch state."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"dir: {run_dir} does not exist" if not run_dir.exists() else f"dir: {run_dir} is a file")
    if not (run_dir / PLAN).exists() and (run_dir / store.PROGRESS).exists():
        pr = store.read_progress(run_dir / store.PROGRESS)
        raise ConfigError(f"dir: {run_dir} holds a `fastgrok train` run (not a grid): step {pr['step']} of "
                          f"{pr.get('steps', '?')}, {'done' if pr.get('done') else 'not done'}")
    if not (run_dir / PLAN).exists():
        raise ConfigError(f"dir: {run_dir} holds no grid run (no {PLAN})")
    plan = store.read_plan(run_dir)
    results = store.Results(run_dir, models_required=("cell", "t_grok"), curves=False,
                            model_columns=("model", "cell", "t_grok", "steps", "diverged"))
    done = done_batches(run_dir) | (complete_in_results(run_dir, plan) if not results.from_parts else set())
    frames = [results.models()]
    state = {}
    for b in plan["batches"]:
        st = "done" if b["id"] in done else "pending"
        bdir = run_dir / "batches" / b["id"]
        if st == "pending" and bdir.is_dir():
            # the batch's trainer (a fork batch: its arms, after the parents in parent/)
            for d, label in ((bdir, "step"), (bdir / "parent", "fork parent, step")):
                if (d / store.PROGRESS).exists():
                    pr = store.read_progress(d / store.PROGRESS)
                    st = f"{label} {pr['step']}" + (f"/{pr['steps']}" if "steps" in pr else "")
                    break
                if (d / store.CHECKPOINT).exists():
                    st = "running"
                    break
            if (bdir / store.MODELS).exists():
                frames.append(store.read_parquet(bdir / store.MODELS, required=("cell", "t_grok"))
                              .assign(_running=True))
        for c in b["cells"]:
            state[c] = st
    models = pd.concat(frames, ignore_index=True)
    models = models.reindex(columns=["cell", "t_grok", *(c for c in ("steps", "diverged") if c in models)])
    spec = store.read_json(run_dir / SPEC_JSON) if (run_dir / SPEC_JSON).exists() else {}
    stops_when_grokked = spec.get("train", {}).get("stop_when_grokked", True)
    # per cell, from one grouped pass (not a scan per cell): rows, grokked rows, median T_grok
    tg = pd.to_numeric(models["t_grok"], errors="coerce").astype("float64")
    g = tg.groupby(models["cell"].to_numpy(), sort=False)
    n_rows, n_grok, med = g.size(), g.count(), g.median()
    ids = [c["cell"] for c in plan["cells"]]
    rows_of = n_rows.reindex(ids, fill_value=0).to_numpy()
    grok_of = n_grok.reindex(ids, fill_value=0).to_numpy()
    med_of = med.reindex(ids).to_numpy(dtype="float64")
    unfinished = {cid for cid, r in zip(ids, rows_of) if r and state[cid] != "done"}     # cells of running batches
    by_cell = dict(tuple(models.loc[models["cell"].isin(unfinished)].groupby("cell", sort=False))) if unfinished else {}
    cells = plan["cells"]
    finished = [int(r) if state[c["cell"]] == "done" or (c["cell"] in by_cell and _cell_finished(
        by_cell[c["cell"]], c, stops_when_grokked)) else 0 for c, r in zip(cells, rows_of)]
    return pd.DataFrame({
        "cell": ids, "p": [c["p"] for c in cells], "arch": [c["model"] for c in cells],
        "loss": [c["loss"] for c in cells], "dtype": [c["dtype"] for c in cells],
        "rho": [_dose_label(c) for c in cells], "tau": [c["tau"] for c in cells],
        "arm": [c["arm"] or "" for c in cells],
        "done": [f"{f}/{c['seeds']}" for f, c in zip(finished, cells)],
        "grokked": [f"{int(k)}/{c['seeds']}" for k, c in zip(grok_of, cells)],
        "median T_grok": [float(v) if k else float("nan") for v, k in zip(med_of, grok_of)],
        "state": [state[i] for i in ids]})


def _cell_finished(m: pd.DataFrame, cell: dict, stops_when_grokked: bool) -> bool:
    """Whether a cell of a running batch has stopped, from the batch's last saved results: every seed
    saved, and at its budget, or (when cells stop once grokked) every seed grokked or diverged."""
    if len(m) < cell["seeds"] or "steps" not in m.columns:
        return False
    if (pd.to_numeric(m["steps"]) >= cell["budget"]).all():
        return True
    ended = m["t_grok"].notna() | m.get("diverged", pd.Series(False, index=m.index)).astype(bool)
    return bool(stops_when_grokked and ended.all())


RICH_ROWS = 1000
"""`fastgrok status` draws a table of at most this many cells with rich; a larger grid's, as plain aligned
columns (rich lays a table out at about a millisecond a row: 25 s for 25,000 cells)."""


def _status_cell(v) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:g}" if isinstance(v, float) else str(v)


def print_status(run_dir) -> None:
    from rich.console import Console
    from rich.table import Table
    run_dir = Path(run_dir)
    df = status_table(run_dir)
    spec = store.read_json(run_dir / SPEC_JSON) if (run_dir / SPEC_JSON).exists() else {}
    cal = store.read_calibration(run_dir)
    n_done = sum(a == b for a, b in (x.split("/") for x in df["done"]))   # as the rows count (running batches too)
    # settings shared by every cell go in the title, so the table fits a terminal without truncation
    shared = [c for c in ("p", "arch", "loss", "dtype", "rho", "tau") if len(df) > 1 and df[c].nunique() == 1]
    common = ", ".join(f"{c} {df[c].iloc[0]:g}" if isinstance(df[c].iloc[0], float) else f"{c} {df[c].iloc[0]}"
                       for c in shared)
    title = f"{spec.get('name', run_dir.name)}: {n_done}/{len(df)} cells done" + (f" ({common})" if common else "")
    cols = [c for c in df.columns if c not in shared and not (c == "arm" and not df["arm"].any())]
    text = [[_status_cell(v) for v in df[c]] for c in cols]                # per column
    con = Console()
    if len(df) <= RICH_ROWS:
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="right", overflow="fold")
        for r in zip(*text):
            t.add_row(*r)
        con.print(t)
    else:                                   # rich lays out a table in ~1 ms a row: plain columns, same values
        widths = [max(len(c), *map(len, col)) for c, col in zip(cols, text)]
        lines = [title, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in zip(*text)]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    for k, v in cal.items():
        con.print(f"w_c[{k}] = {v['w_c']:.4g} ({v['n_grokked']}/{v['seeds']} grokked, from {v['source']})"
                  + ("  WARNING: no calibration model grokked" if v["n_grokked"] == 0 else ""),
                  markup=False, highlight=False)         # the key's [...] is text, not rich markup
    cal_dir = run_dir / "calibration"
    for d in sorted(cal_dir.iterdir()) if cal_dir.is_dir() else []:
        if d.name not in cal and (d / store.PROGRESS).exists():
            pr = store.read_progress(d / store.PROGRESS)
            con.print(f"calibration {d.name}: step {pr['step']}/{pr.get('steps', '?')} (the cells wait for its w_c)")
