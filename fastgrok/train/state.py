"""The training state of one batch of models, built from (config, rows, device) with no run directory.

`build_state(cfg, table)` draws everything the step reads and updates: the task (each model's split),
the model, the per-model batch tensors (step.Batch) and the updated tensors (flat parameters, Adam's m
and v, step counts, the alive mask, clamp targets), with empty host-side Records. The Trainer runs its
loop over such a state; bench, benchmarks and a fork's arms build and use one directly.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

import fastgrok.kernels as K
from fastgrok.config import OPTIMIZERS, PER_MODEL, SPLIT_SEED_OFFSET, ConfigError, TrainConfig, default_lr, n_pairs_of
from fastgrok.core.data import PAD_ROWS, Task, make_task
from fastgrok.core.models import build_model
from fastgrok.core.optim import bias_correction_table
from fastgrok.core.step import Batch, eval_metrics, has_model_axis, optimizer_groups, strict_float32
from fastgrok.train.memory import check_fits
from fastgrok.train.minibatches import Minibatches

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""config.DTYPES as torch dtypes."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA device is available on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Records:
    """Host-side results so far (saved in checkpoints)."""
    steps: list            # evaluated steps
    evals: list            # (M, N_EVAL) numpy per evaluated step (NaN: the model had left the batch)
    t_mem: np.ndarray      # (M,) int, -1 = not yet
    t_grok: np.ndarray
    diverged: np.ndarray   # (M,) bool
    stop: np.ndarray | None = None   # (M,) int: the step a model stopped at, -1 = running

    def to_payload(self, n_metrics: int) -> dict:
        """The records as tensors (a checkpoint holds no other objects: store.load_checkpoint)."""
        M = len(self.t_mem)
        return {"steps": torch.as_tensor(np.asarray(self.steps, dtype=np.int64)),
                "evals": torch.from_numpy(np.stack(self.evals) if self.evals else np.zeros((0, M, n_metrics))),
                **{k: torch.from_numpy(np.asarray(getattr(self, k))) for k in ("t_mem", "t_grok", "diverged")},
                "stop": None if self.stop is None else torch.from_numpy(np.asarray(self.stop))}

    @classmethod
    def from_payload(cls, d: dict) -> "Records":
        return cls([int(s) for s in d["steps"].tolist()], list(d["evals"].numpy()),
                   *(d[k].numpy().copy() for k in ("t_mem", "t_grok", "diverged")),
                   None if d.get("stop") is None else d["stop"].numpy().copy())


def per_model_values(cfg: TrainConfig, table: list[dict]) -> dict[str, list]:
    """Each per-model field (config.PER_MODEL) as one value per table row: the row's, else the config's
    (which must then be one value). lr None is the model's default."""
    out = {}
    for name in PER_MODEL:
        default = cfg.values(name)
        vals = []
        for r in table:
            v = r.get(name)
            if v is None:
                if len(default) > 1:
                    raise ConfigError(f"table: model {r.get('model')} has no {name} and the config gives "
                                      f"several ({list(default)})")
                v = default[0]
            vals.append(v)
        out[name] = vals
    out["lr"] = [default_lr(cfg.model) if v is None else v for v in out["lr"]]
    return out


def _column(values: list[float], dtype, device) -> torch.Tensor:
    """(M, 1) per-model values, rounded once from float64."""
    return torch.tensor(values, dtype=torch.float64)[:, None].to(dtype).to(device)


def rows_config(cfg: TrainConfig, per: dict[str, list]) -> TrainConfig:
    """cfg with its per-model fields set to the values the rows use (`per_model_values`; validated as a
    config: a row's bad lr or fraction is a ConfigError; `n_train` is the batch's most train rows)."""
    return dataclasses.replace(cfg, **{k: tuple(dict.fromkeys(v)) for k, v in per.items()})


