"""The study's experiments as specs: `kw_only` dataclasses validated on construction, stored as TOML.

A spec is a union of products. Its top-level axes (AXES: p, model, dtype, every per-model setting of
config.PER_MODEL, rho, norm_target, tau, layer_fracs; and seeds) are defaults; each `[[grid]]` block
overrides some of them, and the spec's cells are the union (in order, duplicates dropped) of every block's product. With no block
the top-level axes form one product. A cell is clamped to `rho * w_c` (rho "free" = no clamp; w_c from
a free calibration run, see rundir.calibrate_from) or to an absolute `norm_target`.

    name = "mediation"
    seeds = 12
    tau = [1.0]
    [[grid]]               # the baseline
    rho = [1.0]
    [[grid]]               # the tau sweep at rho 1.15
    rho = [1.15]
    tau = [1.0, 1.15, 1.3, 1.5, 1.7]

Step budgets grow with rho: `budget(rho) = steps * (steps_ref / steps) ** ((rho - 1) / (rho_ref - 1))`
for rho > 1 (20k at rho 1 and 137k at rho 1.15 by default, as in the study), `steps` for free cells and
rho <= 1, all capped by `max_steps`.

A `[[grid]]` block may also name its regime and set what its own cells train with, so one spec can run each
paper's setting beside another's (the built-in `interventions`):

    [[grid]]
    regime = "Prieto et al. 2025: StableMax"     # a label, stored as the `regime` column
    steps = 35000                                 # this block's budget.steps
    loss = ["ce", "stablemax"]
    [grid.train]                                  # TrainConfig fields over the spec's [train], this block only
    eps = 1e-25

Cells of blocks whose [grid.train] differ never share a batch (their shapes or steps may differ). Every mistake raises `ConfigError` naming the field
(`grid[1].tau`, `train.hiden`, `fork.step`) before any training starts.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastgrok.config import (DTYPES, GRID_AXES, MAX_STEPS, MODELS, PER_MODEL, PER_MODEL_META, ConfigError,
                             TrainConfig, default_lr, logit_every_for, steps_problem)

try:
    import tomllib
except ImportError:                                 # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

SPEC_DIR = Path(__file__).parent / "specs"
NAME_MAX = 255
"""The longest file name, in bytes (Linux's NAME_MAX, and most file systems'): the bound of a spec's name."""
FREE = "free"
SHAPE_AXES = ("p", "model", "dtype")
"""Axes that change the batch's tensor shapes or its step: cells differing in one never share a batch."""
PACKED_AXES = tuple(a for a in GRID_AXES if a in PER_MODEL)
"""The per-model settings (config.PER_MODEL, in the spec's order): cells differing in them pack into one batch."""
CONFIG_AXES = SHAPE_AXES + PACKED_AXES
"""The axes that are TrainConfig fields: a cell's config is the spec's [train] with these."""
CLAMP_AXES = ("rho", "norm_target", "tau", "layer_fracs")
"""The axes of the clamp and the temperature (per model, not TrainConfig fields: each model's row)."""
CELL_AXES = PACKED_AXES + CLAMP_AXES
"""Per-model axes: cells differing only in these pack into one batch of M models."""
AXES = GRID_AXES + CLAMP_AXES
"""Every axis, in the order a block's product runs (the last fastest)."""
ARMS = {"same": lambda f: 1.0, "raised": lambda f: f, "lowered": lambda f: 1.0 / f, "free": lambda f: None}
"""Fork arms: the clamp target as a multiple of the norm at the fork (None = no clamp)."""
_NOT_IN_TRAIN = set(SHAPE_AXES) | set(PACKED_AXES) | {"taus", "norm_targets", "layer_fracs", "seeds", "steps",
                                                       "device"}


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _steps(where: str, v) -> None:
    """A step count of the spec ([budget], [calibration], [fork]): an integer in [1, MAX_STEPS]."""
    problem = steps_problem(v)
    if problem:
        raise _err(where, problem)


def _named(e: ConfigError, where: dict, fallback: str) -> ConfigError:
    """A TrainConfig error ("hidden must be >= 1, ...") as `where[hidden].hidden: ...` when its first word
    is a key of `where` (field -> the section that set it), else `fallback: ...`."""
    msg = str(e)
    m = re.match(r"[a-z_0-9]+", msg)
    return _err(f"{where[m.group()]}.{m.group()}" if m and m.group() in where else fallback, msg)


