"""`fastgrok bench`: fastgrok's step and runs timed beside what a user would pick instead.

sections (the bench's sections and their rows), baseline (the study's eager per-cell loop),
ensemble_baseline (the torch.func ensemble), ensemble (fastgrok vs both). Imports core and train.
"""
from fastgrok import _submodules_on_first_use

__getattr__, __all__ = _submodules_on_first_use(__name__, __path__)
