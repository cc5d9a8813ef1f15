"""The training step and the evaluation pass, each one function with no host synchronisation.

State (all tensors with leading axis M, living on the device):
    flat (M, P) parameters, m/v (M, P) Adam moments, t (M,) steps taken, alive (M,) bool
Per-model settings: tau (M,), lr and lr * wd (M, 1), target (M, S) clamp targets, clamp_on (M,) bool,
t_clamp (M,); each model's task (labels, train rows and their weights, test rows; data.py).

`train_step` = forward for all M models -> fused loss and dL/dz -> backward -> per-model gradient
transforms (⊥Grad, Grokfast-EMA) -> AdamW (or each model's optimizer and warm-up: `optimizer_update`)
-> clamp, with a
model that diverges frozen (alive = False) so the others are unaffected; the trainer records it as diverged
at its next evaluation. Diverged: its loss, its updated parameters or its updated Adam second moment v is
not finite. v overflows first (a gradient entry above ~1.8e19 in float32, whose square is past the dtype's
range): the update m / sqrt(v) is then 0 and the model stops training while its loss and parameters stay
finite (a tau of 1e-30: train loss 1e29, accuracy at chance, formerly not marked). A healthy run's v is
many orders of magnitude below that, so the check changes none of its numbers.
Nothing here calls .item() or .cpu(): metrics are read on the host only at evaluation steps.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field

import torch

import fastgrok.kernels as K
from fastgrok.kernels.reference import row_sum

from fastgrok.config import OPTIMIZERS, TrainConfig
from fastgrok.core.optim import adam, adamw, grokfast_ema, muon, orthograd, sgd, warmup
from fastgrok.core.measures import embedding, fourier_stats, matrix_norms, metric_names, restricted_excluded

EVAL_METRICS = ("train_loss", "train_acc", "test_acc", "sc_rate", "logit_scale", "weight_norm", "test_loss")
"""The base metrics every evaluation reads per model (the first columns of its result; test_loss last, so
the others keep their places in checkpoints written before it). `eval_metrics` adds the progress measures."""
N_EVAL = len(EVAL_METRICS)


def eval_metrics(model, cfg: TrainConfig) -> tuple[str, ...]:
    """The columns of `evaluate`'s result: EVAL_METRICS, then the progress measures (progress.py): Fourier
    sparsity and key_freq_1..5 of the embedding, norm_<X> for each matrix of the model's layout, and with
    cfg.restricted_loss the restricted and excluded losses. Appended at the end, so a checkpoint written
    before them restores with NaN there."""
    return EVAL_METRICS + metric_names(model, cfg.restricted_loss)


def _without_model_axis(ndim: int, **kw):
    """A Batch field with no model axis when it has ndim dimensions: shared by every model, kept whole by
    train.state.select_batch (every other tensor field is selected along its first axis, the model axis)."""
    return field(metadata={"no_model_axis_ndim": ndim}, **kw)


def has_model_axis(f, value: torch.Tensor) -> bool:
    """Whether Batch field f (a dataclasses.Field), holding value, has the leading model axis."""
    return value.dim() != f.metadata.get("no_model_axis_ndim")


@dataclass
class Batch:
    """Everything per-model the step reads, on the device."""
    train_a: torch.Tensor   # (M, n_train)
    train_b: torch.Tensor
    train_y: torch.Tensor
    a: torch.Tensor = _without_model_axis(1)    # (N,) all pairs
    b: torch.Tensor = _without_model_axis(1)
    y: torch.Tensor = _without_model_axis(1)    # (N,), or (M, N) when the models' ops differ
    train_mask: torch.Tensor  # (M, N) bool
    test_mask: torch.Tensor   # (M, N) bool
    tau: torch.Tensor       # (M,)
    lr: torch.Tensor        # (M, 1) learning rates
    lr_wd: torch.Tensor | None  # (M, 1) lr * wd (formed in float64); None when no model decays
    clamp_on: torch.Tensor  # (M,) bool
    t_clamp: torch.Tensor   # (M,) int64
    kind: torch.Tensor | None = None          # (M,) each model's loss code (kernels.LOSS_KINDS); None = cfg.loss
    orthograd: torch.Tensor | None = None     # (M,) bool: ⊥Grad on; None = no model uses it
    gf_alpha: torch.Tensor | None = None      # (M, 1) Grokfast-EMA decay; None = no model uses Grokfast
    gf_lambda: torch.Tensor | None = None     # (M, 1) Grokfast-EMA gain (0 = off)
    beta1: torch.Tensor | None = None         # (M,) float64 Adam's beta1; None = every model the config's
    beta2: torch.Tensor | None = None         # (M,) float64 Adam's beta2; None = every model the config's
    eps: torch.Tensor | None = None           # (M,) float64 Adam's eps; None = every model the config's
    # the peers' optimizers and warm-up (optimizer_update): all None when every model runs the study's
    # AdamW without warm-up (today's code path, bit for bit)
    optimizer: torch.Tensor | None = None     # (M,) int64 index into config.OPTIMIZERS
    opt_groups: tuple | None = None           # ((name, rows (K,) int64 or None = all), ...): `optimizer_groups`
    lr64: torch.Tensor | None = None          # (M,) float64 lr, wd, momentum, muon lr, warm-up steps (int64)
    wd64: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    muon_lr: torch.Tensor | None = None
    warmup: torch.Tensor | None = None        # None also when no model warms up
    mb_idx: torch.Tensor | None = None        # (M, B) int64 this step's minibatch: indices into each model's
    mb_weight: torch.Tensor | None = None     # train rows, and False on padding (train.minibatches); None = full batch
    train_weight: torch.Tensor | None = None  # (M, n_train) bool, False on padding; None = no padding
    valid: torch.Tensor | None = None         # (M, N) bool, the pairs of each model's task; None = all
    plan: dict | None = None  # the model's index plan for the train rows (`ensure_plan`), else None
    # (R, T) Adam's bias corrections, a row per distinct beta (optim.bias_correction_table), shared by the models
    bias_table: torch.Tensor | None = _without_model_axis(2, default=None)
    bias_rows: torch.Tensor | None = None     # (M, 2) int64 each model's rows for its beta1, beta2; None: powers


def strict_float32() -> None:
    """float32 matrix products in full float32: no TF32 on CUDA, no reduced-precision oneDNN math on a
    CPU (`torch.set_float32_matmul_precision("highest")`, PyTorch's default, set again in case the
    process lowered it). The study's effect runs through softmax saturation: precision is not a knob."""
    if torch.get_float32_matmul_precision() != "highest":
        torch.set_float32_matmul_precision("highest")