def _scalar(where: str, v, conv):
    """One value (not a list) from TOML, converted by conv."""
    if isinstance(v, (list, tuple, dict)):
        raise _err(where, f"must be a single value, got {v!r}")
    return _tuple(where, v, conv)[0]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tuple(where: str, v, conv) -> tuple:
    """A scalar or a list from TOML as a non-empty tuple, each entry converted by conv."""
    vals = v if isinstance(v, (list, tuple)) else [v]
    if not vals:
        raise _err(where, "is empty; give at least one value")
    out = []
    for x in vals:
        try:
            out.append(conv(x))
        except (TypeError, ValueError) as e:
            raise _err(where, f"bad value {x!r} ({e})") from None
    return tuple(out)


def _int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError("expected an integer")
    return x


def _float(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError("expected a number")
    return float(x)


def _bool(x) -> bool:
    if not isinstance(x, bool):
        raise ValueError("expected true or false")
    return x


def _choice(allowed):
    def conv(x):
        if x not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return x
    return conv


def _positive(x) -> float:
    x = _float(x)
    if not math.isfinite(x) or x <= 0:
        raise ValueError("must be finite and > 0")
    return x


def _rho(x):
    """A dose > 0, or "free" (an unclamped cell; held as None, which is accepted again on a re-check)."""
    if x is None or x == FREE:
        return None
    if isinstance(x, str):
        raise ValueError(f'must be a number > 0 or "{FREE}"')
    return _positive(x)


def _fracs(x) -> tuple[float, ...]:
    if not isinstance(x, (list, tuple)) or not x:
        raise ValueError("each entry is a list of squared-norm shares, one per matrix")
    f = tuple(_positive(v) for v in x)
    if abs(sum(f) - 1.0) > 1e-6:
        raise ValueError("shares must sum to 1")
    return f


BLOCK_KEYS = ("regime", "steps", "train")
"""What only a [[grid]] block may give besides the axes: its regime's name (the `regime` column), its step
budget (budget.steps for its cells) and its [grid.train] (TrainConfig fields over the spec's [train])."""


def _check_train(where: str, table: dict) -> None:
    """A [train] table (the spec's, or a block's [grid.train]): known TrainConfig fields of the right type,
    none of them an axis or set by the engine."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in sorted(table):
        if k in AXES and k not in known:
            raise _err(f"{where}.{k}", "is an axis: give it at the top level (before [train]) or in [[grid]]")
        if k not in known:
            raise _err(f"{where}.{k}", "unknown TrainConfig field")
        if k in _NOT_IN_TRAIN:
            raise _err(f"{where}.{k}", "is set per cell or by the engine: give it as an axis (top level or "
                                       "[[grid]]), `seeds`, or [budget]")
        bad = _train_type_error(k, table[k])
        if bad:
            raise _err(f"{where}.{k}", bad)


def freeze(train: dict | None) -> str | None:
    """A block's [grid.train] as a hashable key (sorted JSON), None for none."""
    return json.dumps(train, sort_keys=True) if train else None


def _train_type_error(name: str, v) -> str | None:
    """Why v cannot be TrainConfig.<name> (by the type of its default), or None."""
    default = getattr(TrainConfig(), name)
    if isinstance(default, bool):
        ok, want = isinstance(v, bool), "true or false"
    elif isinstance(default, int) or (default is None and name == "clamp_from"):
        ok, want = _is_int(v), "an integer"
    elif isinstance(default, float) or (default is None and name == "lr"):
        ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(v, str), "a string"
    elif isinstance(default, tuple):
        ok, want = isinstance(v, (list, tuple)), "a list"
    else:
        return None
    return None if ok else f"expected {want}, got {v!r}"


def _per_model(name: str):
    """A per-model setting's converter, from its declaration (config.PerModel): the type of its default,
    then its rule."""
    meta, default = PER_MODEL_META[name], TrainConfig.__dataclass_fields__[name].default
    kind = _bool if isinstance(default, bool) else _choice(meta.choices) if meta.choices else \
        _int if meta.integer else _float

    def conv(x):
        x = kind(x)
        if not meta.ok(x):
            raise ValueError(f"must be {meta.rule}")
        return x
    return conv


_CONV = {"p": _int, "model": _choice(MODELS), "dtype": _choice(DTYPES), **{n: _per_model(n) for n in PER_MODEL},
         "rho": _rho, "norm_target": _positive, "tau": _positive, "layer_fracs": _fracs}


class _AxesMethods:
    """One product of settings (a spec's top level or one [[grid]] block); None means 'inherit' (from the
    spec's top level, then the defaults). A field per axis (AXES, each a tuple of values or None):
    p (moduli), model (`mlp` or `transformer`, stored as the `arch` column), dtype, every per-model setting
    (config.PER_MODEL: op, loss, lr, ...), rho (clamp doses, target = rho * w_c; None, "free" in TOML, is an
    unclamped cell), norm_target (absolute clamp targets instead of rho: no calibration), tau (> 0),
    layer_fracs (train.clamp_mode = "layer": squared-norm shares of the matrices, summing to 1); and seeds
    (models per cell: seed ids seed0 .. seed0 + seeds - 1, the same ids in every cell)."""

    def __post_init__(self) -> None:
        for name in AXES:
            v = getattr(self, name)
            if v is not None:
                v = _tuple(f"{self.where}.{name}", v, _CONV[name])
                twice = [x for i, x in enumerate(v) if x in v[:i]]
                if twice:                   # as `train --tau 1 1` is refused: a repeat is a typo, not a cell
                    x = FREE if twice[0] is None else list(twice[0]) if isinstance(twice[0], tuple) else twice[0]
                    raise _err(f"{self.where}.{name}", f"lists {x!r} more than once; give each value once")
                setattr(self, name, v)
        if self.seeds is not None and (isinstance(self.seeds, bool) or not isinstance(self.seeds, int)
                                       or self.seeds < 1):
            raise _err(f"{self.where}.seeds", f"must be an integer >= 1, got {self.seeds!r}")
        if self.regime is not None and (not isinstance(self.regime, str) or not self.regime.strip()):
            raise _err(f"{self.where}.regime", f"must be a non-empty string, got {self.regime!r}")
        if self.steps is not None:
            _steps(f"{self.where}.steps", self.steps)
        if self.train is not None:
            self.train = dict(_table(f"{self.where}.train", self.train))
            _check_train(f"{self.where}.train", self.train)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Axes":
        block = BLOCK_KEYS if where != "spec" else ()
        unknown = sorted(set(d) - set(AXES) - {"seeds", *block})
        if unknown:
            extra = f", and in a [[grid]] block {', '.join(BLOCK_KEYS)}" if where == "spec" else f", {', '.join(block)}"
            raise _err(f"{where}.{unknown[0]}", f"unknown key (axes are {', '.join(AXES)}, seeds{extra})")
        return cls(**d, where=where)

    def to_dict(self) -> dict:
        out = {}
        for name in (*AXES, "seeds", *BLOCK_KEYS):
            v = getattr(self, name)
            if v is not None:
                out[name] = [FREE if x is None else (list(x) if isinstance(x, tuple) else x) for x in v] \
                    if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
        return out


Axes = dataclasses.make_dataclass(
    "Axes", [*((name, "tuple | None", field(default=None)) for name in AXES),
             ("seeds", "int | None", field(default=None)),
             ("regime", "str | None", field(default=None)), ("steps", "int | None", field(default=None)),
             ("train", "dict | None", field(default=None)),
             ("where", str, field(default="spec", repr=False, compare=False))],
    bases=(_AxesMethods,), kw_only=True)
Axes.__module__, Axes.__doc__ = __name__, _AxesMethods.__doc__     # (make_dataclass's module= is 3.12+)


STUDY_BUDGET_RATIO = 137000 / 20000
"""The study's CE budgets: 137k steps at rho 1.15 against 20k at rho 1."""


@dataclass(kw_only=True)
class Budget:
    """Step budget per cell, growing with rho."""
    steps: int = 20000
    """Budget at rho <= 1 and for free cells."""
    rho_ref: float = 1.15
    steps_ref: int | None = None
    """Budget at rho_ref; the exponent k = ln(steps_ref / steps) / (rho_ref - 1) is fitted to the two.
    Default: the study's ratio (137k at 1.15 for 20k at rho 1) applied to `steps`."""
    max_steps: int | None = None
    """Cap on every budget (calibration and fork arms included); `--max-steps`."""

    def __post_init__(self) -> None:
        _steps("budget.steps", self.steps)
        if self.steps_ref is None:
            self.steps_ref = max(self.steps, round(self.steps * STUDY_BUDGET_RATIO))
            if self.steps_ref > MAX_STEPS:
                raise _err("budget.steps", f"{self.steps} is too large for the default budget.steps_ref (the study's "
                                           f"ratio, {STUDY_BUDGET_RATIO:g} x steps, is over 10^18); give steps_ref")
        _steps("budget.steps_ref", self.steps_ref)
        if self.max_steps is not None:
            _steps("budget.max_steps", self.max_steps)
        if isinstance(self.rho_ref, bool) or not isinstance(self.rho_ref, (int, float)) or not self.rho_ref > 1 \
                or not math.isfinite(self.rho_ref):
            raise _err("budget.rho_ref", f"must be a number > 1, got {self.rho_ref!r}")
        if self.steps_ref < self.steps:
            raise _err("budget.steps_ref", f"must be >= budget.steps ({self.steps}), got {self.steps_ref}")

    @property
    def k(self) -> float:
        return math.log(self.steps_ref / self.steps) / (self.rho_ref - 1.0)

    def at(self, rho: float | None) -> int:
        """The budget at rho; above MAX_STEPS (a large rho; the spec refuses it unless max_steps caps it)
        it is MAX_STEPS + 1 rather than an OverflowError."""
        s = self.steps
        if rho is not None and rho > 1.0:
            e = self.k * (rho - 1.0)
            s = int(round(self.steps * math.exp(e))) if e <= math.log(MAX_STEPS / self.steps) else MAX_STEPS + 1
        return min(s, self.max_steps) if self.max_steps else s


@dataclass(kw_only=True)
class Calibration:
    """The free control that sets w_c = median over seeds of ||W|| at grokking, per setting."""
    steps: int | None = None
    """Its budget (default budget.steps, capped by max_steps); it stops once every seed grokked."""
    seeds: int | None = None
    """Its models (default: the spec's seeds)."""
    w_c: float | None = None
    """Give w_c outright and skip the control runs."""

    def __post_init__(self) -> None:
        if self.steps is not None:
            _steps("calibration.steps", self.steps)
        if self.seeds is not None and (not _is_int(self.seeds) or self.seeds < 1):
            raise _err("calibration.seeds", f"must be an integer >= 1, got {self.seeds!r}")
        if self.w_c is not None:
            self.w_c = _scalar("calibration.w_c", self.w_c, _positive)


@dataclass(kw_only=True)
class Fork:
    """Same-state forks: each cell is a parent trained to `step`, then forked into arms."""
    step: int = 800
    arms: tuple[str, ...] = ("same", "raised", "lowered", "free")
    """Clamp targets N0 (same), factor * N0 (raised), N0 / factor (lowered), none (free); N0 = ||W|| at the fork."""
    factor: float = 1.15
    """> 1: the raised arm's target is above N0 and the lowered one's below (at 1 the arms are one; below 1
    they swap, and the lowered arm's budget, budget.at(1 / factor), grows past the parent's)."""

    def __post_init__(self) -> None:
        _steps("fork.step", self.step)
        self.arms = _tuple("fork.arms", self.arms, _choice(tuple(ARMS)))
        if len(set(self.arms)) != len(self.arms):
            raise _err("fork.arms", f"repeats an arm: {list(self.arms)}")
        self.factor = _scalar("fork.factor", self.factor, _positive)
        if self.factor <= 1.0:
            raise _err("fork.factor", f"must be > 1 (raised: factor x N0, lowered: N0 / factor), got {self.factor!r}")


@dataclass(kw_only=True)
class SlurmFields:
    """The SLURM executor's options (`--executor slurm`, grid/slurm.py): [engine] fields, each overridden by
    the CLI flag of the same name (--time-limit for time_limit). They never change a result."""
    partition: str | None = None
    """SLURM partition of the jobs (default: the cluster's default partition)."""
    time_limit: int | None = None
    """Minutes per array task (default: the partition's); at the limit a task checkpoints and requeues."""
    gpus_per_job: int | None = None
    """GPUs per array task (default: none)."""
    cpus_per_job: int | None = None
    """CPUs per array task (default: SLURM's, one); the task trains on that many threads."""
    array_parallelism: int | None = None
    """Array tasks running at once (default: submitit's, 256)."""
    batches_per_job: int | None = None
    """Batches per array task, trained one after another (default 1: one array task per batch)."""

    def check_slurm(self, name) -> None:
        """A ConfigError naming the field (name(field): engine.partition, --partition) for a bad value."""
        for f in dataclasses.fields(SlurmFields):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "partition":
                if not (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", v)):
                    raise _err(name(f.name), f"must be a partition name (letters, digits, '_', '.', '-'), got {v!r}")
                continue
            low = 0 if f.name == "gpus_per_job" else 1
            if not (_is_int(v) and low <= v <= 10**9):
                raise _err(name(f.name), f"must be an integer >= {low}, got {v!r}")


SLURM_FIELDS = tuple(f.name for f in dataclasses.fields(SlurmFields))


@dataclass(kw_only=True)
class Engine(SlurmFields):
    """How cells are packed and run (never changes a model's results)."""
    max_models: int | None = None
    """Cap on models per batch (default: only the memory budget limits a batch)."""
    memory_gb: float | None = None
    """Memory budget per device for one batch (default: half the GPU's memory, or 1/4 of RAM up to 8 GB)."""
    compact_frac: float = 0.5
    """Drop finished models from a batch at an evaluation once this fraction of it has finished; 0 = never.
    Each compaction recompiles the step for the new M (tens of seconds on a CPU), so it waits for half."""
    track: str | None = None
    """Track the grid in "wandb" or "tensorboard" (fastgrok/tracking.py); None: no tracking."""
    def __post_init__(self) -> None:
        self.check_slurm(lambda f: f"engine.{f}")
        if self.track is not None and self.track not in ("wandb", "tensorboard"):
            raise _err("engine.track", f"must be \"wandb\" or \"tensorboard\", got {self.track!r}")
        if self.max_models is not None and (not _is_int(self.max_models) or self.max_models < 1):
            raise _err("engine.max_models", f"must be an integer >= 1, got {self.max_models!r}")
        if self.memory_gb is not None:
            self.memory_gb = _scalar("engine.memory_gb", self.memory_gb, _positive)
        if isinstance(self.compact_frac, bool) or not isinstance(self.compact_frac, (int, float)) \
                or not 0.0 <= self.compact_frac <= 1.0:
            raise _err("engine.compact_frac", f"must be in [0, 1], got {self.compact_frac!r}")


_SECTIONS = {"budget": Budget, "calibration": Calibration, "fork": Fork, "engine": Engine}


@dataclass(kw_only=True)
class ExperimentSpec:
    name: str
    """Names the run directory (runs/<name>) and the `experiment` column."""
    description: str = ""
    seeds: int = 12
    """Models per cell unless a block says otherwise."""
    axes: Axes = field(default_factory=Axes)
    """Top-level axes: the defaults of every block."""
    grids: tuple[Axes, ...] = ()
    """The `[[grid]]` blocks; the cells are the union of their products."""
    train: dict = field(default_factory=dict)
    """TrainConfig fields shared by every cell (widths, eval_every, clamp_from, clamp_mode, compile, ...)."""
    budget: Budget = field(default_factory=Budget)
    calibration: Calibration = field(default_factory=Calibration)
    fork: Fork | None = None
    engine: Engine = field(default_factory=Engine)

    def __post_init__(self) -> None:
        if not _plain_name(self.name):     # it names the run directory: runs/<name>, never above or beside it
            raise _err("name", f"must be a plain file name (not '.' or '..', no '/', '\\' or control "
                               f"characters), got {self.name!r}")
        if len(os.fsencode(self.name)) > NAME_MAX:    # (runs/ itself was made before the error, and left)
            raise _err("name", f"is {len(os.fsencode(self.name))} bytes long; it names the run directory "
                               f"(runs/<name>), and a file name takes at most {NAME_MAX} bytes")
        if not isinstance(self.description, str):
            raise _err("description", f"must be a string, got {self.description!r}")
        if not _is_int(self.seeds) or self.seeds < 1:
            raise _err("seeds", f"must be an integer >= 1, got {self.seeds!r}")
        self.grids = tuple(self.grids)
        _check_train("train", self.train)
        ev = self.train.get("eval_every")
        if _is_int(ev) and ev >= 1 and "logit_every" not in self.train and \
                logit_every_for(ev) != TrainConfig.logit_every:     # as `train --eval-every N` adapts it
            self.train = {**self.train, "logit_every": logit_every_for(ev)}
        try:
            base = TrainConfig(**self.train)
        except ConfigError as e:
            raise _named(e, dict.fromkeys(self.train, "train"), "train") from None
        layer = base.clamp_mode == "layer"
        for b in self.blocks():
            _check_block(self, b, layer)
        arm_rho = (self.fork.factor,) if self.fork is not None else ()      # the raised arm's budget
        for rho in (*(r for b in self.blocks() for r in self.resolve(b, "rho")), *arm_rho):
            if self.budget.at(rho) > MAX_STEPS:
                raise _err("budget", f"the step budget at rho {rho:g} is over 10^18 (budget.steps x (steps_ref / "
                                     "steps) ^ ((rho - 1) / (rho_ref - 1))); lower rho or cap the budgets with "
                                     "budget.max_steps (--max-steps)")
        if self.fork is not None:
            if layer:
                raise _err("fork", "same-state forks clamp the total norm; train.clamp_mode must be 'total'")
            if self.fork.step % base.eval_every:
                raise _err("fork.step", f"{self.fork.step} is not a multiple of train.eval_every ({base.eval_every}): "
                                        "the arms would inherit an evaluation their own schedule does not have")
            for b in self.blocks():
                for rho in self.resolve(b, "rho"):
                    budget = self.budget.at(rho)
                    if self.fork.step >= budget:
                        raise _err("fork.step", f"{self.fork.step} is beyond the parent's budget of {budget} steps "
                                                f"(at rho {FREE if rho is None else rho}{', --max-steps' if self.budget.max_steps else ''})")

    # ---------------------------------------------------------------- axes
    def blocks(self) -> tuple[Axes, ...]:
        return self.grids or (Axes(where="spec"),)

    def resolve(self, block: Axes, name: str) -> tuple:
        """The values of one axis in a block: the block's, else the spec's, else the default. A block
        that gives norm_target (rho) drops an inherited rho (norm_target)."""
        if name == "rho" and block.norm_target is not None and block.rho is None:
            return (None,)
        if name == "norm_target" and block.rho is not None and block.norm_target is None:
            return (None,)
        for src in (block, self.axes):
            v = getattr(src, name)
            if v is not None:
                return v
        if name == "rho":
            return (None,)
        if name in ("norm_target", "layer_fracs"):
            return (None,)
        if name == "tau":
            return (1.0,)
        return (self.train.get(name, getattr(TrainConfig(), name)),)

    def block_seeds(self, block: Axes) -> int:
        return block.seeds or self.axes.seeds or self.seeds

    def products(self):
        """Yield (block index, dict of axis values) over every block's product, in order."""
        for i, b in enumerate(self.blocks()):
            vals = [self.resolve(b, n) for n in AXES]
            extra = {k: v for k, v in (("regime", b.regime), ("train", b.train), ("steps", b.steps)) if v}
            for combo in itertools.product(*vals):
                cell = dict(zip(AXES, combo), seeds=self.block_seeds(b), **extra)
                if cell["lr"] is None:                  # the study's lr for the cell's model
                    cell["lr"] = default_lr(cell["model"])
                yield i, cell

    def budget_at(self, rho: float | None, steps: int | None = None) -> int:
        """A cell's step budget: budget.at(rho), or with a block's own `steps` as budget.steps."""
        if steps is None:
            return self.budget.at(rho)
        return dataclasses.replace(self.budget, steps=steps, steps_ref=None).at(rho)

    def base_config(self, **shape) -> TrainConfig:
        """The TrainConfig of a batch: the spec's train fields and one shape (a block's [grid.train]
        fields among them)."""
        return TrainConfig(**{**self.train, **shape})

    @property
    def has_regimes(self) -> bool:
        """Whether a block names its regime (the results then carry a `regime` column)."""
        return any(b.regime for b in self.grids)

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentSpec":
        d = dict(d)
        kw = {}
        for k in ("name", "description", "seeds"):
            if k in d:
                kw[k] = d.pop(k)
        if "train" in d:
            kw["train"] = _table("train", d.pop("train"))
        for k, section in _SECTIONS.items():
            if k in d:
                sub = _table(k, d.pop(k))
                known = {f.name for f in dataclasses.fields(section)}
                bad = sorted(set(sub) - known)
                if bad:
                    raise _err(f"{k}.{bad[0]}", f"unknown key (known: {', '.join(sorted(known))})")
                kw[k] = section(**sub)
        grids = d.pop("grid", None)
        if grids is not None and not isinstance(grids, list):
            raise _err("grid", "must be an array of tables ([[grid]])")
        if grids == []:
            raise _err("grid", "is empty; give at least one [[grid]] block, or leave `grid` out to use the "
                               "top-level axes as the one product")
        grids = grids or []
        axes = {k: d.pop(k) for k in list(d) if k in AXES}
        if d:
            raise _err(sorted(d)[0], "unknown key (spec keys: name, description, seeds, train, budget, "
                                     f"calibration, fork, engine, grid, and the axes {', '.join(AXES)})")
        if "name" not in kw:
            raise _err("name", "missing")
        kw["axes"] = Axes.from_dict(axes, "spec")
        kw["grids"] = tuple(Axes.from_dict(_table(f"grid[{i}]", g), f"grid[{i}]") for i, g in enumerate(grids))
        return cls(**kw)

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "seeds": self.seeds, **self.axes.to_dict()}
        if self.train:
            out["train"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.train.items()}
        for k in _SECTIONS:
            sec = getattr(self, k)
            if sec is not None:
                out[k] = {f.name: (list(v) if isinstance(v, tuple) else v)
                          for f in dataclasses.fields(sec) if (v := getattr(sec, f.name)) is not None}
        if self.grids:
            out["grid"] = [g.to_dict() for g in self.grids]
        return out


def _plain_name(name) -> bool:
    """Whether name is one path component that stays where it is put (runs/<name>)."""
    return (isinstance(name, str) and name.strip() not in ("", ".", "..") and not any(c in name for c in "/\\")
            and all(ord(c) >= 32 and ord(c) != 127 for c in name))


def _table(where: str, v) -> dict:
    if not isinstance(v, dict):
        raise _err(where, f"must be a table, got {v!r}")
    return v


def _check_block(spec: ExperimentSpec, b: Axes, layer: bool) -> None:
    w = b.where
    rho_from = b.where if b.rho is not None else "spec" if spec.axes.rho is not None and b.norm_target is None \
        else None
    target_from = b.where if b.norm_target is not None else \
        "spec" if spec.axes.norm_target is not None and b.rho is None else None
    if rho_from and target_from:
        raise _err(f"{target_from}.norm_target", f"given together with {rho_from}.rho; a cell is clamped to "
                                                 "rho * w_c or to an absolute norm_target, not both")
    fracs = spec.resolve(b, "layer_fracs")
    if layer and None in fracs:
        raise _err(f"{w}.layer_fracs", "train.clamp_mode = 'layer' needs the shares of every matrix per cell")
    if not layer and fracs != (None,):
        raise _err(f"{w}.layer_fracs", "only applies with train.clamp_mode = 'layer'")
    own = b.train or {}
    if own and any(r is not None for r in spec.resolve(b, "rho")):
        raise _err(f"{w}.rho", "a clamped cell (rho) is calibrated with the spec's [train]; a block with its own "
                               "[grid.train] takes free cells or an absolute norm_target")
    if b.steps is not None:
        for rho in spec.resolve(b, "rho"):
            if spec.budget_at(rho, b.steps) > MAX_STEPS:
                raise _err(f"{w}.steps", f"the step budget at rho {rho:g} is over 10^18; lower steps or rho")
    for combo in itertools.product(*(spec.resolve(b, n) for n in CONFIG_AXES)):
        shape = dict(zip(CONFIG_AXES, combo))
        try:
            cfg = spec.base_config(**own, **shape)
        except ConfigError as e:
            src = {a: w if getattr(b, a) is not None else "spec" for a in CONFIG_AXES}
            raise _named(e, {**dict.fromkeys(spec.train, "train"), **dict.fromkeys(own, f"{w}.train"), **src},
                         w) from None
        if layer:
            from fastgrok.core.models import build_model
            n = build_model(cfg).layout.n_matrices
            for f in fracs:
                if len(f) != n:
                    raise _err(f"{w}.layer_fracs", f"{list(f)} has {len(f)} shares; the {cfg.model} has {n} matrices")


OVERRIDES = ("p", "seeds", "max_steps", "compile")


def apply_overrides(spec: ExperimentSpec, **overrides) -> ExperimentSpec:
    """The CLI's --p, --seeds, --max-steps, --compile: one modulus everywhere, seeds per cell, a cap on
    budgets, the step's compile setting (train.compile: part of the spec, so a resume keeps it)."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"overrides: unknown key(s) {', '.join(unknown)} (known: {', '.join(OVERRIDES)})")
    p, seeds, max_steps, compile_mode = (overrides.get(k) for k in OVERRIDES)
    if compile_mode is not None:
        spec = dataclasses.replace(spec, train={**spec.train, "compile": compile_mode})   # validated by the spec
    axes, grids, budget, cal = spec.axes, spec.grids, spec.budget, spec.calibration
    if p is not None:
        if not _is_int(p) or p < 2:
            raise _err("p", f"must be an integer >= 2, got {p!r}")
        axes = dataclasses.replace(axes, p=(p,))
        grids = tuple(dataclasses.replace(g, p=None) for g in grids)
    if seeds is not None:
        axes = dataclasses.replace(axes, seeds=None)
        grids = tuple(dataclasses.replace(g, seeds=None) for g in grids)
        cal = dataclasses.replace(cal, seeds=None)
    if max_steps is not None:
        _steps("max_steps", max_steps)
        budget = dataclasses.replace(budget, max_steps=min(max_steps, budget.max_steps or max_steps))
    return dataclasses.replace(spec, axes=axes, grids=grids, budget=budget, calibration=cal,
                               seeds=spec.seeds if seeds is None else seeds)


# ---------------------------------------------------------------- the built-in experiments
def load_spec(path: Path | str) -> ExperimentSpec:
    path = Path(path)
    if tomllib is None:
        raise ConfigError("reading TOML on Python 3.10 needs tomli (pip install tomli)")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a SPEC.toml (to resume a grid run, rerun the command that "
                          "started it: the same experiment and --out)")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no spec file {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return ExperimentSpec.from_dict(d)


def load_experiment(experiment) -> ExperimentSpec:
    """A built-in name (`fastgrok experiments`), a path to a SPEC.toml, or an ExperimentSpec."""
    if isinstance(experiment, ExperimentSpec):
        return experiment
    s = str(experiment)
    if (SPEC_DIR / f"{s}.toml").exists() and not s.endswith(".toml"):
        return load_spec(SPEC_DIR / f"{s}.toml")
    if s.endswith(".toml") or Path(s).exists():
        return load_spec(s)
    names = ", ".join(n for n, _ in list_experiments())
    raise ConfigError(f"experiment: unknown name {s!r} (built-in: {names}; or give a path to a SPEC.toml)")


EXPERIMENTS = ("mediation", "collapse", "dose", "mse", "float64", "samestate", "alloc", "transformer", "phase",
               "interventions", "atlas")


def list_experiments() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in experiment, in the study's order."""
    return [(n, load_spec(SPEC_DIR / f"{n}.toml").description) for n in EXPERIMENTS]


def to_toml(d: dict) -> str:
    """A spec dict (`ExperimentSpec.to_dict()`) as TOML text that `load_spec` reads back."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):      # JSON's escapes (\" \\ \n \uXXXX) are TOML basic-string escapes
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((f"[{k}]", v))
        elif k == "grid":
            tables += [("[[grid]]", g) for g in v]
        else:
            lines.append(f"{k} = {val(v)}")
    for head, t in tables:
        lines += ["", head] + [f"{k} = {val(v)}" for k, v in t.items() if not isinstance(v, dict)]
        for k, v in t.items():
            if isinstance(v, dict):         # a block's [grid.train]: after its block's keys
                lines += [f"[{head.strip('[]')}.{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
