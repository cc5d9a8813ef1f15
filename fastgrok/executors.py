"""Running an experiment's batches: locally (one process per device: in this process, or in worker
processes when there are several devices or `workers` asks for them) or on Ray.

`run_experiment` plans the grid (grid.py), runs the free calibration controls first (w_c per setting,
cached in calibration.json), then the packed batches. Either executor only maps jobs to results; the
driver alone writes the run directory (a part per finished batch), so both give identical results and
a rerun of the same command resumes: finished batches are skipped, a running one continues from its
checkpoint.

Ray: connects to a running cluster (RAY_ADDRESS, or `ray.init(address="auto")`), else starts a local
one (shut down at the end). Each batch is one task pinned to one GPU when the cluster has GPUs, else to
one CPU; a task that fails (a lost worker, a CUDA error) is retried up to `MAX_RETRIES` times and
resumes from its checkpoint (the run directory must be on storage every node sees).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import extend, grid, store
from . import trainer as trainer_mod
from .config import ConfigError
from .experiments import apply_overrides, load_experiment

EXECUTORS = ("local", "ray")
MAX_RETRIES = 3


def run_experiment(experiment, *, overrides: dict | None = None, out: Path | str | None = None,
                   executor: str = "local", device: str = "auto", progress: bool = True,
                   workers: int | None = None) -> Path:
    """Run (or resume) an experiment into `out` (default runs/<name>); returns the run directory.

    The local executor runs `workers` processes, one per device: by default one per CUDA device (one on
    a CPU); with one worker, jobs run in this process. Workers change where a batch runs, not its results.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be an integer >= 1; got {workers!r}")
    if workers is not None and executor != "local":
        raise ConfigError("workers is an option of the local executor; Ray places its tasks itself")
    spec = apply_overrides(load_experiment(experiment), **(overrides or {}))
    if executor == "local":
        dev = grid.resolve_device(device)      # a CUDA request without CUDA fails here, before any work
        n_dev = torch.cuda.device_count() if dev.type == "cuda" else 1
        workers = workers or n_dev
    else:
        _import_ray()
        workers = 1
    run_dir = Path(out) if out is not None else Path("runs") / spec.name
    with store.writer_lock(run_dir):            # one writer per run directory (a second is refused)
        return _run_locked(spec, run_dir, executor, device, progress, workers,
                           n_dev if executor == "local" else 1, dev if executor == "local" else None)


def _run_locked(spec, run_dir, executor, device, progress, workers, n_dev, dev) -> Path:
    local = executor == "local"                 # Ray's workers may have other devices: no preflight here
    saved = run_dir / grid.SPEC_JSON
    if saved.is_file() and extend.is_extension(store.read_json(saved), spec.to_dict()):
        extend.extend(spec, run_dir, lambda msg: print(f"fastgrok: {msg}", file=sys.stderr, flush=True))
    plan = grid.init_run_dir(spec, run_dir, device if local else "cpu", check=local)
    compile_mode = grid.resolve_compile(spec, plan)
    pooled = executor == "ray" or workers > 1
    bar = GridProgress(plan, run_dir, enabled=progress, live=pooled)
    late = grid.clamp_never_starts(spec, plan)
    if late:
        bar.warn(f"{len(late)} clamped cell(s) end before their clamp starts (budget {min(b for _, b, _ in late)} "
                 f"<= clamp start {late[0][2]}): they train unclamped")
    if executor == "ray":
        mapper = _RayMapper()
    elif workers > 1:
        mapper = _PoolMapper(workers, devices=list(range(n_dev)) if dev.type == "cuda" else None)
    else:
        mapper = contextlib.nullcontext(_local_map)
    with mapper as run_jobs:
        _run_plan(spec, plan, run_dir, device, compile_mode, run_jobs, progress and not pooled, bar)
    return run_dir


