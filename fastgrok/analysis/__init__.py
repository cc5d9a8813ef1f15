"""Tables, figures and the report from a run directory's results.

statistics (the per-cell table, the paired bootstrap, forks), mediation, regressions, phases,
interventions, report, display, figures, terminal. Pandas, numpy and matplotlib only: no torch and no
training code; it reads run directories through config and store.
"""
from fastgrok import _submodules_on_first_use

__getattr__, __all__ = _submodules_on_first_use(__name__, __path__)
