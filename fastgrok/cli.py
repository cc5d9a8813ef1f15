"""The `fastgrok` command: argument parsing and error reporting only; it calls the library.

A user mistake (ConfigError, store.Locked) prints one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import re
import signal
import sys
import time
from pathlib import Path

from fastgrok.store import Locked
from fastgrok.config import (COMPILE, DEVICES, DTYPES, INITS, KERNELS, MLP_ACTS, MLP_INPUTS, MODELS, PER_MODEL,
                             PER_MODEL_META, PRESETS, TF_CONVENTIONS,
                     ConfigError, TrainConfig, logit_every_for, small_test_set_warning, tiny_tau_warning)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # argparse reads "-1e-3" or "-inf" (not matching its own "-1" / "-.5" pattern) as an option and says
        # "expected one argument"; no fastgrok option looks like a number, so any number is a value and the
        # config's validation names the field ("lr must be finite and > 0")
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):                   # one line, exit 2 (argparse prints usage otherwise)
        self.exit(2, f"fastgrok: error: {message}\n")


def _on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")
    return v == "on"


def _per_model_kwargs(name: str) -> dict:
    """A per-model setting's flag, from its declaration (config.PerModel): several values make cells; a
    true/false one takes on|off (alone: on)."""
    meta, default = PER_MODEL_META[name], TrainConfig.__dataclass_fields__[name].default
    if isinstance(default, bool):
        return dict(type=_on_off, nargs="*", metavar="on|off", help=meta.help)
    if meta.choices:
        return dict(choices=meta.choices, nargs="+", metavar=name.upper(), help=meta.help)
    return dict(type=int if meta.integer else float, nargs="+", help=meta.help)


# flag -> (TrainConfig field, argparse kwargs). Defaults come from the preset (TrainConfig() unless
# --preset), so only the flags a user gives override it.
_TRAIN_FLAGS = {
    "--p": ("p", dict(type=int, help="modulus")),
    **{f"--{name.replace('_', '-')}": (name, _per_model_kwargs(name)) for name in PER_MODEL},
    "--model": ("model", dict(choices=MODELS)),
    "--seeds": ("seeds", dict(type=int, help="models per cell")),
    "--seed0": ("seed0", dict(type=int)),
    "--tau": ("taus", dict(type=float, nargs="+", help="temperature(s); several make cells")),
    "--norm-target": ("norm_targets", dict(type=float, nargs="+", help="clamp target(s) for ||W||; none = no clamp")),
    "--clamp-from": ("clamp_from", dict(type=int, help="first clamped step (default: 500 CE, 50 MSE, 600 transformer)")),
    "--clamp-mode": ("clamp_mode", dict(choices=("total", "layer"))),
    "--steps": ("steps", dict(type=int, help="step budget")),
    "--eval-every": ("eval_every", dict(type=int)),
    "--d-embed": ("d_embed", dict(type=int, help="MLP embedding width")),
    "--hidden": ("hidden", dict(type=int, help="MLP hidden width")),
    "--d-model": ("d_model", dict(type=int, help="transformer width")),
    "--n-heads": ("n_heads", dict(type=int)),
    "--d-mlp": ("d_mlp", dict(type=int, help="transformer MLP width")),
    "--mlp-input": ("mlp_input", dict(choices=MLP_INPUTS, help="MLP input: embed (the study's embedding E) or "
                                                               "onehot (a and b one-hot, 2p inputs; Prieto et al.)")),
    "--mlp-layers": ("mlp_layers", dict(type=int, help="MLP hidden layers, each --hidden wide (Prieto et al.: 2)")),
    "--mlp-act": ("mlp_act", dict(choices=MLP_ACTS, help="MLP activation (Prieto et al.: relu)")),
    "--mlp-bias": ("mlp_bias", dict(type=_on_off, metavar="on|off", help="MLP biases (Prieto et al.: off)")),
    "--init": ("init", dict(choices=INITS, help="initial weights: model (each from its own seed), study "
                                               "(the study's cell-level draw: seed for seed its weights) or prieto "
                                               "(Prieto et al.'s split and nn.Linear init per seed; one-hot MLP)")),
    "--layernorm": ("layernorm", dict(action="store_const", const=True, help="transformer: pre-LayerNorm")),
    "--n-layers": ("n_layers", dict(type=int, help="transformer blocks")),
    **{f"--{k.replace('_', '-')}": (k, dict(choices=v, help="transformer convention ("
                                            "docs/training.md: the peers' transformers)"))
       for k, v in TF_CONVENTIONS.items()},
    "--dtype": ("dtype", dict(choices=DTYPES)),
    "--device": ("device", dict(choices=DEVICES)),
    "--kernels": ("kernels", dict(choices=KERNELS, help="loss/clamp implementation: auto (Triton on CUDA), triton, torch")),
    "--compile": ("compile", dict(choices=COMPILE, help="torch.compile the step (auto: where measured faster)")),
    "--no-compile": ("compile", dict(action="store_const", const="off", help="same as --compile off")),
    "--checkpoint-every": ("checkpoint_every", dict(type=int)),
    "--snapshots": ("snapshots", dict(type=int, metavar="N", help="keep each model's weights at about N "
                                      "log-spaced steps and at its T_mem and T_grok (DIR/snapshots/); 0 = off")),
    "--snapshot-cap-gib": ("snapshot_cap_gib", dict(type=float, metavar="GIB", help="refuse snapshots that could "
                                                    "take more: (N + 2) x models x params x bytes")),
    "--restricted-loss": ("restricted_loss", dict(action="store_const", const=True,
                                                  help="record Nanda et al.'s restricted and excluded losses "
                                                       "(MLP on add) at every evaluation")),
    "--keep-going": ("stop_when_grokked", dict(action="store_const", const=False,
                                               help="train to --steps even after every model grokked")),
}


def _add_train(sub):
    p = sub.add_parser("train", help="train a batch of models (cells x seeds) and record when they grok")
    defaults = TrainConfig()
    presets = {name: PRESETS[name]() for name in sorted(PRESETS)}
    sets = {name: ", ".join(f"{_flag_of(f)} {_shown(getattr(cfg, f))}" for f in _differs(cfg, defaults))
            for name, cfg in presets.items()}
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset; flags given override it. " + "; ".join(
                       f"{name}: {PRESETS[name].__doc__.strip().splitlines()[0].rstrip('.')}"
                       + (f" (sets {sets[name]})" if sets[name] else " (the defaults)") for name in sorted(PRESETS)))
    compile_flags = p.add_mutually_exclusive_group()        # --compile X --no-compile: refused, not last-wins
    for flag, (field, kw) in _TRAIN_FLAGS.items():
        kw = dict(kw)
        if "action" not in kw and field not in ("taus", "norm_targets"):
            # the default, and what a preset puts in its place (--preset quick --help shows the same text)
            shown = [] if getattr(defaults, field) is None else [f"default {_shown(getattr(defaults, field))}"]
            shown += [f"--preset {n}: {_shown(getattr(c, field))}" for n, c in presets.items()
                      if getattr(c, field) != getattr(defaults, field)]
            if shown:
                kw["help"] = (kw.get("help", "") + f" ({'; '.join(shown)})").strip()
        (compile_flags if field == "compile" else p).add_argument(flag, dest=field, default=argparse.SUPPRESS, **kw)
    p.add_argument("--out", type=_path, default=None, help="run directory (default runs/<time>)")
    p.add_argument("--resume", type=_path, default=None, metavar="DIR", help="continue the run in DIR with its saved config; with --steps N, extend it to N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--track", choices=("wandb", "tensorboard"), default=None,
                   help="log per-cell curve quartiles and the cell table to W&B (WANDB_MODE=offline works) or "
                        "TensorBoard (DIR/tensorboard); a resumed tracked run continues its tracked run")


def _flag_of(field: str) -> str:
    return next((f for f, (name, kw) in _TRAIN_FLAGS.items() if name == field and "action" not in kw),
                f"--{field.replace('_', '-')}")


def _shown(v) -> str:
    if isinstance(v, tuple):
        return " ".join(_shown(x) for x in v)
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _differs(cfg: TrainConfig, base: TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)]


def _config_from_args(args) -> TrainConfig:
    base = PRESETS[args.preset]() if args.preset else TrainConfig()
    given = {field: getattr(args, field) for field, _ in _TRAIN_FLAGS.values() if hasattr(args, field)}
    for name in PER_MODEL:                      # `--orthograd` alone: on
        if given.get(name) == []:
            given[name] = [True]
    for k in ("taus", "norm_targets", *PER_MODEL):
        if k in given:
            given[k] = tuple(given[k])
            twice = sorted({v for v in given[k] if given[k].count(v) > 1})
            if twice:
                raise ConfigError(f"{_flag_of(k)} lists {', '.join(_shown(v) for v in twice)} more than once: each value "
                                  f"makes a cell of --seeds models; give each value once")
    if "eval_every" in given and "logit_every" not in given:
        given["logit_every"] = logit_every_for(given["eval_every"])
    return dataclasses.replace(base, **given)


_MODEL_ONLY = {"mlp": ("d_embed", "hidden", "mlp_input", "mlp_layers", "mlp_act", "mlp_bias"),
               "transformer": ("d_model", "n_heads", "d_mlp", "layernorm", "n_layers", *TF_CONVENTIONS)}


def _ignored_options(args, cfg: TrainConfig) -> list[str]:
    """Options given on the command line that this run does not use."""
    given = {field for field, _ in _TRAIN_FLAGS.values() if hasattr(args, field)}
    flag = {field: f for f, (field, _) in _TRAIN_FLAGS.items()}
    out = []
    for model, fields in _MODEL_ONLY.items():
        unused = [flag[f] for f in fields if f in given and cfg.model != model]
        if unused:
            out.append(f"{', '.join(unused)} set the {model}'s size; this run trains the {cfg.model}: ignored")
    if "d_embed" in given and cfg.model == "mlp" and cfg.mlp_input == "onehot":
        out.append("--d-embed sets the embedding's width; the one-hot MLP (--mlp-input onehot) has none: ignored")
    if given & {"clamp_mode", "clamp_from"} and not cfg.norm_targets:
        out.append("--clamp-mode/--clamp-from without --norm-target: no model is clamped")
    return out


def _check_out(path: Path, flag: str, directory: bool) -> None:
    """A ConfigError unless `path` can be written as a directory (or as a file): not the other kind
    already, and not under a file."""
    if path.exists() and path.is_dir() != directory:
        raise ConfigError(f"{path} is a file; pick a directory for {flag}" if directory else
                          f"{path} is a directory; give a file name for {flag}")
    above = next((d for d in path.absolute().parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{path}: {above} is a file, so no {'directory' if directory else 'file'} can be made "
                          f"under it; pick another {flag}")


def _path(s: str) -> Path:
    """A path option's value: an empty one (`--out "$UNSET"`) would name the current directory."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty path; give a directory or file name")
    return Path(s)