def loss_name(cfg: TrainConfig, batch: Batch) -> str:
    """The kernels' `loss` argument: the config's one loss, or "ce" beside a per-model kind tensor."""
    return cfg.loss if batch.kind is None else "ce"


def make_lossfn(loss: str, backend: str, tau: torch.Tensor, mask=None, kind=None):
    """The fused loss for the models' logits: one loss for all (kind None), else each model's kind
    (with loss "ce": `loss_name`)."""

    def lossfn(z, y):
        return K.loss_and_grad(z, y, tau, mask, backend=backend, loss=loss, kind=kind, check_kind=False)
    return lossfn


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(M,) whether every entry of each row of x (M, P) is finite: its row maximum and minimum are (a NaN
    propagates into both, +inf into the maximum, -inf into the minimum). The same mask as
    isfinite(x).all(1) from two reductions without an (M, P) temporary (faster on a CPU: RESULTS.md)."""
    return torch.isfinite(x.amax(1)) & torch.isfinite(x.amin(1))


def adam_hyper(cfg: TrainConfig, batch: Batch) -> dict:
    """beta1, beta2, eps for the optimizer: each the config's float (the study's code path) unless the
    batch holds per-model values ((M,) float64, which give a model the same bits as its float alone)."""
    return {k: getattr(cfg, k) if getattr(batch, k) is None else getattr(batch, k) for k in ("beta1", "beta2", "eps")}


def bias_of(batch: Batch, sel=lambda x: x):
    """The optimizers' `bias` argument: the batch's bias-correction table and its models' rows (sel: the
    rows of one optimizer's models), or None."""
    return None if batch.bias_table is None else (batch.bias_table, sel(batch.bias_rows))


