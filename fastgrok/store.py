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
Checkpoints, results tables, grid parts and plans carry the sha256 of the configuration they belong to
(`fingerprint`; `run_identity` is a run directory's), and a reader refuses a file of another run.

Seals: every state file fastgrok writes (JSON, parquet, checkpoint, snapshot) carries a sha256 of its own
bytes (`seal`), checked on every read (`read_verified`): one flipped byte anywhere in the file is refused
in one line, never read as a changed result. The digest sits in the file's own format, so the files stay
plain JSON, parquet and zip for other tools: a top-level JSON key, a parquet metadata key, a zip comment
(torch.save's and .npz archives), each `fastgrok.sha256` with the value `FGSUM1:` + 64 hex digits; the
digest is that of the whole file with those 64 digits read as "0" * 64. A file with neither the key nor
the marker was written before seals (2026-12-07) and is read as it was then.

Nothing read from a run directory runs code: checkpoints load with `torch.load(weights_only=True)` (plain
types and tensors; `load_checkpoint` migrates those written before, which pickled a results class and
numpy arrays, through an allowlist of exactly those types), snapshots with `np.load(allow_pickle=False)`.

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
import math
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from fastgrok.config import AXIS_ADDED_DEFAULTS, GRID_AXES, PER_MODEL, ConfigError, TrainConfig

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODELS = "models.parquet"
CURVES = "curves.parquet"
PROGRESS = "progress.json"
SPEC_JSON = "spec.json"                 # a grid run (fastgrok run): its spec and plan
PLAN = "plan.json"
CALIBRATION = "calibration.json"       # a grid run's clamp calibration per setting
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


HOW_FIELDS = ("steps", "device", "kernels", "compile", "checkpoint_every", "snapshot_cap_gib")
"""Config fields that say how or how long a run trains, not what it computes: left out of fingerprints
(a run may be extended, moved to another device, or checkpoint at another interval)."""


def config_fingerprint(cfg: dict) -> str:
    """The fingerprint of a `fastgrok train` run's config (config.json or TrainConfig.to_dict()), less
    HOW_FIELDS and the fields added since at their old value (config.without_defaults)."""
    from fastgrok.config import without_defaults
    d = json.loads(json.dumps(cfg, default=str))           # tuples as saved: lists
    return fingerprint({k: v for k, v in without_defaults(d).items() if k not in HOW_FIELDS})


def spec_fingerprint(spec: dict) -> str:
    """The fingerprint of a grid run (its spec.json dict), which with the calibrations it records
    determines every result, less what only decides packing (engine), the step budgets (a run may be
    extended) and the description."""
    return fingerprint({k: v for k, v in spec.items() if k not in ("engine", "budget", "description", SEAL_KEY)})


def run_identity(run_dir: Path) -> str | None:
    """The fingerprint a run directory's results tables, plan and progress must carry: its spec's (a
    grid), else its config's (a train run); None when it has neither yet."""
    run_dir = Path(run_dir)
    if (run_dir / SPEC_JSON).exists():
        return spec_fingerprint(read_json(run_dir / SPEC_JSON))
    if (run_dir / CONFIG).exists():
        cfg = read_json(run_dir / CONFIG)
        return None if "experiment" in cfg else config_fingerprint(cfg)
    return None


def check_identity(path: Path, got: str | None, run_dir: Path | None = None) -> None:
    """A StateError unless `got` (a file's recorded fingerprint; None: written before they were recorded)
    is the run directory's (`run_identity` of run_dir, by default the file's directory)."""
    if got is None:
        return
    want = run_identity(Path(path).parent if run_dir is None else run_dir)
    if want is not None and got != want:
        raise state_error(path, "a file of another run (its fingerprint is not this run directory's "
                                "config.json / spec.json)")


SEAL_KEY = "fastgrok.sha256"
"""The key under which a state file carries its seal (a JSON key, a parquet metadata key, a zip comment)."""
SEAL_MARK = b"FGSUM1:"
_DIGITS = 64
SEAL_PLACEHOLDER = SEAL_MARK.decode() + "0" * _DIGITS
"""What a writer puts in the file; `seal_file` then writes the digest over the zeros."""


def _seal_digest(data: bytes, at: int) -> str:
    buf = bytearray(data)
    buf[at:at + _DIGITS] = b"0" * _DIGITS
    return hashlib.sha256(buf).hexdigest()


def seal_file(path: Path) -> str:
    """Write the digest of `path` (which holds SEAL_PLACEHOLDER) into it, in place; returns the sha256
    of the sealed file."""
    data = Path(path).read_bytes()
    at = data.rfind(SEAL_MARK) + len(SEAL_MARK)
    if at < len(SEAL_MARK) or data[at:at + _DIGITS] != b"0" * _DIGITS:
        raise AssertionError(f"{path}: no seal placeholder to fill")
    digest = _seal_digest(data, at).encode()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest)
    return hashlib.sha256(data[:at] + digest + data[at + _DIGITS:]).hexdigest()


def read_verified(path: Path) -> bytes:
    """The bytes of a state file whose seal matches (or that predates seals); a StateError naming it when
    its contents are not those it was written with. FileNotFoundError when it is missing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise state_error(path, "a directory, not a file") from None
    return verified(path, data)


def verified(path: Path, data: bytes) -> bytes:
    """data (the bytes of `path`) if its seal matches or it has none (`read_verified`), else a StateError."""
    at = data.rfind(SEAL_MARK)
    if at < 0 and SEAL_KEY.encode() not in data:
        return data                                     # written before seals
    at += len(SEAL_MARK)
    if at < len(SEAL_MARK) or at + _DIGITS > len(data) or _seal_digest(data, at).encode() != data[at:at + _DIGITS]:
        raise state_error(path, "damaged: its contents do not match the checksum it was written with (a "
                                "changed, lost or added byte)")
    return data


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


def atomic_write(path: Path, write, seal: bool = False) -> str | None:
    """Call write(tmp_path), then (seal: fill the seal placeholder the writer put in, `seal_file`) fsync
    and rename tmp over path; returns the sealed file's sha256 (None unsealed). A full disk raises
    DiskFull, the old version of path left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        digest = seal_file(tmp) if seal else None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())         # mkstemp makes 0600; results are shared like any file
        os.replace(tmp, path)
        return digest
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


