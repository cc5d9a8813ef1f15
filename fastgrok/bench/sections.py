"""`fastgrok bench`: the kernels, the training step and a small grid, side by side in one process.

Sections (each a list of long-format rows in the JSON, one rich table on the terminal):
  ce     tempered CE loss + dL/dz + readouts: fastgrok.kernels (Triton on CUDA) vs the eager PyTorch
         reference vs torch.compile of the reference; time, GB/s, fraction of the measured copy bandwidth
  clamp  the weight-norm clamp: fastgrok.kernels.clamp_flat_ vs an eager per-tensor clamp
  step   one training step, p = 59 MLP: fastgrok's compiled batched step (all M models at once) vs the
         eager per-cell baseline (fastgrok.bench.baseline, cells of 12 seeds run one after another);
         seed-steps/s, speed-up (at equal M, and at each provider's best M), executed FLOP/s and on
         CUDA the fraction of the float32 peak
  grid   a small grid end to end with fastgrok.train.trainer.Trainer: packed (one Trainer, all cells) vs
         sequential (one Trainer per cell); wall-clock, cell-runs and model-runs per hour, compile included
  phase  an lr x wd phase diagram's training step: every cell in one batch (lr and wd per model) vs one
         batch per cell stepped in turn; model-steps/s and the ratio (the GPU target: >= 10x at >= 1,000
         models)
  ensemble  a cell end to end (fixed steps, evaluation every 25, compile time apart): fastgrok compiled vs
         the torch.func ensemble of PyTorch's tutorial vs the study's eager loop, MLP and transformer
         (fastgrok/bench_ensemble.py; not in the default sections: minutes of compiling)
Timing: warm-up excluded, the device synchronised before every clock read, the providers of a case timed
in alternation (one call each per round, so a noisy machine affects them alike), median over repeats with
min-max (and p20/p80 in the JSON); compile time (the first call) reported separately.
Bytes moved: CE reads z and writes dz (M*N*V each) plus labels, the mask and the readouts (M*N*11 bytes:
mask 1, row loss 4, correct 1, collapsed 1, norm 4); the clamp reads the matrices twice and writes them
once. The fraction of copy bandwidth compares with a large copy (1 GiB on CUDA): operands that fit in a
cache (the study's shapes, the clamp) can read above 100% -- read it at the large shape, or use
benchmarks/gpu_check.py on a GPU (L2 flushed between calls). FLOPs: what each provider executes per
model and step (the step only, evaluations excluded): the baseline's direct form (`core.models.step_flops`), fastgrok's
table form (`mlp_table_flops`, ~4.5x fewer at p = 59); `nominal_flop_per_s` in the JSON is the direct
form's count over fastgrok's time.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import fastgrok.kernels as K
from fastgrok.kernels.reference import tempered_ce_reference

from fastgrok.bench.baseline import BaselineCell
from fastgrok.config import ConfigError, TrainConfig
from fastgrok.core.models import step_flops
from fastgrok.core.step import build_step_fns, keep_freed_memory

# float32 (non-tensor-core) peaks, TFLOP/s, by a substring of torch.cuda.get_device_name()
FP32_PEAK_TFLOPS = {"H200": 67.0, "H100 SXM": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5,
                    "L40S": 91.6, "L40": 90.5, "L4": 30.3, "A10G": 31.2, "A10": 31.2, "A6000": 38.7,
                    "RTX 4090": 82.6, "RTX 3090": 35.6, "V100": 15.7, "T4": 8.1}


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, device, *, repeats: int, warmup: int = 1) -> dict:
    """Run fn warmup + repeats times; seconds per call: median, min, max, p20, p80, first (warm-up)."""
    return _measure_alternating({"fn": (fn, repeats)}, device, warmup=warmup)["fn"]


GPU_SAMPLE_S = 2e-3     # on a GPU each timed sample runs back-to-back calls for at least this long


def _timed(fn, device, calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls, the device synchronised before each clock read."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def _measure_alternating(fns: dict, device, *, warmup: int = 1) -> dict:
    """fns: name -> (callable, repeats). Each is warmed up (its first call timed apart), then the timed
    samples alternate, one of each per round until each has its repeats: on a shared, noisy machine
    every provider sees the same conditions. On a GPU a sample is as many back-to-back calls as fill
    GPU_SAMPLE_S (a kernel of microseconds would otherwise time the launch and the synchronisation);
    on a CPU one call. Per name: median, min, max, p20, p80 (seconds per call), first, repeats, calls
    per sample."""
    first, times, calls = {}, {name: [] for name in fns}, {}
    for name, (fn, _) in fns.items():
        first[name] = _timed(fn, device)
        for _ in range(warmup - 1):
            fn()
        calls[name] = 1
        if device.type == "cuda":
            t = _timed(fn, device)
            calls[name] = max(1, min(1000, math.ceil(GPU_SAMPLE_S / max(t, 1e-9))))
    for rnd in range(max(reps for _, reps in fns.values())):
        for name, (fn, reps) in fns.items():
            if rnd < reps:
                times[name].append(_timed(fn, device, calls[name]))
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else ts * 4
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "p20_s": q[0],
                     "p80_s": q[-1], "first_s": first[name], "repeats": len(ts), "calls_per_sample": calls[name]}
    return out


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a device-to-device copy (bytes read + written): 256 MiB on a CPU, 1 GiB on a GPU (where a
    smaller copy is short enough for launch and sync overheads to show)."""
    nbytes = nbytes or (1 << 28 if device.type == "cpu" else 1 << 30)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = _measure(lambda: y.copy_(x), device, repeats=5 if device.type == "cpu" else 20)
    return 2 * nbytes / t["median_s"] / 1e9


