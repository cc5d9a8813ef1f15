"""The training loop: evaluation, grokking detection, checkpoints, resume, progress.

One screen of loop (`Trainer.run`): evaluate every `eval_every` steps (the only host sync), record
T_mem/T_grok per model, checkpoint every `checkpoint_every` steps and on SIGINT/SIGTERM, stop when
every model has grokked or diverged, or at the budget. Training is full batch and deterministic, so a
run resumed from its checkpoint ends with exactly the results of an uninterrupted one.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fastgrok.kernels as K

from . import store
from .config import ConfigError, TrainConfig
from .data import make_task
from .models import build_model
from .step import EVAL_METRICS, Batch, build_step_fns

DTYPES = {"float32": torch.float32, "float64": torch.float64}
I_TRAIN_ACC, I_TEST_ACC, I_LOGIT = EVAL_METRICS.index("train_acc"), EVAL_METRICS.index("test_acc"), \
    EVAL_METRICS.index("logit_scale")


class Interrupted(Exception):
    """Raised after a checkpoint was written because the process was asked to stop."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA device is available on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """`auto`: compile on CUDA, and for the MLP on CPU (measured faster there; the transformer was not)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return device.type == "cuda" or cfg.model == "mlp"


@dataclass
class Records:
    """Host-side results so far (saved in checkpoints)."""
    steps: list            # evaluated steps
    evals: list            # (M, 6) numpy per evaluated step
    t_mem: np.ndarray      # (M,) int, -1 = not yet
    t_grok: np.ndarray
    diverged: np.ndarray   # (M,) bool


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | str, *, progress: bool = True):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.device = resolve_device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.backend = K.resolve_backend(cfg.kernels, self.device, self.dtype)
        self.table = cfg.model_table()
        M = len(self.table)
        seeds = [r["seed"] for r in self.table]
        dev = self.device
        self.task = make_task(cfg.p, cfg.op, cfg.n_train, seeds, dev)
        self.model = build_model(cfg)
        lay = self.model.layout
        tgt = torch.tensor([r["norm_target"] or 0.0 for r in self.table], dtype=torch.float64)
        S = lay.n_matrices if cfg.clamp_mode == "layer" else 1
        fracs = torch.tensor(cfg.layer_fracs or [1.0 / S] * S, dtype=torch.float64)
        ta, tb = self.task.a[self.task.train_idx], self.task.b[self.task.train_idx]
        self.batch = Batch(
            train_a=ta, train_b=tb, train_y=self.task.y[self.task.train_idx],
            a=self.task.a, b=self.task.b, y=self.task.y, train_mask=self.task.train_mask,
            tau=torch.tensor([r["tau"] for r in self.table], dtype=self.dtype, device=dev),
            clamp_on=torch.tensor([r["norm_target"] is not None for r in self.table], device=dev),
            t_clamp=torch.full((M,), cfg.t_clamp, dtype=torch.int64, device=dev))
        flat = lay.init(seeds, self.dtype, dev)
        self.state = {
            "flat": flat, "m": torch.zeros_like(flat), "v": torch.zeros_like(flat),
            "t": torch.zeros(M, dtype=torch.int64, device=dev),
            "alive": torch.ones(M, dtype=torch.bool, device=dev),
            "target": (tgt[:, None] * fracs.sqrt()[None]).to(self.dtype).to(dev),
            "bounds": lay.bounds if cfg.clamp_mode == "layer" else [lay.bounds[0], lay.bounds[-1]],
        }
        self.capture_shares = cfg.clamp_mode == "layer" and not cfg.layer_fracs
        self.records = Records([], [], np.full(M, -1), np.full(M, -1), np.zeros(M, bool))
        self.step_idx = 0
        self.done = False
        self.step_fn, self.eval_fn = build_step_fns(self.model, cfg, self.backend, use_compile(cfg, dev))
        self._stop_signal = None

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        tensors = {k: v.detach().cpu() for k, v in self.state.items() if isinstance(v, torch.Tensor)}
        store.save_checkpoint(self.run_dir, {"step": self.step_idx, "state": tensors, "records": self.records,
                                             "done": self.done, "capture_shares": self.capture_shares})
        self.write_results()

    def restore(self, ck: dict) -> None:
        for k, v in ck["state"].items():
            self.state[k] = v.to(self.device)
        self.step_idx, self.records, self.done = ck["step"], ck["records"], ck["done"]
        self.capture_shares = ck["capture_shares"]

    # ---------------------------------------------------------------- the loop
    def _evaluate(self) -> None:
        out = self.eval_fn(self.state, self.batch).double().cpu().numpy()   # sync point: once per eval
        r, cfg, s = self.records, self.cfg, self.step_idx
        r.steps.append(s)
        r.evals.append(out)
        r.diverged = ~self.state["alive"].cpu().numpy()
        mem = (r.t_mem < 0) & (out[:, I_TRAIN_ACC] >= cfg.mem_threshold) & ~r.diverged
        grok = (r.t_grok < 0) & (out[:, I_TEST_ACC] >= cfg.grok_threshold) & ~r.diverged
        r.t_mem[mem] = s
        r.t_grok[grok] = s

    def _capture_layer_targets(self) -> None:
        """Per-layer clamp with no fixed shares: each matrix keeps its share of ||W||^2 from now on."""
        flat, b = self.state["flat"], self.state["bounds"]
        sq = torch.stack([flat[:, lo:hi].double().square().sum(1) for lo, hi in zip(b[:-1], b[1:])], 1)
        total = torch.tensor([r["norm_target"] or 0.0 for r in self.table], dtype=torch.float64, device=flat.device)
        self.state["target"] = (total[:, None] * (sq / sq.sum(1, keepdim=True)).sqrt()).to(self.dtype)
        self.capture_shares = False

    def run(self) -> pd.DataFrame:
        cfg = self.cfg
        self._install_signals()
        bar = _Progress(cfg.steps, len(self.table), enabled=self.progress)
        try:
            with bar:
                while not self.done:
                    s = self.step_idx
                    if s % cfg.eval_every == 0 and (not self.records.steps or self.records.steps[-1] != s):
                        self._evaluate()
                        bar.update(s, self.records)
                        if s > 0 and s % cfg.checkpoint_every == 0:
                            self.checkpoint()
                    finished = (self.records.t_grok >= 0) | self.records.diverged
                    if s >= cfg.steps or (cfg.stop_when_grokked and finished.all()):
                        self.done = True
                        break
                    if self._stop_signal is not None:
                        self.checkpoint()
                        raise Interrupted(f"stopped by signal {self._stop_signal} at step {s}; "
                                          f"resume with: fastgrok train --resume {self.run_dir}")
                    if self.capture_shares and s + 1 >= cfg.t_clamp:
                        self._capture_layer_targets()
                    self.step_fn(self.state, self.batch)
                    self.step_idx = s + 1
                    if self.step_idx % cfg.eval_every:
                        bar.update(self.step_idx, None)
            if self.records.steps[-1] != self.step_idx:      # the budget ended between evaluations
                self._evaluate()
            self.checkpoint()
        finally:
            self._restore_signals()
        return self.results()

    # ---------------------------------------------------------------- results
    def results(self) -> pd.DataFrame:
        r, cfg = self.records, self.cfg
        ev = np.stack(r.evals)                                  # (T, M, 6)
        steps = np.asarray(r.steps)
        logged = (steps % cfg.logit_every) == 0
        last = ev[-1]
        rows = []
        for i, row in enumerate(self.table):
            tg = int(r.t_grok[i])
            L = float("nan")
            if tg >= 0 and logged.any():
                ls = steps[logged]
                L = float(ev[logged][np.argmin(np.abs(ls - tg)), i, I_LOGIT])
            rows.append({**row, "rho": None,
                         "t_mem": int(r.t_mem[i]) if r.t_mem[i] >= 0 else None,
                         "t_grok": tg if tg >= 0 else None, "logit_scale_at_grok": L,
                         **{m: float(last[i, k]) for k, m in enumerate(EVAL_METRICS) if m != "logit_scale"},
                         "diverged": bool(r.diverged[i]), "steps": int(steps[-1])})
        df = pd.DataFrame(rows)
        for c in ("t_mem", "t_grok"):
            df[c] = df[c].astype("Int64")
        for c in ("norm_target", "rho"):
            df[c] = df[c].astype("float64")
        return df

    def curves(self) -> pd.DataFrame:
        r, cfg = self.records, self.cfg
        ev = np.stack(r.evals)                                  # (T, M, 6)
        T, M, K_ = ev.shape
        steps = np.repeat(np.asarray(r.steps), M * K_).reshape(T, M, K_)
        model = np.broadcast_to(np.arange(M)[None, :, None], (T, M, K_))
        metric = np.broadcast_to(np.arange(K_)[None, None, :], (T, M, K_))
        keep = (metric != I_LOGIT) | (steps % cfg.logit_every == 0)
        return pd.DataFrame({"model": model[keep], "step": steps[keep],
                             "metric": np.asarray(EVAL_METRICS)[metric[keep]], "value": ev[keep]})

    def write_results(self) -> None:
        if not self.records.evals:
            return
        store.write_parquet(self.run_dir / store.MODELS, self.results())
        store.write_parquet(self.run_dir / store.CURVES, self.curves())
        store.write_json(self.run_dir / store.PROGRESS, {"step": self.step_idx, "done": self.done,
                                                         "steps": self.cfg.steps})

    # ---------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        self._old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        except ValueError:          # not the main thread: no handlers, checkpoints still happen
            self._old = {}

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:       # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _restore_signals(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


