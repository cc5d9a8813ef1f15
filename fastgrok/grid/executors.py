"""Running an experiment's batches: locally (one process per device: in this process, or in worker
processes when there are several devices or `workers` asks for them) or on Ray.

`run_experiment` plans the grid (plan.py) into its run directory (rundir.py), runs the free calibration
controls first (w_c per setting, cached in calibration.json), then the packed batches (grid.py's jobs).
Either executor only maps jobs to results; the driver alone writes the run directory (a part per
finished batch), so both give identical results and a rerun of the same command resumes: finished
batches are skipped, a running one continues from its checkpoint.

Ray: connects to a running cluster (RAY_ADDRESS, or `ray.init(address="auto")`), else starts a local
one (shut down at the end). Each batch is one task pinned to one GPU when the cluster has GPUs, else to
one CPU; a task that fails (a lost worker, a CUDA error) is retried up to `MAX_RETRIES` times and
resumes from its checkpoint (the run directory must be on storage every node sees). A local cluster the
driver started does not outlive it, even after kill -9 (fastgrok/watchdog.py).

SLURM (grid/slurm.py, through submitit): the jobs as one job array; the driver may exit, and a rerun
collects what finished and resubmits what no live job holds.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import torch

from fastgrok.grid import extend, jobs as grid, rundir, watchdog
from fastgrok import store
from fastgrok.train import tracking
from fastgrok.config import DTYPES, ConfigError, small_test_set_warning, tiny_tau_warning
from fastgrok.grid.experiments import apply_overrides, load_experiment
from fastgrok.grid.plan import batch_config, calibration_steps, clamp_never_starts, resolve_compile, snapshot_bytes
from fastgrok.train.snapshots import human
from fastgrok.train.state import resolve_device
from fastgrok.grid.workers import PoolMapper

EXECUTORS = ("local", "ray", "slurm")
MAX_RETRIES = 3


def run_experiment(experiment, *, overrides: dict | None = None, out: Path | str | None = None,
                   executor: str = "local", device: str = "auto", progress: bool = True,
                   workers: int | None = None, slurm: dict | None = None) -> Path:
    """Run (or resume) an experiment into `out` (default runs/<name>); returns the run directory.

    The local executor runs `workers` processes, one per device: by default one per CUDA device (one on
    a CPU); with one worker, jobs run in this process. Workers change where a batch runs, not its results.
    `slurm`: the SLURM executor's options (slurm.SlurmOptions), over the spec's [engine] fields; with
    wait False it raises slurm.Submitted once the jobs of the next stage are in SLURM.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be an integer >= 1; got {workers!r}")
    if workers is not None and executor != "local":
        raise ConfigError("workers is an option of the local executor; Ray places its tasks itself")
    if slurm and executor != "slurm":
        flag = next(iter(slurm)).replace("_", "-").replace("wait", "no-wait")
        raise ConfigError(f"--{flag} is an option of the SLURM executor (--executor slurm)")
    spec = apply_overrides(load_experiment(experiment), **(overrides or {}))
    slurm_opts = None
    if executor == "slurm":
        from fastgrok.grid import slurm as slurm_mod
        slurm_opts = slurm_mod.check(slurm_mod.options(spec.engine, **(slurm or {})))   # before any write
        workers = 1
    elif executor == "local":
        dev = resolve_device(device)           # a CUDA request without CUDA fails here, before any work
        n_dev = torch.cuda.device_count() if dev.type == "cuda" else 1
        workers = workers or n_dev
    else:
        _import_ray()
        workers = 1
    run_dir = Path(out) if out is not None else Path("runs") / spec.name
    with store.writer_lock(run_dir):            # one writer per run directory (a second is refused)
        return _run_locked(spec, run_dir, executor, device, progress, workers,
                           n_dev if executor == "local" else 1, dev if executor == "local" else None, slurm_opts)