def _extended(cfg: TrainConfig, steps: int, run_dir: Path) -> TrainConfig:
    """The saved config with a larger step budget (`train` extends the run), after saying what happens."""
    if steps < cfg.steps:
        raise ConfigError(f"{run_dir} holds a run of {cfg.steps:,} steps: --steps can extend it "
                          f"(more than {cfg.steps:,}), not shorten it")
    from fastgrok.store import PROGRESS, read_progress
    progress = run_dir / PROGRESS
    state = read_progress(progress) if progress.exists() else {}
    if state.get("done") and state.get("step", cfg.steps) < cfg.steps:
        print(f"fastgrok: the run finished at step {state['step']:,}, every model grokked or diverged: "
              f"nothing to extend", file=sys.stderr)
        return cfg
    print(f"fastgrok: extending the run from {cfg.steps:,} to {steps:,} steps", file=sys.stderr)
    return dataclasses.replace(cfg, steps=steps)


def cmd_train(args) -> int:
    if args.resume is not None:
        given = [f for f, _ in _TRAIN_FLAGS.values() if hasattr(args, f) and f != "steps"]
        if given or args.preset or args.out:
            raise ConfigError("--resume DIR continues the run with its saved config; give no other run options "
                              "(--steps N alone extends it to N steps)")
        from fastgrok.store import holds_grid_run
        if holds_grid_run(args.resume):
            raise ConfigError(f"{args.resume} holds a grid run (fastgrok run); resume it by rerunning the "
                              f"`fastgrok run` command that started it, with --out {args.resume}")
        from fastgrok.train.trainer import load_config
        cfg, run_dir, resume = load_config(args.resume), args.resume, True
        if hasattr(args, "steps") and args.steps != cfg.steps:
            cfg = _extended(cfg, args.steps, run_dir)
    else:
        cfg = _config_from_args(args)           # a bad flag fails here, before torch is imported
        run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        resume = False
    from fastgrok.train.summary import print_summary
    from fastgrok.train.signals import Interrupted
    from fastgrok.train.trainer import preflight, train
    if args.track:                              # its library is installed (one line naming the extra if not)
        from fastgrok.train.tracking import check
        check(args.track)
    if not resume:
        _check_out(run_dir, "--out", directory=True)
    # a CUDA request without CUDA, kernels that cannot run here, too many models, snapshots over their cap,
    # another run's directory: refused now, before the banner and before the run directory is created
    snap = preflight(cfg, run_dir, resume)
    from fastgrok.store import writer_lock
    with writer_lock(run_dir):          # a second writer is refused before the banner
        print(f"fastgrok: {cfg.n_models} models ({len(cfg.cells)} cells x {cfg.seeds} seeds), p={cfg.p} "
              f"{'/'.join(cfg.values('op'))} "
              f"{cfg.model} {'/'.join(cfg.values('loss'))} {cfg.dtype} -> {run_dir}", file=sys.stderr)
        if snap:
            print(f"fastgrok: snapshots: at most {snap} -> {run_dir}/snapshots", file=sys.stderr)
        for warning in _ignored_options(args, cfg):
            print(f"fastgrok: warning: {warning}", file=sys.stderr)
        for warning in (small_test_set_warning([cfg]), tiny_tau_warning(cfg.taus, cfg.dtype)):
            if warning:
                print(f"fastgrok: warning: {warning}", file=sys.stderr)
        if any(t is not None for t in cfg.norm_targets) and cfg.t_clamp >= cfg.steps:
            print(f"fastgrok: warning: the clamp starts at step {cfg.t_clamp} (--clamp-from), at or after the last "
                  f"step ({cfg.steps}): no model will be clamped", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            df = train(cfg, run_dir, resume=resume, progress=not args.quiet, track=args.track)
        except Interrupted as e:
            print(f"fastgrok: {e}; resume with: fastgrok train --resume {run_dir}", file=sys.stderr)
            return 130
    print_summary(cfg, df, time.perf_counter() - t0)
    print(f"results: {run_dir}/models.parquet, {run_dir}/curves.parquet")
    return 0


def _add_run(sub):
    p = sub.add_parser("run", help="run a built-in experiment or a SPEC.toml grid (resumes an existing --out)")
    p.add_argument("experiment", help="a name from `fastgrok experiments`, or a path to a SPEC.toml")
    p.add_argument("--p", type=int, default=None, help="override the modulus")
    p.add_argument("--seeds", type=int, default=None, help="override seeds per cell")
    p.add_argument("--max-steps", type=int, default=None, help="cap every cell's step budget")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", default=None, choices=COMPILE,
                   help="torch.compile the step (default: the spec's [train] compile, else auto)")
    g.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument("--out", type=_path, default=None, help="run directory (default runs/<experiment>)")
    p.add_argument("--executor", default="local", choices=("local", "ray", "slurm"))
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--workers", type=int, default=None,
                   help="local executor: worker processes (default one per CUDA device; one on a CPU)")
    s = p.add_argument_group("--executor slurm (each overrides the spec's [engine] field of the same name)")
    s.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    s.add_argument("--time-limit", type=int, default=None, metavar="MIN",
                   help="minutes per array task (default: the partition's); at the limit a task checkpoints "
                        "and requeues")
    s.add_argument("--gpus-per-job", type=int, default=None, metavar="N", help="GPUs per array task (default 0)")
    s.add_argument("--cpus-per-job", type=int, default=None, metavar="N", help="CPUs per array task (default 1)")
    s.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                   help="array tasks running at once (default 256)")
    s.add_argument("--batches-per-job", type=int, default=None, metavar="N",
                   help="batches each array task trains in turn (default 1)")
    s.add_argument("--no-wait", dest="wait", action="store_false", default=None,
                   help="submit and exit; the same command later collects the results and submits the next stage")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """A SIGTERM to the driver (`kill PID`, a job scheduler) stops a grid as Ctrl-C does: the workers
    checkpoint and exit, no process is left behind. (A running in-process Trainer handles SIGTERM itself.)"""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:                              # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_run(args) -> int:
    from fastgrok.grid.executors import run_experiment
    from fastgrok.grid.slurm import JobsFailed, Submitted
    from fastgrok.grid.workers import WorkerDied
    from fastgrok.train.signals import Interrupted
    overrides = {k: v for k, v in (("p", args.p), ("seeds", args.seeds), ("max_steps", args.max_steps),
                                   ("compile", args.compile)) if v is not None}
    slurm = {k: v for k in ("partition", "time_limit", "gpus_per_job", "cpus_per_job", "array_parallelism",
                            "batches_per_job", "wait") if (v := getattr(args, k)) is not None}
    try:
        with _sigterm_as_ctrl_c():
            run_dir = run_experiment(args.experiment, overrides=overrides, out=args.out, executor=args.executor,
                                     device=args.device, progress=not args.quiet, workers=args.workers,
                                     slurm=slurm or None)
    except (Interrupted, KeyboardInterrupt) as e:
        why = str(e) or "interrupted"
        print(f"fastgrok: {why}; finished batches are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    except (WorkerDied, JobsFailed) as e:        # not a user mistake: exit 1, one line
        print(f"fastgrok: error: {e}", file=sys.stderr)
        return 1
    except Submitted as e:                       # --no-wait
        print(f"fastgrok: {e}", file=sys.stderr)
        return 0
    print(f"results: {run_dir}/parts/models/, {run_dir}/parts/curves/; tables and report: fastgrok analyze {run_dir}")
    return 0


def cmd_experiments(args) -> int:
    from fastgrok.grid.experiments import EXPERIMENTS, SPEC_DIR, apply_overrides, load_spec
    from fastgrok.grid import sizes
    from fastgrok.grid.sizes import experiment_size, fmt_duration
    where = f"at p = {args.p}" if args.p is not None else "at each spec's own p"
    rows = []                                   # all sized first: a bad --p prints its error alone
    for name in EXPERIMENTS:
        spec = load_spec(SPEC_DIR / f"{name}.toml")
        if args.p is not None:
            spec = apply_overrides(spec, p=args.p)
        z = experiment_size(spec)
        steps = f"{z['min_steps']:,}" + (f"-{z['max_steps']:,}" if z["max_steps"] != z["min_steps"] else "")
        rows.append(f"{name:12s} {z['cells']:6d} {z['models']:7d} {steps:>16s} {fmt_duration(z['cpu_s']):>10s} "
                    f"{fmt_duration(z['gpu_s']):>10s}  {spec.description}")
    print(f"{'name':12s} {'cells':>6s} {'models':>7s} {'steps (budget)':>16s} {'CPU time':>10s} {'GPU time*':>10s}  "
          "description")
    print("\n".join(rows))
    print(f"({where}; models include the calibration controls; CPU time: every model to its budget on one "
          "thread of a 2-core CPU, from model-step times measured there (fastgrok/grid/sizes.py), compilation "
          "included; runs are shorter where cells stop once their seeds grok, and two threads are faster. "
          f"*GPU time: an estimate, not a measurement: each batch's FLOPs at {sizes.GPU_UTIL:.0%} of an H100's "
          f"float32 peak plus {sizes.GPU_STEP_S * 1e3:g} ms a batch step, both assumed until a GPU is measured)")
    return 0


def cmd_status(args) -> int:
    """A train run's lines (train.status), a grid run's table (grid.rundir)."""
    from fastgrok import store
    run_dir = args.dir
    if run_dir.is_dir() and not store.holds_grid_run(run_dir) and store.holds_train_run(run_dir):
        from fastgrok.train.status import train_status
        print("\n".join(train_status(run_dir)))
    else:
        from fastgrok.grid.rundir import print_status
        print_status(run_dir)
    return 0


def cmd_analyze(args) -> int:
    from fastgrok.analysis.report import analyze_dir, write_report
    from fastgrok.analysis.terminal import render_terminal
    from fastgrok import store
    if not args.dir.exists():
        raise ConfigError(f"{args.dir} does not exist")
    if not args.dir.is_dir():
        raise ConfigError(f"{args.dir} is a file; give the run directory (fastgrok run/train --out)")
    if not (args.dir / "models.parquet").exists() and not store.part_files(args.dir, "models"):
        raise ConfigError(f"{args.dir} holds no results (no models.parquet, no parts/)")
    result = analyze_dir(args.dir)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for the report")
    report = write_report(args.dir, result, out=args.out)   # the files first: a closed pipe (| head) keeps them
    render_terminal(result)
    print(f"report: {report}")
    return 0


def cmd_bench(args) -> int:
    for flag, path in (("--json", args.json), ("--plot", args.plot)):    # before minutes of measuring
        if path is not None:
            _check_out(path, flag, directory=False)
    from fastgrok.bench.sections import run_bench
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    models = None
    if args.models is not None:
        try:
            models = tuple(int(x) for x in args.models.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--models must be comma-separated model counts, e.g. 1,12,96; got {args.models!r}")
    result = run_bench(quick=args.quick, device=args.device, json_path=args.json, plot_path=args.plot,
                       sections=sections, models=models)
    return 1 if result["errors"] else 0


def cmd_export(args) -> int:
    from fastgrok import export
    if not (args.dir / "config.json").exists() and not (args.dir / "spec.json").exists():
        raise ConfigError(f"{args.dir} holds no run (no config.json or spec.json)")
    if args.to == "safetensors":
        if args.snapshot is None or args.model is not None:
            raise ConfigError("--to safetensors writes a snapshot's models: give --snapshot STEP (and no --model)")
        out = export.to_safetensors(args.dir, args.snapshot, args.out)
    else:
        if args.model is None:
            raise ConfigError("--to transformer-lens writes one model: give --model K")
        out = export.to_transformer_lens(args.dir, args.model, args.out, step=args.snapshot)
    print(f"exported: {out}")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="a run's weights for other tools: a snapshot as safetensors, a model for "
                                      "TransformerLens (the MLP: a torch.nn.Module)")
    p.add_argument("dir", type=Path, help="the run directory")
    p.add_argument("--to", required=True, choices=("safetensors", "transformer-lens"))
    p.add_argument("--model", type=int, default=None, metavar="K", help="the model id (models.parquet's `model`)")
    p.add_argument("--snapshot", type=int, default=None, metavar="STEP",
                   help="the snapshot of this step (default for one model: its final weights, from the checkpoint)")
    p.add_argument("out", type=Path, help="safetensors: the file to write; transformer-lens: a directory")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgrok", description="A performance-first trainer for grokking research.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_run(sub)
    p = sub.add_parser("experiments", help="list the built-in experiments: cells, models, step budgets, CPU time")
    p.add_argument("--p", type=int, default=None, help="size them at this modulus (as `run --p` would)")
    p = sub.add_parser("status", help="progress of a run: a grid's cells, or a train run's step and models grokked")
    p.add_argument("dir", type=_path)
    p = sub.add_parser("analyze", help="the study's tables, figures and a report from a run directory")
    p.add_argument("dir", type=_path)
    p.add_argument("--out", type=_path, default=None,
                   help="write report.md and figures/ here (default: into the run directory)")
    _add_export(sub)
    p = sub.add_parser("bench", help="measure kernels, the training step and a small grid, side by side")
    p.add_argument("--quick", action="store_true", help="small sizes, a minute or two")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", type=_path, default=Path("bench.json"),
                   help="where to write the JSON results (default: bench.json here)")
    p.add_argument("--plot", type=_path, default=None, help="write a PNG of throughput against M")
    p.add_argument("--sections", default="ce,clamp,step,grid,phase",
                   help="comma-separated sections to run, in order (default: ce,clamp,step,grid,phase)")
    p.add_argument("--models", default=None,
                   help="the step section's model counts M, comma-separated (default 1,12,96 on a CPU, "
                        "1,12,96,768,3072 on a GPU)")
    return parser


