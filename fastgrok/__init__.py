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

def _submodules_on_first_use(package: str, path) -> tuple:
    """(__getattr__, names) for a package whose modules and subpackages, found on disk (so none is left
    out), load on first use: `fastgrok.analysis.report` works after a bare `import fastgrok`."""
    names = tuple(sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")))

    def __getattr__(name: str):
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__, names


__getattr__, _found = _submodules_on_first_use(__name__, __path__)
_SUBMODULES = _found + ("kernels",)
"""Every module and subpackage of the package, and the kernels subpackage (installed from kernels/)."""
_kernels_getattr = __getattr__


def __getattr__(name: str):         # noqa: F811 (the kernels subpackage lives outside this directory)
    return importlib.import_module(f"{__name__}.kernels") if name == "kernels" else _kernels_getattr(name)


__all__ = ["__version__", *_SUBMODULES]
