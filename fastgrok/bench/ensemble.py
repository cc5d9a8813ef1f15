"""`fastgrok bench --sections ensemble`: fastgrok against what a user would pick instead, end to end.

One cell of M models trained three ways (four on a CPU) in one process, for a fixed number of steps with an evaluation
every 25 (and at the end), compile time included and shown apart:
  fastgrok compiled          fastgrok's compiled step and evaluation, its default kernels (bench.fastgrok_step)
  fastgrok eager             the same uncompiled (on a CPU only): what fastgrok's `compile = auto` runs there
                             for the transformer and for runs of at most step.QUICK_STEPS steps
  torch.func ensemble        PyTorch's ensembling recipe (stack_module_state, functional_call,
                             vmap(grad(...)), a functional AdamW, torch.compile): fastgrok.bench.ensemble_baseline
  study eager per-cell loop  the study's way (fastgrok.bench.baseline: eager, cells of <= 12 seeds one after
                             another, the logit readout every 200 steps); the MLP only (the study's
                             transformer code is not public)
for the study's MLP at p = 59 and the transformer (the study's: p = 59, d_model 128, MLP 512, 4 heads).

Timing: each run is cut into chunks at its evaluations (chunk 0 the first evaluation, chunk 1 the first
step: the compiling calls; then the rest of the first 25 steps; then each evaluation with the 25 steps
after it, and the last evaluation), and the providers run their chunks in turn (chunk k of each, then
chunk k + 1 of each), so a shared machine's load falls on all alike; every chunk ends with the device
synchronised. Per provider: wall (the whole N-step run: the sum of its chunks, compilation included),
compile (first evaluation + first step less a steady one of each), steady ms per step and per evaluation
(medians), model-steps/s end to end (M * N / wall) and excluding compilation, and a run of RUN_STEPS
steps projected from compile + steady step and evaluation medians (a projection, labelled so).
Equal work: the mean train and test accuracy at the last evaluation are in each row; the ensemble starts
from fastgrok's weights for each seed and its training follows fastgrok's to float rounding
(tests/test_ensemble_baseline.py).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from fastgrok.bench.sections import RUN_STEPS, _sync, fastgrok_step
from fastgrok.config import ConfigError, TrainConfig

EVAL_EVERY = 25
FASTGROK, EAGER = "fastgrok compiled", "fastgrok eager"
ENSEMBLE, STUDY = "torch.func ensemble (compiled)", "study eager per-cell loop"
PROVIDERS = (FASTGROK, EAGER, ENSEMBLE, STUDY)


def ensemble_configs(quick: bool) -> dict[str, TrainConfig]:
    """The cells: the study's MLP at p = 59 and the transformer (--quick: small ones that compile fast)."""
    if quick:
        return {"mlp": TrainConfig(p=23, d_embed=32, hidden=64, seeds=1, compile="off"),
                "transformer": TrainConfig(model="transformer", p=23, d_model=32, d_mlp=64, seeds=1, compile="off")}
    return {"mlp": TrainConfig(p=59, seeds=1, compile="off"),
            "transformer": TrainConfig(model="transformer", p=59, seeds=1, compile="off")}


class _Provider:
    """step() and evaluate() (the latter returns (M, 2) train/test accuracy on the host: a sync point)."""

    def __init__(self, name: str, step, evaluate):
        self.name, self.step, self.evaluate = name, step, evaluate


def _fastgrok(cfg: TrainConfig, device, compiled: bool = True) -> _Provider:
    step, evaluate = fastgrok_step(cfg, device, compile_step=compiled)   # builds reset dynamo: all before any call
    return _Provider(FASTGROK if compiled else EAGER, step, lambda: evaluate()[:, 1:3].cpu())


def _ensemble(cfg: TrainConfig, device) -> _Provider:
    from fastgrok.bench.ensemble_baseline import EnsembleCell
    cell = EnsembleCell(cfg, device=device)
    return _Provider(ENSEMBLE, cell.step, lambda: cell.evaluate().cpu())