def _run_locked(spec, run_dir, executor, device, progress, workers, n_dev, dev, slurm_opts=None) -> Path:
    local = executor == "local"                 # Ray's and SLURM's may have other devices: no preflight here
    spec.engine.track and tracking.check(spec.engine.track)     # its library is there (one line if not)
    saved = run_dir / rundir.SPEC_JSON
    if saved.is_file() and extend.is_extension(store.read_json(saved), spec.to_dict()):
        extend.extend(spec, run_dir, lambda msg: print(f"fastgrok: {msg}", file=sys.stderr, flush=True))
    plan = rundir.init_run_dir(spec, run_dir, device if local else "cpu", check=local)
    compile_mode = resolve_compile(spec, plan)
    pooled = executor != "local" or workers > 1
    bar = GridProgress(plan, run_dir, enabled=progress, live=pooled)
    snap = snapshot_bytes(spec, plan)
    if snap:
        bar.say(f"snapshots: at most {human(snap)} ((snapshots + 2) x models x (2 x params x bytes + headers)) -> "
                f"{run_dir}/snapshots/<batch>/")
    cells = plan["cells"]
    configs = [batch_config(spec, [cells[i] for i in b["cells"]]) for b in plan["batches"]]
    for warning in (small_test_set_warning(configs),
                    *(tiny_tau_warning({c["tau"] for c in cells if c["dtype"] == d}, d) for d in DTYPES)):
        if warning:
            bar.warn(warning)
    late = clamp_never_starts(spec, plan)
    if late:
        bar.warn(f"{len(late)} clamped cell(s) end before their clamp starts (budget {min(b for _, b, _ in late)} "
                 f"<= clamp start {late[0][2]}): they train unclamped")
    if executor == "ray":
        mapper = _RayMapper()
    elif executor == "slurm":
        from fastgrok.grid.slurm import SlurmMapper
        mapper = SlurmMapper(run_dir, slurm_opts, spec.name)
    elif workers > 1:
        mapper = PoolMapper(workers, devices=list(range(n_dev)) if dev.type == "cuda" else None)
    else:
        mapper = contextlib.nullcontext(_local_map)
    with mapper as run_jobs:
        _run_plan(spec, plan, run_dir, device, compile_mode, run_jobs, progress and not pooled, bar)
    return run_dir


def _run_plan(spec, plan, run_dir, device, compile_mode, mapper, progress, bar) -> None:
    """Calibrations, then the batches not done yet; the driver writes every result."""
    # 1. calibration: the free controls that set w_c, before any clamped cell
    cached = store.read_calibration(run_dir)
    jobs = [grid.calibration_job(spec, c, run_dir, device, compile_mode)
            for c in plan["calibrations"] if c["key"] not in cached]
    with bar:
        for job, (models, curves) in mapper(jobs, progress, bar):
            cal = rundir.record_calibration(run_dir, job["id"], models, curves)
            bar.note(f"calibration {job['id']}: w_c = {cal['w_c']:.4g} ({cal['n_grokked']}/{cal['seeds']} "
                     f"grokked; median ||W|| at step {cal['step']}, "
                     f"{'where the last seed grokked' if cal['source'] == 'last grok' else 'the budget'})")
            if cal["n_grokked"] == 0:
                bar.warn(f"no calibration model grokked within {calibration_steps(spec)} steps, so w_c is "
                         "not the norm at grokking and every rho is relative to it; consider more calibration "
                         "steps ([calibration] steps, --max-steps) or absolute norm_target cells")
        w_c = {k: v["w_c"] for k, v in store.read_calibration(run_dir).items()}

        # 2. the packed batches
        rundir.migrate(run_dir, plan)           # a run directory copied without parts/, or of before parts/
        rundir.check_parts(run_dir, plan)       # a damaged or foreign part is refused here, in one line
        done = rundir.done_batches(run_dir)
        jobs = [grid.batch_job(spec, plan, b, w_c, run_dir, device, compile_mode)
                for b in plan["batches"] if b["id"] not in done]
        if not jobs:
            bar.say(f"{run_dir}: every batch is already done ({len(plan['cells'])} cells)")
        tracker = tracking.open_tracker(spec.engine.track, run_dir, spec.to_dict()) if spec.engine.track else None
        n_models = sum(c["seeds"] for c in plan["cells"])
        for job, (models, curves) in mapper(jobs, progress, bar):
            rundir.write_part(run_dir, job["id"], models, curves)
            bar.batch_done(job["id"], models)
            tracker and tracker.results(models, curves, n_models)
        if tracker:
            tracker.finish(store.Results(run_dir, curves=False).models())
            tracker.close()


# ---------------------------------------------------------------------------------------------
# Executors: map jobs to (models, curves) as they finish
# ---------------------------------------------------------------------------------------------
def _local_map(jobs, progress, bar):
    for job in jobs:
        bar.start(job)
        yield job, grid.run_job(job, progress=progress)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray executor needs ray: pip install 'fastgrok[ray]'") from None
    return ray


def _ray_job(job):
    _crash_once_for_tests()
    return grid.run_job(job, progress=False)


def _crash_once_for_tests() -> None:
    """Fault injection: with FASTGROK_CRASH_ONCE=PATH, the first task to start (the one that creates PATH)
    kills its worker process, as a lost node would; the tests check that Ray retries it."""
    marker = os.environ.get("FASTGROK_CRASH_ONCE")
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os._exit(3)


