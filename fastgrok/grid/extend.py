"""Extending a grid run with a larger `--max-steps` (or none): the rerun of a run directory whose spec
differs from the saved one only in budget.max_steps, raised.

What it leaves is what a run started with the new cap would have, so the rerun that follows (the
ordinary resume) ends with exactly that run's results: every batch with a cell whose budget grows loses
its part and its checkpoint and trains again (a model's results never depend on its batch, and training
is deterministic, so the batch's other cells come out as they were), as does a calibration whose budget
grows and that had not seen every seed grok, and with it every clamped batch of its setting. A change of
the compile setting that `auto` picks (eager up to trainer.QUICK_STEPS steps on a CPU) retrains everything,
as compiled and eager steps may differ in the last bits.

Crash safety: the stale state goes first and spec.json (what marks the directory's spec) last, so a run
killed midway repeats the extension when rerun.
"""
from __future__ import annotations

import shutil
from pathlib import Path


from fastgrok.grid import rundir
from fastgrok import store
from fastgrok.grid.experiments import ExperimentSpec, to_toml
from fastgrok.grid.plan import calib_key, calibration_steps, expand, resolve_compile


def _without_cap(d: dict) -> dict:
    return {**d, "budget": {k: v for k, v in d.get("budget", {}).items() if k != "max_steps"}}


def is_extension(old: dict, new: dict) -> bool:
    """Whether spec dict `new` is `old` with a larger step cap (or none)."""
    a, b = old.get("budget", {}).get("max_steps"), new.get("budget", {}).get("max_steps")
    return _without_cap(old) == _without_cap(new) and a is not None and (b is None or b > a)


def extend(spec: ExperimentSpec, run_dir: Path, say) -> None:
    """Turn run_dir (holding `spec` with a smaller cap) into what `spec` resumes from; `say` gets one line."""
    run_dir = Path(run_dir)
    old_spec = ExperimentSpec.from_dict(store.read_json(run_dir / rundir.SPEC_JSON))
    plan = store.read_plan(run_dir)
    cells = expand(spec)
    if [{**c, "budget": None} for c in cells] != [{**c, "budget": None} for c in plan["cells"]]:
        raise AssertionError("a larger max_steps changed the cells beyond their budgets")
    everything = resolve_compile(old_spec, plan) != resolve_compile(spec, {**plan, "cells": cells})
    # calibrations whose budget grows and whose run ended at the old cap (not every seed grokked)
    cal = store.read_calibration(run_dir)
    grows = calibration_steps(spec) > calibration_steps(old_spec)
    redo_cal = {k for k, v in cal.items() if everything or (grows and v["n_grokked"] < v["seeds"])}
    redo = set()
    for b in plan["batches"]:
        for i in b["cells"]:
            old, new = plan["cells"][i], cells[i]
            if everything or new["budget"] > old["budget"] or (new["rho"] is not None
                                                                 and calib_key(new) in redo_cal):
                redo.add(b["id"])
    for bid in sorted(redo):
        for kind in ("models", "curves"):                       # models first: it marks the batch done
            store.part_path(run_dir, bid, kind).unlink(missing_ok=True)
            store.legacy_part_path(run_dir, bid, kind).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "batches" / bid, ignore_errors=True)
        shutil.rmtree(run_dir / "snapshots" / bid, ignore_errors=True)
    _drop_results(run_dir, plan, redo)
    for key in redo_cal:
        shutil.rmtree(run_dir / "calibration" / key, ignore_errors=True)
    if redo_cal:
        store.write_json(run_dir / store.CALIBRATION, {k: v for k, v in cal.items() if k not in redo_cal})
    store.write_json(run_dir / store.PLAN, {**plan, "cells": cells})
    store.atomic_write(run_dir / rundir.SPEC_TOML, lambda tmp: Path(tmp).write_text(to_toml(spec.to_dict())))
    store.write_json(run_dir / rundir.SPEC_JSON, spec.to_dict())          # last: the extension is done
    cap = spec.budget.max_steps
    say(f"extending the grid to {'no step cap' if cap is None else f'{cap:,} steps at most'}: "
        f"{len(redo)} of {len(plan['batches'])} batches and {len(redo_cal)} of {len(cal)} calibrations train again"
        + (" (the compile setting changed with the budget)" if everything else ""))


def _drop_results(run_dir: Path, plan: dict, redo: set[str]) -> None:
    """A copied or older run's models/curves.parquet without the cells of the batches trained again (left
    in, they would count those cells done)."""
    path = run_dir / store.MODELS
    if not path.exists():
        return
    gone = {c for b in plan["batches"] if b["id"] in redo for c in b["cells"]}
    models = store.read_parquet(path, run_dir=run_dir)
    keep = models.loc[~models["cell"].isin(gone)].reset_index(drop=True)
    curves = store.read_parquet(run_dir / store.CURVES, run_dir=run_dir)
    fp = store.run_identity(run_dir)
    store.write_parquet(run_dir / store.CURVES, curves.loc[curves["model"].isin(keep["model"])]
                        .reset_index(drop=True), fingerprint=fp)
    store.write_parquet(path, keep, fingerprint=fp)