def _study(cfg: TrainConfig, device) -> _Provider:
    from fastgrok.bench.baseline import BaselineCell
    M = cfg.seeds
    cells = [BaselineCell(replace(cfg, seeds=min(12, M - s0)), device=device,
                          seeds=list(range(cfg.seed0 + s0, cfg.seed0 + min(s0 + 12, M))))
             for s0 in range(0, M, 12)]
    count = [0]

    def step():
        for c in cells:
            c.step()

    def evaluate():
        accs = []
        for c in cells:
            tr, te, _ = c.evaluate()
            accs.append(torch.stack([tr, te], 1).cpu())
            if count[0] % (cfg.logit_every // EVAL_EVERY) == 0:    # the study's logit readout every 200 steps
                c.logit_scale()
        count[0] += 1
        return torch.cat(accs)
    return _Provider(STUDY, step, evaluate)


def _chunks(steps: int) -> list[tuple[bool, int]]:
    """The run of `steps` steps as chunks (evaluate first?, steps after), see the module docstring."""
    out = [(True, 0), (False, min(1, steps))]
    s = min(1, steps)
    if s < min(EVAL_EVERY, steps):
        out.append((False, min(EVAL_EVERY, steps) - s))
        s = min(EVAL_EVERY, steps)
    while s < steps:
        n = min(EVAL_EVERY, steps - s)
        out.append((True, n))
        s += n
    out.append((True, 0))
    return out


def run_case(cfg: TrainConfig, M: int, steps: int, device, run_steps: int,
             providers: tuple[str, ...] | None = None) -> list[dict]:
    """The ways (the study's loop for the MLP only; fastgrok eager on a CPU only) on M models of cfg for
    `steps` steps; one row each."""
    cfg = replace(cfg, seeds=M, device=device.type, eval_every=EVAL_EVERY, stop_when_grokked=False)
    providers = providers or (PROVIDERS if device.type == "cpu" else (FASTGROK, ENSEMBLE, STUDY))
    builders = {FASTGROK: _fastgrok, EAGER: lambda c, d: _fastgrok(c, d, compiled=False), ENSEMBLE: _ensemble,
                STUDY: _study}
    provs = [builders[name](cfg, device) for name in providers if not (name == STUDY and cfg.model != "mlp")]
    rec = {p.name: {"eval": [], "step": [], "wall": 0.0, "acc": None} for p in provs}
    for do_eval, n in _chunks(steps):
        for p in provs:
            r = rec[p.name]
            _sync(device)
            t0 = time.perf_counter()
            if do_eval:
                r["acc"] = p.evaluate()
                t1 = time.perf_counter()
                r["eval"].append(t1 - t0)
            else:
                t1 = t0
            for _ in range(n):
                p.step()
            _sync(device)
            t2 = time.perf_counter()
            if n:
                r["step"].append((t2 - t1) / n)
            r["wall"] += t2 - t0
    rows = []
    for p in provs:
        r = rec[p.name]
        ev, st = statistics.median(r["eval"][1:]), statistics.median(r["step"][1:] or r["step"])
        compile_s = max(0.0, r["eval"][0] - ev) + max(0.0, r["step"][0] - st)
        n_evals = len(r["eval"])
        proj = compile_s + run_steps * st + (run_steps // EVAL_EVERY + 1) * ev
        rows.append({"section": "ensemble", "model": cfg.model, "p": cfg.p, "M": M, "steps": steps,
                     "case": f"{cfg.model} p={cfg.p} M={M}, {steps} steps", "provider": p.name,
                     "wall_s": r["wall"], "compile_s": compile_s, "step_s": st, "eval_s": ev, "evals": n_evals,
                     "first_step_s": r["step"][0], "first_eval_s": r["eval"][0],
                     "model_steps_per_s": M * steps / r["wall"],
                     "model_steps_per_s_excl_compile": M * steps / max(r["wall"] - compile_s, 1e-9),
                     "run_steps": run_steps, "projected_run_s": proj,
                     "projected_model_steps_per_s": M * run_steps / proj,
                     "train_acc": float(r["acc"][:, 0].double().mean()), "test_acc": float(r["acc"][:, 1].double().mean())})
    ens = next((x for x in rows if x["provider"] == ENSEMBLE), None)
    for x in rows:
        for key, ref in (("vs_ensemble", ens), ("vs_study", next((y for y in rows if y["provider"] == STUDY), None))):
            x[key] = ref["wall_s"] / x["wall_s"] if ref else None
            x[key + "_excl_compile"] = ((ref["wall_s"] - ref["compile_s"]) / max(x["wall_s"] - x["compile_s"], 1e-9)
                                        if ref else None)
            x[key + "_projected"] = ref["projected_run_s"] / x["projected_run_s"] if ref else None
    return rows


def section_ensemble(device, quick: bool, models: tuple[int, ...] | None = None, steps: dict | None = None,
                     kinds: tuple[str, ...] = ("mlp", "transformer"), on_rows=None,
                     providers: tuple[str, ...] | None = None) -> list[dict]:
    """Every (model kind, M) case; M that may not fit (three times fastgrok's memory estimate: the providers'
    states at once, the direct form's larger activations) and every larger one are skipped with a message.
    steps: per kind (default MLP 100, transformer 50 on a CPU; 200 and 100 on a GPU; --quick 30).
    providers: which of PROVIDERS run, in that order (default all of run_case's for the device); fastgrok
    compiled and the ensemble must be among them (the section's ratios are theirs)."""
    if providers is not None and not {FASTGROK, ENSEMBLE} <= set(providers) <= set(PROVIDERS):
        raise ValueError(f"providers {providers}: a subset of {PROVIDERS} with {FASTGROK!r} and {ENSEMBLE!r}")
    from fastgrok.train.memory import device_memory, estimate_bytes
    Ms = models or ((1, 4) if quick else (1, 12, 96) if device.type == "cpu" else (1, 12, 96, 768))
    steps = steps or ({"mlp": 30, "transformer": 30} if quick else {"mlp": 100, "transformer": 50}
                      if device.type == "cpu" else {"mlp": 200, "transformer": 100})
    cfgs = ensemble_configs(quick)
    rows = []
    for kind in kinds:
        for M in sorted(Ms):
            cfg = replace(cfgs[kind], seeds=M)
            need, have = 3 * estimate_bytes(cfg, M, device), device_memory(device)
            if have is not None and need > have:
                print(f"fastgrok bench: ensemble {kind} at M = {M} skipped, and larger M: the providers may need "
                      f"{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available")
                break
            try:
                rows += run_case(cfg, M, steps[kind], device, RUN_STEPS, providers)
            except (torch.cuda.OutOfMemoryError, ConfigError) as e:
                print(f"fastgrok bench: ensemble {kind} at M = {M} does not fit ({str(e)[:160]}); larger M skipped")
                torch.cuda.empty_cache()
                break
            if on_rows is not None:
                on_rows(rows)
    return rows


def markdown(rows: list[dict]) -> str:
    """The section's rows as a Markdown table (benchmarks/RESULTS.md's form)."""
    out = ["| case | provider | wall (compile) | ms/step | ms/eval | model-steps/s end to end (excl. compile) "
           "| fastgrok vs this: end to end, excl. compile, projected run | train / test acc at the end |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fg = next(x for x in rows if x["case"] == r["case"] and x["provider"] == FASTGROK)
        vs = (f"{r['wall_s'] / fg['wall_s']:.2f}x, {(r['wall_s'] - r['compile_s']) / (fg['wall_s'] - fg['compile_s']):.2f}x, "
              f"{r['projected_run_s'] / fg['projected_run_s']:.2f}x" if r is not fg else "")
        out.append(f"| {r['case']} | {r['provider']} | {r['wall_s']:.1f} s ({r['compile_s']:.1f} s) | "
                   f"{r['step_s'] * 1e3:.1f} | {r['eval_s'] * 1e3:.1f} | {r['model_steps_per_s']:.0f} "
                   f"({r['model_steps_per_s_excl_compile']:.0f}) | {vs} | {r['train_acc']:.3f} / {r['test_acc']:.3f} |")
    return "\n".join(out)


def goal_lines(rows: list[dict], goal_m: int, goal_x: float) -> list[str]:
    """The issue's goal per case with M >= goal_m: fastgrok compiled over the compiled ensemble, end to end
    (compilation included), measured and for a RUN_STEPS-step run projected."""
    out = []
    for r in rows:
        if r["provider"] != FASTGROK or r["M"] < goal_m:
            continue
        ens = next(x for x in rows if x["case"] == r["case"] and x["provider"] == ENSEMBLE)
        for what, n, key in (("measured", r["steps"], "wall_s"), ("projected", r["run_steps"], "projected_run_s")):
            x = ens[key] / r[key]
            out.append(f"{r['case']}, {what} over {n:,} steps: {x:.2f}x ({'met' if x >= goal_x else 'NOT met'})")
    return out