def optimizer_groups(codes: list[int], device) -> tuple:
    """The models of each optimizer: ((name, rows), ...) in OPTIMIZERS order, rows None when one optimizer
    holds the whole batch (no selection), else (K,) int64 on the device."""
    present = sorted(set(codes))
    if len(present) == 1:
        return ((OPTIMIZERS[present[0]], None),)
    return tuple((OPTIMIZERS[c], torch.tensor([i for i, x in enumerate(codes) if x == c], dtype=torch.int64,
                                              device=device)) for c in present)


def optimizer_update(model, cfg: TrainConfig, batch: Batch, flat, grad, m, v, t_new):
    """Each model's update by its own optimizer (core.optim) at its lr (warmed up where it has a warm-up):
    every optimizer runs on its own models only (index_select on the model axis, its rows put back with
    index_copy; one optimizer alone runs on the whole batch), so a model's bits are its solo run's.
    Hyperparameters are (M,) float64, rounded inside the optimizers as the scalar code rounds a float.
    adamw decays the matrices (the study's); adam, sgd and muon decay every parameter, as torch does."""
    lr = batch.lr64 if batch.warmup is None else warmup(batch.lr64, t_new, batch.warmup)
    mlr = batch.muon_lr if batch.warmup is None else warmup(batch.muon_lr, t_new, batch.warmup)
    hyper, P = adam_hyper(cfg, batch), flat.shape[1]
    outs = []
    for name, rows in batch.opt_groups:
        def sel(x):
            return x if rows is None or not isinstance(x, torch.Tensor) else x.index_select(0, rows)
        h = {k: sel(x) for k, x in hyper.items()}
        wd = sel(batch.wd64) if batch.lr_wd is not None else None       # None: no model decays
        args = (sel(flat), sel(grad), sel(m), sel(v), sel(t_new))
        bias = bias_of(batch, sel)
        if name == "adamw":
            lr_wd = None if wd is None else (sel(lr) * wd)[:, None].to(flat.dtype)
            out = adamw(*args, lr=sel(lr)[:, None].to(flat.dtype), lr_wd=lr_wd, n_mat=model.layout.n_mat,
                        bias=bias, **h)
        elif name == "adam":
            out = adam(*args, lr=sel(lr), wd=wd, n_decay=P, bias=bias, **h)
        elif name == "sgd":
            out = sgd(*args, lr=sel(lr), momentum=sel(batch.momentum), wd=wd, n_decay=P)
        else:
            out = muon(*args, lr=sel(lr), muon_lr=sel(mlr), momentum=sel(batch.momentum), wd=wd,
                       mats=model.layout.spans(model.hidden), n_decay=P, bias=bias, **h)
        if rows is None:
            return out
        outs.append((rows, out))
    res = [torch.empty_like(x) for x in (flat, m, v)]
    for rows, out in outs:
        res = [r.index_copy(0, rows, o) for r, o in zip(res, out)]
    return tuple(res)


def train_step(model, cfg: TrainConfig, backend: str, state: dict, batch: Batch) -> torch.Tensor:
    """One optimizer step for all M models, in place on `state`. Returns the train loss (M,)."""
    flat, m, v, t, alive = state["flat"], state["m"], state["v"], state["t"], state["alive"]
    # forward, fused loss with readouts, backward (hand-written for the MLP, autograd otherwise)
    if batch.mb_idx is None:                    # full batch: every train row (the study's)
        a, b, y, w = batch.train_a, batch.train_b, batch.train_y, batch.train_weight
        kw = {} if batch.plan is None else {"plan": batch.plan}
    else:                                       # each model's minibatch of its train rows
        a, b, y = (torch.gather(x, 1, batch.mb_idx) for x in (batch.train_a, batch.train_b, batch.train_y))
        w, kw = batch.mb_weight, {}
    lossfn = make_lossfn(loss_name(cfg, batch), backend, batch.tau, w, batch.kind)
    loss, grad, _ = model.loss_and_grads(flat, a, b, y, lossfn, **kw)
    # gradient transforms, per model: ⊥Grad, then Grokfast-EMA (its filter h is state, checkpointed)
    if batch.orthograd is not None:
        off = model.layout.offsets
        grad = orthograd(flat, grad, list(zip(off[:-1], off[1:])), batch.orthograd)
    if batch.gf_lambda is not None:
        grad, ema_new = grokfast_ema(grad, state["ema"], t, batch.gf_alpha, batch.gf_lambda)
    # AdamW (decay on matrices only)
    t_new = t + 1
    if batch.opt_groups is None:                # the study's AdamW, today's code
        new, m_new, v_new = adamw(flat, grad, m, v, t_new, lr=batch.lr, lr_wd=batch.lr_wd,
                                  n_mat=model.layout.n_mat, bias=bias_of(batch), **adam_hyper(cfg, batch))
    else:
        new, m_new, v_new = optimizer_update(model, cfg, batch, flat, grad, m, v, t_new)
    # divergence: a model whose loss, update or second moment is non-finite stops updating, the others go on
    # (v >= 0: its row maximum is finite iff every entry is, NaN included)
    ok = alive & torch.isfinite(loss) & finite_rows(new) & torch.isfinite(v_new.amax(1))
    keep = ok[:, None]
    flat.copy_(torch.where(keep, new, flat))
    m.copy_(torch.where(keep, m_new, m))
    v.copy_(torch.where(keep, v_new, v))
    if batch.gf_lambda is not None:
        state["ema"].copy_(torch.where(keep, ema_new, state["ema"]))
    t.copy_(torch.where(ok, t_new, t))
    alive.copy_(ok)
    # clamp: from step t_clamp on, each clamped model's matrix norm(s) set to its own target
    active = ok & batch.clamp_on & (t_new >= batch.t_clamp)
    K.clamp_flat_(flat, state["bounds"], state["target"], active, backend=backend)
    return loss


