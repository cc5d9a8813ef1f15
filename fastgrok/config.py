"""Typed run configuration, validated on construction.

Every field has a docstring-style comment; `__post_init__` raises `ConfigError` naming the field and the
bad value, which the CLI prints as one line (exit code 2). `asdict(cfg)` is saved with every run.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from dataclasses import dataclass, field

OP_HELP = {"add": "a + b mod p", "sub": "a - b mod p", "mul": "a * b mod p", "div": "a / b mod p (p prime)",
           "quad": "a^2 + ab + b^2 mod p", "cubic": "a^3 + ab mod p", "perm": "composition in S_n, p = n! (S5: 120)",
           "random": "a fixed random table (control)"}
OPS = tuple(OP_HELP)
"""The tasks, each a binary operation on p symbols given as a p x p table (data.op_table): a + b, a - b,
a * b, a / b mod p (div: p prime, b = 0 in neither split); quad = a^2 + ab + b^2 and cubic = a^3 + ab mod p
(Power et al. 2022); perm = composition in the permutation group S_n, p = n! symbols (S5: p = 120);
random = a fixed random table (seeded by p: nothing to generalize, a control)."""
MODELS = ("mlp", "transformer")
LOSS_INFO = {"ce": ("CE", "softmax cross-entropy on z/tau, the study's"),
             "mse": ("MSE", "sum over classes of (z/tau - onehot)^2, the study's control"),
             "stablemax": ("StableMax", "Prieto et al. 2025's StableMax cross-entropy on z/tau")}
"""Each loss: its label in tables and figures, and what it is (the CLI's help). Its code in the kernels is
kernels.LOSS_KINDS (a test holds the two lists of names equal)."""
LOSSES = tuple(LOSS_INFO)
OPTIMIZER_INFO = {
    "adamw": "the study's AdamW (decoupled decay on the matrices, after the Adam update)",
    "adam": "torch.optim.Adam: coupled L2 decay, wd P added to the gradient of every parameter",
    "sgd": "torch.optim.SGD with --momentum (dampening 0, not Nesterov), coupled L2 decay on every parameter",
    "muon": "Muon (Keller Jordan) on the hidden matrices at --muon-lr with --momentum, torch's AdamW on the rest"}
"""Each optimizer (core.optim) and what it is (the CLI's help)."""
OPTIMIZERS = tuple(OPTIMIZER_INFO)
DTYPES = ("float32", "float64")
DTYPE_MAX = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}
"""The largest finite value of each dtype (torch.finfo(...).max; here without importing torch)."""
DEVICES = ("auto", "cpu", "cuda")
KERNELS = ("auto", "triton", "torch")
CLAMP_MODES = ("total", "layer")
COMPILE = ("auto", "on", "off")
INITS = ("model", "study", "prieto")
MLP_INPUTS = ("embed", "onehot")
MLP_ACTS = ("gelu", "relu")
STUDY_MLP = {"mlp_input": "embed", "mlp_layers": 1, "mlp_act": "gelu", "mlp_bias": True}
"""The peers' MLP fields (issue 30) at the study's MLP, and the value every run saved before them had: at
these the MLP is the study's table-form, hand-written one (core.models.MLP), bit for bit."""


class ConfigError(ValueError):
    """A user mistake in a configuration; the message names the field and the value."""


MAX_SEED = 2**63 - 1
"""Largest seed a model may use: `torch.Generator.manual_seed` takes 64-bit integers, and results keep seeds
in int64 columns. A model's split generator is seeded 1000 + seed (data.py), so seed0 + seeds - 1 + 1000
must not exceed it."""
SPLIT_SEED_OFFSET = 1000

MAX_STEPS = 10**18
"""Largest step count or period (steps, eval_every, logit_every, checkpoint_every, clamp_from, a spec's
budgets): steps are held in int64 tensors and arrays (at most 9.2e18), and a sum of a few such counts must
not overflow either. A larger value is refused in one line."""



# ---------------------------------------------------------------------------------------------
# Per-model settings: declared once, as TrainConfig fields made with `per_model(...)`
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerModel:
    """What a per-model setting is beyond its TrainConfig field: the metadata from which its validation,
    CLI flag (`--init-scale`), spec axis (`init_scale = [...]`), packing into one batch, result column and
    calibration key all derive. Each model of a batch holds its own value; several values make cells."""
    rule: str
    """The valid values in words, for errors: "finite and > 0"."""
    ok: object
    """One value -> valid? (type and range; relations with other fields are TrainConfig's own checks)."""
    help: str
    """The CLI flag's help."""
    choices: tuple = ()
    """The allowed values of a text setting."""
    added: bool = False
    """A field added after runs were saved without it: its default is the value such runs had
    (`with_defaults`), and at that value it is left out of their fingerprints (`without_defaults`)."""
    integer: bool = False
    """An integer setting (the CLI parses its values as integers)."""
    axis_added: bool = False
    """Made per model after grids were run: the calibration keys (grid.plan.calib_key) and results tables
    (store.with_added_columns) of such runs lack it, so a key names it only off its default and an old
    table reads with its default. True for every field `added`; also for a field saved all along that
    became per model later (as eps would)."""


def per_model(default, *, rule: str, ok, help: str, choices: tuple = (), added: bool = False,
              axis_added: bool | None = None, integer: bool = False):
    """A TrainConfig field holding one value per model (or several: cells), with its PerModel metadata
    (axis_added: `added` unless given)."""
    meta = PerModel(rule, ok, help, choices, added, integer, added if axis_added is None else axis_added)
    return field(default=default, metadata={"per_model": meta})


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


TF_CONVENTIONS = {"tf_tokens": ("a b =", "a op b ="), "tf_unembed": ("p", "vocab"), "tf_act": ("gelu", "relu"),
                  "tf_bias": ("none", "mlp", "all"), "tf_block": ("pre", "lee"),
                  "tf_init": ("fastgrok", "nanda", "torch")}
"""The transformer's conventions (TrainConfig's tf_* fields) and their values, the first the default (fastgrok's
own model, and the value of every run saved before them: `with_defaults` fills it in, `without_defaults`
leaves it out of fingerprints)."""
TF_PRESETS = {"nanda": dict(tf_tokens="a b =", tf_unembed="vocab", tf_act="relu", tf_bias="mlp", tf_init="nanda",
                            layernorm=False, n_layers=1, d_model=128, n_heads=4, d_mlp=512),
              "lee": dict(tf_tokens="a op b =", tf_unembed="vocab", tf_act="gelu", tf_bias="all", tf_block="lee",
                          tf_init="torch", layernorm=True, n_layers=2, d_model=128, n_heads=4, d_mlp=512)}
"""The peers' transformers as TrainConfig fields: Nanda et al.'s (progress-measures-paper's transformers.py)
and Lee et al.'s (ironjr/grokfast's main.py Decoder). docs/training.md lists what differs."""
ADDED_TF = {k: v[0] for k, v in TF_CONVENTIONS.items()}
ADDED_READOUTS = {"restricted_loss": False, "snapshots": 0, "snapshot_cap_gib": 2.0}
"""Fields added since that change what is recorded, not how a model trains (not axes, no calibration of
their own), and the value a run saved before them had; `with_defaults` and `without_defaults` treat them
as the per-model settings added since (ADDED_DEFAULTS)."""


def n_pairs_of(p: int, op: str) -> int:
    """Pairs of the task: p * p, or p * (p - 1) for div (b = 0 left out)."""
    return p * (p - 1) if op == "div" else p * p


def n_train_of(p: int, op: str, train_frac: float) -> int:
    """Train rows of a model: int(train_frac * its task's pairs), the study's rule."""
    return int(train_frac * n_pairs_of(p, op))


def with_defaults(d: dict) -> dict:
    """A saved config dict with the fields added since filled in (so an old run compares equal)."""
    return {**ADDED_DEFAULTS, **ADDED_READOUTS, **STUDY_MLP, **ADDED_TF, **d}


def without_defaults(d: dict) -> dict:
    """A config dict less the added fields at their old value (fingerprints of old runs stay valid)."""
    added = {**ADDED_DEFAULTS, **ADDED_READOUTS, **STUDY_MLP, **ADDED_TF}
    return {k: v for k, v in d.items() if not (k in added and v == added[k])}


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(math.isqrt(n)) + 1))