# ------------------------------------------------------------------------------------------ ce
def section_ce(device, quick: bool, copy_gbs: float) -> list[dict]:
    shapes = [(12, 3481, 59)] if quick else [(12, 3481, 59), (12, 3481, 97), (12, 3481, 113)]
    big = (4, 1024, 8192) if quick or device.type == "cpu" else (4, 8192, 32768)
    rows = []
    g = torch.Generator(device=device).manual_seed(0)     # drawn on the device: the big case is 1e9 values
    for M, N, V in shapes + [big]:
        z = torch.randn(M, N, V, generator=g, device=device)
        y = torch.randint(0, V, (N,), generator=g, device=device)
        tau = torch.full((M,), 1.3, device=device)
        mask = torch.rand(M, N, generator=g, device=device) < 0.4
        nbytes = 2 * z.numel() * z.element_size() + M * N * 11 + y.numel() * y.element_size()
        impl = K.resolve_backend("auto", device)
        compiled = torch.compile(tempered_ce_reference, dynamic=False)
        providers = [(f"fastgrok.kernels ({impl})", lambda: K.loss_and_grad(z, y, tau, mask)),
                     ("eager reference", lambda: tempered_ce_reference(z, y, tau, mask)),
                     ("torch.compile(reference)", lambda: compiled(z, y, tau, mask))]
        reps = 5 if quick or device.type == "cpu" else 50
        t_all = _measure_alternating({name: (fn, reps) for name, fn in providers}, device, warmup=2)
        for name, _ in providers:
            t = t_all[name]
            gbs = nbytes / t["median_s"] / 1e9
            rows.append({"section": "ce", "case": f"M={M} N={N} V={V}", "provider": name, **t,
                         "bytes": nbytes, "gb_per_s": gbs, "frac_copy_bw": gbs / copy_gbs,
                         "compile_s": t["first_s"] - t["median_s"] if "compile" in name else 0.0})
        torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------------ clamp