LOCK_TRIES = 20
"""A writer tries the lock this many times, 10 ms apart, before it is refused: `lock_holder` (status)
takes it shared for an instant to ask whether anybody holds it."""


def _open_lock(path: Path, flags: int) -> int:
    """The lock file opened without following a link (a link in its place could point anywhere, and the
    writer truncates its lock file): a link there is a one-line StateError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~_umask())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(f"{path}: a symbolic link, not fastgrok's lock file; remove it (rm removes the link, "
                             "not what it points to)") from None
        raise


def _flock(fd: int, how: int, tries: int = 1) -> bool:
    """Take flock `how` without blocking, trying `tries` times 10 ms apart; whether it was taken."""
    for i in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if i + 1 < tries:
                time.sleep(0.01)
    return False


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
        fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
        if not _flock(fd, fcntl.LOCK_EX, tries=LOCK_TRIES):
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


def lock_holder(run_dir: Path) -> int | str | None:
    """The PID of the process holding run_dir's writer lock ("?" if it has not written it yet), or None
    when nobody holds it. Asked of the lock itself (a shared flock taken and dropped at once, which a
    starting writer waits out: LOCK_TRIES), not of the PID in the file, which may be anybody's."""
    try:
        fd = _open_lock(Path(run_dir) / LOCK, os.O_RDONLY)
    except (OSError, StateError):
        return None                         # no lock file (nobody ever wrote), or not one of ours
    try:
        if _flock(fd, fcntl.LOCK_SH):
            return None                     # nobody holds it (flock(LOCK_UN) comes with the close)
        holder = _holder(fd)
        return int(holder) if holder.isdigit() else holder
    finally:
        os.close(fd)


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


def write_json(path: Path, obj: dict) -> None:
    """A JSON object, sealed (its SEAL_KEY, which read_json drops again)."""
    if not isinstance(obj, dict) or SEAL_KEY in obj:
        raise TypeError("write_json takes a dict without the seal key")

    def w(tmp):
        with open(tmp, "w") as f:
            json.dump({**obj, SEAL_KEY: SEAL_PLACEHOLDER}, f, indent=2, sort_keys=True)
    atomic_write(path, w, seal=True)