def _run_plan(spec, plan, run_dir, device, compile_mode, mapper, progress, bar) -> None:
    """Calibrations, then the batches not done yet; the driver writes every result."""
    # 1. calibration: the free controls that set w_c, before any clamped cell
    cached = grid.read_calibration(run_dir)
    jobs = [grid.calibration_job(spec, c, run_dir, device, compile_mode)
            for c in plan["calibrations"] if c["key"] not in cached]
    with bar:
        for job, (models, curves) in mapper(jobs, progress, bar):
            cal = grid.record_calibration(run_dir, job["id"], models, curves)
            bar.note(f"calibration {job['id']}: w_c = {cal['w_c']:.4g} ({cal['n_grokked']}/{cal['seeds']} "
                     f"grokked{'' if cal['source'] == 'grok' else '; none grokked: median final ||W||'})")
            if cal["n_grokked"] == 0:
                bar.warn(f"no calibration model grokked within {grid.calibration_steps(spec)} steps, so w_c is "
                         "not the norm at grokking and every rho is relative to it; consider more calibration "
                         "steps ([calibration] steps, --max-steps) or absolute norm_target cells")
        w_c = {k: v["w_c"] for k, v in grid.read_calibration(run_dir).items()}

        # 2. the packed batches
        grid.restore_parts(run_dir, plan)       # a run directory copied without parts/ keeps its results
        grid.consolidate(run_dir)               # repairs a crash between a part and the consolidation
        done = grid.done_batches(run_dir)
        jobs = [grid.batch_job(spec, plan, b, w_c, run_dir, device, compile_mode)
                for b in plan["batches"] if b["id"] not in done]
        if not jobs:
            bar.say(f"{run_dir}: every batch is already done ({len(plan['cells'])} cells)")
        for job, (models, curves) in mapper(jobs, progress, bar):
            grid.write_part(run_dir, job["id"], models, curves)
            bar.batch_done(job["id"], models)


# ---------------------------------------------------------------------------------------------
# Executors: map jobs to (models, curves) as they finish
# ---------------------------------------------------------------------------------------------
def _local_map(jobs, progress, bar):
    for job in jobs:
        bar.start(job)
        yield job, grid.run_job(job, progress=progress)


class WorkerDied(RuntimeError):
    """A local worker process died while it ran a job (the OOM killer, kill -9): the run stops, keeping
    the job's last checkpoint, and a rerun resumes it."""


def _worker_main(index, driver_pid, conn, devices, threads, stopping) -> None:
    """A local worker process: takes jobs from its pipe to the driver, returns ("ok", result) or
    ("err", exception), until the driver sends None or goes away."""
    # the start-up window: a driver killed while this process imported torch (seconds) left it orphaned
    # before the parent-death signal existed. Arm the signal first, then check the driver is still there:
    # together they leave no instant at which its death goes unnoticed
    _sigterm_when_driver_dies()
    if os.getppid() != driver_pid:
        os._exit(143)
    global _DRIVER_PID
    _DRIVER_PID = driver_pid
    if devices:
        torch.cuda.set_device(devices[index % len(devices)])
    torch.set_num_threads(threads)
    # Ctrl-C reaches every process of the terminal's group: the driver alone handles it and stops the
    # workers with SIGTERM, on which a running trainer checkpoints and raises Interrupted. Outside a
    # trainer (idle, or setting a batch up) SIGTERM is noted for the next trainer (see _note_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _note_stop)
    trainer_mod.STOP_SIGNALS = (signal.SIGTERM,)
    if stopping.value:                          # stopped while this worker started up (SIGTERM ignored there)
        trainer_mod.PENDING_STOP = signal.SIGTERM
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):             # the driver is gone: no one to serve
            os._exit(143)
        if job is None:
            return
        try:
            reply = ("ok", grid.run_job(job, progress=False))
        except BaseException as e:              # the driver re-raises it (Interrupted, a ConfigError, ...)
            reply = ("err", e)
        if os.getppid() != driver_pid:
            os._exit(143)                       # the driver is gone: no one takes the result or sends more
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            os._exit(143)
        except Exception as e:                  # an exception that cannot be pickled: its text
            conn.send(("err", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))