def evaluate(model, cfg: TrainConfig, backend: str, state: dict, batch: Batch, pass_fn=None) -> torch.Tensor:
    """All pairs through every model: (M, n) float64 of `eval_metrics(model, cfg)`. The caller syncs once to
    read it. pass_fn: `evaluate_pass` compiled (build_step_fns); the weights' readouts stay eager."""
    base, fourier, restricted = (pass_fn or functools.partial(evaluate_pass, model, cfg, backend))(state, batch)
    flat = state["flat"]
    if fourier is None:
        fourier, _ = fourier_stats(embedding(model, model.layout.views(flat)))
    return torch.cat([base, fourier, matrix_norms(model, flat)] + ([restricted] if cfg.restricted_loss else []), 1)


def evaluate_pass(model, cfg: TrainConfig, backend: str, state: dict, batch: Batch):
    """The pass over all pairs: (M, N_EVAL) float64 of EVAL_METRICS; with cfg.restricted_loss (MLP) also the
    Fourier columns whose key frequencies it uses, and (M, 2) the restricted and excluded losses (else None,
    None). Compiled with the step; `evaluate` adds the readouts of the weights alone (Fourier, norms), eager:
    a few small ops (~2.5 ms at p = 59, M = 12 on one CPU thread) that compiled cost ~1.5 s of compilation."""
    flat = state["flat"]
    z = model.logits(flat, batch.a, batch.b)                            # (M, N, V)
    mask = batch.train_mask
    loss, st = K.loss_and_stats(z, batch.y, batch.tau, mask, backend=backend,
                                loss=loss_name(cfg, batch), kind=batch.kind, check_kind=False)
    # the test loss: the mean of the same pass's per-row losses over each model's test rows
    wdt = st.row_loss.dtype
    test_w = batch.test_mask.to(wdt)
    test_loss = row_sum(st.row_loss * test_w) / test_w.sum(1).clamp_min(1.0)     # sums over rows: row_sum's
    # one order (a reduction compiled for M models can add them in another order than for one)
    f64 = torch.float64
    # the rates in float64: counts over counts, so an accuracy of exactly 0.9 (999 / 1110 at p = 43) is
    # 0.9 and passes the 0.90 threshold (in float32 it is 0.89999998 and would not)
    train = mask.to(f64)
    n_train = train.sum(1)
    test = batch.test_mask.to(f64)
    n_test = test.sum(1).clamp_min(1.0)
    bounds = state["bounds"]
    wn = flat[:, bounds[0]:bounds[-1]].to(wdt).square().sum(1).sqrt()
    if batch.valid is None:                                             # L: the mean over the model's pairs
        logit_scale = row_sum(st.logit_norm) / st.logit_norm.shape[1]
    else:
        v = batch.valid.to(wdt)
        logit_scale = row_sum(st.logit_norm * v) / v.sum(1)
    # (opt-in) the restricted and excluded losses of the MLP on a + b, at the embedding's key frequencies
    fourier = restricted = None
    if cfg.restricted_loss:
        if cfg.model == "mlp":
            fourier, key_freqs = fourier_stats(embedding(model, model.layout.views(flat)))
            r = restricted_excluded(z, batch.a, batch.b, batch.y, key_freqs, batch.tau, mask, batch.valid,
                                    backend=backend, loss=loss_name(cfg, batch), kind=batch.kind)
            restricted = torch.stack(r, 1)
        else:
            restricted = torch.full((flat.shape[0], 2), float("nan"), dtype=f64, device=flat.device)
    return torch.stack([
        loss.to(f64),
        (st.correct.to(f64) * train).sum(1) / n_train,
        (st.correct.to(f64) * test).sum(1) / n_test,
        (st.collapsed.to(f64) * train).sum(1) / n_train,
        logit_scale.to(f64),
        wn.to(f64),
        test_loss.to(f64),
    ], 1), fourier, restricted


