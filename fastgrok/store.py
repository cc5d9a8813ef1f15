"""The run directory: config, checkpoints and results, every file written atomically.

    DIR/config.json        the run's TrainConfig (asdict)
    DIR/checkpoint.pt      resumable state (tensors + host-side records), replaced atomically
    DIR/models.parquet     one row per model
    DIR/curves.parquet     long format: model, step, metric, value
    DIR/progress.json      step reached, done flag

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the old one, so a kill at any instant leaves either the old or the new version, never a torn file.

Reading: a file that cannot be used (truncated, corrupt, of the wrong type, from another run) raises
StateError, one line naming the file and what to do about it (`advice`), never a traceback.
Checkpoints and grid parts carry the sha256 of the configuration they belong to (`fingerprint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from .config import ConfigError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODELS = "models.parquet"
CURVES = "curves.parquet"
PROGRESS = "progress.json"
SPEC_JSON = "spec.json"                 # a grid run (fastgrok run): its spec and plan
PLAN = "plan.json"


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


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then fsync and rename tmp over path."""
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        and isinstance(pr.get("steps", 0), int)
    if not ok:
        raise state_error(path, "not a progress record (step, done, steps)")
    return pr


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
