"""The training loop: evaluation, grokking detection, checkpoints, resume, progress.

One screen of loop (`Trainer.run`): evaluate every `eval_every` steps (the only host sync), record
T_mem/T_grok per model, checkpoint every `checkpoint_every` steps and on SIGINT/SIGTERM; each model
stops (is frozen) when it has grokked or diverged, or at the budget, and the run ends when all have. Training is deterministic (full batch, or each model's own seeded minibatches), so a
run resumed from its checkpoint ends with exactly the results of an uninterrupted one.

`Trainer(cfg, dir)` trains cfg's product of cells x seeds, each model stopping at its own end (its
T_grok, divergence or the budget), so every number it reports equals that of the model trained alone
(`--seeds 1 --seed0 K`). `Trainer(cfg, dir, table=rows)` trains an
explicit list of models (the grid engine's packed batches): each row carries its own seed, tau,
norm_target, t_clamp, step `budget` and `cell`, and a model stops at its own budget, when it diverges,
or when every model of its cell has grokked (the study's per-cell rule) -- never because of another
cell, so its results do not depend on the batch it trained in. Stopped models are frozen; with
`compact_frac`, once that fraction of the batch has stopped their rows are dropped from every tensor
(index_select on the model axis) and the rest run alone. Records keep the full model axis (NaN for rows
no longer in the batch); `self.rows` maps batch rows to table rows.

With `cfg.snapshots`, the running models' parameters are saved at evaluations (their log-spaced steps,
T_mem and T_grok; snapshots.py) into `snapshot_dir` (default DIR/snapshots; a grid batch's is
DIR/snapshots/<id>).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastgrok import store
from fastgrok.config import ConfigError, TrainConfig, with_defaults
from fastgrok.core.step import EVAL_METRICS, build_step_fns, use_compile
from fastgrok.train import checkpoints, results, snapshots
from fastgrok.train.progress_bar import ProgressBar
from fastgrok.train.signals import Interrupted, StopSignals
from fastgrok.train.memory import check_fits
from fastgrok.train.state import TORCH_DTYPES, Records, build_state, kernel_backend, resolve_device, select_batch

I_TRAIN_ACC, I_TEST_ACC = EVAL_METRICS.index("train_acc"), EVAL_METRICS.index("test_acc")


PROGRESS_EVERY_S = 2.0
"""progress.json (what `fastgrok status` shows) is rewritten at the first evaluation this long after the
last write, besides at every checkpoint: a live view at the cost of one small atomic write per interval."""


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | str, *, progress: bool = True,
                 table: list[dict] | None = None, compact_frac: float = 0.0, snapshot_dir: Path | str | None = None):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        st = build_state(cfg, table)                # the models' state: fails (too big, bad device) before any file
        self.device, self.dtype, self.backend = st.device, st.dtype, st.backend
        self.table, self.per, self.budget = st.table, st.per, st.budget
        self.task, self.model, self.metrics, self.batch = st.task, st.model, st.metrics, st.batch
        self.state, self.records, self.rows, self.capture_shares = st.tensors, st.records, st.rows, st.capture_shares
        self.minibatches = st.minibatches
        self.step_idx = 0
        M = len(self.table)
        self.independent = table is not None        # per-cell stopping, per-model budgets, compaction
        # what a model waits for before it stops once grokked: its cell (a grid's cells are never split
        # across batches), or (`train`, where `--seeds 1 --seed0 K` makes a cell of one) nothing but itself
        self.group = np.array([r["cell"] for r in self.table]) if self.independent else np.arange(M)
        self.compact_frac = compact_frac if self.independent else 0.0
        self.snapshots = None                       # cfg.snapshots > 0: snapshots.py, under snapshot_dir
        if cfg.snapshots:
            lay = self.model.layout
            snapshots.check_bound(cfg, snapshots.bound_bytes(cfg, M, lay), f"at most {snapshots.describe(cfg, M, lay)}")
            self.snapshots = snapshots.Snapshots(cfg, snapshot_dir or self.run_dir / "snapshots", lay,
                                                 [r["model"] for r in self.table], self.budget)
        self.done = False
        self._build_fns()
        self._stop = None                           # signals.StopSignals while run() runs
        self._progress_t = 0.0
        self._checkpoint_step = None
        self.tracker = None                         # tracking.Safe: set by train(track=...)

    def start_from(self, tensors: dict, records: Records, step: int) -> None:
        """Begin at `step` from the given tensors (those this state holds: flat, m, v, t, alive, ema) and
        records, instead of from scratch or a checkpoint: a fork's arms from their parents' state at the
        fork step. Call before run()."""
        for k, v in tensors.items():
            if k in self.state:
                self.state[k] = v
        self.records, self.step_idx = records, step

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """The checkpoint (train.checkpoints.payload), then the results tables and progress.json."""
        store.save_checkpoint(self.run_dir, checkpoints.payload(
            self.step_idx, self.state, self.records, len(self.metrics), self.done, self.capture_shares, self.rows,
            self.fingerprint, self.snapshots.written if self.snapshots is not None else None))
        self.write_results()

    @functools.cached_property
    def fingerprint(self) -> str:
        """What determines this batch's results (train.checkpoints.batch_fingerprint)."""
        return checkpoints.batch_fingerprint(self.cfg, self.table)

    @functools.cached_property
    def run_id(self) -> str:
        """The fingerprint this trainer's results tables and progress carry: a `fastgrok train` run's
        config (store.config_fingerprint, which readers compute from config.json), a batch's own
        `fingerprint` when it trains a given table (a grid batch)."""
        return self.fingerprint if self.independent else store.config_fingerprint(self.cfg.to_dict())

    def restore(self, ck: dict) -> None:
        """Continue from checkpoint ck (checked to be this run's: train.checkpoints.check)."""
        checkpoints.check(ck, self.run_dir / store.CHECKPOINT, self.fingerprint, len(self.table),
                          self.model.layout.n_params)
        for k, v in ck["state"].items():
            self.state[k] = v.to(self.device)
        self.step_idx, self.records, self.done = ck["step"], Records.from_payload(ck["records"]), ck["done"]
        self._checkpoint_step = ck["step"]
        if self.snapshots is not None:
            self.snapshots.restore(ck.get("snapshots"), self.run_dir / store.CHECKPOINT, ck["step"])
        self.capture_shares = ck["capture_shares"]
        checkpoints.upgrade_records(self.records, len(self.table), len(self.metrics))
        rows = checkpoints.rows_of(ck, len(self.table))
        if len(rows) < len(self.table):             # the state was saved compacted: compact the batch too
            self.batch = select_batch(self.batch, torch.as_tensor(rows, device=self.device))
        self.rows = rows

    def extend(self, old_steps: int) -> None:
        """After `restore`: a run saved with a budget of old_steps continues to cfg.steps (larger).

        Models that stopped at the old budget run on (frozen ones stay frozen), and the evaluation the
        old budget forced between regular ones is dropped with what it detected: the run goes on exactly
        as one started with the longer budget (with the same compile mode). A run that stopped because
        every model grokked or diverged stays finished."""
        r = self.records
        if self.independent or self.cfg.steps <= old_steps:
            return
        at_budget = r.stop == old_steps
        forced = bool(r.steps) and r.steps[-1] == old_steps and old_steps % self.cfg.eval_every != 0
        if not forced:                              # a divergence seen at a regular evaluation stands
            at_budget &= ~r.diverged
        if not at_budget.any():
            return
        if forced:
            r.steps.pop()
            r.evals.pop()
            r.t_mem[r.t_mem == old_steps] = -1
            r.t_grok[r.t_grok == old_steps] = -1
            r.diverged[at_budget] = False           # seen again at the next regular evaluation
        r.stop[at_budget] = -1
        self.done = False
        pos = np.nonzero(at_budget[self.rows])[0]
        if len(pos):
            alive = self.state["alive"]
            alive[torch.as_tensor(pos, device=self.device)] = torch.as_tensor(~r.diverged[self.rows][pos],
                                                                              device=self.device)

    def compact(self) -> None:
        """Drop the stopped models' rows from every state and batch tensor (the model axis)."""
        keep = np.nonzero(self.records.stop[self.rows] < 0)[0]
        idx = torch.as_tensor(keep, device=self.device)
        for k, v in self.state.items():
            if isinstance(v, torch.Tensor):
                self.state[k] = v.index_select(0, idx)
        self.batch = select_batch(self.batch, idx)
        self.rows = self.rows[keep]
        self._build_fns()                           # a new M: compiled anew, from empty caches

    def _build_fns(self) -> None:
        """The step and evaluation callables. Compiled ones start from empty dynamo caches: every
        torch.compile'd step of the process shares one code object and its recompile limit (8), so
        trainers built one after another (a grid's batches, compactions) would otherwise exhaust it."""
        compiled = use_compile(self.cfg, self.device)
        if compiled:
            torch._dynamo.reset()
        self.step_fn, self.eval_fn = build_step_fns(self.model, self.cfg, self.backend, compiled)

    # ---------------------------------------------------------------- the loop
    def _evaluate(self) -> None:
        ev = self.eval_fn(self.state, self.batch).double().cpu().numpy()    # sync point: once per eval
        r, cfg, s, rows = self.records, self.cfg, self.step_idx, self.rows
        out = np.full((len(self.table), ev.shape[1]), np.nan)               # (M, N_EVAL) over the whole table
        out[rows] = ev
        r.steps.append(s)
        r.evals.append(out)
        running = np.zeros(len(self.table), bool)
        running[rows] = r.stop[rows] < 0
        running &= self._scheduled(np.array([s]))[0]    # another cell's budget step is not this model's
        alive = np.ones(len(self.table), bool)
        alive[rows] = self.state["alive"].cpu().numpy()
        r.diverged |= running & ~alive
        with np.errstate(invalid="ignore"):
            mem = running & (r.t_mem < 0) & (out[:, I_TRAIN_ACC] >= cfg.mem_threshold) & ~r.diverged
            grok = running & (r.t_grok < 0) & (out[:, I_TEST_ACC] >= cfg.grok_threshold) & ~r.diverged
        r.t_mem[mem] = s
        r.t_grok[grok] = s
        if self.snapshots is not None:
            self._snapshot(s, running)
        if self.tracker is not None:                # the models this step counts for: their curves' rows
            self.tracker.evaluation(s, [t["model"] for t in self.table], np.array([t["cell"] for t in self.table]),
                                    running, self.metrics, out, s % cfg.logit_every == 0)
        # who stops here: its own budget, its divergence, or every model of its group (its cell in a
        # grid, itself in `train`) grokked or diverged
        stop = running & ((s >= self.budget) | r.diverged)
        if cfg.stop_when_grokked:
            fin = (r.t_grok >= 0) | r.diverged
            open_groups = np.unique(self.group[~fin])
            stop |= running & ~np.isin(self.group, open_groups)
        r.stop[stop] = s
        self.done = bool((r.stop >= 0).all())
        if stop.any() and not self.done:           # freeze the stopped models (a sync-free mask update)
            pos = np.nonzero(stop[rows])[0]
            self.state["alive"][torch.as_tensor(pos, device=self.device)] = False

    def _snapshot(self, s: int, running: np.ndarray) -> None:
        """The running models' parameters at this evaluation, where their schedule or T_mem/T_grok says
        (snapshots.py); copied to the host only then."""
        due = self.snapshots.due(s, running, self.records.t_mem, self.records.t_grok)
        if due:
            where = {int(t): k for k, t in enumerate(self.rows)}         # table row -> batch row
            pos = torch.as_tensor([where[i] for i, _ in due], device=self.device)
            self.snapshots.save(s, due, self.state["flat"].index_select(0, pos).cpu().numpy())   # (K, P)

    def _eval_due(self, s: int) -> bool:
        if self.records.steps and self.records.steps[-1] == s:
            return False
        running = self.rows[self.records.stop[self.rows] < 0]
        return s % self.cfg.eval_every == 0 or bool((self.budget[running] == s).any())

    def _scheduled(self, steps: np.ndarray) -> np.ndarray:
        return results.scheduled(steps, self.cfg.eval_every, self.budget)

    def _capture_layer_targets(self) -> None:
        """Per-layer clamp with no fixed shares: each matrix keeps its share of ||W||^2 from now on."""
        flat, b = self.state["flat"], self.state["bounds"]
        sq = torch.stack([flat[:, lo:hi].double().square().sum(1) for lo, hi in zip(b[:-1], b[1:])], 1)
        total = torch.tensor([self.table[i]["norm_target"] or 0.0 for i in self.rows], dtype=torch.float64,
                             device=flat.device)
        self.state["target"] = (total[:, None] * (sq / sq.sum(1, keepdim=True)).sqrt()).to(self.dtype)
        self.capture_shares = False

    def run(self) -> pd.DataFrame:
        cfg = self.cfg
        self._stop = StopSignals().__enter__()
        bar = ProgressBar(cfg.steps, len(self.table), enabled=self.progress)
        if self.step_idx == 0 and use_compile(cfg, self.device):
            bar.note("compiling the training step and the evaluation (one-off: ~45 s on a CPU at p = 59, "
                     "seconds once cached; --no-compile skips it)")
        last_checkpoint = self.step_idx
        if not (self.run_dir / store.PROGRESS).exists():   # `status` shows a started run from its first step
            self._write_progress()
        if self.snapshots is not None and self._checkpoint_step is None:
            self.snapshots.clear()                  # a start from scratch: an earlier start's files go
        try:
            with bar:
                while not self.done:
                    s = self.step_idx
                    if self._eval_due(s):
                        self._evaluate()                    # also decides who stops here (and done)
                        bar.update(s, self.records)
                        if time.monotonic() - self._progress_t >= PROGRESS_EVERY_S:
                            self._write_progress()          # for `fastgrok status`: a small file, seconds apart
                        n_stopped = int((self.records.stop[self.rows] >= 0).sum())
                        if not self.done and self.compact_frac and n_stopped >= self.compact_frac * len(self.rows):
                            self.compact()                  # results are per model: unchanged by this
                        if s // cfg.checkpoint_every > last_checkpoint // cfg.checkpoint_every:
                            self.checkpoint()               # the first evaluation at or after each multiple
                            last_checkpoint = s
                    if self.done:
                        break
                    if self._stop.signal is not None:
                        self.checkpoint()
                        raise Interrupted(f"stopped by signal {self._stop.signal} at step {s}")
                    if self.capture_shares and s + 1 >= cfg.t_clamp:
                        self._capture_layer_targets()
                    if self.minibatches is not None:    # this step's rows of each model (its step s)
                        self.minibatches.fill(self.batch.mb_idx, self.batch.mb_weight, s, self.rows)
                    self.step_fn(self.state, self.batch)
                    self.step_idx = s + 1
                    if self.step_idx % cfg.eval_every:
                        bar.update(self.step_idx, None)
            if self.records.steps[-1] != self.step_idx:      # the budget ended between evaluations
                self._evaluate()
            self.checkpoint()
            if self.tracker is not None:
                self.tracker.finish(self.results())
            early = self.step_idx < int(self.budget.max())
            bar.finish(self.step_idx, self.records, "the step budget" if not early else
                       "every model grokked or diverged" if not self.independent else
                       "every model grokked, diverged or reached its own budget")
            if self._stop.signal is not None:
                # the signal came during the last evaluation or checkpoint: the run is saved whole, and
                # the caller (a grid about to start its next batch) is told to stop too
                raise Interrupted(f"stopped by signal {self._stop.signal} at step {self.step_idx} "
                                  "(this run had finished)")
        finally:
            self._stop.__exit__(None, None, None)
            if self.tracker is not None:
                self.tracker.close()
        return self.results()

    # ---------------------------------------------------------------- results
    def results(self) -> pd.DataFrame:
        """The models table: a row per model of the table (train.results.models_table)."""
        return results.models_table(self.records, self.table, self.per, self.budget, self.cfg.eval_every)

    def curves(self) -> pd.DataFrame:
        """The curves table, long: a row per model, evaluation and metric (train.results.curves_table)."""
        return results.curves_table(self.records, self.table, self.metrics, self.budget, self.cfg.eval_every,
                                    self.cfg.logit_every)

    def write_results(self) -> None:
        if not self.records.evals:
            return
        store.write_parquet(self.run_dir / store.MODELS, self.results(), fingerprint=self.run_id)
        store.write_parquet(self.run_dir / store.CURVES, self.curves(), fingerprint=self.run_id)
        self._write_progress(checkpoint=True)

    def _write_progress(self, checkpoint: bool = False) -> None:
        """progress.json: the step reached, whether the run is done, the budget, the step of the last
        checkpoint (what a resume starts from), and how many models memorized, grokked and diverged."""
        r = self.records
        if checkpoint:
            self._checkpoint_step = self.step_idx
        store.write_json(self.run_dir / store.PROGRESS, {
            "step": self.step_idx, "done": self.done, "steps": int(self.budget.max()),
            "checkpoint": self._checkpoint_step, "models": len(self.table),
            "memorized": int((r.t_mem >= 0).sum()), "grokked": int((r.t_grok >= 0).sum()),
            "diverged": int(r.diverged.sum()), "run": self.run_id})
        self._progress_t = time.monotonic()