def kernel_backend(kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """The loss/clamp implementation for config.kernels on device (kernels.resolve_backend); kernels that
    cannot run here (no triton, float64 on Triton, ...) are a ConfigError, a user's mistake."""
    try:
        return K.resolve_backend(kernels, device, dtype)
    except K.BackendError as e:
        raise ConfigError(str(e)) from None


@dataclass
class TrainState:
    """One batch of M models, ready to train: what `build_state` draws. The step reads `batch` and
    updates `tensors` in place; `records` gathers what evaluations find; `rows` maps batch rows to
    table rows (a compacted batch holds fewer)."""
    cfg: TrainConfig
    table: list[dict]                   # one row per model: model, cell, seed, tau, norm_target, ...
    device: torch.device
    dtype: torch.dtype
    backend: str                        # the loss/clamp kernels (kernels.resolve_backend)
    per: dict[str, list]                # each per-model setting, one value per table row
    budget: np.ndarray                  # (M,) int64 each model's step budget
    task: Task
    model: object                       # models.MLP or models.Transformer (its layout and forward)
    metrics: list[str]                  # the evaluation's columns: step.EVAL_METRICS first
    batch: Batch
    tensors: dict                       # flat (M, P), m, v, t (M,), alive (M,), target, bounds[, ema]
    records: "Records"
    rows: np.ndarray                    # (M_batch,) table row of each batch row
    capture_shares: bool               # a per-layer clamp that takes its shares at the clamp's first step
    minibatches: Minibatches | None = None  # each model's minibatch rows (batch_size); None = all full batch


def build_state(cfg: TrainConfig, table: list[dict] | None = None) -> TrainState:
    """The state of cfg's models (its cells x seeds), or of the given table's rows (each with its own
    seed, tau, norm_target and, optionally, per-model settings, t_clamp, budget, layer_fracs), on
    cfg.device. Refuses, before drawing anything, a batch that does not fit the device (memory.check_fits)."""
    device = resolve_device(cfg.device)
    strict_float32()
    dtype = TORCH_DTYPES[cfg.dtype]
    backend = kernel_backend(cfg.kernels, device, dtype)
    table = [dict(r) for r in table] if table is not None else cfg.model_table()
    M = len(table)
    if M == 0:
        raise ConfigError("table: no models to train")
    per = per_model_values(cfg, table)          # op, train_frac, lr, wd, ...: one value per row
    check_fits(rows_config(cfg, per), M, device)
    budget = np.array([r.get("budget", cfg.steps) for r in table], dtype=np.int64)
    seeds = [r["seed"] for r in table]
    dev = device
    task = make_task(cfg.p, per["op"], per["train_frac"], seeds, dev, label_noise=per["label_noise"],
                     split_offset=0 if cfg.init == "prieto" else SPLIT_SEED_OFFSET)
    model = build_model(cfg)
    lay = model.layout
    tgt = torch.tensor([r["norm_target"] or 0.0 for r in table], dtype=torch.float64)
    S = lay.n_matrices if cfg.clamp_mode == "layer" else 1
    fracs = torch.tensor([(r.get("layer_fracs") or cfg.layer_fracs or [1.0 / S] * S) if S > 1 else [1.0]
                          for r in table], dtype=torch.float64)                  # (M, S)
    ta, tb = task.a[task.train_idx], task.b[task.train_idx]
    ty = task.y[task.train_idx] if task.y.dim() == 1 else torch.gather(task.y, 1, task.train_idx)
    lr_wd = [a * b for a, b in zip(per["lr"], per["wd"])]             # in float64, as lr * wd in Python
    batch = Batch(
        train_a=ta, train_b=tb, train_y=ty, a=task.a, b=task.b, y=task.y, train_mask=task.train_mask,
        test_mask=task.test_mask, train_weight=task.train_weight, valid=task.valid,
        tau=torch.tensor([r["tau"] for r in table], dtype=dtype, device=dev),
        lr=_column(per["lr"], dtype, dev),
        lr_wd=_column(lr_wd, dtype, dev) if any(lr_wd) else None,
        orthograd=torch.tensor(per["orthograd"], device=dev) if any(per["orthograd"]) else None,
        gf_alpha=_column(per["grokfast_alpha"], dtype, dev) if any(per["grokfast_lambda"]) else None,
        gf_lambda=_column(per["grokfast_lambda"], dtype, dev) if any(per["grokfast_lambda"]) else None,
        clamp_on=torch.tensor([r["norm_target"] is not None for r in table], device=dev),
        t_clamp=torch.tensor([r.get("t_clamp", cfg.t_clamp_of(loss)) for r, loss in zip(table, per["loss"])],
                             dtype=torch.int64, device=dev),
        # each model's loss: None when all share the config's ce or mse (the code paths that predate
        # kinds, bit for bit), else a kernel code per model (kernels.LOSS_KINDS)
        kind=None if set(per["loss"]) <= {cfg.loss} and cfg.loss in ("ce", "mse") else
        torch.tensor([K.LOSS_KINDS[loss] for loss in per["loss"]], dtype=torch.int64, device=dev))
    for k in ("beta1", "beta2", "eps"):      # per-model tensors only where some model differs from the config's one value
        if isinstance(getattr(cfg, k), tuple) or any(x != getattr(cfg, k) for x in per[k]):
            setattr(batch, k, torch.tensor(per[k], dtype=torch.float64, device=dev))
    if set(per["optimizer"]) != {"adamw"} or any(per["warmup"]):   # the peers' optimizers or a warm-up
        f64 = functools.partial(torch.tensor, dtype=torch.float64, device=dev)
        batch.optimizer = torch.tensor([OPTIMIZERS.index(o) for o in per["optimizer"]], device=dev)
        batch.opt_groups = optimizer_groups(batch.optimizer.tolist(), dev)
        batch.lr64, batch.wd64, batch.momentum, batch.muon_lr = (f64(per[k]) for k in ("lr", "wd", "momentum", "muon_lr"))
        batch.warmup = torch.tensor(per["warmup"], device=dev) if any(per["warmup"]) else None
    # Adam's bias corrections as a table per distinct beta (optim.bias_correction_table): a model's bits
    # the same whatever the batch; None (the power per step) for a beta whose table would be too long
    distinct = sorted(set(per["beta1"]) | set(per["beta2"]))
    corrections = bias_correction_table(distinct, dtype)
    if corrections is not None:
        batch.bias_table = corrections.to(dev)
        batch.bias_rows = torch.tensor([[distinct.index(b1), distinct.index(b2)] for b1, b2 in
                                        zip(per["beta1"], per["beta2"])], dtype=torch.int64, device=dev)
    minibatches = None
    if any(bs is not None for bs in per["batch_size"]):  # minibatches: the step reads batch.mb_idx/mb_weight
        n_rows = [task.train_idx.shape[1]] * M if task.train_weight is None else task.train_weight.sum(1).tolist()
        minibatches = Minibatches(n_rows, per["batch_size"], seeds)
        batch.mb_idx = torch.zeros(M, minibatches.width, dtype=torch.int64, device=dev)
        batch.mb_weight = torch.zeros(M, minibatches.width, dtype=torch.bool, device=dev)
        minibatches.fill(batch.mb_idx, batch.mb_weight, 0, range(M))
    cells = None
    if cfg.init == "study":     # each model's cell: its first seed and seed count (train: seed0, seeds)
        cells = [(r.get("cell_seed0", cfg.seed0), r.get("cell_seeds", cfg.seeds)) for r in table]
    after = [n_pairs_of(cfg.p, op) for op in per["op"]] if cfg.init == "prieto" else None   # their split first
    flat = lay.init(seeds, dtype, dev, cells=cells, scales=per["init_scale"], linear_after=after)
    tensors = {
        "flat": flat, "m": torch.zeros_like(flat), "v": torch.zeros_like(flat),
        "t": torch.zeros(M, dtype=torch.int64, device=dev),
        "alive": torch.ones(M, dtype=torch.bool, device=dev),
        "target": (tgt[:, None] * fracs.sqrt()).to(dtype).to(dev),
        "bounds": lay.bounds if cfg.clamp_mode == "layer" else [lay.bounds[0], lay.bounds[-1]],
    }
    if batch.gf_lambda is not None:             # Grokfast-EMA's filter h, per model (set at its first step)
        tensors["ema"] = torch.zeros_like(flat)
    capture = (cfg.clamp_mode == "layer" and not cfg.layer_fracs and not any(r.get("layer_fracs") for r in table))
    records = Records([], [], np.full(M, -1), np.full(M, -1), np.zeros(M, bool), np.full(M, -1))
    return TrainState(cfg=cfg, table=table, device=device, dtype=dtype, backend=backend, per=per, budget=budget,
                      task=task, model=model, metrics=eval_metrics(model, cfg), batch=batch, tensors=tensors,
                      records=records, rows=np.arange(M), capture_shares=capture, minibatches=minibatches)


def select_batch(batch: Batch, idx: torch.Tensor) -> Batch:
    """The batch restricted to rows idx of the model axis (derived non-tensor fields are reset)."""
    kw = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            kw[f.name] = v.index_select(0, idx) if has_model_axis(f, v) else v
        else:
            kw[f.name] = None
    if kw["optimizer"] is not None:             # each optimizer's models among the rows kept
        kw["opt_groups"] = optimizer_groups(kw["optimizer"].tolist(), kw["optimizer"].device)
    w = kw["train_weight"]
    if w is not None and w.shape[0]:
        # padding no kept model needs: drop whole blocks of 16 past the most real rows left (bit for bit the
        # same training, data.PAD_ROWS)
        n = -(-int(w.sum(1).max()) // PAD_ROWS) * PAD_ROWS
        if n < w.shape[1]:
            for k in ("train_a", "train_b", "train_y", "train_weight"):
                kw[k] = kw[k][:, :n]
    return Batch(**kw)