def ensure_plan(model, batch: Batch) -> Batch:
    """Attach the model's index plan for the batch's train rows (once; rebuilt if the rows are replaced).

    The plan is the compiled step's (see models.MLP.plan); eager, the CPU step forms its flat row indices
    each step (a few (M, N) integer ops) and the CUDA step adds atomically."""
    if not hasattr(model, "plan") or batch.mb_idx is not None:     # (minibatches: rows change every step)
        return batch
    plan = batch.plan
    if plan is None or plan["a"] is not batch.train_a or plan["b"] is not batch.train_b:
        batch.plan = {**model.plan(batch.train_a, batch.train_b, batch.train_weight), "a": batch.train_a,
                      "b": batch.train_b}
    return batch


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """CPU runs: have glibc serve big blocks from the heap and keep what is freed (once per process).

    By default each step's (M, N, H) buffers are fresh mmaps that the kernel page-faults and zeroes on
    first touch, every step (~8k faults, ~10 ms of a 35 ms compiled step at p = 59, M = 12; more eager).
    Numerics are unchanged; the process keeps its peak heap. FASTGROK_KEEP_FREED_MEMORY=0 turns it off.
    """
    global _HEAP_KEPT
    off = os.environ.get("FASTGROK_KEEP_FREED_MEMORY") == "0"
    if _HEAP_KEPT or off or not sys.platform.startswith("linux"):
        return _HEAP_KEPT
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _HEAP_KEPT = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _HEAP_KEPT


QUICK_STEPS = 2000
"""compile "auto" on a CPU stays eager for runs of at most this many steps. Measured 2026-12-07 (one thread,
benchmarks/ensemble_vs_fastgrok.py, RESULTS.md): a cold compile of the p = 59 step and evaluation takes
~11 s (~9 s at M = 1) after inductor's one-off ISA probe (~14 s a process); compiled, a step saves ~43 ms
at M = 12 (46 vs 89 ms) but ~3 ms at M = 1 (3.3 vs 6.5): even at ~600 steps at M = 12, at ~7,000 at
M = 1. 2,000 was set when compiling cost ~45 s; it is kept between the two."""


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """`auto`: compile on CUDA, and on a CPU for runs of the study's MLP longer than QUICK_STEPS (measured
    faster there; the transformer was not, the peers' MLP, autograd as the transformer, not measured)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return device.type == "cuda" or (cfg.study_mlp and cfg.steps > QUICK_STEPS)


def build_step_fns(model, cfg: TrainConfig, backend: str, compile_step: bool):
    """(step, eval) callables over (state, batch); compiled when asked.

    The compiled step attaches the model's index plan to the batch, outside the compiled region. On a
    CPU, freed memory is kept in the heap (`keep_freed_memory`).
    """
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()
    step = functools.partial(train_step, model, cfg, backend)
    ev = functools.partial(evaluate, model, cfg, backend)
    if not compile_step:
        return step, ev
    inner = torch.compile(step, fullgraph=cfg.study_mlp, dynamic=False)
    ev = functools.partial(ev, pass_fn=torch.compile(functools.partial(evaluate_pass, model, cfg, backend),
                                                     fullgraph=cfg.study_mlp, dynamic=False))

    def compiled_step(state: dict, batch: Batch) -> torch.Tensor:
        return inner(state, ensure_plan(model, batch))
    return compiled_step, ev
