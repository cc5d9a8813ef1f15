"""fastgrok: a performance-first trainer for grokking research.

Command line: `fastgrok --help` (fastgrok/cli.py). From Python, the pieces a notebook uses:

    from fastgrok.config import TrainConfig
    from fastgrok.train.trainer import train, load_config          # one batch of models -> models/curves tables
    from fastgrok.grid.executors import run_experiment             # a grid (built-in experiment or SPEC.toml)
    from fastgrok.analysis.report import analyze_dir, write_report     # the study's tables, figures and report
    import fastgrok.kernels as K                              # tempered_cross_entropy, clamp_norm_

Submodules load on first use (`fastgrok.analysis.report`, ...), so `import fastgrok` stays light.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastgrok")           # pyproject.toml's, as installed
except PackageNotFoundError:                    # run from a source tree that was never installed
    __version__ = "unknown"

_SUBMODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))) + ("kernels",)
"""Every module of the package, found on disk (so none is left out), and the kernels subpackage."""


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES]