def read_json(path: Path, kind: type | None = dict):
    """The JSON in path, its seal checked and dropped (a StateError if it is damaged, not valid JSON, or
    its top level is not a `kind`)."""
    data = read_verified(path)
    try:
        obj = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError
        raise state_error(path, f"not valid JSON, truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
    if kind is not None and not isinstance(obj, kind):
        raise state_error(path, f"holds a JSON {type(obj).__name__}, not the expected {kind.__name__}")
    if isinstance(obj, dict):
        obj.pop(SEAL_KEY, None)
    return obj


def read_progress(path: Path) -> dict:
    """progress.json: {"step": int, "done": bool, "steps": int (optional)} (a StateError otherwise)."""
    pr = read_json(path)
    ok = isinstance(pr.get("step"), int) and isinstance(pr.get("done", False), bool) \
        and isinstance(pr.get("steps", 0), int) \
        and all(isinstance(pr.get(k, 0), int) for k in ("models", "memorized", "grokked", "diverged")) \
        and (pr.get("checkpoint") is None or isinstance(pr["checkpoint"], int)) \
        and isinstance(pr.get("run", ""), str)
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


def write_parquet(path: Path, df: pd.DataFrame, fingerprint: str | None = None,
                  keys: tuple[str, ...] | None = None) -> None:
    """df to path, sealed; `fingerprint` (the run's: `run_identity`) goes into the file's metadata
    (`read_fingerprint`). The footer's key-value metadata is pandas' (which gives the frame back, dtypes
    included) and fastgrok's keys, without ARROW:schema (a second, base64 copy of the schema and of pandas'
    metadata: half a small table's bytes) unless a column needs it (not `_plain`: a categorical, a
    timestamp). keys: a small table's (a grid's models part): min/max statistics for those columns only and
    no dictionary pages (per column, they cost more than a few rows' values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), SEAL_KEY.encode(): SEAL_PLACEHOLDER.encode()}
    if fingerprint is not None:
        meta[FINGERPRINT_KEY] = fingerprint.encode()
    options = {} if keys is None else {"write_statistics": [k for k in keys if k in table.column_names],
                                       "use_dictionary": False}
    if all(_plain(f.type) for f in table.schema):
        _write_table(path, table, meta, store_schema=False, **options)
    else:                                   # a categorical, a timestamp: ARROW:schema gives it back
        table = table.replace_schema_metadata(meta)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, **options), seal=True)


def _plain(t) -> bool:
    """An arrow type that parquet's own types (and pandas' metadata) give back as it was."""
    import pyarrow as pa
    return any(f(t) for f in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                              pa.types.is_string, pa.types.is_large_string, pa.types.is_null))


def _write_table(path: Path, table, meta: dict, **options) -> None:
    """An arrow table to path (one row group), sealed, with `meta` as the footer's key-value metadata."""
    import pyarrow.parquet as pq
    table = table.replace_schema_metadata(None)

    def write(tmp):
        with pq.ParquetWriter(tmp, table.schema, **options) as w:
            w.write_table(table, row_group_size=max(1, table.num_rows))
            w.add_key_value_metadata(meta)
    atomic_write(path, write, seal=True)


def _parquet_error(path: Path, e: Exception) -> StateError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
    return state_error(path, f"not a readable parquet table, truncated or corrupt ({first})")


def read_parquet(path: Path, columns: list[str] | None = None, required: tuple[str, ...] = (),
                 run_dir: Path | None = None) -> pd.DataFrame:
    """A parquet table, its seal checked (a StateError if it is damaged, cannot be read, lacks a
    `required` column, or carries another run's fingerprint than run_dir's, when run_dir is given).
    columns: read only those of these the file has (and the required ones), not every column."""
    import pyarrow.parquet as pq
    data = read_verified(path)
    try:
        buf = _buffer(data)
        if run_dir is not None or columns is not None:
            schema = pq.read_schema(buf)
        if run_dir is not None:
            fp = (schema.metadata or {}).get(FINGERPRINT_KEY)
            check_identity(path, fp.decode() if fp is not None else None, run_dir)
        if columns is not None:
            columns = [c for c in dict.fromkeys([*required, *columns]) if c in schema.names]
        df = pd.read_parquet(buf, columns=columns)
    except StateError:
        raise
    except Exception as e:                              # pyarrow's errors for a torn or foreign file vary
        raise _parquet_error(path, e) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise state_error(path, f"lacks column(s) {', '.join(missing)}: not a fastgrok results table")
    return df


