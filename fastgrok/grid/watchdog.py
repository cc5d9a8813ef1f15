"""A watchdog that takes a driver's processes with it when the driver dies, however it dies (kill -9 too).

The Ray executor starts one before it starts a local Ray cluster (executors._RayMapper). Ray arms a
parent-death signal in the processes it starts itself (GCS, raylet, dashboard, monitors), but the raylet's
own children, its dashboard and runtime-env agents, see the raylet die and then spend 60 s trying to report
that to the dead GCS (ray 2.60: two processes left for ~65 s after a kill -9 of the driver). The watchdog
follows the driver's descendants started after itself (every POLL_S, from /proc; children the driver had
before are none of its business) and, once the pipe from the driver closes without a `done` line (the
driver died), stops those still running: SIGTERM, then SIGKILL after GRACE_S. Each is matched by its start time as well as its pid, so a pid reused meanwhile is left alone.

    python -m fastgrok.grid.watchdog      stdin: a pipe from the driver; "done" on it: exit, stopping nothing

Linux only (it reads /proc); elsewhere `start` returns None. Imports nothing heavy: it starts in ~50 ms.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5
"""How often the watchdog lists the driver's descendants (a few ms of CPU each time)."""
GRACE_S = 3.0
"""How long the processes left have after SIGTERM before SIGKILL."""


def start() -> subprocess.Popen | None:
    """Start a watchdog of this process (Linux); `stop` it before a normal exit."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen([sys.executable, "-m", "fastgrok.grid.watchdog"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen | None) -> None:
    """Tell the watchdog the driver is exiting normally (it stops nothing) and wait for it."""
    if proc is None:
        return
    try:
        proc.stdin.write(b"done\n")
        proc.stdin.close()
    except OSError:                         # it is gone already
        pass
    proc.wait()


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every live process in /proc (zombies left out:
    they are dead, waiting for their parent to read their exit status)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:                     # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()      # after "pid (comm) ": state, ppid, ... starttime
        if fields[0] != b"Z":
            out[int(name)] = (int(fields[1]), int(fields[19]))
    return out


def descendants(root: int, procs: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every descendant of root (root excluded)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid][1]
        todo += children.get(pid, [])
    return out


def _alive(known: dict[int, int]) -> dict[int, int]:
    procs = _processes()
    return {pid: t for pid, t in known.items() if pid in procs and procs[pid][1] == t}


def _signal_all(known: dict[int, int], sig: int) -> None:
    for pid in known:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the driver's: it stops and says "done"
    driver, me = os.getppid(), os.getpid()
    born = _processes()[me][1]              # (its start time: only processes started after it count)
    known: dict[int, int] = {}
    buf = b""
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready:
            data = os.read(sys.stdin.fileno(), 4096)
            buf += data
            if b"done" in buf:
                return
            if not data:                    # EOF without "done": the driver died
                break
        if os.getppid() != driver:          # (reparented: the pipe's EOF follows at once)
            continue
        procs = _processes()                # those seen before and still running, and any new ones
        known = {pid: t for pid, t in {**known, **descendants(driver, procs)}.items()
                 if pid != me and t >= born and pid in procs and procs[pid][1] == t}
    left = _alive(known)
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _alive(left)
    _signal_all(left, signal.SIGKILL)


if __name__ == "__main__":
    main()
