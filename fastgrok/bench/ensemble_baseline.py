"""What a PyTorch user writes instead of fastgrok: the torch.func ensemble of PyTorch's tutorial.

PyTorch's "Model ensembling" tutorial (torch.func) trains many copies of one small `nn.Module` at once:

    params, buffers = stack_module_state(models)                   # every leaf stacked along a model axis
    base = copy.deepcopy(models[0]).to("meta")
    def loss(params, buffers, a, b, y):                             # one model, written as for one model
        return F.cross_entropy(functional_call(base, (params, buffers), (a, b)) / tau, y)
    grads = vmap(grad(loss))(params, buffers, a, b, y)              # all models, each on its own data

This module is that recipe for the study's cell, nothing fastgrok-specific in the training step:
  model      the study's MLP (z = GeLU([E[a], E[b]] W1 + b1) W2 + b2, the direct form, as
             fastgrok.bench.baseline writes it) or fastgrok's transformer ([a, b, =], causal attention, GeLU
             MLP, no biases, no LayerNorm), each an `nn.Module` for ONE model; one module per seed;
  data       each model its own split (fastgrok.core.data.make_task, the study's), full batch;
  init       each model's weights from its seed by fastgrok's layout (`init = "model"`), so a member and
             fastgrok's model with that seed start equal and follow one trajectory to float rounding;
  optimizer  a functional AdamW over the stacked parameters, the study's: bias correction, decoupled
             decay lr * wd * P AFTER the Adam update on the matrices (ndim >= 2) only (`decay="before"`:
             torch.optim.AdamW's order, decay first);
  readouts   every eval_every steps, all p^2 pairs through every model (vmap over the parameters, the
             pairs shared): train and test accuracy over each model's own split;
  compile    `torch.compile` of the vmapped step (vmap(grad) + AdamW) and of the evaluation.
`benchmarks/ensemble_vs_fastgrok.py` and `fastgrok bench --sections ensemble` time it beside fastgrok.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from fastgrok.config import TrainConfig
from fastgrok.core.data import make_task
from fastgrok.core.models import build_model
from fastgrok.core.step import strict_float32


class _LayoutModule(nn.Module):
    """One model's parameters as `nn.Parameter`s, named and shaped as fastgrok's layout of cfg."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.layout = build_model(cfg).layout
        for name, shape in zip(self.layout.names, self.layout.shapes):
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))


