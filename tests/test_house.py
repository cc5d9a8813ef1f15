"""Rules of the house (issue 28): what is declared once stays consistent with what it describes."""
from __future__ import annotations

import importlib
import pkgutil

import fastgrok
from fastgrok.cli import main
from fastgrok.status import train_status


def test_every_module_is_a_lazy_attribute_of_the_package():
    """fastgrok.<name> loads each module of the package (the list is found on disk, not written out)."""
    names = {m.name for m in pkgutil.iter_modules(fastgrok.__path__) if not m.name.startswith("_")}
    assert names and names | {"kernels"} == set(fastgrok._SUBMODULES)
    for name in sorted(names):
        assert getattr(fastgrok, name) is importlib.import_module(f"fastgrok.{name}")


def test_status_counts_the_cells_of_every_per_model_axis(tmp_path):
    """Two lrs x two taus are 4 cells (status used to count taus x clamp targets only: 2)."""
    out = tmp_path / "run"
    assert main(["train", "--p", "11", "--seeds", "2", "--d-embed", "8", "--hidden", "8", "--steps", "10",
                 "--lr", "1e-3", "3e-3", "--tau", "1", "2", "--no-compile", "--quiet", "--out", str(out)]) == 0
    assert "8 models (4 cells x 2 seeds)" in train_status(out)[0]


def test_the_analysis_side_loads_no_torch():
    """Reading and analysing results (store, status, analysis, report and their helpers) imports no torch:
    a notebook or a login node without torch can read a run directory."""
    import subprocess
    import sys
    mods = ["store", "status", "analysis", "report", "regressions", "phases", "mediation", "figures", "display",
            "terminal"]
    code = ("import sys\n" + "".join(f"import fastgrok.{m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
