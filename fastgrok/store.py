"""The run directory: config, checkpoints and results, every file written atomically.

    DIR/config.json        the run's TrainConfig (asdict)
    DIR/checkpoint.pt      resumable state (tensors + host-side records), replaced atomically
    DIR/models.parquet     one row per model
    DIR/curves.parquet     long format: model, step, metric, value
    DIR/progress.json      step reached, done flag

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the old one, so a kill at any instant leaves either the old or the new version, never a torn file.

One writer per run directory: `fastgrok run`, `train` and `train --resume` hold an exclusive flock on
DIR/.lock (`writer_lock`) while they write; a second writer is refused, naming the holder's PID. The OS
drops the lock when its process dies, so even `kill -9` leaves no stale lock. Readers (status, analyze)
take no lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODELS = "models.parquet"
CURVES = "curves.parquet"
PROGRESS = "progress.json"
SPEC_JSON = "spec.json"                 # a grid run (fastgrok run): its spec and plan
PLAN = "plan.json"
LOCK = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 64 * 2**20
"""A writer that fails otherwise than with ENOSPC (torch.save says "unexpected pos ...") while the file
system has less free space than this is taken to have run out of it."""


class DiskFull(OSError):
    """The disk filled up while writing `filename`; the file's previous version is kept."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _out_of_space(e: BaseException, directory: Path) -> bool:
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return True
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then fsync and rename tmp over path. A full disk raises DiskFull, the old
    version of path left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())         # mkstemp makes 0600; results are shared like any file
        os.replace(tmp, path)
    except Exception as e:
        if not isinstance(e, DiskFull) and _out_of_space(e, path.parent):
            raise DiskFull(path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Locked(RuntimeError):
    """Another live process holds the run directory's writer lock."""


def _holder(fd: int) -> str:
    """The PID the lock's holder wrote into the lock file ("?" if it has not yet)."""
    for _ in range(20):                     # the holder writes its PID just after it takes the lock
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "?"


_HELD: set[str] = set()
"""Run directories whose writer lock this process holds (flock is per open file: a second one would
conflict with the first)."""


@contextlib.contextmanager
def writer_lock(run_dir: Path):
    """Hold run_dir's writer lock inside (making the directory). Raises Locked when another process holds
    it. A directory this call made and left holding nothing but the lock file (the run was refused before
    writing) is removed again, with the parents it made, so a refused run leaves no trace."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _HELD:                        # this process holds it already (the CLI around a library call)
        yield
        return
    made = []
    for d in (run_dir, *run_dir.absolute().parents):
        if d.exists():
            break
        made.append(d)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        yield                               # a file in the way: nothing to lock; the caller's checks say so
        return
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Locked(f"{run_dir} is being written by another fastgrok process (PID {holder}); wait for it "
                         "to finish or stop it; one writer per run directory") from None
        try:                                # the file locked may have just been removed (by the cleanup below)
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(key)
        if made and [q.name for q in run_dir.iterdir()] == [LOCK]:
            os.unlink(path)
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)         # empty while nobody holds it (a reader's snapshot does not change)
        os.close(fd)                        # releases the lock


def lock_holder(run_dir: Path) -> int | None:
    """The PID of the live process holding run_dir's writer lock, or None (read without locking: a
    reader never stands in a writer's way)."""
    try:
        pid = int((Path(run_dir) / LOCK).read_text().strip())
        os.kill(pid, 0)                     # the file keeps the PID of a writer killed with -9: alive?
    except (OSError, ValueError):
        return None
    return pid


def holds_train_run(run_dir: Path) -> bool:
    """Whether run_dir holds a `fastgrok train` run (its config.json is a TrainConfig; a grid run's
    config.json names its experiment, and a grid keeps its checkpoints under batches/)."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).exists():
        return True
    cfg = run_dir / CONFIG
    if not cfg.exists():
        return False
    try:
        return "experiment" not in read_json(cfg)
    except (OSError, ValueError):
        return True


def holds_grid_run(run_dir: Path) -> bool:
    """Whether run_dir holds a `fastgrok run` grid (its spec and plan, or a config.json naming an experiment)."""
    run_dir = Path(run_dir)
    if (run_dir / SPEC_JSON).exists() or (run_dir / PLAN).exists():
        return True
    cfg = run_dir / CONFIG
    try:
        return cfg.exists() and "experiment" in read_json(cfg)
    except (OSError, ValueError):
        return False


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, w)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def save_checkpoint(run_dir: Path, payload: dict) -> None:
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