class _Progress:
    """A rich progress bar: step, mean train/test accuracy, models grokked."""

    def __init__(self, total: int, n_models: int, enabled: bool):
        self.enabled, self.n = enabled, n_models
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.p = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                              TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.p.add_task("train", total=total, info="")
        self.last = 0.0

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def update(self, step: int, records: Records | None) -> None:
        if not self.enabled:
            return
        kw = {}
        if records is not None:
            ev = records.evals[-1]
            kw["info"] = (f"train {ev[:, I_TRAIN_ACC].mean():.3f}  test {ev[:, I_TEST_ACC].mean():.3f}  "
                          f"grokked {(records.t_grok >= 0).sum()}/{self.n}  diverged {records.diverged.sum()}")
        now = time.monotonic()
        if records is not None or now - self.last > 0.2:
            self.p.update(self.task, completed=step, **kw)
            self.last = now


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, progress: bool = True) -> pd.DataFrame:
    """Train `cfg` into run_dir (resuming from its checkpoint when asked); returns models' results."""
    run_dir = Path(run_dir)
    if not resume:
        if (run_dir / store.CONFIG).exists():
            raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
        store.write_json(run_dir / store.CONFIG, cfg.to_dict())
    trainer = Trainer(cfg, run_dir, progress=progress)
    if resume:
        ck = store.load_checkpoint(run_dir)
        if ck is not None:
            trainer.restore(ck)
    return trainer.run()


def load_config(run_dir: Path | str) -> TrainConfig:
    path = Path(run_dir) / store.CONFIG
    if not path.exists():
        raise ConfigError(f"{run_dir} holds no run (no {store.CONFIG})")
    return TrainConfig.from_dict(store.read_json(path))