def symmetric_group_degree(p: int) -> int | None:
    """n with n! = p (n >= 2), else None."""
    n, f = 2, 2
    while f < p:
        n += 1
        f *= n
    return n if f == p else None


def default_lr(model: str) -> float:
    """The study's learning rate: 1e-3 for the MLP, 5e-4 for the transformer."""
    return 5e-4 if model == "transformer" else 1e-3


def _default_clamp_from(loss: str, model: str) -> int:
    """The study's t_int: 500 for CE, 50 for MSE, 600 for the transformer."""
    if model == "transformer":
        return 600
    return 50 if loss == "mse" else 500


@dataclass(kw_only=True)
class TrainConfig:
    # --- task ---
    p: int = 59
    """Modulus; the task is `a op b mod p`, a p-way classification."""
    op: str | tuple[str, ...] = per_model(
        "add", choices=OPS, rule="one of " + ", ".join(OPS), ok=lambda v: v in OPS,
        help="task(s): " + "; ".join(f"{k}: {v}" for k, v in OP_HELP.items()) + "; several make cells")
    """One of add, sub, mul, div (div needs a prime p; pairs with b = 0 belong to neither split), or
    several (per-model: product cells)."""
    train_frac: float | tuple[float, ...] = per_model(
        0.4, rule="in (0, 1)", ok=lambda v: _number(v) and 0.0 < v < 1.0, help="train fraction(s); several make cells")
    """Fraction of the pairs in each model's training split, n_train = int(train_frac * n_pairs); several
    values make cells (models of one batch then hold different numbers of train rows)."""

    # --- model ---
    model: str = "mlp"
    """`mlp` (the study's 2-layer MLP) or `transformer` (1-layer, no biases)."""
    d_embed: int = 128
    """MLP: embedding width d (the input to W1 is 2d)."""
    hidden: int = 256
    """MLP: hidden width H."""
    d_model: int = 128
    """Transformer: residual width."""
    n_heads: int = 4
    """Transformer: attention heads."""
    n_layers: int = 1
    """Transformer: blocks."""
    d_mlp: int = 512
    """Transformer: MLP hidden width."""
    layernorm: bool = False
    """Transformer: LayerNorm before attention, MLP and unembedding."""
    # --- transformer conventions (the peers' transformers as settings: docs/training.md, "The peers'
    # transformers"); each default is fastgrok's own model, and a run saved before them had it ---
    tf_tokens: str = "a b ="
    """Transformer: the input sequence. `a b =` (vocabulary p + 1, "=" is token p; Nanda et al.) or
    `a op b =` (vocabulary p + 2, "=" is p, the op token p + 1; Lee et al.)."""
    tf_unembed: str = "p"
    """Transformer: the unembedding's outputs. `p` (the answers only) or `vocab` (a logit per token of the
    vocabulary, the softmax over all of them: Lee et al.'s p + 2, Nanda et al.'s p + 1)."""
    tf_act: str = "gelu"
    """Transformer: the MLP's activation, `gelu` (exact erf) or `relu` (Nanda et al.)."""
    tf_bias: str = "none"
    """Transformer: biases. `none`; `mlp` (b_in, b_out; Nanda et al.); `all` (also b_Q, b_K, b_V, b_O: Lee
    et al.'s nn.MultiheadAttention and nn.Linear). Biases are vectors: no decoupled decay, no clamp."""
    tf_block: str = "pre"
    """Transformer with LayerNorm: `pre` (x + f(LN(x))) or `lee` (Lee et al.'s Block: x = LN1(x), then
    x + attn(x), so the residual stream itself passes through LN1; the MLP's is pre-LN)."""
    tf_init: str = "fastgrok"
    """Transformer: initial weights. `fastgrok` (embeddings N(0, 1/d_model), the rest N(0, 1/fan_in));
    `nanda` (progress-measures-paper: every matrix N(0, 1/d_model), W_U N(0, 1/d_vocab)); `torch` (Lee et
    al.'s PyTorch defaults: embeddings N(0, 1), nn.Linear U(+-1/sqrt(fan_in)) with its bias alike,
    nn.MultiheadAttention's in-projection Xavier-uniform with zero biases)."""
    init: str = "model"
    """Initial weights: `model` draws each model from its own seed (its weights depend on its seed
    alone); `study` is the study's cell-level draw (one generator seeded with the cell's first seed draws
    all its seeds' matrices; the weights depend on the cell's seed0 and seed count); `prieto` is Prieto et
    al.'s code's draw for the one-hot MLP: one generator seeded with the model's seed draws its split
    (their random_split) and then every layer as torch's nn.Linear does, so split and weights are theirs
    seed for seed. See models.py."""

    # --- the peers' MLP (issue 30): shape fields, one value per batch; at STUDY_MLP the study's MLP ---
    mlp_input: str = "embed"
    """MLP input: `embed` (the study's: a shared embedding E of width d_embed for a and b, concatenated) or
    `onehot` (one-hot of a and of b concatenated, 2p inputs, Prieto et al.'s; no E, d_embed unused)."""
    mlp_layers: int = 1
    """MLP: hidden layers, each of width `hidden` (the study's: 1; Prieto et al.'s: 2)."""
    mlp_act: str = "gelu"
    """MLP: the hidden layers' activation, `gelu` (exact erf; the study's) or `relu` (Prieto et al.'s)."""
    mlp_bias: bool = True
    """MLP: a bias on every layer (the study's) or none (Prieto et al.'s)."""

    # --- cells and seeds ---
    seeds: int = 12
    """Models per cell; model s of a cell uses seed seed0 + s (init and split both derive from it)."""
    seed0: int = 0
    """First seed."""
    taus: tuple[float, ...] = (1.0,)
    """Temperatures; logits are divided by tau before the loss and the readouts."""
    norm_targets: tuple[float, ...] = ()
    """Clamp targets for the total matrix norm (absolute); empty means no clamp."""
    clamp_from: int | None = None
    """First step of the clamp (t_int); None means the study's default for the loss and model."""
    clamp_mode: str = "total"
    """`total` (one norm over all matrices) or `layer` (each matrix to its share, see layer_fracs)."""
    layer_fracs: tuple[float, ...] = ()
    """Per-layer clamp: the squared-norm share of each matrix (sums to 1); empty means the shares at
    the clamp's first step."""

    # --- optimisation ---
    steps: int = 20000
    """Budget of optimizer steps."""
    lr: float | tuple[float, ...] | None = per_model(
        None, rule="finite and > 0", ok=lambda v: _number(v) and v > 0,
        help="learning rate(s); several make cells (default: the study's, 1e-3 for the MLP, 5e-4 for the transformer)")
    """Adam's learning rate; None means the study's for the model (`learning_rate`); several make cells."""
    wd: float | tuple[float, ...] = per_model(
        1.0, rule="finite and >= 0", ok=lambda v: _number(v) and v >= 0, help="weight decay(s); several make cells")
    """Decoupled weight decay, on matrices only, applied after the Adam update; several make cells."""
    init_scale: float | tuple[float, ...] = per_model(
        1.0, rule="finite and > 0", ok=lambda v: _number(v) and v > 0, added=True,
        help="init scale(s) alpha: every initial matrix times alpha; several make cells")
    """Every matrix of the initial draw multiplied by this (Omnigrok's `initialization_scale`); several
    values make cells."""
    orthograd: bool | tuple[bool, ...] = per_model(
        False, rule="true or false", ok=lambda v: isinstance(v, bool), added=True,
        help="⊥Grad before AdamW (Prieto et al. 2025); alone: on; `off on` makes cells")
    """Prieto et al. 2025's ⊥Grad before AdamW: each parameter tensor's gradient loses its component along
    the weights, rescaled to the gradient's norm (optim.orthograd); both values make cells."""
    grokfast_alpha: float | tuple[float, ...] = per_model(
        0.98, rule="in [0, 1)", ok=lambda v: _number(v) and 0.0 <= v < 1.0, added=True,
        help="Grokfast-EMA decay (Lee et al. 2024)")
    """Grokfast-EMA's decay alpha (Lee et al. 2024; their algorithmic-data setting): h <- alpha h + (1 - alpha) g."""
    grokfast_lambda: float | tuple[float, ...] = per_model(
        0.0, rule="finite and >= 0", ok=lambda v: _number(v) and v >= 0, added=True,
        help="Grokfast-EMA gain; 0 = off")
    """Grokfast-EMA's gain lambda: g <- g + lambda h before AdamW; 0 is off (their algorithmic data: 2)."""
    loss: str | tuple[str, ...] = per_model(
        "ce", choices=LOSSES, rule="one of " + ", ".join(LOSSES), ok=lambda v: v in LOSSES,
        help="loss(es): " + "; ".join(f"{k}: {v[1]}" for k, v in LOSS_INFO.items()) + "; several make cells")
    """`ce` (cross-entropy on z/tau), `mse` (sum over classes of (z/tau - onehot)^2) or `stablemax`
    (Prieto et al. 2025's StableMax cross-entropy on z/tau); several make cells (one kernel launch)."""
    label_noise: float | tuple[float, ...] = per_model(
        0.0, rule="in [0, 1)", ok=lambda v: _number(v) and 0.0 <= v < 1.0, added=True,
        help="label-noise fraction(s): that share of each model's train labels replaced by random ones; several make cells")
    """The fraction of a model's train labels replaced by labels uniform over the p classes, drawn from its
    own split generator after its split (data.make_task); test labels untouched; 0 is off."""
    beta1: float | tuple[float, ...] = per_model(
        0.9, rule="in [0, 1)", ok=lambda v: _number(v) and 0.0 <= v < 1.0, added=False, axis_added=True,
        help="Adam's beta1 (first-moment decay); several make cells")
    """Adam's first-moment decay (AdamW, Adam, Muon's AdamW part); several make cells."""
    beta2: float | tuple[float, ...] = per_model(
        0.999, rule="in [0, 1)", ok=lambda v: _number(v) and 0.0 <= v < 1.0, added=False, axis_added=True,
        help="Adam's beta2 (second-moment decay); several make cells")
    """Adam's second-moment decay; several make cells (Lee et al.'s Grokfast runs: 0.98)."""
    eps: float | tuple[float, ...] = per_model(
        1e-8, rule="finite and > 0", ok=lambda v: _number(v) and v > 0, added=False, axis_added=True,
        help="Adam's eps, added to sqrt(v); several make cells (Prieto et al.'s StableMax runs: 1e-25)")
    """Adam's eps, added to sqrt(v) (torch's placement); several make cells. Saved in every config all
    along (axis_added: calibration keys and results tables of before read it at 1e-8)."""
    optimizer: str | tuple[str, ...] = per_model(
        "adamw", choices=OPTIMIZERS, rule="one of " + ", ".join(OPTIMIZERS), ok=lambda v: v in OPTIMIZERS,
        added=True, help="optimizer(s): " + "; ".join(f"{k}: {v}" for k, v in OPTIMIZER_INFO.items())
        + "; several make cells (one batch)")
    """`adamw` (the study's), `adam` (torch.optim.Adam's coupled L2 decay), `sgd` (with `momentum`) or `muon`
    (Muon on the hidden matrices, AdamW on the rest; core.optim); several make cells, one batch, each
    optimizer's update computed for its own models only (docs/training.md)."""
    momentum: float | tuple[float, ...] = per_model(
        0.95, rule="in [0, 1)", ok=lambda v: _number(v) and 0.0 <= v < 1.0, added=True,
        help="momentum of sgd and muon (muon's reference: 0.95; torch's SGD without momentum: 0); several make cells")
    """SGD's momentum (torch's buffer) and Muon's (Nesterov); unused by adamw and adam."""
    muon_lr: float | tuple[float, ...] = per_model(
        0.02, rule="finite and > 0", ok=lambda v: _number(v) and v > 0, added=True,
        help="muon's lr on the hidden matrices (the reference's 0.02; --lr is its AdamW part's); several make cells")
    """Muon's learning rate on the matrices it orthogonalizes (the reference's 0.02); the other parameters
    take `lr` with AdamW. Unused by the other optimizers."""
    warmup: int | tuple[int, ...] = per_model(
        0, rule="an integer in [0, 10^18]", ok=lambda v: steps_problem(v, 0) is None, added=True, integer=True,
        help="linear lr warm-up over this many steps (Lee et al.: 10); 0 = off; several make cells")
    """A linear warm-up of the lr (and muon_lr) over this many steps, as torch's LambdaLR(min(u / W, 1))
    stepped after each optimizer step (core.optim.warmup: the first step at lr 0, step W + 1 at full lr);
    0 is off."""
    batch_size: int | None | tuple[int, ...] = per_model(
        None, rule="an integer >= 1 (none: full batch)", integer=True, added=True,
        ok=lambda v: v is None or (steps_problem(v, 1) is None),
        help="minibatch size(s): each model draws its own minibatches, reshuffled every epoch (default: full "
             "batch, the study's); several make cells")
    """Each model's minibatch size: at every step it trains on the next B of its own train rows, reshuffled
    each epoch by its own generator as a DataLoader with shuffle=True, drop_last=False would
    (train.minibatches); None is full batch (the study's). A step is one optimizer step on one minibatch,
    an epoch ceil(n_train / B) steps; `steps` and the evaluations count steps."""

    # --- readouts ---
    eval_every: int = 25
    """Evaluate train/test accuracy every this many steps."""
    logit_every: int = 200
    """Record the effective logit scale L every this many steps (a multiple of eval_every)."""
    mem_threshold: float = 0.99
    grok_threshold: float = 0.90
    stop_when_grokked: bool = True
    """Stop once every model has grokked (or diverged)."""
    restricted_loss: bool = False
    """Record Nanda et al. 2023's restricted and excluded losses on the embedding's key frequencies at every
    evaluation (the MLP on add; NaN otherwise; see progress.py). Off by default: it adds a third loss pass
    over the evaluation's logits."""

    # --- execution ---
    dtype: str = "float32"
    device: str = "auto"
    compile: str = "auto"
    """`auto` uses torch.compile where the benchmark measured it faster (the MLP), `on`, `off`."""
    kernels: str = "auto"
    """Loss/clamp implementation: `auto` (Triton on CUDA, PyTorch elsewhere), `triton`, `torch`."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (at the first evaluation at or after each
    multiple), on a stop signal, and at the end."""
    snapshots: int = 0
    """Keep each model's parameters at about this many log-spaced steps and at its T_mem and T_grok
    (DIR/snapshots/step_*.npz; the steps: snapshots.log_steps); 0 is off."""
    snapshot_cap_gib: float = 2.0
    """Refuse a run whose snapshots could take more than this (GiB): (snapshots + 2) x M x P x bytes."""

    def __post_init__(self) -> None:
        self.taus = tuple(float(t) for t in self.taus)
        self.norm_targets = tuple(float(t) for t in self.norm_targets)
        self.layer_fracs = tuple(float(t) for t in self.layer_fracs)
        for name, meta in PER_MODEL_META.items():       # each value of each per-model setting, by its rule
            setattr(self, name, _one_or_many(name, getattr(self, name)))
            for v in self.values(name):
                if not meta.ok(v):
                    raise ConfigError(f"{name} must be {meta.rule}, got {v!r}")
        _choice("model", self.model, MODELS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("kernels", self.kernels, KERNELS)
        _choice("clamp_mode", self.clamp_mode, CLAMP_MODES)
        _choice("compile", self.compile, COMPILE)
        _choice("init", self.init, INITS)
        _choice("mlp_input", self.mlp_input, MLP_INPUTS)
        _choice("mlp_act", self.mlp_act, MLP_ACTS)
        if isinstance(self.mlp_layers, bool) or not isinstance(self.mlp_layers, int) or self.mlp_layers < 1:
            raise ConfigError(f"mlp_layers must be an integer >= 1 (hidden layers), got {self.mlp_layers!r}")
        if not isinstance(self.mlp_bias, bool):
            raise ConfigError(f"mlp_bias must be true or false, got {self.mlp_bias!r}")
        if self.init == "prieto" and (self.model != "mlp" or self.mlp_input != "onehot"):
            raise ConfigError("init 'prieto' (Prieto et al.'s draw: their split, then torch's nn.Linear init) needs "
                              f"the one-hot MLP (model mlp, mlp_input onehot), got model {self.model!r}, "
                              f"mlp_input {self.mlp_input!r}")
        for name, allowed in TF_CONVENTIONS.items():
            _choice(name, getattr(self, name), allowed)
        if self.tf_block != "pre" and not self.layernorm:
            raise ConfigError(f"tf_block {self.tf_block!r} passes the residual stream through LayerNorm: it needs "
                              f"layernorm (--layernorm)")
        if self.restricted_loss and self.model == "transformer" and self.tf_unembed != "p":
            raise ConfigError("restricted_loss reads p logits a row: it needs tf_unembed 'p', got "
                              f"{self.tf_unembed!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 2:
            raise ConfigError(f"p must be an integer >= 2, got {self.p!r}")
        for op in self.values("op"):
            if op == "div" and not is_prime(self.p):
                raise ConfigError(f"op 'div' needs a prime p, got p={self.p}")
            if op == "perm" and symmetric_group_degree(self.p) is None:
                raise ConfigError(f"op 'perm' needs p = n! symbols (6, 24, 120 for S3, S4, S5), got p={self.p}")
        for f in self.values("train_frac"):
            for op in self.values("op"):
                n, n_train = n_pairs_of(self.p, op), n_train_of(self.p, op, f)
                if n_train < 1 or n_train >= n:
                    raise ConfigError(f"train_frac={f} leaves an empty train or test set at p={self.p}"
                                      + (f" (op {op})" if op == "div" else ""))
        if not self.taus:
            raise ConfigError("taus must hold at least one temperature")
        for t in self.taus:
            if not math.isfinite(t) or t <= 0:
                raise ConfigError(f"tau must be finite and > 0, got {t!r}")
        for t in self.norm_targets:
            if not math.isfinite(t) or t <= 0:
                raise ConfigError(f"norm target must be finite and > 0, got {t!r}")
        if self.seed0 < 0:
            raise ConfigError(f"seed0 must be >= 0, got {self.seed0!r}")
        for name, lo in (("steps", 1), ("eval_every", 1), ("logit_every", 1), ("checkpoint_every", 1),
                         ("clamp_from", 0)):
            problem = steps_problem(getattr(self, name), lo) if getattr(self, name) is not None else None
            if problem:                         # (clamp_from None: the study's default)
                raise ConfigError(f"{name} {problem}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds!r}")
        top = MAX_SEED - SPLIT_SEED_OFFSET - (self.seeds - 1)
        if self.seed0 > top:
            raise ConfigError(f"seed0 must be at most {top:,} with {self.seeds} seeds (seeds and their split "
                              f"generators, seeded 1000 + seed, are 64-bit integers), got {self.seed0!r}")
        for name in ("mem_threshold", "grok_threshold"):
            v = getattr(self, name)
            # an accuracy: above 1 (or nan) nothing could ever memorize or grok, and the run would say so
            # only by its empty T_mem/T_grok columns; at or below chance (1/p) every model would at step 0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1] (an accuracy), got {v!r}")
            if v <= 1.0 / self.p:
                raise ConfigError(f"{name} must be above chance, 1/p = {1.0 / self.p:.4g} at p = {self.p} (an "
                                  f"untrained model is that accurate: it would count at step 0), got {v!r}")
        for name in ("d_embed", "hidden", "d_model", "n_heads", "n_layers", "d_mlp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if isinstance(self.snapshots, bool) or not isinstance(self.snapshots, int) or self.snapshots < 0:
            raise ConfigError(f"snapshots must be an integer >= 0 (0: off), got {self.snapshots!r}")
        c = self.snapshot_cap_gib
        if _not_number(c) or not math.isfinite(c) or c <= 0:
            raise ConfigError(f"snapshot_cap_gib must be finite and > 0, got {c!r}")
        if self.logit_every % self.eval_every:
            raise ConfigError(f"logit_every ({self.logit_every}) must be a multiple of eval_every ({self.eval_every})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.restricted_loss, bool):
            raise ConfigError(f"restricted_loss must be true or false, got {self.restricted_loss!r}")
        if self.layer_fracs:
            if any(f <= 0 for f in self.layer_fracs) or abs(sum(self.layer_fracs) - 1.0) > 1e-6:
                raise ConfigError(f"layer_fracs must be positive and sum to 1, got {self.layer_fracs!r}")

    # --- derived ---
    def values(self, name: str) -> tuple:
        """The values of a per-model field (PER_MODEL) as a tuple; lr resolved to the model's default."""
        v = getattr(self, name)
        v = v if isinstance(v, tuple) else (v,)
        if name == "lr":
            v = tuple(default_lr(self.model) if x is None else x for x in v)
        return v

    @property
    def study_mlp(self) -> bool:
        """The study's MLP (model mlp, its peers' fields at STUDY_MLP): the table-form, hand-written one."""
        return self.model == "mlp" and all(getattr(self, k) == v for k, v in STUDY_MLP.items())

    @property
    def n_pairs(self) -> int:
        """Rows of the batch's task: every pair some model's op defines (p * p unless all ops are div)."""
        return max(n_pairs_of(self.p, op) for op in self.values("op"))

    @property
    def n_train(self) -> int:
        """The most train rows a model holds (a batch's train rows are padded to it)."""
        return max(n_train_of(self.p, op, f) for op in self.values("op") for f in self.values("train_frac"))

    @property
    def learning_rate(self):
        """The lr in effect: `lr`, or the study's for the model (1e-3 MLP, 5e-4 transformer); a tuple
        when several are given."""
        v = self.values("lr")
        return v[0] if len(v) == 1 else v

    def t_clamp_of(self, loss: str) -> int:
        """The clamp's first step for a model of this loss: clamp_from, else the study's default."""
        return _default_clamp_from(loss, self.model) if self.clamp_from is None else self.clamp_from

    @property
    def t_clamp(self) -> int:
        """The clamp's first step (several losses: the earliest of theirs)."""
        return min(self.t_clamp_of(loss) for loss in self.values("loss"))

    @property
    def cells(self) -> list[dict]:
        """The product of the per-model fields (PER_MODEL), taus and norm targets, in order (the first
        field outermost); norm_target None means unclamped."""
        targets = self.norm_targets or (None,)
        axes = [self.values(n) for n in PER_MODEL]
        return [{"cell": i, **dict(zip(PER_MODEL, vals)), "tau": t, "norm_target": r}
                for i, (*vals, t, r) in enumerate(itertools.product(*axes, self.taus, targets))]

    @property
    def n_models(self) -> int:
        return len(self.cells) * self.seeds

    def model_table(self) -> list[dict]:
        """One dict per model in batch order: model, cell, seed, its per-model fields, tau, norm_target."""
        rows = []
        for c in self.cells:
            for s in range(self.seeds):
                rows.append({"model": len(rows), "cell": c["cell"], "seed": self.seed0 + s,
                             **{k: c[k] for k in PER_MODEL}, "tau": c["tau"], "norm_target": c["norm_target"]})
        return rows

    def __eq__(self, other) -> bool:
        """Equal when they train alike: an lr left to its default equals that default given."""
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """All fields, the lr resolved (a saved run keeps its lr whatever later defaults say)."""
        return {**dataclasses.asdict(self), "lr": self.learning_rate}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        d = dict(d)
        for k in ("taus", "norm_targets", "layer_fracs", *PER_MODEL):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


PER_MODEL_META = {f.name: f.metadata["per_model"] for f in dataclasses.fields(TrainConfig) if "per_model" in f.metadata}
"""Each per-model setting's PerModel, in field order (the order a train run's cells are the product in)."""
PER_MODEL = tuple(PER_MODEL_META)
"""The per-model settings' names (op, train_frac, lr, wd, init_scale, ...), derived from the declarations."""
ADDED_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                  if "per_model" in f.metadata and f.metadata["per_model"].added}
"""Per-model settings added after runs were saved without them, and the value such a run had."""
AXIS_ADDED_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                       if "per_model" in f.metadata and f.metadata["per_model"].axis_added}
"""Per-model settings made per model after grids were run, and the value such runs had."""
GRID_AXES = ("p", "op", "model", "loss", "dtype", "lr", "wd", "train_frac",
             *(n for n in PER_MODEL if n not in ("op", "loss", "lr", "wd", "train_frac")))
"""The TrainConfig fields a spec may make axes of, in the order a block's product runs (the last fastest):
the shape axes p, model, dtype and every per-model setting. The first eight keep the order specs were
expanded in before the others existed (so plans, cells and calibration keys of earlier runs stay the same);
a new per-model setting joins at the end, in field order."""


def logit_every_for(eval_every: int) -> int:
    """The logit-scale period for an evaluation period: the study's 200, rounded up to a multiple of
    eval_every (logit_every must be one). `train --eval-every N` and a spec's [train] eval_every use it
    when logit_every is not given."""
    return max(1, -(-200 // max(eval_every, 1))) * max(eval_every, 1)


def steps_problem(v, lo: int = 1) -> str | None:
    """What is wrong with v as a step count or period (an integer in [lo, MAX_STEPS]), or None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= MAX_STEPS:
        return f"must be an integer in [{lo}, 10^18], got {v!r}"
    return None


SMALL_TEST_SET = 20
"""Fewer test pairs than this: `train` and `run` warn that a test accuracy of 0.90 can come by chance."""


def small_test_set_warning(cfgs) -> str | None:
    """The warning for the smallest test set among the configs' models (their p, ops and train fractions),
    or None when every model has at least SMALL_TEST_SET test pairs."""
    n_test, p, frac, thr = min((n_pairs_of(c.p, o) - n_train_of(c.p, o, f), c.p, f, c.grok_threshold)
                               for c in cfgs for o in c.values("op") for f in c.values("train_frac"))
    if n_test >= SMALL_TEST_SET:
        return None
    return (f"only {n_test} test pair(s) at p = {p}, train fraction {frac:g}: test accuracy moves in steps of "
            f"1/{n_test}, so T_grok (test accuracy >= {thr:g}) can come by chance")


def tiny_tau_warning(taus, dtype: str) -> str | None:
    """The warning for temperatures so small that (1/tau)^2 overflows the dtype: the gradient of the loss in
    the logits grows as 1/tau, so Adam's second moment (the squared gradients) overflows and the model stops
    training; the step's divergence guard then marks it diverged (step.train_step). None when no tau is."""
    small = sorted(t for t in taus if t < DTYPE_MAX[dtype] ** -0.5)
    if not small:
        return None
    return (f"tau {', '.join(f'{t:g}' for t in small)} is so small that (1/tau)^2 overflows {dtype}: Adam's squared "
            "gradients overflow and such models stop training; they will be marked diverged")


def _not_number(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, float))


def _one_or_many(name: str, v):
    """A per-model field's value: a scalar, or a tuple of at least two distinct values (a list or tuple
    of one is that one)."""
    if not isinstance(v, (list, tuple)):
        return v
    if not v:
        raise ConfigError(f"{name} must hold at least one value")
    twice = [x for i, x in enumerate(v) if x in v[:i]]
    if twice:
        raise ConfigError(f"{name} lists {twice[0]!r} more than once; give each value once")
    if name == "lr" and None in v:
        raise ConfigError("lr: give numbers (None, the model's default, only alone)")
    return v[0] if len(v) == 1 else tuple(v)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


# --- presets: functions returning a config, variants via dataclasses.replace ---

def study_mlp_p59() -> TrainConfig:
    """The study's baseline cell: MLP, p = 59, 12 seeds, no clamp."""
    return TrainConfig()


def quick_cpu() -> TrainConfig:
    """A configuration that groks in seconds on a 2-core CPU (see README).

    p = 31, 4 seeds, a smaller MLP, lr 1e-2, train fraction 0.6. It runs eager (`--compile on` to
    override): a run this short does not repay a compilation (benchmarks/RESULTS.md)."""
    return TrainConfig(p=31, train_frac=0.6, lr=1e-2, seeds=4, steps=5000, d_embed=64, hidden=128, compile="off")


def prieto_mlp_p31() -> TrainConfig:
    """Prieto et al.'s StableMax run at p = 31: their one-hot MLP, split, init, Adam eps 1e-25, wd 0.

    Their MLP (one-hot input, two hidden ReLU layers of 200, no biases) with their draw (`init = "prieto"`),
    lr 0.01, wd 0, train fraction 0.8, StableMax, eps 1e-25, 35,000 steps, evaluated every 100, seeds 0-2;
    their code reaches test accuracy 0.90 at steps 24,300, 30,400, 22,000 (docs/fidelity.md)."""
    return TrainConfig(p=31, train_frac=0.8, lr=0.01, wd=0.0, loss="stablemax", eps=1e-25, seeds=3, steps=35000,
                       eval_every=100, logit_every=200, mlp_input="onehot", mlp_layers=2, hidden=200, mlp_act="relu",
                       mlp_bias=False, init="prieto", compile="off")


PRESETS = {"quick": quick_cpu, "study": study_mlp_p59, "prieto": prieto_mlp_p31}
