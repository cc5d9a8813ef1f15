"""`fastgrok` as a user runs it, a real process (shared by the command-line tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("fastgrok")
FASTGROK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fastgrok.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}   # tiny models: one thread is fastest


def fastgrok(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FASTGROK, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, **kw)


def checkpointed(run: Path) -> bool:
    """Whether a run has checkpointed: its progress.json (written at the start, at evaluations seconds apart,
    and last at each checkpoint, after checkpoint.pt and the results) names a checkpoint past step 0."""
    try:
        return (json.loads((run / "progress.json").read_text())["checkpoint"] or 0) > 0
    except (OSError, ValueError, KeyError):
        return False