def _sigterm_when_driver_dies() -> None:
    """Linux: have the kernel send this worker SIGTERM when its driver dies (even by kill -9): a running
    trainer then checkpoints and stops, and the worker exits (see _note_stop), instead of training on for
    nobody. (The driver starts its workers from its main thread, which the signal follows.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


_DRIVER_PID = None


def _note_stop(signum, frame) -> None:
    """A worker's SIGTERM: noted for its trainer (see _worker_main). A worker whose driver is gone (killed
    outright) has no one to serve: it exits at once (a running trainer's own handler checkpoints first)."""
    if _DRIVER_PID is not None and os.getppid() != _DRIVER_PID:
        os._exit(128 + signum)
    trainer_mod.PENDING_STOP = signum


@contextlib.contextmanager
def _stop_signals_ignored():
    """SIGINT and SIGTERM ignored inside (main thread only; elsewhere nothing changes), restored after."""
    try:
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:                          # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


STOP_WAIT_S = 60.0
"""After a Ctrl-C, how long the driver waits for local workers to checkpoint and exit before killing them."""


def _job_name(job: dict) -> str:
    return f"batch {job['id']}" if job["kind"] == "batch" else f"calibration {job['id']}"


def _how_it_died(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (", as the out-of-memory killer does" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


class _PoolMapper:
    """Maps jobs to up to `n` worker processes (spawned, one per device, started as jobs need them); each
    worker has its own pipe, so the driver knows which job each one runs. Results arrive as jobs finish and
    the driver writes them. A worker that dies mid-job raises WorkerDied naming its job; the others are
    stopped as on Ctrl-C. CPU workers share the cores (threads each = cores // n, at least 1)."""

    def __init__(self, n: int, devices: list[int] | None):
        import multiprocessing as mp
        self.ctx = mp.get_context("spawn")
        self.n, self.devices = n, devices
        self.threads = max(1, torch.get_num_threads() // n) if not devices else torch.get_num_threads()
        self.stopping = self.ctx.Value("b", 0, lock=False)
        self.workers = []                       # [process, pipe end, job or None]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:                # Ctrl-C, a dead worker, an error: the others checkpoint
            self._stop_workers()
            return
        for w in self.workers:
            with contextlib.suppress(OSError):
                w[1].send(None)
        for w in self.workers:
            w[0].join()

    def _start(self, k: int) -> None:
        # workers start with SIGINT and SIGTERM ignored (inherited) until _worker_main sets its handlers: a
        # signal while a worker still imports torch would otherwise kill it with a traceback
        with _stop_signals_ignored():
            for _ in range(k):
                mine, theirs = self.ctx.Pipe()
                proc = self.ctx.Process(target=_worker_main, daemon=False,
                                        args=(len(self.workers), os.getpid(), theirs, self.devices, self.threads,
                                              self.stopping))
                proc.start()
                theirs.close()                  # the worker's end lives in the worker only: EOF when it dies
                self.workers.append([proc, mine, None])

    def _stop_workers(self) -> None:
        """SIGTERM every worker (a running trainer checkpoints and stops; an idle or starting worker notes
        it, so its next trainer stops at once), then wait up to STOP_WAIT_S for them to exit and kill what
        is left (checkpoints are atomic: at most the work since the last is lost). A second Ctrl-C kills
        them at once."""
        self.stopping.value = 1                     # for a worker still starting up (SIGTERM ignored there)
        for proc, conn, _ in self.workers:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGTERM)
            conn.close()                            # an idle worker reads EOF and exits
        deadline = time.monotonic() + STOP_WAIT_S
        try:
            for proc, _, _ in self.workers:
                proc.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        for proc, _, _ in self.workers:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.workers = []

    def __call__(self, jobs, progress, bar):
        from multiprocessing.connection import wait
        queue = list(jobs)
        self._start(min(self.n, len(queue)) - len(self.workers))
        while queue or any(w[2] is not None for w in self.workers):
            for w in self.workers:
                if w[2] is None and queue:
                    w[2] = queue.pop(0)
                    w[1].send(w[2])
            busy = [w for w in self.workers if w[2] is not None]
            ready = set(wait([w[1] for w in busy] + [w[0].sentinel for w in self.workers]))
            for w in list(self.workers):
                proc, conn, job = w
                if job is not None and conn in ready:
                    try:
                        status, payload = conn.recv()
                    except (EOFError, OSError):  # died mid-reply: as below
                        status, payload = None, None
                    if status is not None:
                        w[2] = None
                        if status == "err":
                            raise payload
                        yield job, payload
                        continue
                if proc.sentinel in ready or (job is not None and conn in ready):
                    proc.join()
                    if job is not None:
                        raise WorkerDied(f"the worker running {_job_name(job)} died ({_how_it_died(proc.exitcode)}); "
                                         "the other workers checkpointed and stopped; rerun the same command to "
                                         "resume (from the batch's last checkpoint)")
                    self.workers.remove(w)      # died idle: its job-less place is taken by a new one if needed
                    conn.close()
                    if queue and len(self.workers) < self.n:
                        self._start(1)


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
        self.ray, self.started, self.task = _import_ray(), False, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()

    def _connect(self):
        ray = self.ray
        if not ray.is_initialized():
            on_term = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError):
                ray.init(log_to_driver=False)          # no cluster to join: a local one
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
        done = grid.done_batches(run_dir)
        self.cells_done = sum(len(self.cells_of[b]) for b in done if b in self.cells_of)
        self.start_cells = self.cells_done
        self.grokked = 0
        if done and (Path(run_dir) / "models.parquet").exists():
            import pandas as pd
            self.grokked = int(pd.read_parquet(Path(run_dir) / "models.parquet")["t_grok"].notna().sum())
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