def _eager_clamp(mats: list[torch.Tensor], target: torch.Tensor) -> None:
    """The study's clamp: one norm over the matrices per seed, every matrix scaled in place."""
    norm = torch.sqrt(sum(w.reshape(w.shape[0], -1).square().sum(1) for w in mats))
    scale = target / (norm + 1e-12)
    for w in mats:
        w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))


def section_clamp(device, quick: bool, copy_gbs: float) -> list[dict]:
    from fastgrok.core.models import MLP
    layout = MLP(TrainConfig(p=59)).layout
    rows = []
    for M in ((12, 96) if quick else (12, 96, 768)):
        flat = torch.randn(M, layout.n_params, device=device)
        target = torch.full((M, 1), 50.0, device=device)
        active = torch.ones(M, dtype=torch.bool, device=device)
        bounds = layout.bounds
        mats = [flat[:, lo:hi].clone().view(M, *s) for lo, hi, s in
                zip(bounds[:-1], bounds[1:], layout.shapes)]            # separate tensors, as the study
        nbytes = 3 * M * layout.n_mat * 4
        impl = K.resolve_backend("auto", device)
        providers = [(f"fastgrok.kernels ({impl})", lambda: K.clamp_flat_(flat, [0, layout.n_mat], target, active)),
                     ("eager per-tensor", lambda: _eager_clamp(mats, target[:, 0]))]
        reps = 10 if device.type == "cpu" else 50
        t_all = _measure_alternating({name: (fn, reps) for name, fn in providers}, device, warmup=2)
        for name, _ in providers:
            t = t_all[name]
            gbs = nbytes / t["median_s"] / 1e9
            rows.append({"section": "clamp", "case": f"M={M} P_mat={layout.n_mat}", "provider": name, **t,
                         "bytes": nbytes, "gb_per_s": gbs, "frac_copy_bw": gbs / copy_gbs})
    return rows


# ------------------------------------------------------------------------------------------ step
def step_config(quick: bool) -> TrainConfig:
    """The study MLP at p = 59 (full), or a small MLP that compiles fast (--quick)."""
    if quick:
        return TrainConfig(p=23, d_embed=32, hidden=64, seeds=1, device="cpu", compile="off")
    return TrainConfig(p=59, seeds=1, device="cpu", compile="off")


def mlp_table_flops(cfg: TrainConfig) -> float:
    """FLOPs fastgrok's MLP step executes (the table form of the first layer): 3 products of N x (H x V)
    plus 6 of the p-row tables (p x d x H: E W1 halves forward, dW1 and dE halves backward)."""
    return 6.0 * cfg.n_train * cfg.hidden * cfg.p + 12.0 * cfg.p * cfg.d_embed * cfg.hidden


RUN_STEPS = 3675
"""The study's baseline cell (p = 59, rho 1, tau 1): median T_grok 3,675 steps, the length of a run in
`runs_per_hour` (evaluation every 25 steps included; the study's logit readout every 200 for the baseline)."""


def fp32_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in FP32_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


_SCRATCH: tempfile.TemporaryDirectory | None = None


def _scratch_dir() -> str:
    """A fresh directory for a benchmark Trainer, inside one per-process temporary directory that is
    removed when the process exits."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="fgbench_")
    return tempfile.mkdtemp(dir=_SCRATCH.name)


def fastgrok_step(cfg: TrainConfig, device, compile_step: bool):
    """(step, evaluate): callables that run fastgrok's training step, and its evaluation built alike
    (compiled with the step, or not), on one state of cfg's models on device (train.state.build_state)."""
    from fastgrok.train.state import build_state
    torch._dynamo.reset()
    st = build_state(replace(cfg, device=device.type, compile="off"))
    step, eval_fn = build_step_fns(st.model, st.cfg, st.backend, compile_step)
    return (lambda: step(st.tensors, st.batch)), (lambda: eval_fn(st.tensors, st.batch))


