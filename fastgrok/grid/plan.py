"""Planning: how a spec becomes cells and batches (pure: no files read or written; rundir.py stores the plan).

A cell is one point of the spec's grid (its shape, rho/norm_target/tau/layer_fracs, seeds, step budget);
forks give one cell per arm. `make_plan` expands the spec into cells, packs them into batches, and lists
the calibrations (one free control per setting) that the clamped cells need.

Packing: cells that share a shape (experiments.SHAPE_AXES: p, model, dtype; the widths come from the spec's
[train]) go into one batch of M = sum of their seeds models, each with its own per-model settings (op,
loss, lr, wd, train fraction, init scale, gradient transforms: experiments.PACKED_AXES), tau, clamp
target, seed, split and step budget, split into several batches when over the memory budget. A cell is
never split, and a fork's parent travels with all its arms. Every model's results are independent
of its batch (the trainer stops a model by its own cell), so packing, compaction and the executor never
change a result.
"""
from __future__ import annotations

from fastgrok.train import snapshots
from fastgrok.config import AXIS_ADDED_DEFAULTS, GRID_AXES, TrainConfig
from fastgrok.grid.experiments import ARMS, CONFIG_AXES, PACKED_AXES, SHAPE_AXES, ExperimentSpec, freeze
from fastgrok.core.step import QUICK_STEPS
from fastgrok.train.memory import bytes_per_model as trainer_bytes_per_model, check_fits, device_memory
from fastgrok.train.state import TORCH_DTYPES, kernel_backend, resolve_device

CALIB_AXES = tuple(a for a in GRID_AXES if a != "dtype")
"""w_c is measured per setting in float32 (the study's precision); a float64 cell uses its float32 w_c."""


def cell_config(spec: ExperimentSpec, cell: dict, **kw) -> TrainConfig:
    """The TrainConfig of one cell: the spec's [train] with the cell's config axes (a plan written before
    an axis existed lacks it: the default)."""
    return spec.base_config(**(cell.get("train") or {}), **{a: cell[a] for a in CONFIG_AXES if cell.get(a) is not None},
                            **kw)


def batch_config(spec: ExperimentSpec, cells: list[dict], **kw) -> TrainConfig:
    """The TrainConfig of a batch of cells of one shape: each packed axis holds the values its cells use
    (one value: a scalar, as a batch of one setting always had)."""
    shape = {a: cells[0][a] for a in SHAPE_AXES}
    packed = {a: tuple(dict.fromkeys(c[a] for c in cells)) for a in PACKED_AXES if cells[0].get(a) is not None}
    return spec.base_config(**(cells[0].get("train") or {}), **shape, **packed, **kw)


# ---------------------------------------------------------------------------------------------
# Cells and batches
# ---------------------------------------------------------------------------------------------
def expand(spec: ExperimentSpec) -> list[dict]:
    """Every cell of the spec in order: its shape, rho/norm_target/tau/layer_fracs, seeds, step budget,
    global `cell` id and first model id `model0`; forks give one cell per arm (with `parent`)."""
    cells, seen, n_models, parent = [], set(), 0, 0
    for _, ax in spec.products():
        key = tuple(sorted((k, freeze(v) if isinstance(v, dict) else v) for k, v in ax.items()))
        if key in seen:
            continue
        seen.add(key)
        steps = ax.pop("steps", None)                   # a block's own budget.steps
        base = {**ax, "budget": spec.budget_at(ax["rho"], steps), "arm": None, "fork_step": None, "factor": None,
                "parent": None}
        if spec.fork is None:
            variants = [base]
        else:
            variants = []
            for arm in spec.fork.arms:
                f = ARMS[arm](spec.fork.factor)
                variants.append({**base, "arm": arm, "fork_step": spec.fork.step, "factor": f, "parent": parent,
                                 "budget": max(base["budget"], spec.budget.at(f))})
            parent += 1
        for c in variants:
            c.update(cell=len(cells), model0=n_models,
                     layer_fracs=list(c["layer_fracs"]) if c["layer_fracs"] else None)
            n_models += c["seeds"]
            cells.append(c)
    return cells


def shape_of(cell: dict) -> tuple:
    """What a batch's cells share: the shape axes, and their block's [grid.train] if it has one."""
    key = tuple(cell[a] for a in SHAPE_AXES)
    return key + (freeze(cell["train"]),) if cell.get("train") else key


def calib_key(cell: dict) -> str:
    """The setting's name (a directory name): an axis added since is named only off its default, so the
    keys of earlier runs stay valid."""
    return "-".join(f"{a}={cell[a]}" for a in CALIB_AXES
                    if not (a in AXIS_ADDED_DEFAULTS and cell.get(a, AXIS_ADDED_DEFAULTS[a]) == AXIS_ADDED_DEFAULTS[a]))


def calib_shape(cell: dict) -> dict:
    """The axes a cell's calibration control is trained with."""
    return {a: cell[a] for a in CALIB_AXES if cell.get(a) is not None}


def bytes_per_model(spec: ExperimentSpec, cell: dict) -> int:
    """Rough device bytes one model of the cell's shape costs (`trainer.bytes_per_model`)."""
    return trainer_bytes_per_model(cell_config(spec, cell))