class StudyMLP(_LayoutModule):
    """The study's MLP for one model: embedding E shared by both operands, concatenated, W1, GeLU, W2."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.E[a], self.E[b]], -1)                   # (N, 2d)
        return F.gelu(x @ self.W1 + self.b1) @ self.W2 + self.b2     # (N, p)


class SmallTransformer(_LayoutModule):
    """fastgrok's transformer (models.Transformer, layernorm off) for one model: tokens [a, b, =], learned
    positions, causal multi-head attention and a GeLU MLP per layer, unembedding at the last position."""

    def __init__(self, cfg: TrainConfig):
        if cfg.layernorm:
            raise ValueError("the ensemble's transformer has no LayerNorm (the study's has none)")
        super().__init__(cfg)
        self.p, self.heads, self.n_layers = cfg.p, cfg.n_heads, cfg.n_layers

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        tok = torch.stack([a, b, torch.full_like(a, self.p)], -1)   # (N, 3)
        x = self.W_E[tok] + self.W_pos                              # (N, 3, D)
        N, D = a.shape[0], x.shape[-1]
        dh = D // self.heads
        causal = torch.ones(3, 3, dtype=torch.bool, device=x.device).tril()
        for i in range(self.n_layers):
            q, k, v = ((x @ getattr(self, f"W_{c}{i}")).view(N, 3, self.heads, dh).transpose(1, 2) for c in "QKV")
            att = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + (att @ v).transpose(1, 2).reshape(N, 3, D) @ getattr(self, f"W_O{i}")
            x = x + F.gelu(x @ getattr(self, f"W_in{i}")) @ getattr(self, f"W_out{i}")
        return x[:, -1] @ self.W_U                                  # (N, p)


def build_module(cfg: TrainConfig) -> nn.Module:
    return StudyMLP(cfg) if cfg.model == "mlp" else SmallTransformer(cfg)


def adamw(params: dict, grads: dict, m: dict, v: dict, t: torch.Tensor, *, lr: float, wd: float, beta1: float,
          beta2: float, eps: float, decay: frozenset, decay_after: bool = True) -> tuple[dict, dict, dict]:
    """One AdamW step over dicts of stacked tensors; returns new (params, m, v). t: steps taken, this one
    included (a 0-d float tensor, so a compiled step is not specialised on it). `decay`: the names that
    decay (the matrices), after the Adam update as the study (`decay_after`) or before it as
    torch.optim.AdamW."""
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        new_m[k] = beta1 * m[k] + (1.0 - beta1) * g
        new_v[k] = beta2 * v[k] + (1.0 - beta2) * (g * g)
        decays = k in decay and wd != 0.0
        if decays and not decay_after:
            p = p - lr * wd * p
        p = p - lr * (new_m[k] / bc1) / (torch.sqrt(new_v[k] / bc2) + eps)
        if decays and decay_after:
            p = p - lr * wd * p
        new_p[k] = p
    return new_p, new_m, new_v


class EnsembleCell:
    """M models of one cell (cfg.model, one tau, seeds seed0.. or `seeds`) trained as the torch.func
    tutorial does. `step()` one AdamW step of every model (returns the per-model train loss (M,));
    `evaluate()` (M, 2) train and test accuracy over every model's own split."""

    def __init__(self, cfg: TrainConfig, *, device: str | torch.device = "cpu", seeds: list[int] | None = None,
                 compile: bool = True, decay: str = "after"):
        if cfg.loss != "ce" or cfg.norm_targets or cfg.dtype != "float32":
            raise ValueError("the ensemble baseline trains float32 cross-entropy cells without a clamp")
        if decay not in ("after", "before"):
            raise ValueError(f"decay must be 'after' (the study's AdamW) or 'before' (torch's); got {decay!r}")
        strict_float32()
        self.cfg, self.device = cfg, torch.device(device)
        self.seeds = seeds if seeds is not None else [cfg.seed0 + s for s in range(cfg.seeds)]
        M = len(self.seeds)
        if len(cfg.values("op")) > 1 or len(cfg.values("train_frac")) > 1:
            raise ValueError("the ensemble baseline needs one op and one train fraction for all models")
        task = make_task(cfg.p, cfg.op, cfg.train_frac, self.seeds, self.device)
        self.a, self.b, self.y = task.a, task.b, task.y                      # (N,) all pairs, shared
        self.train_mask, self.test_mask = task.train_mask, task.test_mask    # (M, N)
        idx = task.train_idx[:, :cfg.n_train]                  # (M, n_train): the real rows, no padding
        self.ta, self.tb, self.ty = task.a[idx], task.b[idx], task.y[idx]
        # one nn.Module per seed, its weights fastgrok's for that seed; then the tutorial's stacking
        models = [build_module(cfg) for _ in range(M)]
        layout = models[0].layout
        init = layout.views(layout.init(self.seeds, torch.float32, "cpu"))
        with torch.no_grad():
            for i, mod in enumerate(models):
                for name, prm in mod.named_parameters():
                    prm.copy_(init[name][i])
        models = [mod.to(self.device) for mod in models]
        params, self.buffers = stack_module_state(models)
        self.params = {k: p.detach() for k, p in params.items()}     # the optimizer owns them: no autograd leaves
        self.m = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.t = torch.zeros((), device=self.device)
        base = copy.deepcopy(models[0]).to("meta")
        tau = float(cfg.taus[0])
        opt = dict(lr=float(cfg.learning_rate), wd=float(cfg.wd), beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                   decay=frozenset(k for k, p in models[0].named_parameters() if p.dim() >= 2),
                   decay_after=decay == "after")

        def fmodel(params, buffers, a, b):
            return functional_call(base, (params, buffers), (a, b))

        def loss_fn(params, buffers, a, b, y):
            return F.cross_entropy(fmodel(params, buffers, a, b) / tau, y)

        def train_step(params, buffers, m, v, t, a, b, y):
            grads, loss = vmap(grad_and_value(loss_fn))(params, buffers, a, b, y)
            t = t + 1
            params, m, v = adamw(params, grads, m, v, t, **opt)
            return params, m, v, t, loss

        def evaluate(params, buffers, a, b, y, train_mask, test_mask):
            z = vmap(fmodel, in_dims=(0, 0, None, None))(params, buffers, a, b)   # (M, N, p)
            correct = (z.argmax(-1) == y).double()                 # rates in float64, as fastgrok's
            train, test = train_mask.double(), test_mask.double()
            return torch.stack([(correct * train).sum(1) / train.sum(1), (correct * test).sum(1) / test.sum(1)], 1)

        self._step = torch.compile(train_step, dynamic=False) if compile else train_step
        self._eval = torch.compile(evaluate, dynamic=False) if compile else evaluate

    def step(self) -> torch.Tensor:
        self.params, self.m, self.v, self.t, loss = self._step(self.params, self.buffers, self.m, self.v, self.t,
                                                               self.ta, self.tb, self.ty)
        return loss

    def evaluate(self) -> torch.Tensor:
        return self._eval(self.params, self.buffers, self.a, self.b, self.y, self.train_mask, self.test_mask)

    def run(self, steps: int) -> tuple[list[tuple[int, list[float], list[float]]], float]:
        """Train `steps` steps, evaluating every eval_every and at the end; ((step, train acc per model,
        test acc per model) per evaluation, seconds)."""
        evals = []
        t0 = time.perf_counter()
        for s in range(steps + 1):
            if s % self.cfg.eval_every == 0 or s == steps:
                acc = self.evaluate().cpu()                             # sync point: once per evaluation
                evals.append((s, acc[:, 0].tolist(), acc[:, 1].tolist()))
            if s < steps:
                self.step()
        return evals, time.perf_counter() - t0