def _buffer(data: bytes):
    import pyarrow as pa
    return pa.BufferReader(data)


def _schema(path: Path):
    import pyarrow.parquet as pq
    data = read_verified(path)
    try:
        return pq.read_schema(_buffer(data))
    except Exception as e:                              # a torn or foreign file: pyarrow's errors vary
        raise _parquet_error(path, e) from None


def read_parquet_schema(path: Path) -> list[str]:
    """The column names of a parquet file (a StateError if it is damaged or unreadable)."""
    return list(_schema(path).names)


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint in a parquet file's metadata (None: written without one, by an older fastgrok)."""
    fp = (_schema(path).metadata or {}).get(FINGERPRINT_KEY)
    return fp.decode() if fp is not None else None


def _with_zip_comment(path: str, comment: bytes) -> None:
    """Give the zip archive at path (no comment yet) `comment` (zip's own field, after the end record)."""
    with open(path, "r+b") as f:
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
        if end[:4] != b"PK\x05\x06" or end[-2:] != b"\x00\x00":
            raise AssertionError(f"{path}: not a zip archive without a comment")
        f.seek(-2, os.SEEK_END)
        f.write(len(comment).to_bytes(2, "little") + comment)


ZIP_SEAL = f"{SEAL_KEY} {SEAL_PLACEHOLDER}".encode()
"""The zip comment a sealed archive (checkpoint, snapshot) is written with."""

CHECKPOINT_FORMAT = 2
"""Checkpoints hold tensors and plain types only (loaded with weights_only=True). Format 1 (no
"format" key) pickled trainer.Records and numpy arrays; `load_checkpoint` migrates it."""


def save_checkpoint(run_dir: Path, payload: dict) -> None:
    """torch.save of payload (tensors, str, int, float, bool, None, lists and dicts of them), sealed."""
    import torch                                        # here: the tables' readers (report) need no torch

    def w(tmp):
        torch.save({**payload, "format": CHECKPOINT_FORMAT}, tmp)
        _with_zip_comment(tmp, ZIP_SEAL)
    atomic_write(Path(run_dir) / CHECKPOINT, w, seal=True)


CHECKPOINT_KEYS = ("step", "state", "records", "done", "capture_shares")
RECORD_KEYS = ("steps", "evals", "t_mem", "t_grok", "diverged", "stop")


class _Format1Records:
    """Stands in, while a format-1 checkpoint loads, for the class it pickled (fastgrok.trainer.Records):
    torch's weights_only unpickler builds it as a plain object (its __dict__ set from the file), running
    nothing of the file's."""


def _format1_globals() -> list:
    """The only globals a format-1 checkpoint may name: its Records (as the stand-in) and numpy's array
    reconstruction (under numpy 1's and numpy 2's module names) for the dtypes the records use."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:                                  # numpy 1
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]   # numpy 2: dtype classes
    return [(_Format1Records, "fastgrok.trainer.Records"), np.ndarray, np.dtype, *dtypes,
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _migrate_format1(ck: dict) -> dict:
    """A format-1 payload in format 2's types: records as a dict of tensors, rows as a tensor."""
    import numpy as np
    import torch
    rec = ck["records"]
    if not isinstance(rec, _Format1Records):
        raise TypeError("records")
    r = {k: getattr(rec, k, None) for k in RECORD_KEYS}
    n = max((e.shape[1] for e in r["evals"]), default=0)
    M = len(r["t_mem"])
    ck["records"] = {
        "steps": torch.as_tensor(np.asarray(r["steps"], dtype=np.int64)),
        # evaluations of before a metric was added have fewer columns: NaN there (as Trainer.restore)
        "evals": torch.as_tensor(np.stack([np.pad(e.astype(np.float64), ((0, 0), (0, n - e.shape[1])),
                                                  constant_values=np.nan) for e in r["evals"]])
                                 if r["evals"] else np.zeros((0, M, n))),
        **{k: torch.as_tensor(np.asarray(r[k])) for k in ("t_mem", "t_grok", "diverged")},
        "stop": None if r["stop"] is None else torch.as_tensor(np.asarray(r["stop"]))}
    if "rows" in ck:
        ck["rows"] = torch.as_tensor(np.asarray(ck["rows"], dtype=np.int64))
    return ck


