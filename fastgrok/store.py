"""The run directory: config, checkpoints and results, every file written atomically.

    DIR/config.json        the run's TrainConfig (asdict)
    DIR/checkpoint.pt      resumable state (tensors + host-side records), replaced atomically
    DIR/models.parquet     one row per model
    DIR/curves.parquet     long format: model, step, metric, value
    DIR/progress.json      step reached, done flag

A file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
the old one, so a kill at any instant leaves either the old or the new version, never a torn file.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
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