def memory_budget(spec: ExperimentSpec, device: str) -> float:
    if spec.engine.memory_gb:
        return spec.engine.memory_gb * 2**30
    dev = resolve_device(device)
    total = device_memory(dev)
    if dev.type == "cuda":
        return 0.5 * total
    return min(0.25 * (total or 32 * 2**30), 8 * 2**30)


SIZE_FREE_AXES = ("lr", "wd", "init_scale")
"""Per-model axes that size no tensor (optimizer scalars per model): cells that differ only in them cost the
same bytes, so `pack` sizes one of them (an atlas of 17,280 cells has a few hundred sizes to compute). Kept
to the axes a phase diagram sweeps: any other axis is sized cell by cell, as before."""


def pack(spec: ExperimentSpec, cells: list[dict], budget_bytes: float) -> list[dict]:
    """Batches: cells of one shape in order, whole units (a cell, or a fork parent with its arms)
    added while the batch stays under the memory budget and engine.max_models."""
    sizes: dict[tuple, int] = {}

    def size(c: dict) -> int:
        key = (freeze(c.get("train")), *(c.get(a) for a in CONFIG_AXES if a not in SIZE_FREE_AXES))  # what cell_config reads, less those
        if key not in sizes:
            sizes[key] = bytes_per_model(spec, c)
        return sizes[key]

    units: dict[tuple, list[list[dict]]] = {}
    for c in cells:
        groups = units.setdefault(shape_of(c), [])
        if c["parent"] is not None and groups and groups[-1][0]["parent"] == c["parent"]:
            groups[-1].append(c)
        else:
            groups.append([c])
    batches = []
    for groups in units.values():
        # a batch pads every model to its most train rows: the costliest cell's bytes for each
        per_model = max(size(c) for u in groups for c in u)
        cur, m = [], 0
        for u in groups:
            n = sum(c["seeds"] for c in u)
            over = (m + n) * per_model > budget_bytes or (spec.engine.max_models and m + n > spec.engine.max_models)
            if cur and over:
                batches.append(cur)
                cur, m = [], 0
            cur += [c["cell"] for c in u]
            m += n
        batches.append(cur)
    return [{"id": f"b{i:03d}", "cells": b} for i, b in enumerate(batches)]


def make_plan(spec: ExperimentSpec, device: str) -> dict:
    cells = expand(spec)
    need = {}
    if spec.calibration.w_c is None:
        for c in cells:
            if c["rho"] is not None:
                need.setdefault(calib_key(c), calib_shape(c))
    return {"cells": cells, "batches": pack(spec, cells, memory_budget(spec, device)),
            "calibrations": [{"key": k, "shape": s} for k, s in need.items()]}


def preflight(spec: ExperimentSpec, plan: dict, device: str) -> None:
    """What a batch's trainer would refuse, checked for every batch before anything is written: kernels
    that cannot run on the device, a batch too big for its memory (one cell alone can be)."""
    dev = resolve_device(device)
    cells = {c["cell"]: c for c in plan["cells"]}
    for b in plan["batches"]:
        cfg = batch_config(spec, [cells[c] for c in b["cells"]], device=device)
        kernel_backend(cfg.kernels, dev, TORCH_DTYPES[cfg.dtype])
        check_fits(cfg, sum(cells[c]["seeds"] for c in b["cells"]), dev)
    total = snapshot_bytes(spec, plan)
    if total:
        snapshots.check_bound(spec.base_config(), total, f"the grid's at most {snapshots.human(total)} "
                              "((snapshots + 2) x models x (2 x params x bytes + headers), over its batches)")


def snapshot_bytes(spec: ExperimentSpec, plan: dict) -> int:
    """The most bytes the grid's snapshots ([train] snapshots) take: snapshots.bound_bytes summed over
    its batches (calibrations take none); 0 when off."""
    cells = {c["cell"]: c for c in plan["cells"]}
    total = 0
    for b in plan["batches"]:
        cfg = batch_config(spec, [cells[c] for c in b["cells"]])
        if cfg.snapshots:
            total += snapshots.bound_bytes(cfg, sum(cells[c]["seeds"] for c in b["cells"]), snapshots.layout_of(cfg))
    return total


def resolve_compile(spec: ExperimentSpec, plan: dict) -> str:
    """One compile setting for the whole run (so no result depends on which batch a cell is in)."""
    mode = spec.train.get("compile", "auto")
    if mode != "auto":
        return mode
    budgets = [c["budget"] for c in plan["cells"]] + [calibration_steps(spec)]
    return "off" if max(budgets) <= QUICK_STEPS else "auto"


def calibration_steps(spec: ExperimentSpec) -> int:
    s = spec.calibration.steps or spec.budget.steps
    return min(s, spec.budget.max_steps) if spec.budget.max_steps else s


def clamp_never_starts(spec: ExperimentSpec, plan: dict) -> list[tuple[int, int, int]]:
    """(cell, budget, clamp start) of each clamped cell (not a fork arm) whose step budget ends before
    its clamp starts: it trains unclamped (e.g. --max-steps below train.clamp_from)."""
    out = []
    for c in plan["cells"]:
        if c["arm"] is None and (c["rho"] is not None or c.get("norm_target") is not None):
            t_clamp = cell_config(spec, c).t_clamp
            if c["budget"] <= t_clamp:
                out.append((c["cell"], c["budget"], t_clamp))
    return out