def load_checkpoint(run_dir: Path) -> dict | None:
    """The checkpoint's payload in format 2, None if there is none (a StateError if it is damaged,
    unreadable, would need any other type than tensors and plain ones, or is not one of fastgrok's: the
    caller checks its fingerprint). Nothing in the file is executed."""
    import io

    import torch
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = read_verified(path)
    try:
        with torch.serialization.safe_globals(_format1_globals()):
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:                              # torch.load's errors for a torn or foreign file vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        if isinstance(e, __import__("pickle").UnpicklingError) and "weights_only" in str(e):
            first = "it names Python objects other than tensors and plain types; nothing of it was run"
        raise state_error(path, f"not a readable checkpoint, truncated, corrupt or not fastgrok's ({first})") \
            from None
    if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS) or not isinstance(ck["state"], dict):
        raise state_error(path, "not a fastgrok checkpoint (its keys are not a run's)")
    if ck.get("format") is None:
        try:
            ck = _migrate_format1(ck)
        except (TypeError, ValueError, AttributeError, IndexError):
            raise state_error(path, "not a fastgrok checkpoint (its records are not a run's)") from None
    rec = ck["records"]
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), torch.Tensor) for k in RECORD_KEYS if k != "stop"):
        raise state_error(path, "not a fastgrok checkpoint (its records are not a run's)")
    return ck


# ---------------------------------------------------------------------------------------------
# A grid run's plan and calibration (written by grid.rundir; read by the grid and the analysis)
# ---------------------------------------------------------------------------------------------
def read_plan(run_dir: Path) -> dict:
    """plan.json, checked for the fields the grid reads and for belonging to the run (its "run"
    fingerprint, when it has one, is the spec's); a StateError naming it otherwise."""
    p = Path(run_dir) / PLAN
    plan = read_json(p)
    check_identity(p, plan.get("run") if isinstance(plan.get("run"), str) else None, run_dir)
    try:
        cell_ids = {c["cell"] for c in plan["cells"]}
        ok = (all(isinstance(c["seeds"], int) and isinstance(c.get("budget", 0), int) for c in plan["cells"])
              and all(isinstance(b["id"], str) and set(b["cells"]) <= cell_ids for b in plan["batches"])
              and isinstance(plan.get("calibrations", []), list))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise state_error(p, "not a grid plan (cells with seeds and budget, batches of cells)")
    return plan


def read_calibration(run_dir: Path) -> dict:
    """calibration.json: {key: {"w_c", "source", "n_grokked", "seeds"}} ({} if none yet)."""
    p = Path(run_dir) / CALIBRATION
    if not p.exists():
        return {}
    cal = read_json(p)
    for v in cal.values():
        if not (isinstance(v, dict) and isinstance(v.get("w_c"), (int, float)) and not isinstance(v["w_c"], bool)
                and math.isfinite(v["w_c"]) and v["w_c"] > 0 and isinstance(v.get("n_grokked"), int)
                and isinstance(v.get("seeds"), int) and isinstance(v.get("source"), str)):
            raise state_error(p, "not a calibration record (w_c > 0, source, n_grokked, seeds per setting)")
    return cal


def cells_complete(models: pd.DataFrame, plan: dict) -> set[int]:
    """The planned cells with all their seeds in `models` (a run's models.parquet, written from finished
    batches only): done, even where parts/ is gone (a run directory copied without it)."""
    have = models.groupby("cell")["seed"].nunique() if len(models) else pd.Series(dtype=int)
    return {c["cell"] for c in plan["cells"] if int(have.get(c["cell"], 0)) >= c["seeds"]}