def _user_error(e: Exception) -> bool:
    """A user's mistake: a ConfigError (bad input, kernels that cannot run here), or a second writer of
    a run directory (store.Locked)."""
    return isinstance(e, (ConfigError, Locked))


def _out_of_memory(e: Exception) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "tried to allocate" in str(e).lower())


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)     # torch is imported only by the commands that need it
        return {"train": cmd_train, "run": cmd_run, "experiments": cmd_experiments, "status": cmd_status,
                "analyze": cmd_analyze, "bench": cmd_bench, "export": cmd_export}[args.command](args)
    except KeyboardInterrupt:                      # before a trainer's own handler took over (or a second ^C)
        print("fastgrok: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                        # output piped into `head` or a pager that quit: not an error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        except (OSError, AttributeError, ValueError):
            pass
        return 141
    except Exception as e:
        if _out_of_memory(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"fastgrok: error: out of memory ({first[:200]}); use fewer models (seeds x cells), a smaller p "
                  "or model, or another device", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # atomic writes: every file holds its last complete version, so the run resumes once there is room
            where = f" writing {e.filename}" if e.filename else ""
            print(f"fastgrok: error: the disk is full{where}; free some space and rerun (or --resume): what was "
                  "written before is kept", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.filename is not None:     # a path that cannot be made, read or written
            print(f"fastgrok: error: {e.strerror or type(e).__name__}: {e.filename}", file=sys.stderr)
            return 2
        if not _user_error(e):
            raise
        print(f"fastgrok: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
