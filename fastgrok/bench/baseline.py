"""The reference point of every speed-up claim: one cell trained the way the study's public code does.

One cell = S seeds stacked as tensors, full batch, eager float32 PyTorch:
    forward   the direct form: x = [E[a], E[b]] (S, N, 2d), pre = x W1 + b1, h = GeLU(pre),
              z = h W2 + b2, all with `bmm`, autograd `loss.backward()`
    loss      F.cross_entropy(z_s / tau, y_s) per seed, summed over seeds (each seed its own gradient)
    AdamW     a Python loop over the parameter tensors: m, v per tensor, bias correction, decoupled
              decay lr * wd * P after the update on the matrices E, W1, W2 only
    clamp     from step t_clamp on, E, W1, W2 of each seed scaled so ||W|| = target (if the cell has one)
    readouts  a separate evaluation pass every `eval_every` steps (train/test accuracy over all pairs),
              the logit scale mean ||z/tau||_2 over all pairs every `logit_every` steps

Same semantics and initialisation as fastgrok (each model's weights from its own seed, the splits of
fastgrok.core.data), so a baseline cell and a fastgrok run of it follow the same trajectory to float32
rounding. `run_baseline(cfg, steps)` times it: seed-steps per second, evaluation included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastgrok.config import TrainConfig
from fastgrok.core.data import make_task
from fastgrok.core.models import MLP
from fastgrok.core.step import strict_float32


@dataclass
class BaselineResult:
    steps: int
    seeds: int
    seconds: float
    evals: list = field(default_factory=list)     # (step, train_acc (S,), test_acc (S,), train_loss (S,))
    logit_scale: list = field(default_factory=list)  # (step, L)
    t_grok: list = field(default_factory=list)    # per seed, -1 = not yet

    @property
    def seed_steps_per_s(self) -> float:
        return self.seeds * self.steps / self.seconds


class BaselineCell:
    """S seeds of one cell (one tau, one clamp target or none), as stacked leaf tensors."""

    def __init__(self, cfg: TrainConfig, *, tau: float | None = None, norm_target: float | None = None,
                 device: str | torch.device = "cpu", seeds: list[int] | None = None):
        if cfg.model != "mlp" or cfg.loss != "ce":
            raise ValueError("the baseline trains the study's MLP under cross-entropy only")
        self.cfg, self.device = cfg, torch.device(device)
        strict_float32()
        self.dtype = torch.float32 if cfg.dtype == "float32" else torch.float64
        self.seeds = seeds if seeds is not None else [cfg.seed0 + s for s in range(cfg.seeds)]
        self.tau = cfg.taus[0] if tau is None else tau
        self.norm_target = norm_target
        S = len(self.seeds)
        task = make_task(cfg.p, cfg.op, cfg.train_frac, self.seeds, self.device)
        self.a, self.b, self.y, self.train_mask = task.a, task.b, task.y, task.train_mask
        idx = task.train_idx[:, :cfg.n_train]                           # (S, n_train): the real rows, no padding
        self.ta, self.tb, self.ty = task.a[idx], task.b[idx], task.y[idx]
        layout = MLP(cfg).layout                                        # fastgrok's init, per seed
        views = layout.views(layout.init(self.seeds, self.dtype, self.device))
        self.params = {n: views[n].clone().requires_grad_(True) for n in layout.names}  # E, W1, W2, b1, b2
        self.matrices = ("E", "W1", "W2")
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.t = 0
        self.seed_index = torch.arange(S, device=self.device)[:, None]  # (S, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (S, N) per seed -> logits (S, N, V), the direct form."""
        P = self.params
        x = torch.cat([P["E"][self.seed_index, a], P["E"][self.seed_index, b]], -1)  # (S, N, 2d)
        h = F.gelu(torch.bmm(x, P["W1"]) + P["b1"][:, None])            # (S, N, H)
        return torch.bmm(h, P["W2"]) + P["b2"][:, None]                 # (S, N, V)

    def step(self) -> torch.Tensor:
        """One full-batch AdamW step of every seed; returns the per-seed train loss (S,)."""
        cfg = self.cfg
        z = self.forward(self.ta, self.tb) / self.tau                   # (S, N, V)
        losses = torch.stack([F.cross_entropy(z[s], self.ty[s]) for s in range(len(self.seeds))])
        for p in self.params.values():
            p.grad = None
        losses.sum().backward()
        self.t += 1
        bc1, bc2 = 1.0 - cfg.beta1 ** self.t, 1.0 - cfg.beta2 ** self.t
        with torch.no_grad():
            for n, p in self.params.items():
                g, m, v = p.grad, self.m[n], self.v[n]
                m.mul_(cfg.beta1).add_(g, alpha=1.0 - cfg.beta1)
                v.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
                p.sub_(cfg.learning_rate * (m / bc1) / ((v / bc2).sqrt() + cfg.eps))
                if n in self.matrices and cfg.wd:
                    p.sub_(cfg.learning_rate * cfg.wd * p)
            if self.norm_target is not None and self.t >= cfg.t_clamp:
                mats = [self.params[n] for n in self.matrices]
                norm = torch.sqrt(sum(w.reshape(w.shape[0], -1).square().sum(1) for w in mats))  # (S,)
                scale = self.norm_target / (norm + 1e-12)
                for w in mats:
                    w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))
        return losses.detach()

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train/test accuracy and train loss over all pairs: (S,) each."""
        S = len(self.seeds)
        z = self.forward(self.a.expand(S, -1), self.b.expand(S, -1)) / self.tau   # (S, p^2, V)
        correct = (z.argmax(-1) == self.y).double()                 # rates in float64: 999/1110 is 0.9
        train = self.train_mask.double()
        nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), self.y.repeat(S), reduction="none").view(S, -1)
        return ((correct * train).sum(1) / train.sum(1), (correct * (1 - train)).sum(1) / (1 - train).sum(1),
                (nll * train).sum(1) / train.sum(1))

    @torch.no_grad()
    def logit_scale(self) -> float:
        """L = mean over seeds and all pairs of ||z/tau||_2."""
        S = len(self.seeds)
        z = self.forward(self.a.expand(S, -1), self.b.expand(S, -1)) / self.tau
        return float(torch.linalg.vector_norm(z, dim=-1).mean())


def run_baseline(cfg: TrainConfig, steps: int, *, tau: float | None = None, norm_target: float | None = None,
                 device: str | torch.device = "cpu", seeds: list[int] | None = None,
                 stop_when_grokked: bool = False) -> BaselineResult:
    """Train one cell for `steps` steps (evaluation and readouts included) and time it."""
    cell = BaselineCell(cfg, tau=tau, norm_target=norm_target, device=device, seeds=seeds)
    S = len(cell.seeds)
    res = BaselineResult(steps=0, seeds=S, seconds=0.0, t_grok=[-1] * S)
    sync = torch.cuda.synchronize if cell.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(steps + 1):
        if s % cfg.eval_every == 0:
            tr, te, loss = cell.evaluate()
            te_host = te.tolist()                                       # sync point: once per eval
            res.evals.append((s, tr.tolist(), te_host, loss.tolist()))
            for i, acc in enumerate(te_host):
                if res.t_grok[i] < 0 and acc >= cfg.grok_threshold:
                    res.t_grok[i] = s
        if s % cfg.logit_every == 0:
            res.logit_scale.append((s, cell.logit_scale()))
        if s == steps or (stop_when_grokked and min(res.t_grok) >= 0):
            break
        cell.step()
        res.steps = s + 1
    sync()
    res.seconds = time.perf_counter() - t0
    return res
