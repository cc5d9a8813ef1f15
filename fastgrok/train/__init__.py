"""One batch of models -> one run directory.

state (the training state built from a config, no files), trainer (the loop over a state: evaluation,
stopping, checkpoints, result tables, progress.json), snapshots, memory (will it fit), status and summary
of a train run, tracking (W&B / TensorBoard). Imports core, config, store and kernels; never grid or
analysis.
"""
from fastgrok import _submodules_on_first_use

__getattr__, __all__ = _submodules_on_first_use(__name__, __path__)