class _RayMapper:
    """Maps jobs to Ray tasks. Joins a running cluster (or uses the caller's `ray.init`) on its first jobs,
    else starts a local one, once per run (calibrations and batches alike), shut down on exit."""

    def __init__(self):
        self.ray, self.started, self.task, self.watchdog = _import_ray(), False, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()
        watchdog.stop(self.watchdog)

    def _connect(self):
        ray = self.ray
        if not ray.is_initialized():
            on_term = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError):
                # no cluster to join: a local one, which goes with this process even when it is killed
                # outright (fastgrok.grid.watchdog; Ray's own parent-death signals miss the raylet's agents)
                self.watchdog = watchdog.start()
                ray.init(log_to_driver=False)
                self.started = True
            if callable(on_term):
                # ray.init installs its core's failure handler for SIGTERM (a crash dump and an abort);
                # the driver's own (cli: stop as on Ctrl-C) is put back
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, on_term)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=MAX_RETRIES,
                               retry_exceptions=[RuntimeError, OSError])(_ray_job)

    def __call__(self, jobs, progress, bar):
        if not jobs:
            return
        if self.task is None:
            self._connect()
        ray = self.ray
        pending = {self.task.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            yield job, ray.get(ready[0])


# ---------------------------------------------------------------------------------------------
# Progress across the grid
# ---------------------------------------------------------------------------------------------
class GridProgress:
    """Cells done, models grokked and an ETA for the whole grid (from the fraction of cells done).

    `live` (Ray): one rich bar. Otherwise (local) the trainer shows a bar per batch and this prints
    one line per finished batch (rich allows one live display at a time)."""

    def __init__(self, plan: dict, run_dir: Path, enabled: bool, live: bool):
        self.enabled, self.live = enabled, live and enabled
        self.n_cells = len(plan["cells"])
        self.n_models = sum(c["seeds"] for c in plan["cells"])
        self.cells_of = {b["id"]: b["cells"] for b in plan["batches"]}
        self.plan = plan
        done = rundir.done_batches(run_dir)
        self.cells_done = sum(len(self.cells_of[b]) for b in done if b in self.cells_of)
        self.start_cells = self.cells_done
        self.grokked = 0
        if done:
            self.grokked = int(store.Results(run_dir, models_required=("t_grok",), curves=False).models()["t_grok"]
                               .notna().sum())
        self.t0 = time.monotonic()
        if enabled:
            from rich.console import Console
            self.console = Console(stderr=True)

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.p = Progress(TextColumn("cells"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), console=self.console)
            self.p.__enter__()
            self.task = self.p.add_task("grid", total=self.n_cells, completed=self.cells_done, info=self._info())
        return self

    def __exit__(self, *exc):
        if self.live:
            self.p.__exit__(*exc)

    def _info(self) -> str:
        return f"grokked {self.grokked}/{self.n_models}"

    def note(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"fastgrok: {msg}", markup=False, soft_wrap=True)

    def say(self, msg: str) -> None:
        """Printed with or without progress (--quiet), on stderr."""
        if self.enabled:
            self.console.print(f"fastgrok: {msg}", markup=False, soft_wrap=True)
        else:
            print(f"fastgrok: {msg}", file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        self.say(f"warning: {msg}")

    def start(self, job: dict) -> None:
        if self.enabled and job["kind"] == "batch":
            cells = self.cells_of[job["id"]]
            c = self.plan["cells"][cells[0]]
            self.note(f"batch {job['id']}: {len(cells)} cells, {len(job['rows'])} models, p={c['p']} {c['model']} "
                      f"{c['loss']} {c['dtype']}")
        elif self.enabled:
            self.note(f"calibration {job['id']}: {len(job['rows'])} free models")

    def batch_done(self, batch_id: str, models) -> None:
        self.cells_done += len(self.cells_of[batch_id])
        self.grokked += int(models["t_grok"].notna().sum())
        if not self.enabled:
            return
        if self.live:
            self.p.update(self.task, completed=self.cells_done, info=self._info())
            return
        el = time.monotonic() - self.t0
        new = self.cells_done - self.start_cells
        eta = el / new * (self.n_cells - self.cells_done) if new else float("nan")
        self.note(f"cells {self.cells_done}/{self.n_cells} done, {self._info()}, {el:.0f} s elapsed, "
                  f"ETA {_fmt_s(eta)}")


def _fmt_s(s: float) -> str:
    if s != s:
        return "-"
    h, r = divmod(int(s), 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