# ---------------------------------------------------------------------------------------------
# A run's results as one dataset: a grid's parts (written once per finished batch), or a train run's
# tables. Readers query it (DuckDB, pyarrow); nothing concatenates every curve in pandas.
# ---------------------------------------------------------------------------------------------
PARTS = "parts"
KINDS = ("models", "curves")
CURVE_KEYS = ("model", "step")
"""A wide curves part: one row per (model, evaluation step), one float64 column per metric, null where the
metric was not recorded (logit_scale between its logit_every steps) and NaN where it was recorded as NaN."""


def part_path(run_dir: Path, batch_id: str, kind: str) -> Path:
    """Where a finished batch's part goes: DIR/parts/models/<id>.parquet, DIR/parts/curves/<id>.parquet."""
    return Path(run_dir) / PARTS / kind / f"{batch_id}.parquet"


def legacy_part_path(run_dir: Path, batch_id: str, kind: str) -> Path:
    """A part written before 2026-12-07 (issue 29): DIR/parts/<id>.<kind>.parquet, long-format curves."""
    return Path(run_dir) / PARTS / f"{batch_id}.{kind}.parquet"


def part_files(run_dir: Path, kind: str) -> dict[str, Path]:
    """batch id -> its `kind` part, the new layout's where a batch has both (a migration cut short)."""
    root = Path(run_dir) / PARTS
    out = {p.name.split(".")[0]: p for p in root.glob(f"*.{kind}.parquet")} if root.is_dir() else {}
    if (root / kind).is_dir():
        out.update({p.stem: p for p in (root / kind).glob("*.parquet") if not p.name.startswith(".")})
    return dict(sorted(out.items()))


def curves_to_wide(curves: pd.DataFrame):
    """A long curves table (model, step, metric, value; the trainer's) as a wide arrow table: a row per
    (model, step), sorted, a float64 column per metric in order of first appearance, null where absent.
    Lossless: `curves_to_long` gives the rows back (NaN values included)."""
    import numpy as np
    import pyarrow as pa
    model = curves["model"].to_numpy(dtype="int64")
    step = curves["step"].to_numpy(dtype="int64")
    metrics, mcode = np.unique(curves["metric"].to_numpy(dtype=object), return_inverse=True)
    first = np.full(len(metrics), len(curves))
    np.minimum.at(first, mcode, np.arange(len(curves)))
    order = np.argsort(first, kind="stable")                 # columns in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keys, row = np.unique(np.stack([model, step], 1), axis=0, return_inverse=True)     # sorted (model, step)
    row = row.reshape(-1)
    vals = np.full((len(keys), len(metrics)), np.nan)          # (R, K)
    have = np.zeros((len(keys), len(metrics)), bool)
    vals[row, rank[mcode]] = curves["value"].to_numpy(dtype="float64")
    have[row, rank[mcode]] = True
    cols = {"model": pa.array(keys[:, 0]), "step": pa.array(keys[:, 1])}
    for j, k in enumerate(order):
        cols[str(metrics[k])] = pa.array(vals[:, j], mask=~have[:, j])
    return pa.table(cols)


def curves_to_long(table) -> pd.DataFrame:
    """A wide curves table (arrow or a pandas frame read from it with its nulls) as the long format:
    model, step, metric, value, sorted by (model, step) and the metric's column, absent values left out."""
    import numpy as np
    import pyarrow as pa
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    names = [n for n in table.column_names if n not in CURVE_KEYS]
    R, K = table.num_rows, len(names)
    vals = np.empty((R, K))                                     # (R, K)
    have = np.empty((R, K), bool)
    for j, n in enumerate(names):
        col = table.column(n)
        vals[:, j] = col.to_numpy(zero_copy_only=False)
        have[:, j] = col.is_valid().to_numpy(zero_copy_only=False)
    r, k = np.nonzero(have)                                     # row-major: (model, step), then metric
    return pd.DataFrame({"model": table.column("model").to_numpy()[r], "step": table.column("step").to_numpy()[r],
                         "metric": pd.array(np.asarray(names, dtype=object)[k], dtype="str"),
                         "value": vals[r, k]})


CURVES_WRITE = {"compression": "zstd", "compression_level": 9, "use_dictionary": False,
                "column_encoding": {"model": "DELTA_BINARY_PACKED", "step": "DELTA_BINARY_PACKED"},
                "write_statistics": list(CURVE_KEYS), "store_schema": False}
