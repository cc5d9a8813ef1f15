"""Local worker processes for `fastgrok run --workers N` (one per device): spawned as jobs need them, each
with its own pipe to the driver, so the driver knows which job each runs.

Lifecycle promises (tests/test_cli_run_dirs.py): a driver killed at any instant, even while its workers
still import torch, leaves no worker behind (each arms a parent-death signal, then checks its driver is
alive); a worker that dies mid-job stops the run with one line naming the job (WorkerDied), the others
checkpointing; Ctrl-C or SIGTERM to the driver stops every worker at its next step, checkpointed, even
one that comes while workers are being started (held, then acted on: tests/test_reliability_inputs.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from multiprocessing import resource_tracker

import torch

from fastgrok.grid import jobs as grid
from fastgrok.train import signals as stop_signals


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # (a Ctrl-C held since start-up is dropped here)
    signal.signal(signal.SIGTERM, _note_stop)
    stop_signals.only(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # held since start-up: a SIGTERM is noted now
    if stopping.value:                          # stopped while this worker started up (belt and braces)
        stop_signals.note_stop(signal.SIGTERM)
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
    stop_signals.note_stop(signum)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _stop_signals_held():
    """SIGINT and SIGTERM held inside and acted on after (main thread only; elsewhere nothing changes).

    Held, not ignored: a Ctrl-C or SIGTERM that comes while workers start is the driver's to act on once
    they are started (ignoring it lost it: the run went on to the end). They are blocked in this thread, so
    the processes started inside inherit them blocked (a worker unblocks them once its own handlers are
    set); one delivered meanwhile to another thread of this process is noted by a placeholder handler. On
    exit the handlers are put back and the signals unblocked: a blocked one is delivered to its handler
    then, a noted one raised again."""
    held = []
    try:
        old = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in STOP_SIGNALS}
    except ValueError:                          # not the main thread
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


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


class PoolMapper:
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
        # workers start with SIGINT and SIGTERM blocked (inherited) until _worker_main sets its handlers: a
        # signal while a worker still imports torch would otherwise kill it with a traceback. The resource
        # tracker is started first: starting it (in a spawn's launch) unblocks both, which would leave the
        # first worker unprotected
        resource_tracker.ensure_running()
        with _stop_signals_held():
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
        self.stopping.value = 1                     # for a worker still starting up (SIGTERM held there)
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