def section_step(device, quick: bool, on_rows=None, models: tuple[int, ...] | None = None) -> list[dict]:
    """The training step at M models: the study's way (cells of <= 12 seeds in turn), fastgrok compiled
    and eager. Seed-steps/s of the step alone; runs/h of a RUN_STEPS-step run with its evaluations; FLOP/s
    of the arithmetic each provider executes (fastgrok's table form does less than the direct form)."""
    base = step_config(quick)
    Ms = (1, 4) if quick else ((1, 12, 96) if device.type == "cpu" else (1, 12, 96, 768, 3072))
    Ms = models or Ms
    reps = 5 if quick else (10 if device.type == "cpu" else 30)
    peak = fp32_peak(device)
    rows = []
    too_big = math.inf                  # the smallest M that did not fit: larger ones are skipped
    for M in Ms:
        if M >= too_big:
            continue
        try:
            rows += _step_rows(base, M, device, reps, peak)
            if on_rows is not None:
                on_rows(rows)
        except (torch.cuda.OutOfMemoryError, ConfigError) as e:   # ConfigError: trainer.check_fits refused M
            print(f"fastgrok bench: step at M = {M} does not fit in device memory ({str(e)[:120]}); larger M skipped")
            torch.cuda.empty_cache()
            too_big = M
    return rows


def check_models_fit(models: tuple[int, ...], device, quick: bool) -> None:
    """A ConfigError (one line: the trainer's memory check, on the config `fastgrok_step` trains) when a
    --models count cannot fit the device."""
    from fastgrok.train.memory import check_fits
    for M in sorted(set(models), reverse=True):
        try:
            check_fits(replace(step_config(quick), seeds=M, device=device.type, compile="off"), M, device)
        except ConfigError as e:
            raise ConfigError(f"--models {M}: {e}") from None