"""How a wide curves part is written (benchmarks/curves_bytes.py measured each choice on real parts,
benchmarks/RESULTS.md): no ARROW:schema copy of the schema in the footer (int64 and float64 columns
need none), min/max statistics for the keys readers filter on only, the keys delta-encoded, the metrics
PLAIN (no dictionary pages: float curves rarely repeat), zstd level 9; one row group. Values are the
float64s given, bit for bit."""


def write_curves_part(path: Path, curves: pd.DataFrame, fingerprint: str | None) -> None:
    """A wide curves part (from the long table, or already a wide arrow table), sealed and fingerprinted
    (`write_parquet`'s seal and metadata; written as `CURVES_WRITE` says)."""
    table = curves if not isinstance(curves, pd.DataFrame) else curves_to_wide(curves)
    meta = {SEAL_KEY.encode(): SEAL_PLACEHOLDER.encode(), b"fastgrok.layout": b"wide"}
    if fingerprint is not None:
        meta[FINGERPRINT_KEY] = fingerprint.encode()
    _write_table(path, table, meta, **CURVES_WRITE)


def with_added_columns(models: pd.DataFrame) -> pd.DataFrame:
    """A models table written before a per-model setting existed, with that setting's column at the value
    such runs had (config.AXIS_ADDED_DEFAULTS), where a table written today has it (after the per-model
    setting before it in config.GRID_AXES): old and new tables read, and concatenate, alike."""
    axes = [a for a in GRID_AXES if a in PER_MODEL]
    for name in axes:
        if name in AXIS_ADDED_DEFAULTS and name not in models.columns:
            prev = [n for n in axes[:axes.index(name)] if n in models.columns]
            at = models.columns.get_loc(prev[-1]) + 1 if prev else len(models.columns)
            models.insert(at, name, AXIS_ADDED_DEFAULTS[name])
    return models


