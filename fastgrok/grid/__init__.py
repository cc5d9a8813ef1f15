"""A grid of cells (an experiment spec) -> batches of models -> one run directory.

experiments (specs and their axes), plan (cells, calibration, batches), jobs (one batch or calibration as
plain data, and running it), rundir (the run directory's parts and tables), executors (local, Ray),
workers, extend (a larger --max-steps), sizes (what a grid costs), watchdog, specs/ (the built-in
experiments). Imports train, core, config and store; never analysis.
"""
from fastgrok import _submodules_on_first_use

__getattr__, __all__ = _submodules_on_first_use(__name__, __path__)