def train(cfg: TrainConfig, run_dir: Path | str, *, resume: bool = False, progress: bool = True,
          track: str | None = None) -> pd.DataFrame:
    """Train `cfg` into run_dir (resuming from its checkpoint when asked); returns models' results.

    Resuming with a config that differs from the saved one only in a larger `steps` extends the run
    (`Trainer.extend`); its config.json then records the new budget. The run directory's writer lock is
    held throughout (`store.writer_lock`): a second writer is refused. `track`: "wandb" or "tensorboard"
    (tracking.py; a resumed tracked run goes on tracking without it)."""
    with store.writer_lock(run_dir):
        return _train(cfg, Path(run_dir), resume, progress, track)


def preflight(cfg: TrainConfig, run_dir: Path | str, resume: bool) -> str | None:
    """What a train run checks before anything is written (the CLI before its banner, `train` again):
    the device and kernels, the memory, the snapshots' size bound, and a run directory that is not a
    grid's, nor (unless resuming) another run's. Returns the snapshots' description (None: none kept)."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    kernel_backend(cfg.kernels, device, TORCH_DTYPES[cfg.dtype])
    check_fits(cfg, cfg.n_models, device)
    described = None
    if cfg.snapshots:
        layout = snapshots.layout_of(cfg)
        described = snapshots.describe(cfg, cfg.n_models, layout)
        snapshots.check_bound(cfg, snapshots.bound_bytes(cfg, cfg.n_models, layout), f"at most {described}")
    if not resume and store.holds_grid_run(run_dir):
        raise ConfigError(f"{run_dir} holds a grid run (fastgrok run); pick another --out")
    if not resume and (run_dir / store.CONFIG).exists():
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    return described


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, track: str | None = None) -> pd.DataFrame:
    preflight(cfg, run_dir, resume)
    saved = run_dir / store.CONFIG
    old_steps = None
    if saved.exists():
        # tuples as saved: lists; fields added since the run was saved at the value it had
        old, new = with_defaults(store.read_json(saved)), json.loads(json.dumps(cfg.to_dict()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff and diff != ["steps"]:
            raise ConfigError(f"{run_dir} holds a run of another config (differs in {', '.join(diff)}); resume it "
                              f"with its own: train(load_config(dir), dir, resume=True)")
        if diff:
            old_steps = int(old["steps"])
            if cfg.steps < old_steps:
                raise ConfigError(f"{run_dir} holds a run of {old_steps:,} steps: a run can be extended "
                                  f"(steps > {old_steps:,}), not shortened")
    trainer = Trainer(cfg, run_dir, progress=progress)       # fails (too big, bad device) before any file
    if resume:
        ck = store.load_checkpoint(run_dir)
        if ck is not None:
            trainer.restore(ck)
            if old_steps is not None:
                trainer.extend(old_steps)
    if not saved.exists() or old_steps is not None:
        store.write_json(saved, cfg.to_dict())
    from fastgrok.train.tracking import open_tracker
    trainer.tracker = open_tracker(track, run_dir, cfg.to_dict())
    return trainer.run()


def load_config(run_dir: Path | str) -> TrainConfig:
    path = Path(run_dir) / store.CONFIG
    if not path.exists():
        raise ConfigError(f"{run_dir} holds no run (no {store.CONFIG})")
    return store.read_config(path)
