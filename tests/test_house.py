"""Rules of the house (issue 28): what is declared once stays consistent with what it describes."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import fastgrok
import fastgrok.kernels
from fastgrok import analysis
from fastgrok.cli import main
from fastgrok.train.status import train_status


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
    mods = ["store", "train.status", *(f"analysis.{m.name}" for m in pkgutil.iter_modules(analysis.__path__))]
    code = ("import sys\n" + "".join(f"import fastgrok.{m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------
# Imports point one way: kernels <- config <- store <- core <- train <- grid | bench; analysis stands on
# config and store only; cli, export and the package's own files are the top and may import anything.
# ---------------------------------------------------------------------------------------------------------
LAYERS = {"kernels": 0, "config": 1, "store": 2, "core": 3, "train": 4, "grid": 5, "bench": 5}
ANALYSIS_MAY_IMPORT = {"config", "store", "analysis"}
TOP = {"cli", "export", "__init__", "__main__"}


def _unit(dotted: str) -> str:
    """fastgrok.train.trainer -> train; fastgrok.store -> store; fastgrok.kernels.reference -> kernels."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _fastgrok_imports(path: Path, module: str) -> set[str]:
    """Every fastgrok module `path` imports, at the top or inside a function (relative ones resolved)."""
    out = set()
    pkg = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fastgrok"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "fastgrok":
                out |= {f"{base}.{a.name}" for a in node.names}
            elif base.split(".")[0] == "fastgrok":
                out.add(base)
    return out


def _modules():
    root = Path(fastgrok.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        yield path, ".".join(("fastgrok", *rel.parts)).removesuffix(".__init__")
    kroot = Path(fastgrok.kernels.__file__).parent
    for path in sorted(kroot.glob("*.py")):
        yield path, "fastgrok.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")


def _bad_imports() -> list[str]:
    bad = []
    for path, module in _modules():
        unit = _unit(module) if module != "fastgrok" else "__init__"
        if unit in TOP:
            continue
        for target in _fastgrok_imports(path, module):
            t = _unit(target)
            if t == unit:
                continue
            if unit == "analysis":
                ok = t in ANALYSIS_MAY_IMPORT
            else:
                ok = t in LAYERS and LAYERS[t] < LAYERS[unit]
            if not ok:
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def test_imports_point_one_way():
    """No module imports upward (core -> train) or sideways (grid <-> bench, analysis -> training code)."""
    assert _bad_imports() == []


def test_the_import_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker sees imports inside functions and relative ones: a core module importing the trainer
    (the kind of leak the rule exists for) is reported."""
    path = tmp_path / "leak.py"
    path.write_text("def f():\n    from ..train import trainer\n    import fastgrok.grid.plan\n")
    assert _fastgrok_imports(path, "fastgrok.core.leak") == {"fastgrok.train", "fastgrok.grid.plan"}
    real = list(_modules())
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: [*real, (path, "fastgrok.core.leak")])
    assert _bad_imports() == ["fastgrok.core.leak imports fastgrok.grid.plan",
                              "fastgrok.core.leak imports fastgrok.train"]