class Results:
    """A run directory's results as one dataset, every file checked once on opening (its seal, its
    fingerprint against the run's, its columns; a StateError naming the first bad one).

    A grid's are its parts (DIR/parts/models|curves/<batch>.parquet, and those of before 2026-12-07,
    DIR/parts/<batch>.models|curves.parquet); a grid copied without parts/ and a `fastgrok train` run have
    DIR/models.parquet and DIR/curves.parquet. `models()` is the models table (small: a row per model);
    curves are queried (`metric`, `cell_means`, `at_steps`) through DuckDB, never loaded whole, unless a
    caller asks for them (`curves()`).
    """

    MODEL_COLUMNS = ("model", "cell", "seed")

    def __init__(self, run_dir: Path, models_required: tuple[str, ...] = MODEL_COLUMNS, curves: bool = True,
                 model_columns: tuple[str, ...] | None = None):
        self.run_dir = d = Path(run_dir)
        models = part_files(d, "models")
        self.from_parts = bool(models)
        if self.from_parts:
            self.model_files = list(models.values())
            curves_of = part_files(d, "curves") if curves else {}
            self.curve_files = [curves_of[b] for b in models if b in curves_of]
        else:
            self.model_files = [d / MODELS] if (d / MODELS).exists() else []
            self.curve_files = [d / CURVES] if curves and (d / CURVES).exists() else []
        self.model_columns = model_columns          # None: every column; else these (those present) and the required
        self._frames = [self._read(p, models_required) for p in self.model_files]
        self.wide, self.long, self.columns = [], [], set()
        for p in self.curve_files:
            schema = self._check(p)
            names = set(schema.names)
            if (schema.metadata or {}).get(b"fastgrok.layout") == b"wide":
                self.wide.append(p)
                self.columns |= names - set(CURVE_KEYS)
            elif {"model", "step", "metric", "value"} <= names:
                self.long.append(p)
            else:
                missing = [c for c in ("model", "step", "metric", "value") if c not in names]
                raise state_error(p, f"lacks column(s) {', '.join(missing)}: not a fastgrok results table")
        self._con = None

    def _check(self, path: Path):
        """The schema of a results file whose seal and fingerprint are this run's (StateError otherwise)."""
        import pyarrow.parquet as pq
        data = read_verified(path)
        try:
            schema = pq.read_schema(_buffer(data))
        except Exception as e:                          # a torn or foreign file: pyarrow's errors vary
            raise _parquet_error(path, e) from None
        fp = (schema.metadata or {}).get(FINGERPRINT_KEY)
        check_identity(path, fp.decode() if fp is not None else None, self.run_dir)
        return schema

    def _read(self, path: Path, required) -> pd.DataFrame:
        df = read_parquet(path, columns=self.model_columns, required=required, run_dir=self.run_dir)
        return with_added_columns(df) if self.model_columns is None else df

    def models(self) -> pd.DataFrame:
        """Every model's row, sorted by model id (as the consolidated models.parquet was)."""
        if not self._frames:
            return pd.DataFrame(columns=list(self.MODEL_COLUMNS))
        df = self._frames[0] if len(self._frames) == 1 else pd.concat(self._frames, ignore_index=True)
        return df.sort_values("model", kind="stable").reset_index(drop=True)

    @property
    def empty(self) -> bool:
        return not self.curve_files

    @property
    def con(self):
        if self._con is None:
            import duckdb
            self._con = duckdb.connect()
            self._con.execute(f"SET threads TO {max(1, min(4, os.cpu_count() or 1))}")
        return self._con

    def metric(self, name: str) -> str:
        """SQL of (model, step, value) for one metric over every part (rows where it was recorded)."""
        q = []
        if self.wide and name in self.columns:
            files = ", ".join(_sql_str(p) for p in self.wide)
            q.append(f'SELECT model, step, "{name}" AS value FROM read_parquet([{files}], union_by_name=true) '
                     f'WHERE "{name}" IS NOT NULL')
        if self.long:
            files = ", ".join(_sql_str(p) for p in self.long)
            q.append(f"SELECT model, step, value FROM read_parquet([{files}]) WHERE metric = {_sql_str(name)}")
        return " UNION ALL ".join(q) if q else "SELECT 0::BIGINT AS model, 0::BIGINT AS step, 0.0 AS value LIMIT 0"

    def cell_means(self, cells: pd.DataFrame, metrics) -> pd.DataFrame:
        """Per (cell, metric, step): the mean over the cell's models (cells: model, cell) of the metric's
        values, NaN values left out (pandas' mean). Columns cell, metric, step, value."""
        con = self.con
        con.register("cells_of", cells[["model", "cell"]])
        out = []
        for m in metrics:
            df = con.execute(
                f"SELECT c.cell, {_sql_str(m)} AS metric, v.step, "
                f"fsum(v.value) FILTER (WHERE NOT isnan(v.value)) / count(*) FILTER (WHERE NOT isnan(v.value)) "
                f"AS value FROM ({self.metric(m)}) v JOIN cells_of c USING (model) "
                f"GROUP BY c.cell, v.step ORDER BY c.cell, v.step").df()
            out.append(df)
        con.unregister("cells_of")
        df = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["cell", "metric", "step", "value"])
        df["value"] = df["value"].astype("float64")
        return df.sort_values(["cell", "metric", "step"], kind="stable").reset_index(drop=True)

    def at_steps(self, metric: str, at: pd.DataFrame) -> pd.DataFrame:
        """The metric's value of each (model, step) in `at` that was recorded: columns model, step, value."""
        con = self.con
        con.register("at_steps", at[["model", "step"]].astype("int64"))
        df = con.execute(f"SELECT v.model, v.step, v.value FROM ({self.metric(metric)}) v "
                         f"JOIN at_steps a USING (model, step) ORDER BY v.model, v.step").df()
        con.unregister("at_steps")
        return df

    def curves(self) -> pd.DataFrame:
        """Every curve in the long format (model, step, metric, value), sorted by (model, step): the
        consolidated curves.parquet of before. Loads them all: for a small run or a caller that needs rows."""
        import pyarrow.parquet as pq
        frames = []
        for p in self.curve_files:
            if p in self.wide:
                frames.append(curves_to_long(pq.read_table(_buffer(read_verified(p)))))
            else:
                frames.append(read_parquet(p))
        if not frames:
            return pd.DataFrame({"model": [], "step": [], "metric": [], "value": []})
        df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        return df.sort_values(["model", "step"], kind="stable").reset_index(drop=True)


def _sql_str(x) -> str:
    return "'" + str(x).replace("'", "''") + "'"