def _step_rows(base: TrainConfig, M: int, device, reps: int, peak: float | None) -> list[dict]:
    """One M's rows of section_step: the baseline, fastgrok compiled, and (M <= 12) fastgrok eager."""
    rows = []
    cfg = replace(base, seeds=M)
    S = min(M, 12)
    n_cells = math.ceil(M / S)
    cell = BaselineCell(replace(base, seeds=S), device=device)     # one cell; cells run in turn
    r = max(3, reps // 2)
    fns = {"baseline": (cell.step, r), "baseline eval": (cell.evaluate, r), "baseline logit": (cell.logit_scale, r)}
    # eager first: building a step resets dynamo, which would throw away the compiled one's code
    for compiled in (False, True) if M <= 12 else (True,):
        fn, evaluate = fastgrok_step(cfg, device, compile_step=compiled)
        name = f"fastgrok {'compiled' if compiled else 'eager'}"
        fns[name] = (fn, reps if compiled else r)
        fns[name + " eval"] = ((lambda evaluate=evaluate: evaluate().sum().item()), r)
    t_all = _measure_alternating(fns, device, warmup=3)                # every provider, alternating
    tb = {k: (v * n_cells if k.endswith("_s") else v) for k, v in t_all["baseline"].items()}
    # per step: evaluation every 25 steps and the logit readout every 200, per cell
    ev_b = n_cells * (t_all["baseline eval"]["median_s"] / base.eval_every
                      + t_all["baseline logit"]["median_s"] / base.logit_every)
    results = [("eager per-cell baseline", tb, 0.0, ev_b, step_flops(base))]
    for name in ("fastgrok compiled", "fastgrok eager"):
        if name not in fns:
            continue
        t, te = t_all[name], t_all[name + " eval"]
        compile_s = (t["first_s"] - t["median_s"]) + (te["first_s"] - te["median_s"]) if "compiled" in name else 0.0
        results.append((name, t, compile_s, te["median_s"] / base.eval_every, mlp_table_flops(base)))
    for name, t, compile_s, ev_per_step, flops in results:
        per_step = t["median_s"] + ev_per_step
        rows.append({"section": "step", "case": f"p={base.p} M={M}", "provider": name, "M": M, **t,
                     "seed_steps_per_s": M / t["median_s"], "speedup_vs_baseline": tb["median_s"] / t["median_s"],
                     "eval_per_step_s": ev_per_step,
                     "runs_per_hour": M * 3600.0 / (RUN_STEPS * per_step), "run_steps": RUN_STEPS,
                     "run_speedup_vs_baseline": (tb["median_s"] + ev_b) / per_step,
                     "flops_per_step": flops * M, "flop_per_s": flops * M / t["median_s"],
                     "nominal_flop_per_s": step_flops(base) * M / t["median_s"],
                     "frac_fp32_peak": flops * M / t["median_s"] / peak if peak else None,
                     "compile_s": compile_s, "baseline_cells": n_cells if "baseline" in name else None})
    return rows


# ------------------------------------------------------------------------------------------ grid
def section_grid(device, quick: bool) -> list[dict]:
    """A small grid of cells (taus), fixed step budget: packed vs sequential Trainers, compile included."""
    from fastgrok.train.trainer import Trainer
    base = replace(step_config(quick), taus=(1.0, 1.15, 1.3, 1.5), seeds=1 if quick else 12,
                   steps=50 if quick else 500, stop_when_grokked=False, checkpoint_every=10 ** 9,
                   device=device.type, compile="auto")
    n_cells = len(base.taus)

    def run(cfgs) -> tuple[float, float]:
        wall = first = 0.0
        for cfg in cfgs:
            torch._dynamo.reset()
            _sync(device)
            t0 = time.perf_counter()
            tr = Trainer(cfg, _scratch_dir(), progress=False)
            calls = {}
            for name in ("step_fn", "eval_fn"):
                setattr(tr, name, _first_call_timer(getattr(tr, name), device, calls, name))
            tr.run()
            _sync(device)
            wall += time.perf_counter() - t0
            first += sum(calls.values())
        return wall, first

    rows = []
    for name, cfgs in [("packed (one Trainer)", [base]),
                       ("sequential (one Trainer per cell)", [replace(base, taus=(t,)) for t in base.taus])]:
        wall, first = run(cfgs)
        rows.append({"section": "grid", "case": f"{n_cells} cells x {base.seeds} seeds, p={base.p}, "
                                                f"{base.steps} steps", "provider": name,
                     "wall_s": wall, "first_calls_s": first, "runs_per_hour": n_cells / wall * 3600,
                     "runs_per_hour_excl_first_calls": n_cells / max(wall - first, 1e-9) * 3600,
                     "seed_runs_per_hour": n_cells * base.seeds / wall * 3600,
                     "steps": base.steps, "cells": n_cells, "seeds": base.seeds})
    return rows


# ------------------------------------------------------------------------------------------ phase
def phase_grid(device, quick: bool) -> tuple[TrainConfig, tuple[float, ...], tuple[float, ...]]:
    """The phase-diagram case: an lr x wd grid (log-spaced) of cells x seeds on step_config's model.
    On CUDA 10 x 10 cells x 12 seeds at p = 59 (1,200 models); on a CPU 4 x 4 x 4 (64); --quick 3 x 3 x 1."""
    base = step_config(quick)
    n, seeds = (3, 1) if quick else (10, 12) if device.type == "cuda" else (4, 4)
    lrs = tuple(float(f"{1e-4 * 100 ** (i / (n - 1)):.3g}") for i in range(n))      # 1e-4 .. 1e-2
    wds = tuple(float(f"{0.01 * 1000 ** (i / (n - 1)):.3g}") for i in range(n))     # 0.01 .. 10
    return replace(base, seeds=seeds, device=device.type), lrs, wds


def section_phase(device, quick: bool) -> list[dict]:
    """One training step of a whole lr x wd diagram: packed (every cell in one batch, lr and wd per
    model) vs one batch per (lr, wd) cell, stepped one after another; model-steps/s and the ratio.
    Compiled on CUDA, eager on a CPU (as `compile = auto` runs short runs); compile time excluded."""
    from fastgrok.train.trainer import Trainer
    base, lrs, wds = phase_grid(device, quick)
    compiled = device.type == "cuda"
    packed = Trainer(replace(base, lr=lrs, wd=wds, compile="off"), _scratch_dir(), progress=False)
    cells = [Trainer(replace(base, lr=a, wd=b, compile="off"), _scratch_dir(), progress=False)
             for a in lrs for b in wds]
    torch._dynamo.reset()
    steps = {}
    for name, trs in (("packed (one batch)", [packed]), ("one batch per (lr, wd) cell", cells)):
        # one step function for all the cells (they share every shape; lr and wd are batch tensors), so
        # the per-cell provider compiles once, as a grid's batches of one shape do
        fn = build_step_fns(trs[0].model, trs[0].cfg, trs[0].backend, compiled)[0]

        def step(fn=fn, trs=trs):
            for tr in trs:
                fn(tr.state, tr.batch)
        steps[name] = (step, 3 if quick else 10)
    t = _measure_alternating(steps, device, warmup=2)
    M = len(packed.table)
    per = t["one batch per (lr, wd) cell"]["median_s"]
    case = f"{len(lrs)} lr x {len(wds)} wd cells x {base.seeds} seeds (M = {M}), p={base.p}"
    return [{"section": "phase", "case": case, "provider": name, "M": M, "cells": len(cells), **t[name],
             "model_steps_per_s": M / t[name]["median_s"], "speedup_vs_per_cell": per / t[name]["median_s"],
             "compiled": compiled, "lrs": list(lrs), "wds": list(wds)} for name in steps]


def best_m(step_rows: list[dict]) -> dict:
    """Each provider at its own best M (the largest seed-steps/s over the Ms measured), and fastgrok
    compiled's ratio to the baseline there: the comparison the issue's GPU target (>= 30x) asks for."""
    best = {}
    for r in step_rows:
        b = best.get(r["provider"])
        if b is None or r["seed_steps_per_s"] > b["seed_steps_per_s"]:
            best[r["provider"]] = {"M": r["M"], "seed_steps_per_s": r["seed_steps_per_s"]}
    fg, base = best.get("fastgrok compiled"), best.get("eager per-cell baseline")
    out = {"providers": best}
    if fg and base:
        out["speedup_best_vs_best"] = fg["seed_steps_per_s"] / base["seed_steps_per_s"]
    return out


def _section_ensemble(device, quick: bool, models, on_rows) -> list[dict]:
    from fastgrok.bench.ensemble import section_ensemble            # its rows saved after each case
    return section_ensemble(device, quick, models, on_rows=on_rows)


def _first_call_timer(fn, device, calls: dict, name: str):
    """Wrap fn so that the duration of its first call (compilation included) lands in calls[name]."""
    def wrapped(*args):
        if name in calls:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        calls[name] = time.perf_counter() - t0
        return out
    return wrapped


# ------------------------------------------------------------------------------------------ report
def meta(device: torch.device, quick: bool) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    m = result["meta"]
    table = Table(title=f"fastgrok bench — {m['device_name']} ({m['device']}), torch {m['torch']}, "
                        f"{m['threads']} threads, {m['date']}")
    for col in ("section", "case", "provider", "median", "min–max", "throughput", "vs reference", "compile"):
        table.add_column(col, justify="left" if col in ("section", "case", "provider") else "right",
                         no_wrap=col not in ("case", "provider", "throughput"))
    for r in result["ce"] + result["clamp"]:
        table.add_row(r["section"], r["case"], r["provider"], _fmt_time(r["median_s"]),
                      f"{_fmt_time(r['min_s'])}–{_fmt_time(r['max_s'])}", f"{r['gb_per_s']:.1f} GB/s",
                      f"{r['frac_copy_bw']:.0%} of copy bw", _fmt_time(r["compile_s"]) if r.get("compile_s") else "")
    for r in result["step"]:
        peak = f", {r['frac_fp32_peak']:.1%} of fp32 peak" if r["frac_fp32_peak"] else ""
        table.add_row("step", r["case"], r["provider"], _fmt_time(r["median_s"]),
                      f"{_fmt_time(r['min_s'])}–{_fmt_time(r['max_s'])}",
                      f"{r['seed_steps_per_s']:.0f} seed-steps/s, {r['flop_per_s'] / 1e9:.0f} GFLOP/s{peak}; "
                      f"{r['runs_per_hour']:,.0f} model-runs/h",
                      f"{r['speedup_vs_baseline']:.2f}x step, {r['run_speedup_vs_baseline']:.2f}x run",
                      _fmt_time(r["compile_s"]) if r["compile_s"] else "")
    seq = next((r["wall_s"] for r in result["grid"] if r["provider"].startswith("sequential")), None)
    for r in result["grid"]:
        table.add_row("grid", r["case"], r["provider"], _fmt_time(r["wall_s"]), "one run",
                      f"{r['seed_runs_per_hour']:,.0f} model-runs/h of {r['steps']} steps "
                      f"({r['runs_per_hour']:,.0f} cells/h)",
                      f"{seq / r['wall_s']:.2f}x" if seq else "",
                      _fmt_time(r["first_calls_s"]) + " first calls")
    for r in result.get("phase", []):
        table.add_row("phase", r["case"], r["provider"], _fmt_time(r["median_s"]),
                      f"{_fmt_time(r['min_s'])}–{_fmt_time(r['max_s'])}", f"{r['model_steps_per_s']:,.0f} model-steps/s",
                      f"{r['speedup_vs_per_cell']:.2f}x", "")
    for r in result.get("ensemble", []):
        table.add_row("ensemble", r["case"], r["provider"], _fmt_time(r["wall_s"]) + " run",
                      f"{_fmt_time(r['step_s'])}/step", f"{r['model_steps_per_s']:,.0f} model-steps/s end to end "
                      f"({r['model_steps_per_s_excl_compile']:,.0f} excl. compile)",
                      f"{r['vs_ensemble']:.2f}x vs ensemble ({r['vs_ensemble_projected']:.2f}x, "
                      f"{r['run_steps']:,}-step run projected)", _fmt_time(r["compile_s"]))
    Console(width=max(170, shutil.get_terminal_size().columns)).print(table)
    step_note = (f"; step GFLOP/s count the arithmetic each provider executes in the step (fastgrok: the table "
                 f"form; evaluations excluded); model-runs/h: one model trained {RUN_STEPS} steps (the study's "
                 f"p = 59 baseline-cell T_grok{'; this --quick step is smaller' if m.get('quick') else ''}) with "
                 f"its evaluations (every 25 steps), compile excluded; compile = first step + first evaluation; "
                 f"baseline = cells of <= 12 seeds trained one after another"
                 if result["step"] else "")
    best = result.get("step_best") or {}
    if "speedup_best_vs_best" in best:
        fg, base = best["providers"]["fastgrok compiled"], best["providers"]["eager per-cell baseline"]
        print(f"at each provider's best M: fastgrok compiled {fg['seed_steps_per_s']:,.0f} seed-steps/s (M = "
              f"{fg['M']}), the eager per-cell baseline {base['seed_steps_per_s']:,.0f} (M = {base['M']}): "
              f"{best['speedup_best_vs_best']:.2f}x")
    print(f"copy bandwidth {result['copy_gb_per_s']:.1f} GB/s (cache-resident operands can read above 100%)"
          + step_note
          + ("; on the CPU every provider ran with fastgrok's allocator setting (step.keep_freed_memory)"
             if m["device"] == "cpu" else ""))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in dict.fromkeys(r["provider"] for r in result["step"]):
        pts = sorted((r["M"], r["seed_steps_per_s"]) for r in result["step"] if r["provider"] == provider)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    Ms = sorted({r["M"] for r in result["step"]})
    ax.set_xticks(Ms, [str(m) for m in Ms])
    ax.minorticks_off()
    ax.set_xlabel("models per batch M")
    ax.set_ylabel("seed-steps / s")
    ax.set_title(f"training step, {result['step'][0]['case'].split()[0]}, {result['meta']['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("ce", "clamp", "step", "grid", "phase", "ensemble")


def run_bench(quick: bool, device: str, json_path: Path, plot_path: Path | None,
              sections: tuple[str, ...] = SECTIONS, models: tuple[int, ...] | None = None) -> dict:
    """Run the sections (in the order given), print the table, write the JSON (and the PNG); returns the
    results. The JSON is rewritten after each section and each M of the step section. A section that
    fails is reported (stderr, and `errors` in the JSON) and the next one runs. `models`: the step
    section's M values (default 1, 12, 96 on a CPU; up to 3072 on a GPU)."""
    from fastgrok.train.state import resolve_device
    sections = tuple(dict.fromkeys(sections))       # each section once, in the order first given
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        raise ConfigError(f"sections must be among {', '.join(SECTIONS)}; got {', '.join(sections) or 'none'}")
    if models is not None and (not models or min(models) < 1):
        raise ConfigError(f"--models must be positive model counts, e.g. 1,12,96; got {','.join(map(str, models))}")
    dev = resolve_device(device)
    if models is not None and "step" in sections:   # before anything is built (a model table of 10^8 rows
        check_models_fit(models, dev, quick)        # set off the OOM killer); the default Ms skip what does not fit
    if dev.type == "cpu":
        keep_freed_memory()         # fastgrok's CPU allocator setting, for every provider alike
    copy_gbs = copy_bandwidth(dev)
    result = {"meta": meta(dev, quick), "copy_gb_per_s": copy_gbs, **{name: [] for name in SECTIONS},
              "step_best": {}, "errors": {}}
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1))

    def save_step_rows(rows: list[dict]) -> None:       # after each M of the step section
        result["step"] = rows
        result["step_best"] = best_m(rows)
        save()

    runs = {"ce": lambda: section_ce(dev, quick, copy_gbs), "clamp": lambda: section_clamp(dev, quick, copy_gbs),
            "step": lambda: section_step(dev, quick, on_rows=save_step_rows, models=models),
            "grid": lambda: section_grid(dev, quick), "phase": lambda: section_phase(dev, quick),
            "ensemble": lambda: _section_ensemble(dev, quick, models, lambda rows: (result.update(ensemble=rows), save()))}
    for name in sections:
        t0 = time.perf_counter()
        try:
            result[name] = runs[name]()
        except Exception as e:          # the next section still runs; what this one measured is kept
            result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            print(f"fastgrok bench: the {name} section failed ({type(e).__name__}: {str(e)[:300]}); "
                  "going on with the next", file=sys.stderr, flush=True)
        if name == "step":
            result["step_best"] = best_m(result["step"])
        result["meta"][f"{name}_section_s"] = time.perf_counter() - t0
        print(f"fastgrok bench: {name} done in {result['meta'][f'{name}_section_s']:.0f} s", file=sys.stderr,
              flush=True)
        save()                      # after each section: a cut-off run keeps its part
    render(result)
    if plot_path is not None and result["step"]:
        plot(result, Path(plot_path))
        print(f"plot: {plot_path}")
    elif plot_path is not None:
        print("fastgrok bench: no plot: --plot draws the step section's throughput, which did not run", file=sys.stderr)
    print(f"results: {json_path}")
    for name, err in result["errors"].items():
        print(f"fastgrok bench: the {name} section failed: {err[:300]}", file=sys.stderr)
    return result
