"""The run directory: config, checkpoints and results, every file written atomically.

    DIR/config.json        the run's TrainConfig (asdict)
    DIR/checkpoint.pt      resumable state (tensors + host-side records), replaced atomically
    DIR/models.parquet     one row per model
    DIR/curves.parquet     long format: model, step, metric, value
    DIR/progress.json      step reached, done flag
    DIR/snapshots/         weight snapshots (`--snapshots N`; snapshots.py): step_*.npz, index.json

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the old one, so a kill at any instant leaves either the old or the new version, never a torn file.

Reading: a file that cannot be used (truncated, corrupt, of the wrong type, from another run) raises
StateError, one line naming the file and what to do about it (`advice`), never a traceback.
Checkpoints and grid parts carry the sha256 of the configuration they belong to (`fingerprint`).

One writer per run directory: `fastgrok run`, `train` and `train --resume` hold an exclusive flock on
DIR/.lock (`writer_lock`) while they write; a second writer is refused, naming the holder's PID. The OS
drops the lock when its process dies, so even `kill -9` leaves no stale lock. Readers (status, analyze)
take no lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from .config import ConfigError, TrainConfig

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODELS = "models.parquet"
CURVES = "curves.parquet"
PROGRESS = "progress.json"
SPEC_JSON = "spec.json"                 # a grid run (fastgrok run): its spec and plan
PLAN = "plan.json"
LOCK = ".lock"


FINGERPRINT_KEY = b"fastgrok.fingerprint"
"""The parquet metadata key of a grid part's fingerprint (the run's spec)."""


class StateError(ConfigError):
    """A run directory's file that cannot be used: unreadable, truncated, of the wrong shape or of another
    run. Its message is one line: the file, what is wrong, what to do."""


def advice(path: Path) -> str:
    """What to do about a bad state file, by its name."""
    path = Path(path)
    name, where = path.name, path.parent
    if name == CHECKPOINT:
        return ("move it away to restart that run (or batch) from step 0, or put back the run's own checkpoint")
    if name == CONFIG:
        return "put back the run's own config.json (it must match its checkpoint), or start a new run with another --out"
    if name == PROGRESS:
        return "delete it: it only reports progress and is written again at the next checkpoint"
    if name in (PLAN, SPEC_JSON):
        return "put back the grid's own file, or rerun into a new --out"
    if name == "calibration.json":
        return "delete it and rerun the same `fastgrok run` command: each w_c is read again from calibration/"
    if where.name == "parts" and name.endswith(".parquet"):
        batch = name.split(".")[0]
        return (f"delete parts/{batch}.models.parquet and parts/{batch}.curves.parquet and rerun the same "
                "`fastgrok run` command: that batch trains again")
    if name in (MODELS, CURVES):
        return ("delete it and write it again: `fastgrok train --resume DIR` (a train run) or the same "
                "`fastgrok run` command (a grid, from parts/)")
    return "delete it or put back the original"


def state_error(path: Path, why: str) -> StateError:
    return StateError(f"{path}: {why}; {advice(path)}")


def fingerprint(obj) -> str:
    """sha256 of obj's canonical JSON (sorted keys, no spaces): what identifies a configuration."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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


def read_json(path: Path, kind: type | None = dict):
    """The JSON in path (a StateError if it is not valid JSON, or its top level is not a `kind`)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError
        raise state_error(path, f"not valid JSON, truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
    except IsADirectoryError:
        raise state_error(path, "a directory, not a file") from None
    if kind is not None and not isinstance(obj, kind):
        raise state_error(path, f"holds a JSON {type(obj).__name__}, not the expected {kind.__name__}")
    return obj


def read_progress(path: Path) -> dict:
    """progress.json: {"step": int, "done": bool, "steps": int (optional)} (a StateError otherwise)."""
    pr = read_json(path)
    ok = isinstance(pr.get("step"), int) and isinstance(pr.get("done", False), bool) \
        and isinstance(pr.get("steps", 0), int) \
        and all(isinstance(pr.get(k, 0), int) for k in ("models", "memorized", "grokked", "diverged")) \
        and (pr.get("checkpoint") is None or isinstance(pr["checkpoint"], int))
    if not ok:
        raise state_error(path, "not a progress record (step, done, steps)")
    return pr


def read_config(path: Path) -> TrainConfig:
    """A train run's config.json as its TrainConfig (a StateError naming the file for a hand-edited value:
    "seeds": "4", a list for p)."""
    d = read_json(path)
    try:
        return TrainConfig.from_dict(d)
    except (ConfigError, TypeError, ValueError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise state_error(path, f"not a valid run config ({why})") from None


def write_parquet(path: Path, df: pd.DataFrame, fingerprint: str | None = None) -> None:
    """df to path; `fingerprint` goes into the file's metadata (`read_fingerprint`)."""
    if fingerprint is None:
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint.encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet(path: Path, columns: list[str] | None = None, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A parquet table (a StateError if it cannot be read or lacks a `required` column)."""
    try:
        df = pd.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise
    except Exception as e:                              # pyarrow's errors for a torn or foreign file vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise state_error(path, f"not a readable parquet table, truncated or corrupt ({first})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise state_error(path, f"lacks column(s) {', '.join(missing)}: not a fastgrok results table")
    return df


def _schema(path: Path):
    import pyarrow.parquet as pq
    try:
        return pq.read_schema(path)
    except Exception as e:                              # a torn or foreign file: pyarrow's errors vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise state_error(path, f"not a readable parquet table, truncated or corrupt ({first})") from None


def read_parquet_schema(path: Path) -> list[str]:
    """The column names of a parquet file (read from its footer only; a StateError if unreadable)."""
    return list(_schema(path).names)


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint in a parquet file's metadata (None: written without one, by an older fastgrok)."""
    fp = (_schema(path).metadata or {}).get(FINGERPRINT_KEY)
    return fp.decode() if fp is not None else None


def save_checkpoint(run_dir: Path, payload: dict) -> None:
    import torch                                        # here: the tables' readers (report) need no torch
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(payload, tmp))


CHECKPOINT_KEYS = ("step", "state", "records", "done", "capture_shares")


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's payload, None if there is none (a StateError if it is unreadable or not one of
    fastgrok's: the caller checks its fingerprint)."""
    import torch
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:                              # torch.load's errors for a torn file vary widely
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise state_error(path, f"not a readable checkpoint, truncated or corrupt ({type(e).__name__}: {first})") \
            from None
    if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS) or not isinstance(ck["state"], dict):
        raise state_error(path, "not a fastgrok checkpoint (its keys are not a run's)")
    return ck
